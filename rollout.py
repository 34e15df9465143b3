"""Rollouts: sample completions for a batch of prompts, with the log-prob of every sampled token.

The RL loop (../shared/spec/algorithms.md) needs, for each prompt, G sampled completions, a mask of which
completion tokens are real, and `logp_old`: the log-prob of each sampled token under the policy that sampled
it, taken from the logits divided by the sampling temperature. A `Rollout` holds all of that in the layout of
NOTES.md: `prompt_ids [B, P]` LEFT-padded, then `completion_ids [B, C]` RIGHT-padded, rows grouped so that
prompt i's samples are rows i*G .. i*G+G-1.

`HFSampler` samples with Hugging Face `model.generate` on the very module being trained. A vLLM sampler
comes later behind the same interface (`generate(...)` -> Rollout, `sync_weights(model)`); with vLLM the
weights live in a separate engine and `sync_weights` copies the trainer's weights into it after each update.

The sampler's log-probs must equal what `token_logprobs` (model.py) computes by teacher forcing on
`rollout.input_ids()` / `rollout.attention_mask()`: both use positions `cumsum(mask) - 1` (HF generate derives
positions from the attention mask the same way), so a mismatch would mean a real bug (stale weights, wrong
temperature, off-by-one) and tests/test_rollout.py checks it.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] long, left-padded with the pad id
    prompt_mask: torch.Tensor  # [B, P] long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, C] long, right-padded with the pad id
    completion_mask: torch.Tensor  # [B, C] float, 1 on generated tokens INCLUDING the EOS that ended them
    sampler_logprobs: torch.Tensor  # [B, C] float, log-prob of each sampled token at the sampling temperature
    completions: list  # B strings, decoded without pad/EOS (the <think>/<answer> tags stay)

    def input_ids(self) -> torch.Tensor:
        """Prompt then completion, as the trainer's forward pass sees them. [B, P + C]"""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1).long()

    def attention_mask(self) -> torch.Tensor:
        """1 on real prompt tokens and on generated tokens, 0 on padding. [B, P + C]"""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1).long()


def mask_through_first_eos(completion_ids, eos_id):
    """1 on every token up to and including the first EOS of each row, 0 after it. [B, C] -> [B, C] float"""
    is_eos = (completion_ids == eos_id).long()  # [B, C]
    eos_strictly_before = is_eos.cumsum(dim=1) - is_eos  # [B, C] number of EOS tokens before column j
    return (eos_strictly_before == 0).float()


def sampled_token_logprobs(step_logits, completion_ids, temperature):
    """log_softmax(logits / temperature) at each sampled token: T tensors [B, V] and [B, T] -> [B, T].

    Done one step at a time so that no float32 [B, T, V] tensor is built. Greedy decoding (temperature 0) is
    scored at temperature 1. Top-p truncation is NOT reflected: these are the log-probs of the full
    temperature-scaled distribution, the same quantity the trainer recomputes with token_logprobs.
    """
    scale = temperature if temperature > 0 else 1.0
    columns = []
    for step, logits in enumerate(step_logits):
        logp_all = torch.log_softmax(logits.float() / scale, dim=-1)  # [B, V]
        columns.append(logp_all.gather(-1, completion_ids[:, step : step + 1]))  # [B, 1]
    return torch.cat(columns, dim=1)  # [B, T]


@contextmanager
def generation_mode(model, generation_config):
    """Eval mode, KV cache on, and only `generation_config` visible to generate; all restored afterwards.

    `generate` fills every field left unset in the config it is given from `model.generation_config` (a
    checkpoint's file often sets top_k=20, top_p=0.8, repetition_penalty=1.05, ...). Swapping the model's own
    config out for ours while generating guarantees that none of those defaults change the distribution.
    """
    was_training = model.training
    used_cache = model.config.use_cache
    own_generation_config = model.generation_config
    model.eval()
    model.config.use_cache = True
    model.generation_config = generation_config
    try:
        yield
    finally:
        model.generation_config = own_generation_config
        model.config.use_cache = used_cache
        model.train(was_training)


class HFSampler:
    """Samples with `model.generate` on the trainer's own module (KV cache, left padding)."""

    def __init__(self, model, tokenizer):
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("HFSampler needs a tokenizer with an EOS and a pad token (use model.load_tokenizer)")
        self.model = model
        self.tokenizer = tokenizer

    def sync_weights(self, model):
        """Nothing to copy: HF generate runs on the trainer's module itself, so it always sees the new weights."""
        self.model = model

    def generation_config(self, temperature, top_p, max_new_tokens):
        """Every sampling knob set explicitly: temperature 0 means greedy; no top-k, no penalties."""
        sampling = {}  # greedy decoding takes the argmax and ignores these (setting them only earns a warning)
        if temperature > 0:
            sampling = dict(
                temperature=temperature,
                top_p=top_p,
                top_k=0,  # 0 = off; left unset, generate would apply its global default top_k=50
            )
        return GenerationConfig(
            do_sample=temperature > 0,
            **sampling,
            repetition_penalty=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            output_logits=True,  # the raw logits of every step, before temperature / top-p
            return_dict_in_generate=True,
        )

    @torch.no_grad()
    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256) -> Rollout:
        """Sample `n` completions for each prompt; rows i*n .. i*n+n-1 belong to prompts[i]."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("generate expects a non-empty list of prompt strings")
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"generate needs n >= 1 and max_new_tokens >= 1, got n={n}, "
                             f"max_new_tokens={max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate needs temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")

        # The prompt strings are already fully templated: add no BOS/EOS of the tokenizer's own.
        encoded = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left",
                                 add_special_tokens=False)
        device = self.model.device
        prompt_ids = encoded["input_ids"].repeat_interleave(n, dim=0).to(device)  # [B, P], B = len(prompts) * n
        prompt_mask = encoded["attention_mask"].repeat_interleave(n, dim=0).to(device)  # [B, P]

        config = self.generation_config(temperature, top_p, max_new_tokens)
        with generation_mode(self.model, config):
            output = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        completion_ids = output.sequences[:, prompt_ids.shape[1] :]  # [B, T]; finished rows are filled with pad
        logprobs = sampled_token_logprobs(output.logits, completion_ids, temperature)  # [B, T]
        mask = mask_through_first_eos(completion_ids, self.tokenizer.eos_token_id)  # [B, T]

        # generate already fills each finished row with the pad id and stops once every row has ended; trimming
        # to the longest row keeps C minimal whatever stopped it.
        longest = int(mask.sum(dim=1).max().item())
        mask = mask[:, :longest]  # [B, C]
        completion_ids = completion_ids[:, :longest]  # [B, C]
        logprobs = logprobs[:, :longest] * mask  # [B, C], 0 where masked
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollout(prompt_ids, prompt_mask, completion_ids, mask, logprobs, completions)
