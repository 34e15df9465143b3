"""Programs that tests/test_fsdp.py runs under torchrun (2 processes, gloo on CPU).

    torchrun --nproc_per_node 2 tests/fsdp_worker.py step MODEL_DIR OUT_JSON
    torchrun --nproc_per_node 2 tests/fsdp_worker.py stop-after RL_STEP --NAME=value ...   (train.py's arguments)
    python tests/fsdp_worker.py stop-after oreo:1 --NAME=value ...                         (another stage, 1 process)

"step": one training step under FSDP2 vs the same global batch in one process. Every rank builds the same
global batch of 4 sequences and first takes, alone and unsharded, one AdamW step on all of it: the reference.
Then, for each variant (plain, CPU offload, activation checkpointing, bf16 mixed precision), it loads a fresh
sharded policy and a sharded frozen reference, takes its own 2 sequences in 2 micro-batches (loss divided by
whole-batch token counts, as train.py does), clips the global gradient norm and steps. Rank 0 writes, per
variant, the largest differences from the single-process run to OUT_JSON.

"stop-after": train.py, killed (os._exit, no clean-up) right after the trainer state of RL step RL_STEP (or
STAGE:STEP) is saved, as a crash or a pre-empted job would stop it.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
import model as M  # noqa: E402

VARIANTS = {
    "plain": dict(),
    "cpu_offload": dict(cpu_offload=True),
    "checkpointing": dict(gradient_checkpointing=True),
    "mixed_precision": dict(mixed_precision=True),
}
BATCH, N_PROMPT, N_COMPLETION = 4, 5, 7
LR, MAX_GRAD_NORM, TEMPERATURE, CHUNK = 1e-3, 0.05, 0.7, 5  # the clip is active; chunks split the LM head calls


def global_batch(vocab_size):
    """Left-padded prompts and right-padded completions, with advantages; the same on every rank."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (BATCH, N_PROMPT + N_COMPLETION), generator=g)
    prompt_len = torch.tensor([5, 3, 4, 2])
    completion_len = torch.tensor([7, 2, 5, 4])
    cols = torch.arange(N_PROMPT + N_COMPLETION)
    prompt_mask = (cols[None, :N_PROMPT] >= N_PROMPT - prompt_len[:, None]).long()  # [B, P]
    completion_mask = (cols[None, :N_COMPLETION] < completion_len[:, None]).long()  # [B, C]
    attention = torch.cat([prompt_mask, completion_mask], 1)  # [B, L]
    advantages = torch.randn(BATCH, N_COMPLETION, generator=g)  # [B, C]
    return ids * attention, attention, completion_mask.float(), advantages


def loss_of(policy, reference, ids, attention, mask, advantages, n_tokens):
    """Policy-gradient loss with an entropy bonus and a k3 KL to the reference; divided by WHOLE-batch tokens."""
    logp, entropy = M.token_logprobs(policy, ids, attention, N_PROMPT, TEMPERATURE, with_entropy=True,
                                     chunk_size=CHUNK)  # [b, C]
    with torch.no_grad():
        logp_ref = M.token_logprobs(reference, ids, attention, N_PROMPT, TEMPERATURE, chunk_size=CHUNK)
    per_token = -advantages * logp - 0.01 * entropy + 0.1 * grpo.kl_estimate(logp, logp_ref, "k3")
    return (per_token * mask).sum() / n_tokens


def single_process_step(model_dir, batch):
    policy = M.load_model(model_dir, "cpu", dtype=torch.float32)
    reference = M.load_reference(model_dir, "cpu", dtype=torch.float32)
    ids, attention, mask, advantages = batch
    loss_of(policy, reference, ids, attention, mask, advantages, mask.sum()).backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM).item()
    torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.01).step()
    return policy, grads, norm


def sharded_step(model_dir, batch, rank, world, gradient_checkpointing=False, **shard_options):
    policy = M.load_model(model_dir, "cpu", dtype=torch.float32, gradient_checkpointing=gradient_checkpointing)
    M.shard_model(policy, **shard_options)
    reference = M.load_sharded(model_dir, "cpu", dtype=torch.float32, frozen=True,
                               cpu_offload=shard_options.get("cpu_offload", False))
    forward_calls = []  # activation checkpointing runs each layer's forward again in backward
    policy.model.layers[0].register_forward_pre_hook(lambda *_: forward_calls.append(1))
    ids, attention, mask, advantages = batch
    n_tokens = mask.sum()  # whole-batch count (train.py all-reduces it; here every rank holds the global batch)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for row in range(share.start, share.stop):  # micro-batches of one sequence: gradients accumulate
        rows = slice(row, row + 1)
        loss_of(policy, reference, ids[rows], attention[rows], mask[rows], advantages[rows], n_tokens).backward()
    grads = {name: p.grad.full_tensor() for name, p in policy.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM).full_tensor().item()
    torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.01).step()
    return policy, grads, norm, len(forward_calls)


def step(model_dir, out_json):
    rank, world = M.init_distributed()
    torch.manual_seed(0)
    vocab_size = M.load_tokenizer(model_dir).vocab_size
    batch = global_batch(vocab_size)
    single, single_grads, single_norm = single_process_step(model_dir, batch)
    expected = dict(single.state_dict())
    results = {}
    for variant, options in VARIANTS.items():
        sharded, grads, norm, forward_calls = sharded_step(model_dir, batch, rank, world, **options)
        updated = dict(M.iter_full_state(sharded))  # every rank gathers
        sampler_copy = M.load_reference(model_dir, "cpu", dtype=torch.float32)
        M.copy_full_weights(sharded, sampler_copy)
        ids, attention = batch[0], batch[1]
        with torch.no_grad():
            logp_copy = M.token_logprobs(sampler_copy, ids, attention, N_PROMPT, TEMPERATURE)
            logp_sharded = M.token_logprobs(sharded, ids, attention, N_PROMPT, TEMPERATURE)
        results[variant] = {
            "max_param_diff": max((updated[k] - expected[k]).abs().max().item() for k in expected),
            "max_update": max((expected[k] - v).abs().max().item()
                              for k, v in M.load_model(model_dir, "cpu", torch.float32).state_dict().items()),
            "max_grad_rel_diff": max(((grads[k] - g).norm() / g.norm().clamp(min=1e-12)).item()
                                     for k, g in single_grads.items()),
            "grad_norm": norm, "single_grad_norm": single_norm,
            "sampler_copy_logprob_diff": (logp_copy - logp_sharded).abs().max().item(),
            "layer_forward_calls": forward_calls,
        }
    if rank == 0:
        Path(out_json).write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


def stop_after(stage_step, *train_args):
    import train

    save_trainer_state = train.save_trainer_state
    stop_stage, _, stop_step = stage_step.rpartition(":")

    def save_then_die(out_dir, stage, step, *args, **kwargs):
        save_trainer_state(out_dir, stage, step, *args, **kwargs)
        if stage == (stop_stage or "rl") and step == int(stop_step):
            os._exit(3)

    train.save_trainer_state = save_then_die
    sys.argv = ["train.py", *train_args]
    train.main()


if __name__ == "__main__":
    {"step": step, "stop-after": stop_after}[sys.argv[1]](*sys.argv[2:])
