"""Programs that tests/test_fsdp.py runs under torchrun (2 processes, gloo on CPU).

    torchrun --nproc_per_node 2 tests/fsdp_worker.py step MODEL_DIR UNTIED_MODEL_DIR OUT_JSON
    torchrun --nproc_per_node 2 tests/fsdp_worker.py stop-after RL_STEP --NAME=value ...   (train.py's arguments)
    python tests/fsdp_worker.py stop-after oreo:1 --NAME=value ...                         (another stage, 1 process)

"step": one training step under FSDP2 vs the same global batch in one process. Every rank builds the same
global batch of 4 sequences and first takes, alone and unsharded, one AdamW step on all of it: the reference.
Then, for each variant (plain, CPU offload, activation checkpointing, bf16 mixed precision), it loads a fresh
sharded policy and a sharded frozen reference, takes its own 2 sequences in 2 micro-batches (loss divided by
whole-batch token counts, as train.py does), clips the global gradient norm and steps with model.clip_and_step
(whose returned norm is what train.py logs as grad_norm). Rank 0 writes, per variant, the largest differences from
the single-process run to OUT_JSON. The untied model (separate LM head, as Qwen2.5-7B) runs the plain variant.
Also measured, for both models: how model.load_sharded loads (only rank 0 reads the checkpoint; the shards then
hold its weights) and how often the embedding + LM-head unit is all-gathered during model.token_logprobs (counted
by wrapping FSDP2's internal foreach_all_gather, torch 2.13).

"stop-after": train.py, killed (os._exit, no clean-up) right after the trainer state of RL step RL_STEP (or
STAGE:STEP) is saved, as a crash or a pre-empted job would stop it.
"""
import collections
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
import model as M  # noqa: E402
import rollout as R  # noqa: E402

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
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.01)
    norm = M.clip_and_step(policy, optimizer, None, MAX_GRAD_NORM)  # what train.py logs, on every rank
    return policy, grads, norm, len(forward_calls)


def compare_with_one_process(model_dir, batch, rank, world, single, options):
    """One sharded step in the layout `options`, measured against the single-process step `single`."""
    single_model, single_grads, single_norm = single
    expected = dict(single_model.state_dict())
    sharded, grads, norm, forward_calls = sharded_step(model_dir, batch, rank, world, **options)
    updated = dict(M.iter_full_state(sharded))  # every rank gathers
    sampler = R.HFSampler(M.load_reference(model_dir, "cpu", dtype=torch.float32), M.load_tokenizer(model_dir))
    sampler.sync_weights(sharded)  # what train.py does after each update
    sampler_copy = sampler.model
    ids, attention = batch[0], batch[1]
    with torch.no_grad():
        logp_copy = M.token_logprobs(sampler_copy, ids, attention, N_PROMPT, TEMPERATURE)
        logp_sharded = M.token_logprobs(sharded, ids, attention, N_PROMPT, TEMPERATURE)
    norms = [None] * world
    torch.distributed.all_gather_object(norms, norm)
    return {
        "max_param_diff": max((updated[k] - expected[k]).abs().max().item() for k in expected),
        "max_update": max((expected[k] - v).abs().max().item()
                          for k, v in M.load_model(model_dir, "cpu", torch.float32).state_dict().items()),
        "max_grad_rel_diff": max(((grads[k] - g).norm() / g.norm().clamp(min=1e-12)).item()
                                 for k, g in single_grads.items()),
        "grad_norm_of_each_rank": norms, "single_grad_norm": single_norm,
        "sampler_copy_logprob_diff": (logp_copy - logp_sharded).abs().max().item(),
        "sampler_copy_is_unsharded": not any(isinstance(p, DTensor) for p in sampler_copy.parameters()),
        "layer_forward_calls": forward_calls,
        "tied": sharded.lm_head.weight is sharded.model.embed_tokens.weight,
    }


def check_load_sharded(model_dir):
    """Who reads the checkpoint in model.load_sharded, and whether the shards then hold its weights (fp32 policy,
    bf16 frozen reference) and compute its log-probs (the rotary buffers, which no checkpoint holds, included)."""
    reads = []
    load_model = M.load_model
    M.load_model = lambda *args, **kwargs: reads.append(1) or load_model(*args, **kwargs)
    try:
        policy = M.load_sharded(model_dir, "cpu", dtype=torch.float32)
        reference = M.load_sharded(model_dir, "cpu", dtype=torch.bfloat16, frozen=True)
    finally:
        M.load_model = load_model
    plain = M.load_model(model_dir, "cpu", dtype=torch.float32)
    ids, attention, _, _ = global_batch(plain.config.vocab_size)
    with torch.no_grad():
        logp_gap = (M.token_logprobs(policy, ids, attention, N_PROMPT, TEMPERATURE, chunk_size=CHUNK)
                    - M.token_logprobs(plain, ids, attention, N_PROMPT, TEMPERATURE)).abs().max().item()
    reference_state = dict(M.iter_full_state(reference))
    reads_per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reads_per_rank, len(reads))
    return {
        "checkpoint_reads_per_rank": reads_per_rank,
        "max_weight_diff": max((full - plain.state_dict()[name]).abs().max().item()
                               for name, full in M.iter_full_state(policy)),
        "reference_bf16_exact": all(torch.equal(reference_state[name], value.to(torch.bfloat16))
                                    for name, value in plain.state_dict().items()),
        "reference_frozen": not any(p.requires_grad for p in reference.parameters()) and not reference.training,
        "logprob_gap": logp_gap,
        "tied": policy.lm_head.weight is policy.model.embed_tokens.weight,
    }


def count_head_unit_all_gathers(model_dir):
    """All-gathers of the embedding + LM-head unit during model.token_logprobs (CHUNK rows per LM-head chunk) on a
    freshly sharded policy: a forward with gradient and its backward, then two no-grad calls; and whether the
    unit is released (resharded) after them."""
    policy = M.load_sharded(model_dir, "cpu", dtype=torch.float32)
    counts = collections.Counter()
    gather = _fsdp_param_group.foreach_all_gather

    def counting_gather(fsdp_params, *args, **kwargs):
        if any(p._param_fqn.endswith("embed_tokens.weight") for p in fsdp_params):
            counts["head_unit"] += 1
        return gather(fsdp_params, *args, **kwargs)

    head_group = policy.model.embed_tokens._get_fsdp_state()._fsdp_param_groups[0]
    ids, attention, mask, _ = global_batch(policy.config.vocab_size)
    result = {"chunks": -(-BATCH * N_COMPLETION // CHUNK), "no_grad": []}
    _fsdp_param_group.foreach_all_gather = counting_gather
    try:
        logp = M.token_logprobs(policy, ids, attention, N_PROMPT, TEMPERATURE, chunk_size=CHUNK)
        result["forward_with_grad"] = counts.pop("head_unit", 0)
        (logp * mask).sum().backward()
        result["backward"] = counts.pop("head_unit", 0)
        for _ in range(2):
            with torch.no_grad():
                M.token_logprobs(policy, ids, attention, N_PROMPT, TEMPERATURE, chunk_size=CHUNK)
            result["no_grad"].append(counts.pop("head_unit", 0))
        result["released_after_no_grad"] = not head_group.is_unsharded
    finally:
        _fsdp_param_group.foreach_all_gather = gather
    return result


def step(model_dir, untied_dir, out_json):
    rank, world = M.init_distributed()
    torch.manual_seed(0)
    results = {}
    for path, variants, suffix in ((model_dir, VARIANTS, ""), (untied_dir, {"untied": VARIANTS["plain"]}, "_untied")):
        batch = global_batch(M.load_tokenizer(path).vocab_size)
        single = single_process_step(path, batch)
        for variant, options in variants.items():
            results[variant] = compare_with_one_process(path, batch, rank, world, single, options)
        results["load_sharded" + suffix] = check_load_sharded(path)
        results["head_unit_all_gathers" + suffix] = count_head_unit_all_gathers(path)
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
