"""FSDP2 under torchrun, on CPU: 2 processes talking over gloo, each holding half of every parameter.

The `dist` tests launch `torchrun --standalone --nproc_per_node 2` in a subprocess (tests/fsdp_worker.py or
train.py itself), each launch once per module, and check what the processes wrote:
1. one training step on 2 ranks equals the same global batch in one process (plain, CPU offload, activation
   checkpointing, an untied LM head; bf16 mixed precision only approximately), every rank's logged grad_norm
   is the one process's, and the sampler's unsharded copy follows; model.load_sharded reads the checkpoint on
   rank 0 only; the embedding + LM-head unit is all-gathered once per token_logprobs forward;
2. a 2-rank train.py run killed after RL step 1 and resumed ends at step 3 with exactly the weights, Adam
   state and logged metrics of an uninterrupted run (an untied model: Qwen2.5-7B does not tie its embeddings;
   the tied ones are covered by the single-process resume test in tests/test_train.py);
3. its final HF folder reloads in transformers with the trained weights rounded to bf16.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import kk_data
import model as M
import train

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden=32, layers=2, heads=2, kv_heads=2, ffn=64)
TRAIN_ARGS = ["--MODEL=tiny", "--TINY_SIZES=" + repr({**TINY, "tie_embeddings": False}), "--WARMUP_CHECKPOINT=",
              "--SFT_STEPS=1",
              "--SFT_BATCH=4", "--STEPS=3", "--PROMPTS_PER_STEP=2", "--GROUP_SIZE=2", "--MAX_NEW_TOKENS=30",
              "--PEOPLE=2-2", "--TRAIN_PER_SIZE=20", "--TEST_PER_SIZE=2", "--EVAL_EVERY=100", "--SAVE_EVERY=1"]
EXACT = ["plain", "cpu_offload", "checkpointing", "untied"]  # fp32 variants, compared with the single-process step


def torchrun(*args, check=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stderr[-6000:]}")
    return done


def final_state(run_dir):
    """The fp32 model and Adam state of a finished 2-rank run: its last sharded checkpoint, read in one process."""
    pointer = torch.load(run_dir / "checkpoints" / "trainer_state.pt", weights_only=False)
    dcp_to_torch_save(run_dir / "checkpoints" / pointer["folder"], run_dir / "final_state.pt")
    return pointer, torch.load(run_dir / "final_state.pt", weights_only=False)


def train_rows(run_dir):
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and not k.endswith("per_s")} for r in rows]


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_step")
    model_dir = M.build_tiny(tmp / "tiny", kk_data.corpus_text(), **TINY)
    untied_dir = M.build_tiny(tmp / "untied", kk_data.corpus_text(), tie_embeddings=False, **TINY)
    torchrun("tests/fsdp_worker.py", "step", model_dir, untied_dir, tmp / "results.json")
    return json.loads((tmp / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 2-rank run, and one killed after RL step 1 then resumed with RESUME=True."""
    tmp = tmp_path_factory.mktemp("fsdp_train")
    whole, resumed = tmp / "whole", tmp / "resumed"
    torchrun("train.py", *TRAIN_ARGS, f"--OUT_DIR={whole}")
    killed = torchrun("tests/fsdp_worker.py", "stop-after", 1, *TRAIN_ARGS, f"--OUT_DIR={resumed}", check=False)
    assert killed.returncode != 0 and not (resumed / "checkpoints" / "final").exists()
    assert torch.load(resumed / "checkpoints" / "trainer_state.pt")["folder"] == "sharded_rl_1"
    torchrun("train.py", *TRAIN_ARGS, f"--OUT_DIR={resumed}", "--RESUME=True")
    return whole, resumed


# ---- 1. one step: 2 ranks == 1 process ----------------------------------------------------------------------

@pytest.mark.dist
@pytest.mark.parametrize("variant", EXACT)
def test_two_ranks_take_the_same_step_as_one_process(step_results, variant):
    result = step_results[variant]
    # Tolerance: float32 sums in another order. Gradients agree to 1e-5 relative; after AdamW moved weights by
    # up to lr = 1e-3, the weights agree to 1e-6 (a missing or doubled gradient share would be off by ~1e-3).
    assert result["max_grad_rel_diff"] < 1e-5
    assert result["max_param_diff"] < 1e-6 < result["max_update"]
    assert result["tied"] == (variant != "untied")


@pytest.mark.dist
@pytest.mark.parametrize("variant", EXACT)
def test_every_rank_logs_the_grad_norm_of_the_whole_model(step_results, variant):
    # model.clip_and_step's norm (train.py's grad_norm, averaged over ranks): this rank's shard alone would be
    # smaller, by about 1/sqrt(2) here
    result = step_results[variant]
    assert result["grad_norm_of_each_rank"] == pytest.approx([result["single_grad_norm"]] * 2, rel=1e-5)


@pytest.mark.dist
def test_activation_checkpointing_recomputes_each_layer(step_results):
    # 2 micro-batches: layer 0 of the policy starts 2 forwards, and 2 more to recompute them in backward
    assert step_results["plain"]["layer_forward_calls"] == 2
    assert step_results["checkpointing"]["layer_forward_calls"] == 4


@pytest.mark.dist
def test_mixed_precision_step_is_close_to_the_fp32_step(step_results):
    result = step_results["mixed_precision"]
    # bf16 compute keeps ~3 significant digits; a wrong reduction (mean for sum, a missing rank) is off by 50%
    assert result["max_grad_rel_diff"] < 0.05
    assert result["grad_norm_of_each_rank"] == pytest.approx([result["single_grad_norm"]] * 2, rel=0.01)


@pytest.mark.dist
@pytest.mark.parametrize("variant", EXACT)
def test_the_samplers_unsharded_copy_follows_the_update(step_results, variant):
    assert step_results[variant]["sampler_copy_is_unsharded"]  # sync_weights copied, not rebound to the shards
    assert step_results[variant]["sampler_copy_logprob_diff"] < 1e-5


@pytest.mark.dist
@pytest.mark.parametrize("suffix", ["", "_untied"])
def test_load_sharded_reads_the_checkpoint_on_rank_0_only(step_results, suffix):
    result = step_results["load_sharded" + suffix]
    assert result["checkpoint_reads_per_rank"] == [2, 0]  # policy + reference on rank 0; nothing on rank 1
    assert result["max_weight_diff"] == 0 and result["reference_bf16_exact"] and result["reference_frozen"]
    assert result["logprob_gap"] < 1e-6  # the rotary buffers (in no checkpoint) were rebuilt
    assert result["tied"] == (suffix == "")


@pytest.mark.dist
@pytest.mark.parametrize("suffix", ["", "_untied"])
def test_head_unit_is_gathered_once_per_token_logprobs_call_and_released_after_no_grad(step_results, suffix):
    # without model.head_unit_gathered, FSDP2 gathers it for the embedding and again after the first LM-head chunk
    # (forward 2), and leaves it gathered after a no-grad call
    counts = step_results["head_unit_all_gathers" + suffix]
    assert counts["chunks"] >= 3
    assert counts["forward_with_grad"] == 1 and counts["backward"] == 1
    assert counts["no_grad"] == [1, 1] and counts["released_after_no_grad"]


# ---- 2. kill and resume under torchrun ----------------------------------------------------------------------

@pytest.mark.dist
def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights_and_adam_state(runs):
    whole, resumed = runs
    (pointer, expected), (_, got) = final_state(whole), final_state(resumed)
    assert pointer == {"folder": "sharded_rl_3", "world_size": 2}
    for part in ("model", "optimizer"):
        flat_expected, flat_got = flatten(expected[part]), flatten(got[part])
        assert flat_expected.keys() == flat_got.keys()
        for key, value in flat_expected.items():
            assert torch.equal(flat_got[key], value) if torch.is_tensor(value) else flat_got[key] == value, key
    assert train_rows(resumed) == train_rows(whole)  # the same samples, rewards, losses, step by step


def flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}/{key}").items()}


@pytest.mark.dist
def test_only_the_latest_sharded_checkpoint_is_kept(runs):
    whole, _ = runs
    assert sorted(p.name for p in (whole / "checkpoints").glob("sharded_*")) == ["sharded_rl_3"]


# ---- 3. the HF folder of a sharded run ----------------------------------------------------------------------

@pytest.mark.dist
def test_final_hf_folder_reloads_with_the_trained_weights_in_bf16(runs):
    whole, _ = runs
    _, trained = final_state(whole)
    reloaded = M.load_model(whole / "checkpoints" / "final", "cpu", dtype=torch.float32).state_dict()
    assert reloaded.keys() == trained["model"].keys()
    for name, weight in trained["model"].items():
        assert torch.equal(reloaded[name], weight.to(torch.bfloat16).float()), name


# ---- single process: the checks and helpers that need no second rank ---------------------------------------

def test_prompts_per_step_must_divide_among_the_ranks(monkeypatch):
    monkeypatch.setattr(train, "WORLD", 2)
    monkeypatch.setattr(train, "PROMPTS_PER_STEP", 3)
    with pytest.raises(SystemExit, match="PROMPTS_PER_STEP=3"):
        train.check_constants()


def test_iter_full_state_of_a_plain_model_yields_its_state_dict_with_ties_kept(tmp_path):
    plain = M.load_model(M.build_tiny(tmp_path, kk_data.corpus_text(), **TINY), "cpu")
    full = dict(M.iter_full_state(plain))
    assert full.keys() == plain.state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in plain.state_dict().items())
    assert full["lm_head.weight"] is full["model.embed_tokens.weight"]


def test_copy_full_weights_copies_every_weight_and_rejects_another_shape(tmp_path):
    source = M.load_model(M.build_tiny(tmp_path / "a", kk_data.corpus_text(), seed=1, **TINY), "cpu")
    target = M.load_model(M.build_tiny(tmp_path / "b", kk_data.corpus_text(), seed=2, **TINY), "cpu")
    M.copy_full_weights(source, target)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    wider = M.load_model(M.build_tiny(tmp_path / "c", kk_data.corpus_text(), **{**TINY, "ffn": 96}), "cpu")
    with pytest.raises(ValueError, match="mlp"):
        M.copy_full_weights(source, wider)
