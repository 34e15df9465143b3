"""bench/memory.py — how much GPU memory each rank needs to train Qwen2.5-7B with FSDP2 (train.py under torchrun).

    python bench/memory.py                                   # 4 GPUs, Logic-RL's 7B recipe
    python bench/memory.py --world 8 --micro-batch 2 --gen 2048

Nothing is downloaded and no GPU is needed: the model is built from its config (written out below) on the meta
device, where tensors have shapes but no storage, to count parameters exactly. Activation bytes per token are
MEASURED on one real decoder layer (bf16, on the CPU, with a saved-tensors hook that adds up what autograd keeps
for backward), then scaled to the sequence length: with flash / memory-efficient attention, which keeps O(L)
per sequence, every term grows linearly with the number of tokens.

Per-GPU memory, in the layout of model.shard_model (../shared/spec/algorithms.md, "FSDP2"):
- resident shards: fp32 master weights, fp32 gradients, AdamW's two fp32 moments (16 bytes/param / world),
  and the frozen reference in bf16 (2 bytes/param / world); with CPU offload all of these live in host RAM;
- the sampler's unsharded bf16 copy of the policy (2 bytes/param, every rank: train.make_sampler): the HF
  sampler's copy stays on the GPU all the time; vLLM's engine sleeps while the trainer works (its weights in host
  RAM, its KV cache freed: rollout.VLLMSampler), so its copy only counts while generating;
- while generating: the KV cache and one step's float32 logits (rows x vocab x 4 bytes: rollout.decode keeps only
  the last step's, as vLLM does);
- while training: activations of one micro-batch (all layers, or with checkpointing each layer's input plus
  one layer being recomputed), the LM head's chunk (model.token_logprobs), and FSDP's working set: the largest
  unit (embedding + LM head) all-gathered in bf16 twice (running + prefetched) plus its bf16 and fp32 gradient.
Peak = resident + max(generation, training), the sampler copy in the phases where it is on the GPU. Not counted:
the CUDA context and allocator fragmentation (we keep MARGIN_GB free for them), and vLLM's reservation: it takes
gpu_memory_utilization (0.3) of the GPU for its weights and KV cache, which must hold the bf16 copy.

Host RAM at start (`host_ram_at_start`): model.load_sharded builds every rank's model on the meta device and only
rank 0 reads the checkpoint (the fp32 policy, then the bf16 reference), sending it tensor by tensor; before, every
rank read the whole fp32 model into host RAM before sharding it.
"""
import argparse

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

GB = 1e9
MARGIN_GB = 4  # CUDA context, NCCL buffers, fragmentation
VLLM_UTILIZATION = 0.3  # rollout.VLLMSampler's gpu_memory_utilization default, which train.py keeps

# Qwen2.5-7B(-Instruct-1M): the values of its config.json that decide memory.
QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
                 max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)


def parameter_counts(config):
    """Parameters of the whole model, of one decoder layer, and of the embedding + LM head unit."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    head_unit = model.model.embed_tokens.weight.numel() + (0 if config.tie_word_embeddings else
                                                           model.lm_head.weight.numel())
    return total, layer, head_unit


def activation_bytes_per_token(config, tokens=32):
    """Bytes autograd keeps per token for backward in ONE decoder layer, in bf16, weights excluded (measured)."""
    with torch.device("meta"):
        layer = Qwen2DecoderLayer(config, layer_idx=0).to(torch.bfloat16)
    layer = layer.to_empty(device="cpu")  # real (uninitialised) storage, bf16 from the start
    for p in layer.parameters():
        p.data.zero_()
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept = {}  # storage -> bytes (several saved views of one tensor count once)

    def remember(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    hidden = torch.zeros(1, tokens, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)  # [1, L, H]
    positions = torch.arange(tokens)[None]  # [1, L]
    cos_sin = Qwen2RotaryEmbedding(config)(hidden, positions)
    with torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor):
        layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
    return sum(kept.values()) / tokens


def plan(config, world, micro_batch, prompt, gen, rollout_rows, chunk, per_token_layer):
    """Per-GPU gigabytes of each component, for these sizes."""
    n, n_layer, n_head_unit = parameter_counts(config)
    layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    kv_dim = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    train_tokens = micro_batch * (prompt + gen)  # one micro-batch, padded to the longest row
    return {
        "params fp32 shard": 4 * n / world / GB,
        "grads fp32 shard": 4 * n / world / GB,
        "AdamW moments fp32 shard": 8 * n / world / GB,
        "reference bf16 shard": 2 * n / world / GB,
        "sampler copy bf16 (full)": 2 * n / GB,
        "KV cache": rollout_rows * (prompt + gen) * layers * 2 * kv_dim * 2 / GB,
        "sampler logits fp32 (one step)": rollout_rows * vocab * 4 / GB,
        "activations, no checkpointing": train_tokens * (layers * per_token_layer + 2 * hidden) / GB,
        "activations, checkpointing": train_tokens * (layers * 2 * hidden + per_token_layer + 2 * hidden) / GB,
        "LM head chunk (~5 fp32 [chunk, V])": 5 * 4 * chunk * vocab / GB,
        "FSDP working set": n_head_unit * (2 * 2 + 2 + 4) / GB,
        "_params": n, "_layer": n_layer, "_head_unit": n_head_unit,
    }


def peak(parts, offload, checkpointing, sampler):
    """Peak GB on one GPU: resident + the larger of the generation and training phases; the sampler's copy is on
    the GPU in both phases for "hf", only while generating for "vllm" (asleep while the trainer works)."""
    resident = 0.0 if offload else sum(parts[k] for k in ("params fp32 shard", "grads fp32 shard",
                                                          "AdamW moments fp32 shard", "reference bf16 shard"))
    copy = parts["sampler copy bf16 (full)"]
    generation = copy + parts["KV cache"] + parts["sampler logits fp32 (one step)"]
    activations = parts["activations, checkpointing" if checkpointing else "activations, no checkpointing"]
    training = activations + parts["LM head chunk (~5 fp32 [chunk, V])"] + parts["FSDP working set"]
    return resident + max(generation, training + (copy if sampler == "hf" else 0.0))


def host_ram_at_start(n_params, ranks_per_node):
    """GB of host RAM for the full weights while the policy loads, per node: (every rank reads it, rank 0 only)."""
    full_fp32 = 4 * n_params / GB
    return ranks_per_node * full_fp32, full_fp32


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=4, help="GPUs (torchrun ranks) in all")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward (MICRO_BATCH)")
    parser.add_argument("--prompt", type=int, default=400, help="prompt tokens (padded)")
    parser.add_argument("--gen", type=int, default=4096, help="generated tokens (MAX_NEW_TOKENS)")
    parser.add_argument("--rollout-rows", type=int, default=None,
                        help="sequences each rank generates at once (default PROMPTS_PER_STEP*GROUP_SIZE/world "
                             "= 64/world)")
    parser.add_argument("--chunk", type=int, default=1024, help="token_logprobs chunk_size")
    args = parser.parse_args()
    rows = args.rollout_rows or max(1, 64 // args.world)
    config = Qwen2Config(**QWEN25_7B, attn_implementation="sdpa")  # on CPU: a flash kernel, O(L) kept

    per_token_layer = activation_bytes_per_token(config)
    parts = plan(config, args.world, args.micro_batch, args.prompt, args.gen, rows, args.chunk, per_token_layer)
    print(f"Qwen2.5-7B: {parts['_params'] / 1e9:.2f}B parameters ({parts['_layer'] / 1e6:.0f}M per decoder layer, "
          f"{parts['_head_unit'] / 1e9:.2f}B in the embedding + LM head unit); activations kept for backward: "
          f"{per_token_layer / 1e3:.0f} kB per token per layer (measured, bf16)")
    print(f"world {args.world}, micro-batch {args.micro_batch} x ({args.prompt} + {args.gen}) tokens, "
          f"{rows} rollout rows per rank, LM-head chunk {args.chunk}\n")
    for name, value in parts.items():
        if not name.startswith("_"):
            print(f"  {name:<38} {value:8.1f} GB")
    print(f"\npeak per GPU (GB; + {MARGIN_GB} GB margin must fit):")
    print(f"  {'CPU offload':<12} {'checkpointing':<14} {'HF sampler':>11} {'vLLM (sleeps)':>14}   fits 80 / 40 GB")
    for offload in (False, True):
        for checkpointing in (False, True):
            hf, vllm = (peak(parts, offload, checkpointing, sampler) for sampler in ("hf", "vllm"))
            print(f"  {str(offload):<12} {str(checkpointing):<14} {hf:11.1f} {vllm:14.1f}   "
                  f"{verdict(hf, vllm, 80)} / {verdict(hf, vllm, 40)}")
    engine = parts["sampler copy bf16 (full)"] + parts["KV cache"]
    print(f"vLLM reserves gpu_memory_utilization ({VLLM_UTILIZATION}) of the GPU, {VLLM_UTILIZATION * 80:.0f} / "
          f"{VLLM_UTILIZATION * 40:.0f} GB on 80 / 40 GB, for its copy and KV cache, which need {engine:.1f} GB")
    offloaded = 18 * parts["_params"] / args.world / GB  # 16 bytes/param of policy state + 2 of reference
    print(f"\nwith CPU offload each rank keeps {offloaded:.1f} GB in host RAM ({offloaded * args.world:.0f} GB per "
          f"{args.world} ranks), and AdamW steps on the CPU")
    every_rank, rank0 = host_ram_at_start(parts["_params"], args.world)
    print(f"host RAM for the full weights at start, {args.world} ranks on a node: {rank0:.1f} GB (rank 0 reads the "
          f"fp32 policy, model.load_sharded); {every_rank:.0f} GB when every rank read it")


def verdict(hf, vllm, gpu_gb):
    """Does the peak fit a GPU of gpu_gb: with either sampler, only with vLLM (asleep while training), or no."""
    if hf + MARGIN_GB <= gpu_gb:
        return "yes"
    return "vLLM only" if vllm + MARGIN_GB <= gpu_gb else "no"


if __name__ == "__main__":
    main()
