"""eval.py — the one way to measure a model on Knights-and-Knaves puzzles, and pictures of a run.

Accuracy follows Logic-RL (arXiv 2502.14768; ../shared/spec/logic_rl.md §3): a completion is correct when the
strict rule reward scores it 3 (format right AND every role right), under greedy decoding, with the same
prompt template the model was trained with. Per puzzle size we also report the format rate, a lenient
accuracy (answer right whatever the format; analysis only) and the mean completion length in tokens.

    evaluate(sampler, records_by_size, template, tokenizer)  -> {"accuracy": {n: x}, ...}
    plot_run(run_dir)                                         -> run_dir/curves.png from metrics.jsonl
"""
import json
from pathlib import Path

from kk_data import make_prompt
from reward import score_batch

EVAL_BATCH = 100  # prompts generated together


def evaluate(sampler, records_by_size, template, tokenizer=None, max_new_tokens=512, temperature=0.0):
    """Greedy (temperature 0) accuracy, format rate, lenient accuracy and mean length per puzzle size."""
    result = {"accuracy": {}, "format_rate": {}, "lenient_accuracy": {}, "mean_length": {}}
    for size, records in sorted(records_by_size.items()):
        scores, lengths = [], []
        for start in range(0, len(records), EVAL_BATCH):
            batch = records[start:start + EVAL_BATCH]
            prompts = [make_prompt(r, template, tokenizer) for r in batch]
            rollout = sampler.generate(prompts, n=1, temperature=temperature, max_new_tokens=max_new_tokens)
            completions = ["<think>" + c for c in rollout.completions]
            scores += score_batch(completions, [r["solution_text_format"] for r in batch])
            lengths += rollout.completion_mask.sum(-1).tolist()
        n = len(scores)
        result["accuracy"][size] = sum(s.correct for s in scores) / n
        result["format_rate"][size] = sum(s.format == 1 for s in scores) / n
        result["lenient_accuracy"][size] = sum(s.lenient_correct for s in scores) / n
        result["mean_length"][size] = sum(lengths) / n
    return result


def markdown_table(rows):
    """rows: {label: {"accuracy": {size: x}}} -> a markdown table shaped like the paper's (sizes as columns)."""
    sizes = sorted({int(s) for r in rows.values() for s in r["accuracy"]})
    lines = ["| model | " + " | ".join(str(s) for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for label, r in rows.items():
        acc = {int(k): v for k, v in r["accuracy"].items()}
        lines.append(f"| {label} | " + " | ".join(f"{acc[s]:.2f}" if s in acc else "-" for s in sizes) + " |")
    return "\n".join(lines)


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics log (is {run_dir} a train.py output folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir, out_name="curves.png"):
    """Draw reward, accuracy and completion length per step from run_dir/metrics.jsonl (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves drawn")
        return None
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    panels = [("reward", "reward"), ("accuracy", "accuracy"), ("completion_length", "mean completion length")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["global_step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=1, label="train (sampled)")
        if key == "accuracy":
            for size in sorted({s for r in evals for s in r["accuracy"]}, key=int):
                pts = [(r["global_step"], r["accuracy"][size]) for r in evals]
                ax.plot(*zip(*pts), marker="o", label=f"held-out, {size} people (greedy)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(run_dir) / out_name
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
