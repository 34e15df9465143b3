"""Tests for OREO's test-time search (oreo.beam_search) and its use in eval.py (--search beam), on a tiny model."""
import importlib.util
import json
import types

import pytest
import torch

import eval as E
import kk_data
import model as M
import oreo
import rollout
from conftest import ROOT


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
    expanded, asked = [], []

    def sample_next_steps(policy, tokenizer, contexts, n, *args):  # contexts: the prompt [9] + a prefix
        expanded.extend(context[1:] for context in contexts)
        asked.append(n)
        return [steps[tuple(context[1:])][:n] for context in contexts]

    monkeypatch.setattr(oreo, "encode_prompts", lambda tokenizer, prompts: {"input_ids": torch.tensor([[9]]),
                                                                           "attention_mask": torch.tensor([[1]])})
    monkeypatch.setattr(oreo, "sample_next_steps", sample_next_steps)
    monkeypatch.setattr(oreo, "prefix_values", lambda vm, contexts, pad: [values[tuple(c[1:])] for c in contexts])
    tokenizer = types.SimpleNamespace(eos_token_id=0, pad_token_id=0,
                                      decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    result = oreo.beam_search(None, None, tokenizer, "prompt", 2, [], max_expansions=3, max_new_tokens=100)
    # round 2 expands the kept [2] then [1], best first; round 3 only [1, 5]: [2, 0] finished, [1, 3] and [2, 4] lost
    assert expanded == [[], [2], [1], [1, 5]]
    assert asked == [4, 2, 2]  # the root gets B x E samples (E = B here), as many as each later round expands
    assert (result.token_ids, result.value, result.finished, result.expansions) == ([2, 0], 0.9, True, 3)


def test_sample_next_steps_stop_at_a_step_end(models, prompt):
    policy, _, tokenizer = models
    step_ids = frequent_step_ends(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    torch.manual_seed(0)
    steps, = oreo.sample_next_steps(policy, tokenizer, [prompt_ids], 4, step_ids, 1.0, max_step_tokens=30)
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


def test_lockstep_search_keeps_each_prompts_candidates_apart(monkeypatch):
    """Two scripted prompts of different lengths (B = 2, E = 1): one sampling and one critic call a round for both,
    each keeps its own best, and a prompt whose candidates have all finished leaves the later rounds."""
    steps = {(8,): [[1, 0], [2]], (8, 2): [[3, 0]], (9, 9): [[5], [6]], (9, 9, 6): [[7]], (9, 9, 5): [[0]],
             (9, 9, 6, 7): [[0]]}
    values = {(8, 1): 0.5, (8, 2): 0.4, (8, 2, 3): 0.9, (9, 9, 5): 0.1, (9, 9, 6): 0.2, (9, 9, 6, 7): 0.3}
    calls = []

    def sample_next_steps(policy, tokenizer, contexts, n, *args):
        calls.append([tuple(c) for c in contexts])
        return [steps[tuple(c)][:n] for c in contexts]

    monkeypatch.setattr(oreo, "encode_prompts", lambda tokenizer, prompts: {
        "input_ids": torch.tensor([[0, 8], [9, 9]]), "attention_mask": torch.tensor([[0, 1], [1, 1]])})
    monkeypatch.setattr(oreo, "sample_next_steps", sample_next_steps)
    monkeypatch.setattr(oreo, "prefix_values", lambda vm, contexts, pad: [values[tuple(c)] for c in contexts])
    tokenizer = types.SimpleNamespace(eos_token_id=0, pad_token_id=0, decode=lambda ids, skip_special_tokens: "")
    a, b = oreo.beam_search_many(None, None, tokenizer, ["a", "b"], 2, [], max_expansions=5, expand=1)
    assert calls == [[(8,), (9, 9)], [(8, 2), (9, 9, 6), (9, 9, 5)], [(9, 9, 6, 7)]]
    assert (a.token_ids, a.value, a.expansions, a.generated) == ([2, 3, 0], 0.9, 2, 5)
    assert (b.token_ids, b.value, b.expansions, b.generated) == ([6, 7, 0], 0.3, 3, 5)


def test_prompts_searched_in_lockstep_each_get_the_search_they_get_alone(tiny_dir, models):
    """beam_search_many over prompts of different lengths = beam_search of each alone (near-greedy, a random V)."""
    policy, _, tokenizer = models
    value_model = oreo.ValueModel.from_pretrained(tiny_dir, "cpu")
    with torch.no_grad():
        value_model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    prompts = [kk_data.make_prompt(r, "tiny") for r in kk_data.generate(2, 2, seed=1) + kk_data.generate(3, 1, seed=1)]
    args = (2, frequent_step_ends(tokenizer))
    settings = dict(max_expansions=4, max_step_tokens=5, temperature=1e-4, max_new_tokens=12, expand=2)
    together = oreo.beam_search_many(policy, value_model, tokenizer, prompts, *args, **settings)
    alone = [oreo.beam_search(policy, value_model, tokenizer, prompt, *args, **settings) for prompt in prompts]
    def search(result):
        return result.token_ids, result.finished, result.expansions, result.generated

    assert [search(r) for r in together] == [search(r) for r in alone] and max(r.expansions for r in together) > 1
    assert [r.value for r in together] == pytest.approx([r.value for r in alone], abs=1e-5)  # (padding: float noise)


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
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    monkeypatch.setattr(oreo, "prefix_values", lambda vm, contexts, pad: scored.append(
        [c[n_prompt:] for c in contexts]) or real_prefix_values(vm, contexts, pad))
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


def test_gpu_search_defaults_are_oreos(monkeypatch):
    """On a GPU, --search beam is the paper's: B = 7, B next steps per kept candidate, temperature 1, 20 rounds."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    spec = importlib.util.spec_from_file_location("eval_on_gpu", ROOT / "eval.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    defaults = gpu.DEFAULT_BEAM, gpu.DEFAULT_EXPAND, gpu.SEARCH_TEMPERATURE, gpu.DEFAULT_MAX_EXPANSIONS
    assert defaults == (7, None, 1.0, 20) and gpu.SEARCH_BATCH == 1


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
    assert settings["temperature"] == E.SEARCH_TEMPERATURE == 0.7 and settings["puzzles"] == {"2": 2}  # CPU default
    rows = [json.loads(line) for line in completions.read_text().splitlines()]
    assert len(rows) == 2 and all(1 <= row["length"] <= 6 and row["completion"].startswith("<think>")
                                  for row in rows)
    assert "| model | 2 |" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--beam", "--search-batch"])
def test_cli_search_settings_below_one_are_refused(tiny_dir, tmp_path, capsys, option):
    with pytest.raises(SystemExit):
        E.parse_args([str(tiny_dir), "--search", "beam", "--value", str(tmp_path), option, "0"])
    assert "--max-step-tokens and --search-batch must be >= 1" in capsys.readouterr().err


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
