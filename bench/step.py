"""Time one full RL step (rollout + scoring + log-probs + update) of the tiny CPU preset, by hand:

    .venv/bin/python bench/step.py [--steps 3] [--model runs/default/checkpoints/warmup] [--threads 2]

It uses train.py's own rl_step with its CPU constants (PROMPTS_PER_STEP x GROUP_SIZE, MAX_NEW_TOKENS), after
one untimed warm-up step, and prints a table of seconds per phase. If `trl` is installed it also times TRL's
GRPOTrainer on the same model, batch, group size and lengths and prints the ratio (TRL is never a dependency
of this project: install it by hand to compare). Both run on --threads torch threads (default train.CPU_THREADS);
time on a quiet machine: with other jobs on the cores, 2 threads ran 3-11x slower than 1 (NOTES.md).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kk_data  # noqa: E402
import model as kk_model  # noqa: E402
import train  # noqa: E402
from rollout import HFSampler  # noqa: E402


def time_ours(model_path, steps):
    torch.manual_seed(0)
    tokenizer = kk_model.load_tokenizer(model_path)
    policy, reference = train.load_policy_and_reference(model_path, "cpu")
    sampler = HFSampler(policy, tokenizer)
    optimizer, scheduler = train.make_optimizer(policy, train.LR, steps + 1, "constant")
    records = kk_data.generate(3, train.PROMPTS_PER_STEP * (steps + 1), seed=7)
    rows = []
    for i in range(steps + 1):
        batch = records[i * train.PROMPTS_PER_STEP:(i + 1) * train.PROMPTS_PER_STEP]
        start = time.perf_counter()
        metrics = train.rl_step(policy, reference, sampler, tokenizer, optimizer, scheduler, batch)
        metrics["total"] = time.perf_counter() - start
        if i > 0:  # the first step warms up allocators and kernels
            rows.append(metrics)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.startswith("seconds_") or k in (
        "total", "completion_length", "trained_tokens")}
    return dict(mean, sampled=mean["completion_length"] * train.PROMPTS_PER_STEP * train.GROUP_SIZE)


def time_trl(model_path, steps):
    """Seconds per step of TRL's GRPOTrainer on the same fp32 model, batch, group size, lengths, learning rate,
    KL weight and temperature (its own defaults otherwise); the first step is not timed, as for ours."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return None
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward import score
    tokenizer = kk_model.load_tokenizer(model_path)
    records = kk_data.generate(3, train.PROMPTS_PER_STEP * (steps + 1), seed=7)
    data = Dataset.from_list([{"prompt": kk_data.make_prompt(r, train.TEMPLATE), "solution": r[
        "solution_text_format"]} for r in records])

    def reward_fn(completions, solution, **_):
        return [score("<think>" + c, s).total for c, s in zip(completions, solution)]

    class StepTimer(TrainerCallback):  # a step = generate + score + log-probs + update, as in train.rl_step
        def __init__(self):
            self.seconds, self.start, self.logs = [], None, []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.logs.append(logs)

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=train.PROMPTS_PER_STEP * train.GROUP_SIZE,
                            num_generations=train.GROUP_SIZE, max_completion_length=train.MAX_NEW_TOKENS,
                            learning_rate=train.LR, beta=train.KL_COEF, max_steps=steps + 1, logging_steps=1,
                            report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                            temperature=train.TEMPERATURE, save_strategy="no")
        trainer = GRPOTrainer(model=kk_model.load_model(model_path, "cpu"), reward_funcs=reward_fn, args=config,
                              train_dataset=data, processing_class=tokenizer, callbacks=[timer := StepTimer()])
        trainer.train()
        timed, logs = timer.seconds[1:], timer.logs
        trained = [float(b["num_tokens"]) - float(a["num_tokens"]) for a, b in zip(logs, logs[1:])]  # cumulative
        sampled = [float(row["completions/mean_length"]) * train.PROMPTS_PER_STEP * train.GROUP_SIZE
                   for row in logs[1:]]  # (mean length of the step's completions) x completions per step
        return {"total": sum(timed) / len(timed), "trained_tokens": sum(trained) / len(trained),
                "sampled": sum(sampled) / len(sampled)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="", help="HF folder; default: a fresh tiny model (untrained)")
    parser.add_argument("--threads", type=int, default=train.CPU_THREADS, help="torch threads, for both trainers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path = args.model or kk_model.build_tiny(tempfile.mkdtemp(), kk_data.corpus_text(), **train.TINY_SIZES)
    ours = time_ours(model_path, args.steps)
    print(f"tiny preset: {train.PROMPTS_PER_STEP} prompts x {train.GROUP_SIZE} samples, max {train.MAX_NEW_TOKENS}"
          f" new tokens, mean completion {ours['completion_length']:.0f} tokens, {args.steps} timed steps, "
          f"{args.threads} torch thread(s)\n")
    print("| phase | seconds per step |\n|---|---|")
    for key, value in ours.items():
        if key.startswith("seconds_") or key == "total":
            print(f"| {key.removeprefix('seconds_')} | {value:.2f} |")
    trl = time_trl(model_path, args.steps)
    if trl is None:
        print("\ntrl is not installed: no comparison (pip install trl to compare with its GRPOTrainer)")
        return
    print("\n| trainer | s/step | sampled tokens/step | sampled tokens/s | trained tokens/step | trained tokens/s |"
          "\n|---|---|---|---|---|---|")
    for name, row in (("ours", ours), ("TRL GRPOTrainer", trl)):
        print(f"| {name} | {row['total']:.2f} | {row['sampled']:.0f} | {row['sampled'] / row['total']:.0f} | "
              f"{row['trained_tokens']:.0f} | {row['trained_tokens'] / row['total']:.0f} |")
    print(f"\nHF sampler on both sides; ratio TRL / ours = {trl['total'] / ours['total']:.2f}")


if __name__ == "__main__":
    main()
