"""Tests for OREO's test-time search (oreo.beam_search) and its use in eval.py (--search beam), on a tiny model."""
import json
import types

import pytest
import torch

import eval as E
import kk_data
import model as M
import oreo
import rollout


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = M.build_tiny(tmp_path_factory.mktemp("tiny"), kk_data.corpus_text(), hidden=32, layers=2, heads=2,
                        kv_heads=2, ffn=64)
    (path / M.EXTRA_FILE).write_text(json.dumps({"template": "tiny"}))
    return path


@pytest.fixture(scope="module")
def models(tiny_dir):
    """(policy, value model with V = 0 everywhere, tokenizer)."""
    policy = M.load_model(tiny_dir, "cpu")
    policy.eval()
    return policy, oreo.ValueModel.from_pretrained(tiny_dir, "cpu"), M.load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def prompt():
    return kk_data.make_prompt(kk_data.generate(2, 1, seed=0)[0], "tiny")


def frequent_step_ends(tokenizer):
    """Every third vocabulary id ends a step, so that the untrained model's steps are a few tokens long."""
    return list(range(3, len(tokenizer), 3))


def completion_tokens(out):
    return out.completion_ids[0][out.completion_mask[0].bool()].tolist()


# ----------------------------------------------------------------------------------------------------------
# Building blocks
def test_through_first_stop():
    assert oreo.through_first_stop([5, 7, 9, 7, 0], {7}) == [5, 7]
    assert oreo.through_first_stop([5, 6], {7}) == [5, 6]


@pytest.mark.exercise(12)
def test_keep_best_takes_the_top_values_and_splits_off_the_finished():
    candidates = [[1], [2, 0], [3], [4, 0]]                        # 0 plays EOS
    values = [0.1, 0.9, 0.5, 0.2]
    partial, finished = oreo.keep_best(candidates, values, 3, is_finished=lambda tokens: tokens[-1] == 0)
    assert partial == [([3], 0.5)]
    assert finished == [([2, 0], 0.9), ([4, 0], 0.2)]


@pytest.mark.exercise(12)
def test_keep_best_breaks_ties_by_order():
    partial, _ = oreo.keep_best([[1], [2], [3]], [0.0, 0.0, 0.0], 2, is_finished=lambda tokens: False)
    assert [tokens for tokens, _ in partial] == [[1], [2]]


@pytest.mark.exercise(12)
def test_beam_search_rounds_expand_only_the_kept_partial_candidates(monkeypatch):
    """beam_search with scripted steps and values (no model): each round keeps the B best candidates, sends the
    finished ones (ending in EOS = 0) to the pool and expands only the kept partial ones."""
    steps = {(): [[1], [2]], (2,): [[4], [0]], (1,): [[3], [5]], (1, 5): [[0], [7]]}
    values = {(1,): 0.1, (2,): 0.9, (2, 4): 0.2, (1, 3): 0.5, (1, 5): 0.8, (1, 5, 7): 0.6}  # [.., 0]: V before EOS
    expanded = []

    def sample_next_steps(policy, tokenizer, prompt_ids, prefixes, n, *args):
        expanded.extend(prefixes)
        return [steps[tuple(prefix)][:n] for prefix in prefixes]

    monkeypatch.setattr(oreo, "encode_prompts", lambda tokenizer, prompts: {"input_ids": torch.tensor([[9]])})
    monkeypatch.setattr(oreo, "sample_next_steps", sample_next_steps)
    monkeypatch.setattr(oreo, "prefix_values",
                        lambda vm, prompt_ids, prefixes, pad: [values[tuple(c)] for c in prefixes])
    tokenizer = types.SimpleNamespace(eos_token_id=0, pad_token_id=0,
                                      decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    result = oreo.beam_search(None, None, tokenizer, "prompt", 2, [], max_expansions=3, max_new_tokens=100)
    # round 2 expands the kept [2] then [1], best first; round 3 only [1, 5]: [2, 0] finished, [1, 3] and [2, 4] lost
    assert expanded == [[], [2], [1], [1, 5]]
    assert (result.token_ids, result.value, result.finished, result.expansions) == ([2, 0], 0.9, True, 3)


def test_sample_next_steps_stop_at_a_step_end(models, prompt):
    policy, _, tokenizer = models
    step_ids = frequent_step_ends(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    torch.manual_seed(0)
    steps, = oreo.sample_next_steps(policy, tokenizer, prompt_ids, [[]], 4, step_ids, 1.0, max_step_tokens=30)
    assert len(steps) == 4
    stops = set(step_ids) | {tokenizer.eos_token_id}
    for step in steps:
        assert all(token not in stops for token in step[:-1])      # no stop token inside a step
        assert step[-1] in stops or len(step) == 30


# ----------------------------------------------------------------------------------------------------------
# The search
@pytest.mark.parametrize("seed", [0, 1])
def test_beam_one_with_a_constant_value_is_plain_sampling(models, prompt, seed):
    """B = 1 and V = 0: sampling step after step from the same seed draws the same tokens as one sampling run."""
    policy, value_model, tokenizer = models
    torch.manual_seed(seed)
    plain = rollout.HFSampler(policy, tokenizer).generate([prompt], n=1, temperature=1.0, max_new_tokens=30)
    torch.manual_seed(seed)
    result = oreo.beam_search(policy, value_model, tokenizer, prompt, 1, frequent_step_ends(tokenizer),
                              max_expansions=100, max_new_tokens=30)
    assert result.expansions > 3                                    # it really went step by step
    assert result.token_ids == completion_tokens(plain)
    assert result.text == plain.completions[0]


def test_beam_search_respects_max_expansions(models, prompt, monkeypatch):
    policy, value_model, tokenizer = models
    rounds, real_prefix_values = [], oreo.prefix_values
    monkeypatch.setattr(oreo, "prefix_values", lambda *args: rounds.append(1) or real_prefix_values(*args))
    torch.manual_seed(0)
    result = oreo.beam_search(policy, value_model, tokenizer, prompt, 2, [], max_expansions=3, max_step_tokens=2,
                              max_new_tokens=100)
    assert result.expansions == 3 and len(rounds) == 3
    assert len(result.token_ids) <= 3 * 2 and not result.finished


def test_beam_search_returns_the_best_finished_candidate(models, prompt, monkeypatch):
    """V = the id of the last token. Two rounds of one-token steps with max_new_tokens = 2: every second-round
    candidate is finished, and the answer must be the one whose last token id is largest."""
    policy, value_model, tokenizer = models
    monkeypatch.setattr(value_model, "last_value", lambda ids, attention: ids[:, -1].float())
    scored, real_prefix_values = [], oreo.prefix_values
    monkeypatch.setattr(oreo, "prefix_values",
                        lambda vm, prompt_ids, prefixes, pad: scored.append(prefixes) or
                        real_prefix_values(vm, prompt_ids, prefixes, pad))
    torch.manual_seed(0)
    result = oreo.beam_search(policy, value_model, tokenizer, prompt, 3, [], max_expansions=20, max_step_tokens=1,
                              max_new_tokens=2)
    assert result.finished and result.expansions == 2 and len(scored) == 2
    assert len(result.token_ids) == 2
    best = max(candidate[-1] for candidate in scored[1])
    assert result.token_ids[-1] == best and result.value == best
    first_round_best = sorted((candidate[-1] for candidate in scored[0]), reverse=True)[:3]
    assert result.token_ids[0] in first_round_best                  # it grew from a kept first-round candidate


def test_beam_search_without_a_finished_candidate_returns_the_best_partial(models, prompt, monkeypatch):
    policy, value_model, tokenizer = models
    monkeypatch.setattr(value_model, "last_value", lambda ids, attention: ids[:, -1].float())
    torch.manual_seed(0)
    result = oreo.beam_search(policy, value_model, tokenizer, prompt, 3, [], max_expansions=1, max_step_tokens=1,
                              max_new_tokens=10)
    assert not result.finished and len(result.token_ids) == 1
    assert result.value == result.token_ids[0]


def test_beam_search_rejects_bad_arguments(models, prompt):
    policy, value_model, tokenizer = models
    with pytest.raises(ValueError, match="beam_search needs"):
        oreo.beam_search(policy, value_model, tokenizer, prompt, 0, [])
    with pytest.raises(ValueError, match="temperature > 0"):
        oreo.beam_search(policy, value_model, tokenizer, prompt, 2, [], temperature=0.0)


# ----------------------------------------------------------------------------------------------------------
# eval.py --search beam
@pytest.fixture(scope="module")
def value_dir(tiny_dir, tmp_path_factory):
    value_model = oreo.ValueModel.from_pretrained(tiny_dir, "cpu")
    with torch.no_grad():
        value_model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    return value_model.save(tmp_path_factory.mktemp("value"))


def test_cli_beam_search_writes_the_json(tiny_dir, value_dir, tmp_path, capsys):
    out, completions = tmp_path / "r.json", tmp_path / "c.jsonl"
    status = E.main([str(tiny_dir), "--search", "beam", "--beam", "2", "--value", str(value_dir), "--people", "2",
                     "--per-size", "2", "--max-new-tokens", "6", "--max-step-tokens", "3", "--device", "cpu",
                     "--out", str(out), "--completions", str(completions)])
    assert status == 0
    result = json.loads(out.read_text())[str(tiny_dir)]
    assert set(result) == {"accuracy", "format_rate", "lenient_accuracy", "mean_length", "settings"}
    settings = result["settings"]
    assert (settings["search"], settings["beam"], settings["value"]) == ("beam", 2, str(value_dir))
    assert settings["temperature"] == 1.0 and settings["puzzles"] == {"2": 2}
    rows = [json.loads(line) for line in completions.read_text().splitlines()]
    assert len(rows) == 2 and all(1 <= row["length"] <= 6 and row["completion"].startswith("<think>")
                                  for row in rows)
    assert "| model | 2 |" in capsys.readouterr().out


def test_cli_beam_search_needs_a_value_model_folder(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        E.main([str(tiny_dir), "--search", "beam"])
    assert exit_info.value.code == 2
    status = E.main([str(tiny_dir), "--search", "beam", "--value", str(tiny_dir), "--people", "2",
                     "--per-size", "1", "--device", "cpu"])                 # an LM folder: no value head
    assert status == 2 and oreo.HEAD_FILE in capsys.readouterr().err


def test_cli_compare_writes_the_curve_table_json_and_png(tiny_dir, value_dir, tmp_path, capsys):
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    status = E.main([str(tiny_dir), "--search", "compare", "--ns", "2,1", "--value", str(value_dir), "--people", "2",
                     "--per-size", "2", "--max-new-tokens", "6", "--max-step-tokens", "3", "--device", "cpu",
                     "--out", str(out), "--png", str(png)])
    assert status == 0 and png.stat().st_size > 0
    result = json.loads(out.read_text())[str(tiny_dir)]
    curve = result["compare"]["2"]
    assert set(curve) == set(E.TTC_METHODS) and all(set(points) == {"1", "2"} for points in curve.values())
    assert all(0 <= p["accuracy"] <= 1 and 0 < p["tokens"] for points in curve.values() for p in points.values())
    assert curve["random"]["2"]["tokens"] > curve["random"]["1"]["tokens"]   # 2 samples cost more than 1
    assert result["settings"]["ns"] == [1, 2] and "| 2 | beam |" in capsys.readouterr().out
