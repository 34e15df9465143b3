"""bench/gpu_check.py — the GPU check (issue 13), prepared for the day a GPU is lent: one script, one table.

    python bench/gpu_check.py                        # <= 8 minutes on one GPU; nothing is downloaded
    python bench/gpu_check.py --work /tmp/gpu_check  # keep the built models and the run there (default: a temp dir)

Steps, in order. Steps 1-3 also run on a CPU; without a CUDA device the script stops before step 4 and says so.
  1 environment   torch / transformers / vLLM / flash-attn versions and the device
  2 models        the tiny warm-up checkpoint (assets/tiny-warmup), and "small": a Qwen2.5-0.5B-shaped Qwen2 (hidden
                  896, 24 layers, 14 heads / 2 KV heads, FFN 4864, vocabulary 151,936) with random weights, UNTIED
                  like Qwen2.5-7B (0.5B itself ties them; 630M parameters then), built from a config with a
                  151,936-word tokenizer so that every id the random model samples decodes
  3 memory plan   bench/memory.py's plan for "small" at step 6's sizes on one GPU: the trainer's part (fp32
                  weights, gradients and AdamW moments, bf16 reference, checkpointed activations, LM-head chunk)
  4 bf16 on CUDA  CUDA only from here. Both models load in bf16, with flash_attention_2 when flash-attn imports
                  (else sdpa), and give finite log-probs; the tiny model's bf16 log-probs, and those of its fp32
                  weights under model.bf16_compute (train.py's single-process policy), agree with fp64 ones
  5 vLLM engine   a VLLMSampler on the tiny model (sleep mode on, as on every GPU): generate leaves it asleep
                  and GPU memory freed; one big SGD step leaves it stale (gap > STALE); sync_weights wakes it and
                  the gap is back under SYNCED; a second generate after the wake works
  6 RL on GPU     train.py, in this process, 3 REINFORCE++ steps on "small" with SAMPLER=vllm and the GPU
                  defaults otherwise (lr 4e-7, token-mean, checkpointing): sampler_logprob_diff < SYNCED after
                  every sync, the fp32 weights moved, the trainer's peak GPU memory (engine asleep) within
                  PLAN_SLACK of step 3's plan; the sampled tokens/s
It prints one table and exits with
  0  every step passed;
  1  a step failed (the table says which and why);
  3  no CUDA device: steps 1-3 passed and the script stopped before step 4. Not a pass: nothing GPU-specific ran.
Record what it printed in NOTES.md ("GPU check").
"""
import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/, which holds a rollout.py of its own
import kk_data  # noqa: E402
import model as kk_model  # noqa: E402
import rollout  # noqa: E402
from bench import memory  # noqa: E402

EXIT_FAILED, EXIT_NO_CUDA = 1, 3
TINY = ROOT / "assets" / "tiny-warmup"
SMALL = dict(hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864, max_positions=2048, tie_embeddings=False)
SMALL_VOCAB = 151936  # Qwen2.5's
SYNCED = 0.05  # mean |sampler - trainer| log-prob gap allowed after a sync: bf16 noise (NOTES: order 1e-2)
STALE = 0.1  # a stale engine after the big step of step 5 (CPU fp32, tests/test_vllm.py: 0.16 to 6)
PLAN_SLACK = 1.25  # measured trainer peak / planned, at most
RL = dict(PROMPTS_PER_STEP=8, GROUP_SIZE=8, MAX_NEW_TOKENS=256, MICRO_BATCH=4, STEPS=3)  # step 6
PROMPT_TOKENS = 200  # planned prompt length of 3-person "tiny"-template prompts (they are ~130 word tokens)


class Stop(Exception):
    """Raised by a step that cannot run here (no CUDA): the check stops without failing the steps before."""


def check(ok, message):
    if not ok:
        raise AssertionError(message)


# ---- the steps: each returns a one-line summary of what it saw, or raises ----------------------------------

def step_environment(ctx):
    try:
        import vllm
        vllm_version = vllm.__version__
    except Exception as error:  # noqa: BLE001  (a CUDA build mismatch raises more than ImportError)
        vllm_version = f"none ({type(error).__name__})"
    try:
        import flash_attn
        ctx["flash_attn"] = flash_attn.__version__
    except ImportError:
        ctx["flash_attn"] = None
    import transformers
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"no CUDA device ({platform.machine()})"
    ctx["vllm"] = vllm_version
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm_version}, "
            f"flash-attn {ctx['flash_attn']}; {device}")


def step_models(ctx):
    check((TINY / "config.json").is_file(), f"{TINY} is missing (the committed tiny warm-up checkpoint)")
    small = ctx["work"] / "small"
    if not (small / "config.json").is_file():
        texts = kk_data.corpus_text()
        base = len(kk_model.build_word_tokenizer(texts))
        filler = " ".join(f"qq{i}" for i in range(SMALL_VOCAB - base))  # words no puzzle uses
        kk_model.build_tiny(small, texts + [filler], seed=0, **SMALL)
    config = json.loads((small / "config.json").read_text())
    check(config["vocab_size"] == SMALL_VOCAB, f"small: vocabulary {config['vocab_size']}, not {SMALL_VOCAB}")
    ctx["small"] = small
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(small))
    ctx["small_params"] = sum(p.numel() for p in meta.parameters())
    return f"tiny: {TINY.relative_to(ROOT)}; small: {ctx['small_params'] / 1e6:.0f}M parameters, untied, in {small}"


def step_memory_plan(ctx):
    config = AutoConfig.from_pretrained(ctx["small"], attn_implementation="sdpa")  # keeps O(L), as flash-attn
    per_token_layer = memory.activation_bytes_per_token(config)
    rows = RL["PROMPTS_PER_STEP"] * RL["GROUP_SIZE"]
    parts = memory.plan(config, 1, RL["MICRO_BATCH"], PROMPT_TOKENS, RL["MAX_NEW_TOKENS"], rows, 1024, per_token_layer)
    trainer = ("params fp32 shard", "grads fp32 shard", "AdamW moments fp32 shard", "reference bf16 shard",
               "activations, checkpointing", "LM head chunk (~5 fp32 [chunk, V])")
    ctx["planned_trainer_gb"] = sum(parts[k] for k in trainer)
    return (f"trainer {ctx['planned_trainer_gb']:.1f} GB planned (resident {sum(parts[k] for k in trainer[:4]):.1f}, "
            f"activations {parts[trainer[4]]:.1f}, LM-head chunk {parts[trainer[5]]:.1f}); the engine's KV cache "
            f"for {rows} rows needs {parts['KV cache']:.2f} GB")


def need_cuda(step):
    if not torch.cuda.is_available():
        raise Stop(f"no CUDA device: stopped before step {step}")


def logprob_batch(tokenizer, records):
    """Prompts and solution-trace completions of `records`, laid out as token_logprobs wants them."""
    prompts = [kk_data.make_prompt(r, "tiny") for r in records]
    completions = [kk_data.sft_completion(r, "trace") for r in records]
    prompt = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    completion = tokenizer(completions, return_tensors="pt", padding=True, padding_side="right",
                           add_special_tokens=False)
    ids = torch.cat([prompt.input_ids, completion.input_ids], 1).cuda()
    attention = torch.cat([prompt.attention_mask, completion.attention_mask], 1).cuda()
    return ids, attention, prompt.input_ids.shape[1], completion.attention_mask.bool().cuda()


def step_bf16(ctx):
    need_cuda(4)
    expected = "flash_attention_2" if ctx["flash_attn"] else "sdpa"
    records = kk_data.generate(3, 8, seed=11)
    tokenizer = kk_model.load_tokenizer(TINY)
    ids, attention, n_prompt, mask = logprob_batch(tokenizer, records)
    bf16 = kk_model.load_model(TINY, "cuda")
    check(bf16.dtype == torch.bfloat16, f"tiny loaded as {bf16.dtype} on CUDA, not bf16")
    check(bf16.config._attn_implementation == expected, f"attention {bf16.config._attn_implementation}, not {expected}")
    fp32 = kk_model.load_model(TINY, "cuda", dtype=torch.float32, attn_implementation="sdpa")
    fp64 = kk_model.load_model(TINY, "cuda", dtype=torch.float64, attn_implementation="sdpa")  # the exact reference
    with torch.no_grad():
        logp_bf16 = kk_model.token_logprobs(bf16, ids, attention, n_prompt)
        logp_autocast = kk_model.token_logprobs(fp32, ids, attention, n_prompt)  # fp32 weights: bf16_compute acts
        logp_exact = kk_model.token_logprobs(fp64, ids, attention, n_prompt)
    gaps = {name: (value - logp_exact)[mask].abs().mean().item()
            for name, value in (("bf16", logp_bf16), ("autocast", logp_autocast))}
    check(all(g < SYNCED for g in gaps.values()), f"bf16 vs fp64 log-prob gaps {gaps} (> {SYNCED})")
    check(gaps["autocast"] > 1e-5, "fp32 weights gave fp32-exact log-probs: model.bf16_compute did not act")
    del bf16, fp32, fp64
    small = kk_model.load_model(ctx["small"], "cuda")
    small_tokenizer = kk_model.load_tokenizer(ctx["small"])
    ids, attention, n_prompt, mask = logprob_batch(small_tokenizer, records)
    start = time.perf_counter()
    with torch.no_grad():
        logp = kk_model.token_logprobs(small, ids, attention, n_prompt)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    check(small.dtype == torch.bfloat16 and bool(torch.isfinite(logp[mask]).all()), "small: not bf16, or non-finite")
    del small
    torch.cuda.empty_cache()
    return (f"attention {expected}; tiny mean |logp - fp64|: bf16 {gaps['bf16']:.1e}, fp32 weights + autocast "
            f"{gaps['autocast']:.1e}; small forward of {ids.numel()} tokens in {seconds:.2f} s")


def gap(sampler_rollout, policy):
    with torch.no_grad():
        trainer = kk_model.token_logprobs(policy, sampler_rollout.input_ids(), sampler_rollout.attention_mask(),
                                          sampler_rollout.prompt_ids.shape[1])
    return rollout.logprob_gap(sampler_rollout.sampler_logprobs, trainer, sampler_rollout.completion_mask)


def step_vllm(ctx):
    need_cuda(5)
    tokenizer = kk_model.load_tokenizer(TINY)
    policy = kk_model.load_model(TINY, "cuda", dtype=torch.float32)  # as train.py's single-process policy
    prompts = [kk_data.make_prompt(r, "tiny") for r in kk_data.generate(3, 4, seed=5)]
    sampler = rollout.VLLMSampler(policy, tokenizer, seed=0, max_model_len=1024, enforce_eager=True)
    try:
        check(sampler.enable_sleep_mode, "sleep mode is off on a GPU")
        awake_free = torch.cuda.mem_get_info()[0]
        first = sampler.generate(prompts, n=4, temperature=1.0, max_new_tokens=128)
        freed_gb = (torch.cuda.mem_get_info()[0] - awake_free) / 1e9
        check(sampler.asleep and freed_gb > 1.0, f"after generate: asleep={sampler.asleep}, {freed_gb:.2f} GB freed")
        synced_gap = gap(first, policy)
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)  # one big step, as tests/test_vllm.py takes
        logp = kk_model.token_logprobs(policy, first.input_ids(), first.attention_mask(), first.prompt_ids.shape[1])
        (-(logp * first.completion_mask).sum() / first.completion_mask.sum()).backward()
        optimizer.step()
        stale_gap = gap(sampler.generate(prompts, n=4, temperature=1.0, max_new_tokens=128), policy)
        sampler.sync_weights(policy)  # wakes the weights, loads, wakes the KV cache
        fresh_gap = gap(sampler.generate(prompts, n=4, temperature=1.0, max_new_tokens=128), policy)
        check(synced_gap < SYNCED and fresh_gap < SYNCED < STALE < stale_gap,
              f"gaps: at start {synced_gap:.3g}, stale {stale_gap:.3g}, after sync {fresh_gap:.3g}")
    finally:
        sampler.close()
    del policy
    torch.cuda.empty_cache()
    return (f"sleep freed {freed_gb:.1f} GB; gap at start {synced_gap:.1e}, stale {stale_gap:.2f}, after "
            f"sync_weights {fresh_gap:.1e}")


def step_rl(ctx):
    need_cuda(6)
    import train  # (first import: its constants as this machine sets them; not reloaded, see train.CONSTANTS)
    out = ctx["work"] / "run"
    shutil.rmtree(out, ignore_errors=True)
    peaks = []  # the trainer's peak GPU memory of each step, from the end of generate to the sync

    generate, sync_weights = rollout.VLLMSampler.generate, rollout.VLLMSampler.sync_weights

    def generate_then_reset_peak(self, *args, **kwargs):
        result = generate(self, *args, **kwargs)
        torch.cuda.reset_peak_memory_stats()  # the engine is asleep now: what follows is the trainer's
        return result

    def record_peak_then_sync(self, policy):
        peaks.append(torch.cuda.max_memory_allocated() / 1e9)
        sync_weights(self, policy)

    rollout.VLLMSampler.generate, rollout.VLLMSampler.sync_weights = generate_then_reset_peak, record_peak_then_sync
    argv = sys.argv
    sys.argv = ["train.py", f"--MODEL={ctx['small']}", "--TEMPLATE=tiny", "--WARMUP_CHECKPOINT=", "--SFT_STEPS=0",
                "--ALGO=reinforce++", "--SAMPLER=vllm", "--PEOPLE=3", "--TRAIN_PER_SIZE=60", "--TEST_PER_SIZE=4",
                "--EVAL_BATCH=8", "--EVAL_EVERY=100", "--SAVE_EVERY=100", f"--OUT_DIR={out}",
                *(f"--{name}={value}" for name, value in RL.items())]
    try:
        train.main()
    finally:
        rollout.VLLMSampler.generate, rollout.VLLMSampler.sync_weights, sys.argv = generate, sync_weights, argv
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train" and r["stage"] == "rl"]
    check(len(steps) == RL["STEPS"], f"{len(steps)} RL steps logged, not {RL['STEPS']}")
    diffs = [r["sampler_logprob_diff"] for r in steps]
    check(all(d < SYNCED for d in diffs), f"sampler_logprob_diff per step {diffs} (> {SYNCED})")
    check(all(math.isfinite(r["grad_norm"]) for r in steps), "non-finite grad_norm")
    state = torch.load(out / "checkpoints" / "trainer_state.pt", weights_only=False)["model"]
    start = kk_model.load_model(ctx["small"], "cpu", dtype=torch.float32).state_dict()
    moved = max((state[name].float().cpu() - value).abs().max().item() for name, value in start.items())
    check(moved > 0, "the fp32 weights did not move in 3 steps at lr 4e-7 (bf16 master weights?)")
    peak = max(peaks)
    ratio = peak / ctx["planned_trainer_gb"]
    check(ratio <= PLAN_SLACK, f"trainer peak {peak:.1f} GB is {ratio:.2f}x the plan's {ctx['planned_trainer_gb']:.1f}")
    tokens_per_s = sum(r["sampled_tokens_per_s"] for r in steps[1:]) / max(1, len(steps) - 1)  # after the first
    seconds = {phase: sum(r[f"seconds_{phase}"] for r in steps) / len(steps)
               for phase in ("generate", "logprobs", "update")}
    return (f"sampler_logprob_diff {', '.join(f'{d:.1e}' for d in diffs)}; weights moved by up to {moved:.1e}; "
            f"trainer peak {peak:.1f} GB = {ratio:.2f} x plan; vLLM {tokens_per_s:,.0f} sampled tokens/s; s/step "
            + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


STEPS = [("environment", step_environment), ("models", step_models), ("memory plan", step_memory_plan),
         ("bf16 on CUDA", step_bf16), ("vLLM sleep/sync", step_vllm), ("RL steps (vLLM)", step_rl)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", help="folder for the built models and the run (kept); default: a temp dir")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx, table, status = {"work": work}, [], 0
    began = time.perf_counter()
    for number, (name, run) in enumerate(STEPS, 1):
        start = time.perf_counter()
        try:
            result, detail = "PASS", run(ctx)
        except Stop as stop:
            result, detail, status = "STOPPED", str(stop), EXIT_NO_CUDA
        except Exception as error:  # noqa: BLE001  (every failure goes into the table)
            traceback.print_exc()
            result, detail, status = "FAIL", f"{type(error).__name__}: {error}".splitlines()[0], EXIT_FAILED
        table.append((number, name, result, time.perf_counter() - start, detail))
        print(f"[gpu_check] step {number} {name}: {result}", file=sys.stderr, flush=True)
        if result != "PASS":
            break
    print("\n| step | check | result | seconds | what was seen |\n|---|---|---|---|---|")
    for number, name, result, seconds, detail in table:
        print(f"| {number} | {name} | {result} | {seconds:.0f} | {detail} |")
    print(f"\n{len(table)} of {len(STEPS)} steps run in {time.perf_counter() - began:.0f} s; exit status {status} "
          f"(0 = all passed, {EXIT_FAILED} = a step failed, {EXIT_NO_CUDA} = no CUDA device, stopped)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
