"""Tests for eval.py: pass@k, test-file loading, per-completion scores -> table numbers, templates, plots, CLI."""
import json
import math
import shutil

import pytest
import torch
from conftest import SHARED

import eval as E
import kk_data
import model as M
import rollout as R
from reward import score

SAMPLE = SHARED / "data" / "kk_sample.jsonl"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORTED = ("accuracy", "format_rate", "lenient_accuracy", "mean_length")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An untrained tiny model folder that says, like a train.py checkpoint, it was trained with "tiny"."""
    path = M.build_tiny(tmp_path_factory.mktemp("tiny"), kk_data.corpus_text(), hidden=32, layers=2, heads=2,
                        kv_heads=2, ffn=64)
    (path / M.EXTRA_FILE).write_text(json.dumps({"template": "tiny", "stage": "rl", "step": 1}))
    return path


@pytest.fixture(scope="module")
def sample_records():
    return kk_data.load_jsonl(SAMPLE)


def by_size(records):
    grouped = {}
    for record in records:
        grouped.setdefault(len(record["names"]), []).append(record)
    return grouped


def correct(record):
    return f"<think> thinking </think>\n<answer> {record['solution_text_format']} </answer>"


def swap_roles(record):
    """The solution with every knight and knave swapped: parseable, and wrong for everyone."""
    return record["solution_text_format"].replace("knight", "#").replace("knave", "knight").replace("#", "knave")


class ScriptedSampler:
    """Stands in for HFSampler: returns given completions (without the pre-filled "<think>") and lengths."""

    def __init__(self, completions_by_prompt, length=7):
        self.completions_by_prompt, self.length, self.calls = completions_by_prompt, length, []

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256):
        self.calls.append(dict(n=n, temperature=temperature, max_new_tokens=max_new_tokens, prompts=len(prompts)))
        texts = [text for p in prompts for text in self.completions_by_prompt[p][:n]]
        mask = torch.zeros(len(texts), self.length + 3)
        mask[:, :self.length] = 1
        empty = torch.zeros(len(texts), 1, dtype=torch.long)
        return R.Rollout(empty, empty, torch.zeros_like(mask).long(), mask, torch.zeros_like(mask), texts)


# ----------------------------------------------------------------------------------------------------------
# pass@k
def test_pass_at_k_hand_computed_case():
    # 5 samples, 2 right: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@5 = 1 (one of 5 is right)
    assert E.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert E.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert E.pass_at_k(5, 2, 5) == pytest.approx(1.0)


def test_pass_at_k_edge_cases():
    assert E.pass_at_k(4, 0, 3) == 0.0
    assert E.pass_at_k(4, 4, 1) == 1.0
    assert E.pass_at_k(4, 2, 3) == 1.0  # only 2 wrong samples: any 3 include a right one
    assert E.pass_at_k(1, 1, 1) == 1.0
    for n, c, k in [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            E.pass_at_k(n, c, k)


# ----------------------------------------------------------------------------------------------------------
# From completions to table numbers
def test_summarize_completions_counts_each_metric_per_size():
    rows = [  # size 2: one right, one right answer with broken format, one wrong; size 3: one right
        dict(size=2, record=0, correct=True, format=1.0, lenient_correct=True, length=10),
        dict(size=2, record=1, correct=False, format=-1.0, lenient_correct=True, length=20),
        dict(size=2, record=2, correct=False, format=1.0, lenient_correct=False, length=60),
        dict(size=3, record=0, correct=True, format=1.0, lenient_correct=True, length=5),
    ]
    result = E.summarize_completions(rows)
    assert result["accuracy"] == {2: pytest.approx(1 / 3), 3: 1.0}
    assert result["format_rate"] == {2: pytest.approx(2 / 3), 3: 1.0}
    assert result["lenient_accuracy"] == {2: pytest.approx(2 / 3), 3: 1.0}
    assert result["mean_length"] == {2: pytest.approx(30.0), 3: 5.0}
    assert "pass_at_k" not in result


def test_summarize_completions_pass_at_k_averages_puzzles():
    rows = [dict(size=4, record=r, sample=s, correct=(r == 0 and s < 2), format=1.0, lenient_correct=False,
                 length=1) for r in (0, 1) for s in range(5)]  # puzzle 0: 2 of 5 right; puzzle 1: none
    result = E.summarize_completions(rows, k=2)
    assert result["pass_at_k"] == {4: pytest.approx((0.7 + 0.0) / 2)}
    assert result["accuracy"] == {4: pytest.approx(2 / 10)}  # mean accuracy over all samples


def test_summarize_completions_pass_at_several_k():
    rows = [dict(size=3, record=r, sample=s, correct=(r == 0 and s < 2), format=1.0, lenient_correct=False,
                 length=1) for r in (0, 1) for s in range(8)]  # puzzle 0: 2 of 8 right; puzzle 1: none
    result = E.summarize_completions(rows, pass_ks=(1, 4, 8))
    assert "pass_at_k" not in result
    assert result["pass@1"] == {3: pytest.approx(2 / 16)}  # pass@1 is the mean accuracy of the samples
    assert result["pass@4"] == {3: pytest.approx((1 - math.comb(6, 4) / math.comb(8, 4)) / 2)}
    assert result["pass@8"] == {3: pytest.approx(0.5)}


def test_score_completions_keeps_each_score_breakdown(sample_records):
    records = by_size(sample_records)
    records = {2: records[2], 3: records[3][:1]}
    r2 = records[2]
    scripted = {  # hand-made completions; the sampler's text does not include the pre-filled "<think>"
        kk_data.make_prompt(r2[0], "base"): [correct(r2[0])[len("<think>"):]],
        kk_data.make_prompt(r2[1], "base"): [f" x <answer> {r2[1]['solution_text_format']} </answer>"],
        kk_data.make_prompt(r2[2], "base"): [f" x </think> <answer> {swap_roles(r2[2])} </answer>"],
        kk_data.make_prompt(records[3][0], "base"): [" nothing"],
    }
    rows = E.score_completions(ScriptedSampler(scripted), records, "base", batch_size=2)
    assert [(row["size"], row["record"], row["sample"]) for row in rows] == [(2, 0, 0), (2, 1, 0), (2, 2, 0),
                                                                              (3, 0, 0)]
    expected_totals = [3.0, -3.0, -0.5, -3.0]
    assert [row["total"] for row in rows] == expected_totals
    for row in rows:
        record = records[row["size"]][row["record"]]
        s = score(row["completion"], record["solution_text_format"])
        assert (row["format"], row["answer"], row["correct"], row["lenient_correct"]) == \
               (s.format, s.answer, s.correct, s.lenient_correct)
        assert row["completion"].startswith("<think>") and row["length"] == 7
    assert [row["lenient_correct"] for row in rows] == [True, True, False, False]


def test_score_completions_groups_samples_by_prompt_and_batches_by_sequences(sample_records):
    records = {2: by_size(sample_records)[2]}
    scripted = {kk_data.make_prompt(r, "tiny"): [correct(r)[7:], " wrong", " wrong"] for r in records[2]}
    sampler = ScriptedSampler(scripted)
    rows = E.score_completions(sampler, records, "tiny", samples=3, temperature=1.0, batch_size=6)
    assert [c["prompts"] for c in sampler.calls] == [2, 1]  # 6 sequences per call = 2 prompts x 3 samples
    assert [(row["record"], row["sample"], row["correct"]) for row in rows[:3]] == [(0, 0, True), (0, 1, False),
                                                                                   (0, 2, False)]
    assert E.summarize_completions(rows, k=3)["pass_at_k"] == {2: 1.0}


def test_evaluate_keeps_examples_from_its_own_generation(sample_records):
    grouped = by_size(sample_records)
    texts = {kk_data.make_prompt(r, "qwen-instruct"): [correct(r)[len("<think>"):]] for r in sample_records}
    plain, with_examples = ScriptedSampler(texts), ScriptedSampler(texts)
    numbers = E.evaluate(plain, grouped, "qwen-instruct", max_new_tokens=16)
    result = E.evaluate(with_examples, grouped, "qwen-instruct", max_new_tokens=16, examples=2)
    assert with_examples.calls == plain.calls  # no second generation pass
    assert {k: v for k, v in result.items() if k != "examples"} == numbers and "examples" not in numbers
    assert [(e["size"], e["record"]) for e in result["examples"]] == [
        (n, i) for n in sorted(grouped) for i in range(min(2, len(grouped[n])))]
    for example in result["examples"]:
        record = grouped[example["size"]][example["record"]]
        assert (example["quiz"], example["solution"]) == (record["quiz"], record["solution_text_format"])
        assert example["completion"] == correct(record) and example["length"] == 7
        assert (example["format"], example["answer"], example["total"]) == (1.0, 2.0, 3.0)


def test_several_samples_without_temperature_is_refused(sample_records):
    with pytest.raises(ValueError, match="temperature"):
        E.score_completions(ScriptedSampler({}), {2: sample_records[:1]}, "tiny", samples=4, temperature=0.0)


# ----------------------------------------------------------------------------------------------------------
# Greedy evaluation of a real (tiny) model
def test_greedy_evaluation_is_deterministic(tiny_dir, sample_records):
    tokenizer = M.load_tokenizer(tiny_dir)
    policy = M.load_model(tiny_dir, "cpu", dtype=torch.float32)
    records = {2: by_size(sample_records)[2][:2], 3: by_size(sample_records)[3][:1]}
    runs = []
    for seed in (0, 1):  # greedy decoding must not depend on the random state
        torch.manual_seed(seed)
        runs.append(E.score_completions(R.HFSampler(policy, tokenizer), records, "tiny", tokenizer,
                                        max_new_tokens=6))
    assert [r["completion"] for r in runs[0]] == [r["completion"] for r in runs[1]]
    assert [r["length"] for r in runs[0]] == [r["length"] for r in runs[1]]
    assert all(r["length"] > 0 for r in runs[0])


# ----------------------------------------------------------------------------------------------------------
# Test files in the benchmark's naming
def write_official_dir(folder, sample_records):
    for n, records in by_size(sample_records).items():
        kk_data.save_jsonl(records, folder / f"people{n}_num{len(records)}.jsonl")
    (folder / "README.txt").write_text("not a test file")
    return folder


def test_load_test_dir_reads_official_naming(tmp_path, sample_records):
    folder = write_official_dir(tmp_path, sample_records)
    loaded = E.load_test_dir(folder)
    assert loaded == by_size(sample_records)
    assert sorted(E.load_test_dir(folder, sizes=[3, 5], per_size=2)) == [3, 5]
    assert E.load_test_dir(folder, sizes=[3], per_size=2)[3] == by_size(sample_records)[3][:2]


def test_load_test_dir_names_file_and_line_of_a_malformed_row(tmp_path, sample_records):
    good = by_size(sample_records)[4]
    broken = {k: v for k, v in good[1].items() if k != "quiz"}
    path = tmp_path / "people4_num3.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good[0], broken, good[2])) + "\n")
    with pytest.raises(ValueError, match=r"people4_num3\.jsonl:2: .*quiz"):
        E.load_test_dir(tmp_path)


def test_load_test_dir_names_a_row_of_the_wrong_size(tmp_path, sample_records):
    path = tmp_path / "people3_num2.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in by_size(sample_records)[3][:1] + [sample_records[0]]))
    with pytest.raises(ValueError, match=r"people3_num2\.jsonl:2: a puzzle with 2 people"):
        E.load_test_dir(tmp_path)


def test_load_test_dir_without_test_files_or_folder(tmp_path):
    with pytest.raises(ValueError, match="no test files"):
        E.load_test_dir(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        E.load_test_dir(tmp_path / "missing")


def test_generated_split_is_train_py_held_out_prefix():
    held_out = kk_data.make_splits([3], 5, 4, seed=7)[1][3]
    args = E.parse_args(["Qwen/Qwen2.5-7B-Instruct-1M", "--people", "3", "--per-size", "3", "--seed", "7"])
    assert E.load_test_set(args)[0][3] == held_out[:3]


# ----------------------------------------------------------------------------------------------------------
# Templates and tables
def test_template_comes_from_mini_logic_rl_json(tmp_path, tiny_dir):
    assert E.trained_settings(tiny_dir)[:2] == ("tiny", str(tiny_dir / M.EXTRA_FILE))
    assert E.trained_settings(tiny_dir, template="base")[:2] == ("base", "--template")
    assert E.trained_settings(tmp_path)[:2] == ("qwen-instruct", "default")
    (tmp_path / M.EXTRA_FILE).write_text(json.dumps({"template": "fancy"}))
    with pytest.raises(ValueError, match="unknown template 'fancy'"):
        E.trained_settings(tmp_path)


def test_generation_budget_is_the_trained_one_unless_overridden(tmp_path):
    assert E.trained_settings(tmp_path)[2] == E.DEFAULT_MAX_NEW_TOKENS
    (tmp_path / M.EXTRA_FILE).write_text(json.dumps({"template": "tiny", "max_new_tokens": 400}))
    assert E.trained_settings(tmp_path)[2] == 400
    assert E.trained_settings(tmp_path, max_new_tokens=64)[2] == 64


def test_markdown_table_has_a_column_per_size_and_dash_for_missing():
    rows = {"a": {"accuracy": {"2": 0.5, "3": 0.25}}, "b": {"accuracy": {2: 1.0}}}
    assert E.markdown_table(rows).splitlines() == [
        "| model | 2 | 3 |", "|---|---|---|", "| a | 0.50 | 0.25 |", "| b | 1.00 | - |"]


# ----------------------------------------------------------------------------------------------------------
# Curves of a run
def synthetic_metrics(run_dir):
    rows = [{"kind": "train", "stage": "sft", "global_step": s, "sft_loss": 3.0 / s, "completion_length": 50.0}
            for s in (1, 2)]
    rows += [{"kind": "train", "stage": "rl", "global_step": s, "reward": -1 + s / 4, "reward_format": 0.5,
              "reward_answer": -1.0, "accuracy": s / 10, "format_rate": 0.5, "completion_length": 40.0 + s,
              "entropy": 1.5} for s in range(3, 7)]
    rows += [{"kind": "eval", "global_step": s, "accuracy": {"2": s / 10, "3": s / 20},
              "format_rate": {"2": 1.0, "3": 1.0}} for s in (2, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_curves_skip_panels_without_data(tmp_path):
    synthetic_metrics(tmp_path)
    panels = dict(E.curves(E.read_metrics(tmp_path)))
    assert "KL to the reference" not in panels  # no row has "kl"
    assert [label for label, _, _ in panels["accuracy"]] == ["accuracy (train)", "held-out, 2 people (greedy)",
                                                             "held-out, 3 people (greedy)"]
    assert panels["accuracy"][2][1] == [(2, 0.1), (6, 0.3)]
    assert panels["SFT loss"][0][1] == [(1, 3.0), (2, 1.5)]


def test_curves_draw_held_out_length_and_pass_at_k_before_and_after(tmp_path):
    synthetic_metrics(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        for step, length in ((0, 25.0), (6, 160.0)):
            f.write(json.dumps({"kind": "eval", "global_step": step, "mean_length": {"3": length},
                                "pass@1": {"3": 0.2}, "pass@8": {"3": 0.6}}) + "\n")
    panels = dict(E.curves(E.read_metrics(tmp_path)))
    lengths = dict((label, points) for label, points, _ in panels["mean completion length (tokens)"])
    assert lengths["held-out, 3 people (greedy)"] == [(0, 25.0), (6, 160.0)]
    assert [label for label, _, _ in panels["pass@k at the rollout temperature"]] == [
        "held-out, 3 people (pass@1)", "held-out, 3 people (pass@8)"]


def test_curves_keep_the_last_evaluation_of_a_step():
    rows = [{"kind": "eval", "stage": "initial", "global_step": 0, "accuracy": {"3": 0.0}},
            {"kind": "eval", "stage": "warmup", "global_step": 0, "accuracy": {"3": 0.4}},
            {"kind": "eval", "stage": "rl", "global_step": 20, "accuracy": {"3": 0.5}}]
    assert dict(E.curves(rows))["accuracy"][0][1] == [(0, 0.4), (20, 0.5)]


def test_trailing_mean_averages_the_last_window_values():
    assert E.trailing_mean([2, 4, 6, 8], 2) == [2, 3, 5, 7]
    assert E.trailing_mean([1, 2, 3], 10) == [1, 1.5, 2]


def test_plot_run_writes_a_png(tmp_path):
    synthetic_metrics(tmp_path)
    out = E.plot_run(tmp_path)
    data = out.read_bytes()
    assert out == tmp_path / "curves.png"
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


def test_read_metrics_names_a_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train"}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: invalid JSON"):
        E.read_metrics(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# report.md
def example(size, record, completion, total, fmt, answer, length=12):
    return {"size": size, "record": record, "quiz": f"Puzzle {size}-{record}: who is a knight?",
            "solution": "(1) Ann is a knight\n(2) Bob is a knave", "completion": completion, "length": length,
            "format": fmt, "answer": answer, "total": total}


def synthetic_run(run_dir, finished=True):
    """A run folder as train.py leaves it: config and defaults, an initial, warm-up and two RL evaluations."""
    (run_dir / "config.json").write_text(json.dumps({"MODEL": "tiny", "ALGO": "grpo", "STEPS": 40, "LR": 5e-5,
                                                     "PEOPLE": "3", "TEST_PER_SIZE": 200}))
    (run_dir / "defaults.json").write_text(json.dumps({"MODEL": "tiny", "ALGO": "grpo", "STEPS": 40, "LR": 2e-5,
                                                       "PEOPLE": "3", "TEST_PER_SIZE": 200}))
    evals = [("initial", 0, 0, 0.0, 0.0, example(3, 0, "<think> knave knave knave", -3.0, -1.0, -2.0, 400)),
             ("warmup", 0, 0, 0.40, 0.92, example(3, 0, "<think> try ``` </think><answer> (1) Ann is a knave "
                                                     "</answer>", -0.5, 1.0, -1.5)),
             ("rl", 20, 20, 0.42, 0.97, None),
             ("rl", 40, 40, 0.45, 0.99, example(3, 0, "<think> try </think><answer> (1) Ann is a knight (2) Bob "
                                                  "is a knave </answer>", 3.0, 1.0, 2.0, 57))]
    rows = [{"kind": "train", "stage": "rl", "step": s, "global_step": s, "reward": 0.1 * s} for s in (1, 2)]
    for stage, step, global_step, accuracy, format_rate, shown in evals:
        row = {"kind": "eval", "stage": stage, "step": step, "global_step": global_step,
               "accuracy": {"3": accuracy}, "format_rate": {"3": format_rate}, "mean_length": {"3": 100.0 - step}}
        if stage == "rl":
            row["pass@1"], row["pass@8"] = {"3": accuracy}, {"3": accuracy + 0.3}  # as train.py logs them
        if shown:
            row["examples"] = [shown]
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"seconds": 768.0}))


def test_report_has_changed_constants_tables_curves_and_scored_completions(tmp_path):
    synthetic_run(tmp_path)
    text = E.write_report(tmp_path).read_text()
    assert "Finished in 12.8 min." in text
    assert "| LR | `5e-05` | `2e-05` |" in text and "| STEPS |" not in text
    assert "| initial model | 0.00 |" in text and "| warm-up (start of RL) | 0.40 |" in text
    assert "| rl step 40 (final) | 0.45 |" in text and "| rl step 40 (final) | 60 |" in text  # accuracy, length
    assert "### pass@8" in text and "| rl step 20 | 0.72 |" in text and "| warm-up (start of RL) | - |" not in \
        text.split("### pass@8")[1].split("###")[0]
    assert "![training curves](curves.png)" in text and (tmp_path / "curves.png").is_file()
    assert "> Puzzle 3-0: who is a knight?" in text and "Right answer: (1) Ann is a knight (2) Bob is a knave" in text
    assert "**initial model** (global step 0): total -3 (format broken) = format -1 + answer -2; 400 tokens" in text
    assert "**rl step 40 (final)** (global step 40): total 3 (correct) = format +1 + answer +2; 57 tokens" in text
    assert "````text\n<think> try ``` </think>" in text  # a fence longer than the completion's own backticks
    assert text.count("```text\n") == 3  # the three kept completions of that one puzzle, in order
    order = [text.index(label) for label in ("initial model** (", "warm-up (start of RL)** (", "(final)** (")]
    assert order == sorted(order)


def test_report_of_a_run_in_progress_and_without_defaults(tmp_path):
    synthetic_run(tmp_path, finished=False)
    (tmp_path / "defaults.json").unlink()
    text = E.write_report(tmp_path, plot=False).read_text()
    assert "In progress: the latest evaluation is rl step 40 (global step 40)." in text
    assert "(final)" not in text and "defaults on the machine that wrote this report" in text


def test_report_shows_at_most_a_spread_of_evaluations():
    assert E.spread(list(range(20)), 4) == [0, 6, 13, 19]
    assert E.spread([1, 2], 8) == [1, 2]


def test_wandb_log_flattens_a_row_to_numbers_at_its_step():
    class Run:
        def log(self, data, step=None):
            self.logged = data, step
    run = Run()
    E.wandb_log(run, {"kind": "eval", "stage": "rl", "step": 2, "global_step": 7, "accuracy": {"3": 0.5},
                      "pass_at_k": {"3": {"8": 0.75}}, "done": True})
    assert run.logged == ({"eval/step": 2, "eval/accuracy/3": 0.5, "eval/pass_at_k/3/8": 0.75}, 7)


# ----------------------------------------------------------------------------------------------------------
# Command line, run in-process
def test_cli_writes_documented_json_and_completions(tiny_dir, tmp_path, capsys):
    out, completions = tmp_path / "r.json", tmp_path / "c.jsonl"
    status = E.main([str(tiny_dir), "--people", "2,3", "--per-size", "2", "--max-new-tokens", "5",
                     "--device", "cpu", "--out", str(out), "--completions", str(completions)])
    assert status == 0
    result = json.loads(out.read_text())[str(tiny_dir)]
    assert set(result) == set(REPORTED) | {"settings"}
    assert all(set(result[metric]) == {"2", "3"} for metric in REPORTED)
    settings = result["settings"]
    assert (settings["template"], settings["samples"], settings["temperature"]) == ("tiny", 1, 0.0)
    assert settings["max_new_tokens"] == 5 and settings["puzzles"] == {"2": 2, "3": 2}
    rows = [json.loads(line) for line in completions.read_text().splitlines()]
    assert len(rows) == 4 and all(row["model"] == str(tiny_dir) for row in rows)
    recomputed = E.summarize_completions(rows)  # the table numbers are those of the saved completions
    for metric in REPORTED:
        assert result[metric] == {str(size): value for size, value in recomputed[metric].items()}
    assert "| model | 2 | 3 |" in capsys.readouterr().out


def test_cli_compares_models_and_reports_pass_at_k(tiny_dir, tmp_path, capsys):
    other = tmp_path / "copy"
    shutil.copytree(tiny_dir, other)
    out, completions = tmp_path / "r.json", tmp_path / "c.jsonl"
    status = E.main([str(tiny_dir), str(other), "--people", "2", "--per-size", "2", "--max-new-tokens", "4",
                     "--samples", "2", "--temperature", "1.0", "--device", "cpu", "--out", str(out),
                     "--completions", str(completions)])
    assert status == 0
    results = json.loads(out.read_text())
    assert list(results) == [str(tiny_dir), str(other)]
    assert all(set(r["pass_at_k"]) == {"2"} and r["settings"]["pass_at_k_k"] == 2 for r in results.values())
    rows = [json.loads(line) for line in completions.read_text().splitlines()]
    texts = {name: [r["completion"] for r in rows if r["model"] == name] for name in results}
    assert len(texts[str(other)]) == 4
    assert texts[str(tiny_dir)] == texts[str(other)]  # same weights and the same sampling seed for each model
    printed = capsys.readouterr().out
    assert f"| {tiny_dir} |" in printed and f"| {other} |" in printed and "pass@2" in printed


def test_metrics_log_redraws_curves_after_an_evaluation_only_when_the_last_drawing_is_old(tmp_path, monkeypatch):
    log = E.MetricsLog(tmp_path, None, {})
    log.write({"kind": "train", "stage": "rl", "step": 1, "global_step": 1, "reward": 0.5})
    log.write({"kind": "eval", "stage": "rl", "step": 1, "global_step": 1, "accuracy": {"3": 0.2}})
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "curves.png").exists()  # drawn < 60 s ago
    monkeypatch.setattr(E, "REPLOT_SECONDS", 0)
    log.write({"kind": "eval", "stage": "rl", "step": 2, "global_step": 2, "accuracy": {"3": 0.3}})
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    (tmp_path / "curves.png").unlink()
    monkeypatch.setattr(E, "REPLOT_SECONDS", 3600)
    log.close()  # the end: always drawn
    assert (tmp_path / "curves.png").is_file()
    assert "![training curves](curves.png)" in (tmp_path / "report.md").read_text()


def test_cli_plot(tmp_path, capsys):
    synthetic_metrics(tmp_path)
    assert E.main(["--plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE


def test_cli_report_rewrites_the_report_from_the_run_folder(tmp_path, capsys):
    synthetic_run(tmp_path)
    expected = E.write_report(tmp_path).read_text()
    (tmp_path / "report.md").unlink()
    assert E.main(["--report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == expected
    moved = shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-moved")  # depends on the files only
    assert E.main(["--report", str(moved)]) == 0 and (moved / "report.md").read_text() == expected
    assert E.main(["--report", str(tmp_path / "nothing")]) == 2
    assert "no metrics log here" in capsys.readouterr().err


def one_line_error(capsys, argv):
    status = E.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err, "expected exit status 2 and a message"
    return err[-1]


def test_check_model_name_accepts_hub_names_and_refuses_missing_folders(tmp_path):
    E.check_model_name("Qwen/Qwen2.5-7B-Instruct-1M")  # left to transformers to fetch
    for name in (str(tmp_path / "final"), "./final", "no-slash-model"):
        with pytest.raises(ValueError, match="no such model folder"):
            E.check_model_name(name)
    with pytest.raises(ValueError, match="no config.json"):
        E.check_model_name(str(tmp_path))


def test_cli_missing_model_folder_is_a_one_line_error(tmp_path, capsys):
    missing = str(tmp_path / "runs" / "nothing" / "final")
    message = one_line_error(capsys, [missing, "--people", "2", "--per-size", "1"])
    assert message.startswith("error: ") and missing in message


def test_cli_model_folder_without_tokenizer(tiny_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, bare / name)
    message = one_line_error(capsys, [str(bare), "--people", "2", "--per-size", "1", "--device", "cpu"])
    assert str(bare) in message and "tokenizer" in message


def test_cli_malformed_test_row_names_file_and_line(tiny_dir, tmp_path, capsys, sample_records):
    path = tmp_path / "people2_num2.jsonl"
    path.write_text(json.dumps(sample_records[0]) + "\nnot json\n")
    message = one_line_error(capsys, [str(tiny_dir), "--data", str(tmp_path)])
    assert f"{path}:2: invalid JSON" in message


def test_cli_missing_data_folder(tiny_dir, tmp_path, capsys):
    message = one_line_error(capsys, [str(tiny_dir), "--data", str(tmp_path / "nope")])
    assert str(tmp_path / "nope") in message


def test_cli_refuses_samples_without_temperature(tiny_dir):
    with pytest.raises(SystemExit) as exit_info:
        E.main([str(tiny_dir), "--samples", "4"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("option", ["--out", "--completions", "--plot"])
def test_cli_unwritable_output_is_refused_before_the_evaluation(tiny_dir, tmp_path, monkeypatch, capsys, option):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(E, "evaluate_models", lambda args: pytest.fail("evaluated before checking the output"))
    monkeypatch.setattr(E, "plot_run", lambda run_dir: pytest.fail("plotted before checking the output"))
    target = tmp_path / "a_file" / ("" if option == "--plot" else "out.json")
    argv = [option, str(target)] if option == "--plot" else [str(tiny_dir), option, str(target)]
    with pytest.raises(SystemExit) as exit_info:
        E.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{option}: " in err and "a_file is a file, not a folder" in err


def test_read_metrics_drops_a_truncated_last_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train"}\n{"kind": "ev')  # a run killed mid-write
    assert E.read_metrics(tmp_path) == [{"kind": "train"}]
    assert "dropped a truncated last line" in capsys.readouterr().err


def test_cli_vllm_sampler_gets_the_loaded_model_not_its_name(tiny_dir, monkeypatch, capsys, tmp_path):
    built = []

    def recording_make_sampler(kind, model, tokenizer, **options):  # stands in for the vLLM engine
        built.append((kind, model, options))
        return R.HFSampler(model, tokenizer)

    monkeypatch.setattr(R, "make_sampler", recording_make_sampler)
    out = tmp_path / "results.json"
    assert E.main([str(tiny_dir), "--sampler", "vllm", "--people", "2", "--per-size", "1", "--max-new-tokens", "5",
                   "--out", str(out)]) == 0
    (kind, model, options), = built
    assert kind == "vllm" and isinstance(model, torch.nn.Module) and model.config.architectures
    assert options["max_model_len"] == min(E.VLLM_PROMPT_TOKENS + 5, model.config.max_position_embeddings)
    assert not model.training
    assert json.loads(out.read_text())[str(tiny_dir)]["settings"]["sampler"] == "vllm"


def test_report_shows_pass_at_k_before_and_after(tmp_path):
    synthetic_metrics(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        for step, value in ((0, 0.2), (6, 0.35)):
            f.write(json.dumps({"kind": "eval", "stage": "rl", "step": step, "global_step": step,
                                "accuracy": {"3": value}, "pass@1": {"3": value}, "pass@8": {"3": 0.7},
                                "sampled_length": {"3": 50.0}}) + "\n")
    E.write_report(tmp_path, plot=False)
    text = (tmp_path / "report.md").read_text()
    assert "### pass@1 at the rollout temperature" in text and "### pass@8 at the rollout temperature" in text
    assert text.index("### pass@1") < text.index("### pass@8")
    assert "| 0.35 |" in text and "### mean length of those samples" in text
