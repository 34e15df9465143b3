"""eval.py — the one way to measure a model on Knights-and-Knaves puzzles, and the curves of a training run.

Logic-RL (arXiv 2502.14768; ../shared/spec/logic_rl.md §3, the results table of §4): reward.score, the strict training
reward, grades "<think>" + the completion of each test prompt. Per puzzle size: accuracy (share scoring 3),
format_rate, lenient_accuracy, mean_length and, with --samples k > 1, pass_at_k = 1 - C(n-c, k) / C(n, k) (Chen et
al. 2021). --search beam: OREO's value-guided step-level beam search (../shared/spec/oreo.md "Test-time search");
--search compare: beam at B = N against best-of-N by the critic, majority vote and a random pick over N samples.
Every setting that moves the number is recorded in --out's "settings"; the table numbers come from the scored
completion rows (--completions) alone.

    python eval.py runs/x/checkpoints/final Qwen/Qwen2.5-7B-Instruct-1M    # one table, a row per model
    python eval.py MODEL --data data/kk/test --out results.json --completions completions.jsonl
    python eval.py MODEL --samples 8 --temperature 0.7                      # mean accuracy and pass@8
    python eval.py MODEL --search beam --beam 7 --value runs/x/checkpoints/value   # OREO's beam search
    python eval.py MODEL --search compare --value runs/x/checkpoints/value --png search.png   # accuracy vs N
    python eval.py --plot runs/x                                            # writes runs/x/curves.png
    python eval.py --report runs/x                      # writes runs/x/report.md (and curves.png), as train.py does
"""
import argparse
import contextlib
import importlib.util
import json
import math
import re
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from statistics import fmean as mean

import torch
import torch.distributed as dist
import transformers
from tqdm import tqdm

import kk_data
import model as kk_model
import oreo
import rollout
from reward import FORMAT_OK, answer_text, claimed_role, score

DEFAULT_TEMPLATE = "qwen-instruct"  # for model folders that do not say which template they were trained with
DEFAULT_SEED = 1234  # train.py's SEED: the generated split is then train.py's held-out split
DEFAULT_PER_SIZE = 100  # test puzzles per size, as in the paper's table
DEFAULT_MAX_NEW_TOKENS = 4096  # the paper's response budget; a longer answer is cut and so scores as broken
EVAL_BATCH = 100  # completions generated together (prompts x samples)
DEFAULT_BEAM = 7 if torch.cuda.is_available() else 2  # OREO's reported beam width; CPU: 2 (NOTES.md, issue 14)
DEFAULT_EXPAND = None if torch.cuda.is_available() else 2  # next steps per kept candidate (None: = beam, OREO's)
DEFAULT_MAX_EXPANSIONS = 20  # OREO's rounds of beam expansion
SEARCH_TEMPERATURE = 1.0 if torch.cuda.is_available() else 0.7  # OREO's; CPU: the offline data's (NOTES.md, issue 14)
SEARCH_BATCH = 1 if torch.cuda.is_available() else 8  # puzzles searched in lockstep (GPU: B x B rows of 4k tokens)
DEFAULT_MAX_STEP_TOKENS = 256  # a step longer than this is cut (and scored as it stands)
TTC_NS = (1, 2, 4, 8, 16)  # --search compare: candidates per puzzle
TTC_METHODS = ("beam", "best-of-N", "majority", "random")  # --search compare: how the N candidates are used
VLLM_PROMPT_TOKENS = 1024  # --sampler vllm: room for the prompt in the engine's context (+ the generation budget)
DATA_FILE = re.compile(r"people(\d+)_num(\d+)\.jsonl")  # the K&K benchmark's file names
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # "Qwen/Qwen2.5-7B-Instruct-1M"
METRIC_TITLES = {"accuracy": "accuracy (strict reward = 3)", "format_rate": "format rate",
                 "lenient_accuracy": "lenient accuracy (answer right, any format)",
                 "mean_length": "mean completion length (tokens)"}


# ---- 1. pass@k: the chance that at least one of k samples is right, estimated from n >= k samples.
def pass_at_k(n, c, k):
    """Unbiased pass@k of one puzzle with n samples, c of them right: 1 - C(n-c, k) / C(n, k) (arXiv 2107.03374)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ---- 2. Test puzzles: {size: [records]}, generated or read from benchmark-format files.
def load_test_dir(data_dir, sizes=None, per_size=None):
    """{n: the first per_size (or all) records} of a folder's people{n}_num{k}.jsonl files, for `sizes` or all."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: no such folder")
    files = {}
    for path in sorted(data_dir.iterdir()):
        match = DATA_FILE.fullmatch(path.name)
        if match is None:
            continue
        n = int(match[1])
        if n in files:
            raise ValueError(f"{data_dir}: two files for {n} people ({files[n].name} and {path.name})")
        files[n] = path
    if not files:
        raise ValueError(f"{data_dir}: no test files named people{{n}}_num{{k}}.jsonl")
    missing = [n for n in sizes or () if n not in files]
    if missing:
        raise ValueError(f"{data_dir}: no people{{n}}_num{{k}}.jsonl file for n = {missing}")
    records_by_size = {}
    for n in sorted(files) if sizes is None else sizes:
        records = kk_data.load_jsonl(files[n], n)  # errors name file:line
        if not records:
            raise ValueError(f"{files[n]}: no records")
        records_by_size[n] = records[:per_size]
    return records_by_size


def load_test_set(args):
    """({size: records}, settings describing them): --data's files, else the first --per-size puzzles of
    kk_data.generate(n, ., --seed) per size (train.py's held-out puzzles for that seed)."""
    if args.data:
        records_by_size, data = load_test_dir(args.data, args.people, args.per_size), str(args.data)
    else:
        per_size = args.per_size or DEFAULT_PER_SIZE
        records_by_size = {n: kk_data.generate(n, per_size, args.seed) for n in args.people or kk_data.SIZES}
        data = f"generated (kk_data.generate, seed {args.seed})"
    return records_by_size, {"data": data, "puzzles": {n: len(r) for n, r in records_by_size.items()}}


# ---- 3. Generate and score: one row per completion, the only thing the table numbers are computed from.
def score_completions(sampler, records_by_size, template, tokenizer=None, samples=1, temperature=0.0, top_p=1.0,
                      max_new_tokens=DEFAULT_MAX_NEW_TOKENS, batch_size=EVAL_BATCH, progress=False,
                      desc="completions"):
    """`samples` completions of every puzzle, each scored: a completion_row per completion, by size and puzzle."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if samples > 1 and temperature == 0:
        raise ValueError(f"{samples} samples per puzzle need a temperature > 0 (greedy gives identical copies)")
    prompts_per_call = max(1, batch_size // samples)
    total = samples * sum(len(records) for records in records_by_size.values())
    bar = tqdm(total=total, desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)
    rows = []
    for size, records in sorted(records_by_size.items()):
        for start in range(0, len(records), prompts_per_call):
            batch = records[start:start + prompts_per_call]
            prompts = [kk_data.make_prompt(record, template, tokenizer) for record in batch]
            out = sampler.generate(prompts, n=samples, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens)  # rows i*samples .. belong to prompts[i]
            lengths = out.completion_mask.sum(-1).long().tolist()  # [B]
            for i, (text, length) in enumerate(zip(out.completions, lengths)):
                rows.append(completion_row(size, start + i // samples, i % samples, batch[i // samples], text, length))
            bar.update(len(out.completions))
    bar.close()
    return rows


def completion_row(size, position, sample, record, text, length):
    """One scored completion: where it is from, "<think>" + text, its length (EOS included) and reward.Score's parts."""
    completion = "<think>" + text  # the pre-filled "<think>" is part of what the format rule checks
    s = score(completion, record["solution_text_format"])
    return {"size": size, "record": position, "sample": sample, "completion": completion, "length": length,
            **{field: getattr(s, field) for field in ("total", "format", "answer", "correct", "lenient_correct")}}


def score_beam_search(policy, value_model, tokenizer, records_by_size, template, beam, temperature=1.0,
                      max_new_tokens=DEFAULT_MAX_NEW_TOKENS, max_expansions=DEFAULT_MAX_EXPANSIONS,
                      max_step_tokens=DEFAULT_MAX_STEP_TOKENS, progress=False, desc="beam search", expand=None,
                      search_batch=SEARCH_BATCH):
    """score_completions' rows (one per puzzle, sample 0, + "generated") with oreo.beam_search_many instead,
    search_batch puzzles searched in lockstep."""
    step_ids = oreo.step_end_ids(tokenizer)
    bar = tqdm(total=sum(len(r) for r in records_by_size.values()), desc=desc, unit="puzzle", disable=not progress,
               dynamic_ncols=True)
    rows = []
    for size, records in sorted(records_by_size.items()):
        for start in range(0, len(records), search_batch):
            batch = records[start:start + search_batch]
            prompts = [kk_data.make_prompt(record, template, tokenizer) for record in batch]
            results = oreo.beam_search_many(policy, value_model, tokenizer, prompts, beam, step_ids,
                                            max_expansions=max_expansions, max_step_tokens=max_step_tokens,
                                            temperature=temperature, max_new_tokens=max_new_tokens, expand=expand)
            for position, (record, result) in enumerate(zip(batch, results), start):
                rows.append({**completion_row(size, position, 0, record, result.text, len(result.token_ids)),
                             "generated": result.generated})
            bar.update(len(batch))
    bar.close()
    return rows


def claimed_answer(row, record):
    """The roles a scored completion claims, in the puzzle's name order; None unless well formatted and complete."""
    if row["format"] != FORMAT_OK:
        return None
    roles = tuple(claimed_role(answer_text(row["completion"]), name) for name in record["names"])
    return None if None in roles else roles


def majority_pick(rows, record):
    """The first of `rows` whose answer got the most votes (the first row if none can be voted for)."""
    answers = [claimed_answer(row, record) for row in rows]
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return rows[0]
    return rows[next(i for i, a in enumerate(answers) if votes.get(a) == max(votes.values()))]


def compare_search(policy, value_model, tokenizer, records_by_size, template, ns=TTC_NS, temperature=1.0,
                   max_new_tokens=DEFAULT_MAX_NEW_TOKENS, progress=False, **beam_settings):
    """{size: {method: {N: {"accuracy", "tokens" (generated per puzzle)}}}}: the first N of max(ns) samples per puzzle
    for random, majority and best-of-N (the critic's V before EOS); beam is oreo.beam_search at beam N."""
    samples = score_completions(rollout.HFSampler(policy, tokenizer), records_by_size, template, tokenizer, max(ns),
                                temperature, max_new_tokens=max_new_tokens, progress=progress, desc="samples")
    critic_rows = [{"prompt": kk_data.make_prompt(records_by_size[r["size"]][r["record"]], template, tokenizer),
                    "response": r["completion"].removeprefix("<think>"), "reward": 0.0} for r in samples]
    for row, value in zip(samples, oreo.offline_values(value_model, tokenizer, critic_rows)[1].tolist()):
        row["value"] = value
    result = {}
    for size, records in sorted(records_by_size.items()):
        by_puzzle = [[r for r in samples if r["size"] == size and r["record"] == i] for i in range(len(records))]
        result[size] = {method: {} for method in TTC_METHODS}
        for n in ns:
            picks = {"random": [mean(r["correct"] for r in rows[:n]) for rows in by_puzzle],
                     "majority": [majority_pick(rows[:n], records[i])["correct"] for i, rows in enumerate(by_puzzle)],
                     "best-of-N": [max(rows[:n], key=lambda r: r["value"])["correct"] for rows in by_puzzle]}
            tokens = mean(sum(r["length"] for r in rows[:n]) for rows in by_puzzle)
            for method, correct in picks.items():
                result[size][method][n] = {"accuracy": mean(correct), "tokens": tokens}
            rows = score_beam_search(policy, value_model, tokenizer, {size: records}, template, n, temperature,
                                     max_new_tokens, progress=progress, desc=f"beam {n}", **beam_settings)
            result[size]["beam"][n] = {"accuracy": mean(r["correct"] for r in rows),
                                       "tokens": mean(r["generated"] for r in rows)}
    return result


def compare_table(result):
    """Markdown: a row per (size, method), a column per N, cells "accuracy (tokens)"."""
    ns = sorted({n for methods in result.values() for points in methods.values() for n in points})
    lines = ["| people | method | " + " | ".join(f"N = {n}" for n in ns) + " |", "|---" * (len(ns) + 2) + "|"]
    for size, methods in sorted(result.items()):
        for method, points in methods.items():
            cells = [f"{points[n]['accuracy']:.3f} ({points[n]['tokens']:.0f})" if n in points else "-" for n in ns]
            lines.append(f"| {size} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_compare(result, path):
    """Accuracy against N and against generated tokens, a row of two panels per puzzle size."""
    panels = []
    for size, methods in sorted(result.items()):
        by_n = {method: sorted(points.items()) for method, points in methods.items()}  # {method: [(N, point)]}
        panels.append((f"{size} people: accuracy vs N",
                       [(method, [(n, p["accuracy"]) for n, p in ps], "o") for method, ps in by_n.items()]))
        panels.append((f"{size} people: accuracy vs generated tokens per puzzle",
                       [(method, [(p["tokens"], p["accuracy"]) for n, p in ps], "o") for method, ps in by_n.items()]))
    plot_panels(panels, path, 2, ("N (candidates per puzzle)", "generated tokens per puzzle"), "accuracy", True)


def summarize_completions(rows, k=None, pass_ks=()):
    """{metric: {size: value}} from score_completions' rows: shares over a size's completions, the mean length,
    and pass_at_k (with k; "pass@j" for each j of pass_ks): pass_at_k of each puzzle, averaged over puzzles."""
    if not rows:
        raise ValueError("no completions to summarize")
    ks = ({"pass_at_k": k} if k is not None else {}) | {f"pass@{j}": j for j in pass_ks}
    result = {name: {} for name in ("accuracy", "format_rate", "lenient_accuracy", "mean_length", *ks)}
    for size in sorted({row["size"] for row in rows}):
        group = [row for row in rows if row["size"] == size]
        result["accuracy"][size] = mean(row["correct"] for row in group)
        result["format_rate"][size] = mean(row["format"] == FORMAT_OK for row in group)
        result["lenient_accuracy"][size] = mean(row["lenient_correct"] for row in group)
        result["mean_length"][size] = mean(row["length"] for row in group)
        correct_by_puzzle = {}
        for row in group:
            correct_by_puzzle.setdefault(row["record"], []).append(row["correct"])
        for name, j in ks.items():
            result[name][size] = mean(pass_at_k(len(c), sum(c), j) for c in correct_by_puzzle.values())
    return result


def evaluate(sampler, records_by_size, template, tokenizer=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
             temperature=0.0, samples=1, top_p=1.0, batch_size=EVAL_BATCH, progress=False, pass_ks=(), examples=0):
    """summarize_completions' {metric: {size: value}} for one sampler, pooled over torchrun's ranks (each scores
    every WORLD-th puzzle); examples > 0 adds "examples": the first sample of that many puzzles per size, scored."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = {size: records[rank::world] for size, records in records_by_size.items()}
    rows = score_completions(sampler, shard, template, tokenizer, samples, temperature, top_p, max_new_tokens,
                             batch_size, progress)
    if world > 1:
        for row in rows:
            row["record"] = row["record"] * world + rank  # its position in the unsharded list
        parts = [None] * world
        dist.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part]
    result = summarize_completions(rows, k=samples if samples > 1 else None, pass_ks=pass_ks)
    if examples:
        shown = sorted((r for r in rows if r["record"] < examples and r["sample"] == 0),
                       key=lambda r: (r["size"], r["record"]))
        result["examples"] = [{"size": r["size"], "record": r["record"],
                               "quiz": records_by_size[r["size"]][r["record"]]["quiz"],
                               "solution": records_by_size[r["size"]][r["record"]]["solution_text_format"],
                               **{k: r[k] for k in ("completion", "length", "format", "answer", "total")}}
                              for r in shown]
    return result


# ---- 4. Models: check the name, find the template it was trained with, load a sampler.
def check_model_name(name):
    """Fail before any work unless `name` is a local HF model folder or looks like a hub name ("org/model")."""
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{name}: no config.json here, so not a Hugging Face model folder")
        return
    if path.exists():
        raise ValueError(f"{name}: a file, not a model folder")
    looks_local = name.startswith((".", "/", "~")) or Path(path.parts[0]).is_dir()  # e.g. runs/x/checkpoints/y
    if looks_local or not HUB_NAME.fullmatch(name):
        raise ValueError(f"{name}: no such model folder (and not a hub name like Qwen/Qwen2.5-7B-Instruct-1M)")


def trained_settings(model_name, template=None, max_new_tokens=None):
    """(template, where it came from, max_new_tokens): the options given, else what train.py saved in the model
    folder's mini_logic_rl.json, else qwen-instruct and 4096."""
    extra_file, extra = Path(model_name) / kk_model.EXTRA_FILE, {}
    if extra_file.is_file() and None in (template, max_new_tokens):
        try:
            extra = json.loads(extra_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{extra_file}: not valid JSON ({error})") from None
    extra = extra if isinstance(extra, dict) else {}
    budget = max_new_tokens or extra.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
    if template is not None:
        return template, "--template", budget
    if extra.get("template") is None:
        return DEFAULT_TEMPLATE, "default", budget
    if extra["template"] not in kk_data.TEMPLATES:
        raise ValueError(f"{extra_file}: unknown template {extra['template']!r}; known: {kk_data.TEMPLATES}")
    return extra["template"], str(extra_file), budget


def load_sampler(kind, model_name, device, max_new_tokens=DEFAULT_MAX_NEW_TOKENS):
    """(sampler, tokenizer) in eval mode: rollout.HFSampler on `device`, or a VLLMSampler copying CPU-loaded weights."""
    tokenizer = kk_model.load_tokenizer(model_name)  # a ValueError naming the folder when it holds none
    try:
        policy = kk_model.load_model(model_name, device if kind == "hf" else "cpu", dtype=kk_model.pick_dtype(device))
    except (OSError, ValueError) as error:
        raise ValueError(f"{model_name}: the model could not be loaded ({first_line(error)})") from None
    policy.eval()
    if kind == "hf":
        return rollout.HFSampler(policy, tokenizer), tokenizer
    context = min(policy.config.max_position_embeddings, VLLM_PROMPT_TOKENS + max_new_tokens)
    return rollout.make_sampler("vllm", policy, tokenizer, max_model_len=context, enable_sleep_mode=False), tokenizer


def load_value_model(path, device):
    """The critic for --search beam: a folder written by oreo.ValueModel.save (backbone + value head)."""
    path = Path(path)
    has_weights = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()  # full or LoRA
    if not has_weights or not (path / oreo.HEAD_FILE).is_file():
        raise ValueError(f"{path}: not a value model folder (oreo.ValueModel.save writes config.json and "
                         f"{oreo.HEAD_FILE}); a folder without the head would give V = 0 everywhere")
    try:
        value_model = oreo.ValueModel.from_pretrained(path, device, dtype=kk_model.pick_dtype(device),
                                                      attn_implementation=kk_model.attention_implementation(device))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: the value model could not be loaded ({first_line(error)})") from None
    return value_model.eval()


def first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---- 5. The table: a row per model, a column per puzzle size, like the paper's.
def markdown_table(rows, metric="accuracy", digits=2):
    """rows: {label: {metric: {size: x}}} -> markdown with sizes as columns; "-" where a model lacks a size."""
    sizes = sorted({int(s) for r in rows.values() for s in r.get(metric, {})})
    lines = ["| model | " + " | ".join(str(s) for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for label, r in rows.items():
        values = {int(size): x for size, x in r.get(metric, {}).items()}
        cells = [f"{values[s]:.{digits}f}" if s in values else "-" for s in sizes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- 6. Curves of a run from its metrics.jsonl (train.py writes a "train" row per step, an "eval" row per eval).
PANELS = [  # (title, keys of train rows drawn as lines, keys of eval rows drawn per puzzle size)
    ("reward (train samples)", ("reward", "reward_format", "reward_answer"), ()),
    ("accuracy", ("accuracy",), ("accuracy",)),
    ("mean completion length (tokens)", ("completion_length",), ("mean_length",)),
    ("pass@k at the rollout temperature", (), ("pass@1", "pass@4", "pass@8")),
    ("format rate", ("format_rate",), ("format_rate",)),
    ("KL to the reference", ("kl",), ()),
    ("entropy", ("entropy",), ()),
    ("SFT loss", ("sft_loss",), ()),
    ("OREO critic on held-out offline rows", ("value_auc_first", "value_auc_last", "value_explained_variance"), ()),
]
SMOOTH = 10  # a train step is one small batch (often of easy or of hard puzzles): also draw the mean of SMOOTH


def read_metrics(run_dir):
    """The rows of run_dir/metrics.jsonl (ValueError naming file:line; a truncated last line dropped, warned)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no metrics log here (is {run_dir} a train.py output folder?)")
    return kk_data.read_jsonl(path, lambda row: kk_data.check_fields(row, {}), truncated_tail_ok=True)  # objects


def curves(rows):
    """[(panel title, [(label, [(step, value), ...], marker)])] for the PANELS that have data; others skipped."""
    train = [r for r in rows if r.get("kind") == "train" and "global_step" in r]
    # one evaluation per step, the last: the initial model's is dropped when a warm-up checkpoint's shares its step
    evals = sorted({r["global_step"]: r for r in rows if r.get("kind") == "eval" and "global_step" in r}.values(),
                   key=lambda r: r["global_step"])
    panels = []
    for title, train_keys, eval_keys in PANELS:
        lines = []
        for key in train_keys:
            points = [(r["global_step"], r[key]) for r in train if r.get(key) is not None]
            if points:
                lines.append((f"{key} (train)" if eval_keys else key, points, ""))
        for eval_key in eval_keys:
            for size in sorted({size for r in evals for size in r.get(eval_key) or {}}, key=int):
                points = [(r["global_step"], r[eval_key][size]) for r in evals if size in (r.get(eval_key) or {})]
                how = eval_key if eval_key.startswith("pass@") else "greedy"
                lines.append((f"held-out, {size} people ({how})", points, "o"))
        if lines:
            panels.append((title, lines))
    return panels


def trailing_mean(values, window):
    """values[i] replaced by the mean of values[max(0, i - window + 1) .. i]."""
    return [mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot_panels(panels, path, columns, xlabels=("step",), ylabel="", log_x=False):
    """Draw panels [(title, [(label, [(x, y), ...], marker)])], `columns` to a row (xlabels: one per column), into
    a PNG at path, through a temporary file: a kill mid-write leaves the previous picture whole."""
    from matplotlib.figure import Figure  # drawn without pyplot
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4.5 * columns, 3.4 * rows))
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    for i, (ax, (title, lines)) in enumerate(zip(axes, panels)):
        for label, points, marker in lines:
            xs, values = zip(*points)
            if marker or len(values) < 2 * SMOOTH:
                ax.plot(xs, values, marker=marker or None, markersize=3, lw=1, label=label)
            else:  # a faint line per step, a solid one for the trailing mean
                raw, = ax.plot(xs, values, lw=0.8, alpha=0.3)
                ax.plot(xs, trailing_mean(values, SMOOTH), lw=1.5, color=raw.get_color(),
                        label=f"{label} (mean of {SMOOTH} steps)")
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=10)
        ax.set(xlabel=xlabels[i % len(xlabels)], ylabel=ylabel)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    temporary = Path(path).with_name(Path(path).name + ".tmp")
    fig.savefig(temporary, dpi=100, format="png")
    temporary.replace(path)


def plot_run(run_dir, out_name="curves.png"):
    """Draw run_dir/metrics.jsonl's curves into run_dir/out_name; its path (None without matplotlib, optional)."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed (pip install matplotlib): no curves drawn")
        return None
    panels = curves(read_metrics(run_dir))
    if not panels:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'}: no train or eval rows with data to plot")
    plot_panels(panels, Path(run_dir) / out_name, min(3, len(panels)))
    return Path(run_dir) / out_name


# ---- 7. report.md of a run: a pure function of its folder, written by train.py and by `eval.py --report RUN_DIR`.
REPORT_EXAMPLES = 3  # held-out puzzles per size whose greedy completion every train.py evaluation keeps
REPORT_MAX_EVALS = 8  # report.md shows each such puzzle at most at this many evaluations (first, last, spread)
REPORT_WIDTH = 110  # completions are wrapped at spaces to this width in report.md (metrics.jsonl has them verbatim)
REPLOT_SECONDS = 60  # train.py redraws curves.png (~2 s of CPU) after an evaluation once the last drawing is this old
SCORE_MEANING = {3.0: "correct", -0.5: "parsed, a role wrong", -1.0: "format fine, answer unparseable",
                 -3.0: "format broken"}
STAGE_LABELS = {"initial": "initial model", "warmup": "warm-up (start of RL)"}


def write_report(run_dir, plot=True):
    """Write run_dir/report.md (first redrawing curves.png when plot and matplotlib is there); returns its path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if plot:
        with contextlib.suppress(ValueError):  # nothing to draw yet
            plot_run(run_dir)
    out = run_dir / "report.md"
    out.write_text(report_markdown(run_dir, rows), encoding="utf-8")
    return out


def read_json(path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def cell(value):
    return "`" + json.dumps(value).replace("|", "\\|") + "`"


def constants_section(run_dir, config):
    """report.md's lines on the constants in config.json unlike defaults.json's (else a fresh train.py's)."""
    defaults, source = read_json(run_dir / "defaults.json"), "defaults.json (train.py's, as the run started)"
    if defaults is None:  # a fresh copy of train.py: its module-level constants are the defaults
        spec = importlib.util.spec_from_file_location("train_defaults", Path(__file__).with_name("train.py"))
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
        defaults = json.loads(json.dumps({k: getattr(train, k) for k in train.CONSTANTS}))
        source = "train.py's defaults on the machine that wrote this report (the run saved none)"
    changed = [(k, v, defaults.get(k)) for k, v in config.items() if defaults.get(k, object()) != v]
    if not changed:
        return [f"None: the run used the defaults ({source})."]
    lines = ["| constant | this run | default |", "|---|---|---|"]
    lines += [f"| {k} | {cell(v)} | {cell(d)} |" for k, v, d in changed]
    return lines + ["", f"Defaults from {source}; every constant is in config.json."]


def code_block(text, width=REPORT_WIDTH):
    """text in a fenced block, the fence longer than any run of backticks inside; lines wrapped at spaces."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    lines = [part for line in text.splitlines() or [""] for part in
             (textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False) or [line])]
    return f"{fence}text\n" + "\n".join(lines) + f"\n{fence}"


def spread(items, n):
    """At most n of items: the first, the last and evenly spaced ones between."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def report_markdown(run_dir, rows):
    """report.md's text: setup and status, the changed constants, held-out tables, curves, scored examples."""
    config = read_json(run_dir / "config.json", {})
    summary = read_json(run_dir / "summary.json")
    evals = [r for r in rows if r.get("kind") == "eval"]
    if summary and "initial" in summary and not any(r.get("stage") == "initial" for r in evals):
        evals.insert(0, {"kind": "eval", "stage": "initial", "step": 0, "global_step": 0, **summary["initial"]})
    labels = [STAGE_LABELS.get(r.get("stage"), f"{r.get('stage')} step {r.get('step')}") for r in evals]
    if summary and evals and evals[-1].get("stage") != "initial":
        labels[-1] += " (final)"
    setup = ", ".join(f"{k} {config[k]}" for k in ("MODEL", "ALGO", "PEOPLE", "STEPS") if k in config)
    if summary:
        status = f"Finished in {summary['seconds'] / 60:.1f} min." if "seconds" in summary else "Finished."
    elif evals:
        status = f"In progress: the latest evaluation is {labels[-1]} (global step {evals[-1].get('global_step')})."
    else:
        status = "In progress: no evaluation yet."
    name = config.get("OUT_DIR", "RUN_DIR")  # as the run named its folder: the report depends on its files only
    lines = [f"# Run report: {name}", "", f"{setup}. {status}", "",
             "Written by `train.py` after every evaluation and at the end; `python eval.py --report "
             f"{name}` writes it again from this folder's files. Evaluations are greedy, on "
             f"{config.get('TEST_PER_SIZE', 'the')} held-out puzzles per size, scored by `reward.score` (the "
             "training reward).", "", "## Constants that differ from the defaults", ""]
    lines += constants_section(run_dir, config) + ["", "## Held-out results", ""]
    pass_keys = sorted({k for r in evals for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    titles = {**METRIC_TITLES, **{k: f"{k} at the rollout temperature (chance that one of {k[5:]} sampled "
                                     "completions is right)" for k in pass_keys},
              "sampled_length": "mean length of those samples (tokens)"}  # pass@k: measured before/after only
    for key, title in titles.items():
        if any(key in row for row in evals):
            shown = {label: row for label, row in zip(labels, evals) if key in row or key in METRIC_TITLES}
            lines += [f"### {title}", "", markdown_table(shown, key, 0 if "length" in key else 2), ""]
    if not evals:
        lines += ["No evaluation yet.", ""]
    if (run_dir / "curves.png").is_file():
        lines += ["## Curves", "", "![training curves](curves.png)", ""]
    return "\n".join(lines + example_sections(evals, labels)).rstrip() + "\n"


def example_sections(evals, labels):
    """Per puzzle kept in "examples": the puzzle, its answer, what the model wrote at (a spread of) evaluations."""
    by_puzzle = {}
    for row, label in zip(evals, labels):
        for example in row.get("examples") or []:
            by_puzzle.setdefault((int(example["size"]), example["record"]), []).append((label, row, example))
    if not by_puzzle:
        return []
    lines = ["## What the model wrote", "",
             "The greedy completion of the first held-out puzzles of each size at each evaluation (the same "
             "puzzles every time), as kept in metrics.jsonl (\"examples\" of the eval rows). Score = format (+1 "
             "or -1) + answer (+2 right, -1.5 a role wrong, -2 unparseable); length in generated tokens. Long "
             "lines are wrapped at spaces here; metrics.jsonl has the text verbatim.", ""]
    for (size, record), shown in sorted(by_puzzle.items()):
        first = shown[0][2]
        lines += [f"### {size} people, held-out puzzle {record + 1}", ""]
        lines += ["> " + line for line in first["quiz"].strip().splitlines()]
        lines += ["", f"Right answer: {' '.join(first['solution'].split())}", ""]
        picked = spread(shown, REPORT_MAX_EVALS)
        if len(picked) < len(shown):
            lines += [f"({len(picked)} of its {len(shown)} evaluations shown; all are in metrics.jsonl.)", ""]
        for label, row, example in picked:
            lines += [f"**{label}** (global step {row.get('global_step')}): total {example['total']:g} "
                      f"({SCORE_MEANING.get(example['total'], '')}) = format {example['format']:+g} + answer "
                      f"{example['answer']:+g}; {example['length']} tokens", "", code_block(example["completion"]), ""]
    return lines


# ---- 8. metrics.jsonl, and wandb when train.py's WANDB is on (optional; WANDB_MODE=offline keeps it on disk).
def numbers(name, value):
    """{"name/key/...": number} of the numbers in a nested dict (bools, text and lists left out)."""
    if isinstance(value, dict):
        return {k: v for key, inner in value.items() for k, v in numbers(f"{name}/{key}", inner).items()}
    return {name: value} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def wandb_log(run, row):
    """A metrics.jsonl row to wandb at its global step: numbers as "eval/accuracy/3", examples as a table."""
    data = numbers(row.get("kind", "row"), {k: v for k, v in row.items() if k not in ("examples", "global_step")})
    if row.get("examples"):
        import wandb
        columns = ["stage", "step", "size", "record", "total", "format", "answer", "length", "completion"]
        data[f"examples/{row.get('stage')}"] = wandb.Table(columns=columns, data=[
            [row.get("stage"), row.get("step")] + [e[c] for c in columns[2:]] for e in row["examples"]])
    run.log(data, step=row.get("global_step"))


class MetricsLog:
    """train.py's metrics.jsonl writer (rank 0; on resume rows after keep_until dropped), + report.md and wandb."""

    def __init__(self, out_dir, keep_until, config, rank=0, wandb_project=None):
        self.path, self.rank, self.wandb = Path(out_dir) / "metrics.jsonl", rank, None
        self.drawn_at = time.monotonic()  # curves.png: redrawn after evaluations REPLOT_SECONDS apart, and at the end
        rows = read_metrics(out_dir) if self.path.exists() and keep_until is not None else []
        if rank == 0:
            kk_data.save_jsonl([r for r in rows if r["global_step"] <= keep_until], self.path)
        if wandb_project and rank == 0:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=Path(out_dir).name, dir=str(out_dir), config=config)

    def write(self, row):
        if self.rank > 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb:
            wandb_log(self.wandb, row)
        if row["kind"] == "eval":
            plot = time.monotonic() - self.drawn_at >= REPLOT_SECONDS
            self.drawn_at = time.monotonic() if plot else self.drawn_at
            write_report(self.path.parent, plot)

    def close(self):
        """At the end, after summary.json: the final report.md, and the wandb run finished."""
        write_report(self.path.parent)
        if self.wandb:
            self.wandb.finish()


# ---- 9. Command line.
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("models", nargs="*", metavar="MODEL", help="local HF folder (e.g. runs/x/checkpoints/final) or hub name")
    run_dir = parser.add_mutually_exclusive_group()  # --report also draws the curves
    run_dir.add_argument("--plot", metavar="RUN_DIR", help="draw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl")
    run_dir.add_argument("--report", metavar="RUN_DIR", help="write RUN_DIR/report.md and curves.png, as train.py does")
    add("--data", metavar="DIR", help="folder of people{n}_num{k}.jsonl test files (default: a generated split)")
    add("--people", help='puzzle sizes, "a-b" or "a,b,c" (default: 2-8, or every file of --data)')
    add("--per-size", type=int, help=f"puzzles per size (default: {DEFAULT_PER_SIZE} generated, or all of --data)")
    add("--seed", type=int, default=DEFAULT_SEED, help="generated split and sampling seed")
    add("--template", choices=kk_data.TEMPLATES, help=f"prompt: mini_logic_rl.json's, else {DEFAULT_TEMPLATE}")
    add("--samples", type=int, default=1, help="completions per puzzle (pass@k with k = samples)")
    add("--temperature", type=float, help=f"0 = greedy (default); --search beam, compare: {SEARCH_TEMPERATURE}")
    add("--top-p", type=float, default=1.0)
    add("--max-new-tokens", type=int, help=f"budget (mini_logic_rl.json's, else {DEFAULT_MAX_NEW_TOKENS})")
    add("--batch-size", type=int, default=EVAL_BATCH, help="completions generated together")
    add("--sampler", choices=("hf", "vllm"), default="hf")
    add("--search", choices=("greedy", "beam", "compare"), default="greedy",
        help=f"beam: OREO's value-guided step-level beam search; compare: {', '.join(TTC_METHODS)} at N = --ns")
    add("--ns", default=",".join(map(str, TTC_NS)), help="--search compare: the Ns, a,b,c")
    add("--png", default="search.png", help="--search compare: the accuracy-vs-N plot")
    add("--expand", type=int, default=DEFAULT_EXPAND, help="--search beam: next steps per candidate (None: --beam)")
    add("--beam", type=int, default=DEFAULT_BEAM, help="--search beam: beam width B")
    add("--value", metavar="DIR", help="--search beam, compare: the critic (oreo.ValueModel.save's folder)")
    add("--max-expansions", type=int, default=DEFAULT_MAX_EXPANSIONS, help="--search beam: rounds of expansion")
    add("--max-step-tokens", type=int, default=DEFAULT_MAX_STEP_TOKENS, help="--search beam: longest step")
    add("--search-batch", type=int, default=SEARCH_BATCH, help="--search beam: puzzles searched in lockstep")
    add("--device", help="cpu, cuda, cuda:1, ... (default: the first GPU if any)")
    add("--out", metavar="FILE", help="write the numbers and settings as JSON")
    add("--completions", metavar="FILE", help="write every scored completion as JSONL")
    args, error = parser.parse_args(argv), parser.error
    if bool(args.plot or args.report) == bool(args.models):
        error("give one or more MODELs, or else --plot RUN_DIR or --report RUN_DIR")
    if len(set(args.models)) != len(args.models):
        error("a MODEL is given twice")
    if args.temperature is None:
        args.temperature = 0.0 if args.search == "greedy" else SEARCH_TEMPERATURE
    if (args.search == "greedy") != (args.value is None):
        error("--search beam and compare need --value DIR (the folder oreo.ValueModel.save wrote); greedy takes none")
    if args.search != "greedy":
        if args.samples != 1 or args.sampler != "hf" or args.temperature == 0:
            error("--search beam samples its steps on the HF model (rollout.decode) at a temperature > 0: "
                  "leave --samples at 1 and --sampler at hf, and give --temperature > 0")
        if min(args.beam, args.max_expansions, args.max_step_tokens, args.expand or 1, args.search_batch) < 1:
            error("--beam, --expand, --max-expansions, --max-step-tokens and --search-batch must be >= 1")
        try:
            args.ns = sorted({int(n) for n in args.ns.split(",")})
        except ValueError:
            error(f"--ns {args.ns!r}: write the Ns as a,b,c")
        if args.ns[0] < 1 or (args.search == "compare" and len(args.models) != 1):
            error("--ns must be >= 1, and --search compare takes one MODEL")
    sizes = [args.samples, args.batch_size] + [n for n in (args.max_new_tokens, args.per_size) if n is not None]
    if min(sizes) < 1:
        error("--samples, --max-new-tokens, --batch-size and --per-size must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        error("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.samples > 1 and args.temperature == 0:
        error(f"--samples {args.samples} needs --temperature > 0 (greedy gives {args.samples} identical completions)")
    if args.people is not None:
        try:
            args.people = kk_data.parse_sizes(args.people)
        except ValueError:
            error(f'--people {args.people!r}: write sizes as "a-b" or "a,b,c"')
    for option, path in (("--out", args.out), ("--completions", args.completions),
                         ("--plot", args.plot and Path(args.plot) / "curves.png")):
        try:  # before any evaluation: an unwritable output must not cost a whole run
            if path:
                kk_data.check_writable(path)
        except ValueError as message:
            error(f"{option}: {message}")
    return args


def evaluate_models(args):
    """Score every model on one test set; returns ({model: numbers + settings}, every completion row)."""
    records_by_size, data_settings = load_test_set(args)
    for name in args.models:  # all names checked before the first (possibly long) evaluation starts
        check_model_name(name)
    trained = {name: trained_settings(name, args.template, args.max_new_tokens) for name in args.models}
    device = torch.device(args.device) if args.device else kk_model.pick_device()
    transformers.utils.logging.disable_progress_bar()  # one bar per model is enough
    value_model = load_value_model(args.value, device) if args.value else None
    beam_settings = dict(max_expansions=args.max_expansions, max_step_tokens=args.max_step_tokens, expand=args.expand,
                         search_batch=args.search_batch)
    results, all_rows = {}, []
    for name, (template, template_source, max_new_tokens) in trained.items():
        sampler, tokenizer = load_sampler(args.sampler, name, device, max_new_tokens)
        print(f"{name}: template {template!r} (from {template_source})", file=sys.stderr)
        torch.manual_seed(args.seed)  # the same sampling noise for every model
        if args.search == "compare":
            result = compare_search(sampler.model, value_model, tokenizer, records_by_size, template, args.ns,
                                    args.temperature, max_new_tokens, progress=True, **beam_settings)
            settings = {"model": name, "value": args.value, "ns": args.ns, "temperature": args.temperature,
                        **beam_settings, **data_settings}
            return {name: {"compare": result, "settings": settings}}, []
        k = args.samples if args.samples > 1 else None
        settings = {"model": name, "template": template, "template_from": template_source,
                    "scorer": "reward.score (strict)", "sampler": args.sampler, "device": str(device),
                    "dtype": str(kk_model.pick_dtype(device)), "samples": args.samples, "pass_at_k_k": k,
                    "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": max_new_tokens,
                    "batch_size": args.batch_size, "seed": args.seed, "search": args.search, **data_settings}
        if args.search == "beam":
            rows = score_beam_search(sampler.model, value_model, tokenizer, records_by_size, template, args.beam,
                                     args.temperature, max_new_tokens, progress=True, desc=name, **beam_settings)
            settings.update(beam=args.beam, value=str(args.value), **beam_settings,
                            step_end_ids=oreo.step_end_ids(tokenizer))
        else:
            rows = score_completions(sampler, records_by_size, template, tokenizer, args.samples, args.temperature,
                                     args.top_p, max_new_tokens, args.batch_size, progress=True, desc=name)
        results[name] = {**summarize_completions(rows, k), "settings": settings}
        all_rows += [{"model": name, **row} for row in rows]
        sampler.close()  # a vLLM engine must be shut down explicitly
    return results, all_rows


def show_results(args, results, rows):
    """The tables on stdout (--search compare: its table and --png's plot), then --out's JSON and --completions."""
    if args.search == "compare":
        curves_by_size = next(iter(results.values()))["compare"]
        print("\naccuracy (generated tokens per puzzle)\n\n" + compare_table(curves_by_size))
        plot_compare(curves_by_size, args.png)
        print(f"\nwrote {args.png}")
    else:
        for metric, title in METRIC_TITLES.items():
            print(f"\n{title}\n\n{markdown_table(results, metric, digits=0 if metric == 'mean_length' else 2)}")
        if any("pass_at_k" in r for r in results.values()):
            k = next(r["settings"]["pass_at_k_k"] for r in results.values())
            print(f"\npass@{k}\n\n{markdown_table(results, 'pass_at_k')}")
    if args.out:
        kk_data.write_atomically(args.out, json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    if args.completions:
        kk_data.save_jsonl(rows, args.completions)
        print(f"wrote {args.completions} ({len(rows)} completions)")


def main(argv=None):
    """Exit status: 0 done, 2 bad input (a one-line message on stderr naming what is wrong)."""
    args = parse_args(argv)
    try:
        if args.plot or args.report:
            out = plot_run(args.plot) if args.plot else write_report(args.report)
            if out is None:  # no matplotlib to plot with
                return 2
            print(f"wrote {out}")
            return 0
        results, rows = evaluate_models(args)
    except (ValueError, OSError) as error:
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 2
    show_results(args, results, rows)
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # on a busy 2-core machine more threads made small models ~20x slower (NOTES.md)
    sys.exit(main())
