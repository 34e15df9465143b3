"""Tests for the critic-only OREO phase, the critic's quality metrics and eval.py's test-time-compute comparison."""
import types

import pytest
import torch

import eval as E
import kk_data
import model as M
import oreo


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return M.build_tiny(tmp_path_factory.mktemp("tiny"), kk_data.corpus_text(), hidden=32, layers=2, heads=2,
                        kv_heads=2, ffn=64)


@pytest.fixture(scope="module")
def rows():
    """Six rows: three prompts, each with the right answer (reward 1) and an empty one (reward 0)."""
    out = []
    for record in kk_data.generate(2, 3, seed=0):
        right = kk_data.sft_completion(record, "answer").removeprefix("<think>")
        wrong = " </think>\n<answer> </answer>"                                 # (an empty answer)
        out += [{"prompt": kk_data.make_prompt(record, "tiny"), "response": text, "reward": reward, "size": 2,
                 "index": record["index"]} for text, reward in ((right, 1.0), (wrong, 0.0))]
    return out


def test_auc_counts_pairs_and_ties_half():
    scores, labels = torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert oreo.auc(scores, labels) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert oreo.auc(scores, torch.ones(4)) is None                          # one class only


def test_split_by_prompt_holds_out_whole_prompts(rows):
    train, held = oreo.split_by_prompt(rows, 1 / 3, seed=0)
    assert len(held) == 2 and len(train) == 4
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_critic_quality_of_the_zero_critic(tiny_dir, rows):
    value_model = oreo.ValueModel.from_pretrained(tiny_dir, "cpu", dtype=torch.float64)
    q = oreo.critic_quality(value_model, M.load_tokenizer(tiny_dir), rows, batch_size=4)
    # V = 0 everywhere: every pair ties (AUC 0.5) and the squared error is E[R^2] = 0.5 against Var(R) = 0.25
    assert (q["value_auc_first"], q["value_auc_last"]) == (0.5, 0.5)
    assert q["value_explained_variance"] == pytest.approx(1 - 0.5 / 0.25)
    assert (q["value_first_mean"], q["reward_mean"]) == (0.0, 0.5)


def test_offline_values_read_the_first_and_the_last_state(tiny_dir, rows):
    """offline_values (which sorts the rows by length to pad less) gives each row the values of its own forward."""
    value_model = oreo.ValueModel.from_pretrained(tiny_dir, "cpu", dtype=torch.float64)
    with torch.no_grad():
        value_model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    tokenizer = M.load_tokenizer(tiny_dir)
    first, last, _, rewards = oreo.offline_values(value_model, tokenizer, rows, batch_size=4)
    for i, row in enumerate(rows):
        batch = oreo.encode_offline_batch(tokenizer, [row], "cpu")
        values = value_model(batch["input_ids"], batch["attention_mask"], batch["n_prompt"])[0]   # [C]
        assert first[i].item() == pytest.approx(values[0].item())
        assert last[i].item() == pytest.approx(values[-1].item())            # the state before EOS
        assert rewards[i] == row["reward"]


@pytest.mark.parametrize("level", ["token", "step"])
def test_critic_step_is_the_value_loss_with_a_policy_equal_to_its_reference(tiny_dir, rows, level):
    """critic_step's loss and gradient = oreo.losses' value loss with log pi = log pi_ref, over the whole batch,
    whatever the micro-batch size."""
    tokenizer = M.load_tokenizer(tiny_dir)
    value_model = oreo.ValueModel.from_pretrained(tiny_dir, "cpu", dtype=torch.float64)
    with torch.no_grad():
        value_model.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    batch, starts = oreo.encode_with_step_starts(tokenizer, rows, "cpu", level)
    values = value_model(batch["input_ids"], batch["attention_mask"], batch["n_prompt"])
    logp = torch.randn_like(values)                                         # any log pi, as long as pi = pi_ref
    _, expected = oreo.losses(logp, logp, values, batch["rewards"], batch["mask"], oreo.BETA, level, starts)
    expected.backward()
    expected_grad = value_model.head.weight.grad.clone()
    value_model.zero_grad()
    optimizer = torch.optim.SGD(value_model.parameters(), lr=0.0)          # a step that changes nothing
    seen = {}
    optimizer.step = lambda: seen.setdefault("grad", value_model.head.weight.grad.clone())
    metrics = oreo.critic_step(value_model, optimizer, tokenizer, rows, level, micro_batch=4, grad_clip=1e9)
    assert metrics["value_loss"] == pytest.approx(expected.item(), rel=1e-9)
    assert torch.allclose(seen["grad"], expected_grad, rtol=1e-6, atol=1e-12)


def test_fit_critic_separates_right_from_wrong_answers(tiny_dir, rows):
    """On rows whose answer decides the reward, a few critic steps rank the right answers' last states above
    the empty ones' (the zero critic ties them all: AUC 0.5)."""
    torch.manual_seed(0)
    tokenizer = M.load_tokenizer(tiny_dir)
    value_model = oreo.ValueModel.from_pretrained(tiny_dir, "cpu")
    steps = list(oreo.fit_critic(value_model, tokenizer, rows, 30, 6, 3e-3, "token", 6))
    assert steps[-1]["value_loss"] < 0.5 * steps[0]["value_loss"]
    assert oreo.critic_quality(value_model, tokenizer, rows)["value_auc_last"] > 0.9


def test_beam_search_scores_a_finished_candidate_before_its_eos(monkeypatch):
    scored = []

    def prefix_values(value_model, contexts, pad):  # contexts: the prompt [9] + a candidate
        scored.extend(tuple(context[1:]) for context in contexts)
        return [0.0] * len(contexts)

    monkeypatch.setattr(oreo, "encode_prompts", lambda tokenizer, prompts: {"input_ids": torch.tensor([[9]]),
                                                                           "attention_mask": torch.tensor([[1]])})
    monkeypatch.setattr(oreo, "sample_next_steps", lambda *args: [[[5, 0], [6]]])
    monkeypatch.setattr(oreo, "prefix_values", prefix_values)
    tokenizer = types.SimpleNamespace(eos_token_id=0, pad_token_id=0, decode=lambda ids, skip_special_tokens: "")
    result = oreo.beam_search(None, None, tokenizer, "prompt", 2, [], max_expansions=1, expand=1)
    assert scored == [(5,), (6,)] and result.token_ids == [5, 0]            # [5, 0] scored as [5]
    assert result.generated == 3


def test_majority_pick_takes_the_first_of_the_most_voted_answer():
    record = {"names": ["Ann", "Bob"]}

    def row(answer, correct=False, fmt=1.0):
        return {"completion": f"<think></think> <answer> {answer} </answer>", "format": fmt, "correct": correct}

    a, b = "Ann is a knight Bob is a knave", "Ann is a knave Bob is a knave"
    rows = [row(a), row(b, True), row("nothing"), row(b, True), row(a, fmt=-1.0)]
    assert E.claimed_answer(rows[0], record) == ("knight", "knave")
    assert E.claimed_answer(rows[2], record) is None and E.claimed_answer(rows[4], record) is None
    assert E.majority_pick(rows, record) is rows[1]
    assert E.majority_pick(rows[2:3], record) is rows[2]                    # nothing to vote for: the first


def test_compare_search_methods_and_their_bookkeeping(tiny_dir, monkeypatch):
    """With scripted samples (two puzzles, N up to 4) every method's accuracy is the hand-computed one."""
    records = kk_data.generate(2, 2, seed=0)
    correct = {0: [0, 1, 1, 0], 1: [1, 0, 0, 0]}                           # per puzzle, per sample
    samples = [{"size": 2, "record": p, "sample": s, "completion": f"<think>{p} {s}", "length": 10 + s,
                "format": -1.0, "correct": bool(c)} for p, cs in correct.items() for s, c in enumerate(cs)]
    monkeypatch.setattr(E, "score_completions", lambda *args, **kwargs: [dict(r) for r in samples])
    values = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.0, 0.5, 0.4, 0.2], dtype=torch.float64)  # best: 1 then 5
    monkeypatch.setattr(oreo, "offline_values", lambda vm, tok, rows: (None, values, None, None))
    monkeypatch.setattr(E, "score_beam_search", lambda *args, **kwargs: [{"correct": True, "generated": 7}] * 2)
    policy = M.load_model(tiny_dir, "cpu")  # (its samples are scripted above)
    result = E.compare_search(policy, None, M.load_tokenizer(tiny_dir), {2: records}, "tiny", ns=(1, 4))[2]
    assert result["random"][1]["accuracy"] == 0.5 and result["random"][4]["accuracy"] == (0.5 + 0.25) / 2
    assert result["best-of-N"][1]["accuracy"] == 0.5 and result["best-of-N"][4]["accuracy"] == 0.5
    assert result["majority"][4]["accuracy"] == 0.5                        # no answer to vote for: the first
    assert result["random"][4]["tokens"] == 10 + 11 + 12 + 13 and result["beam"][4] == {"accuracy": 1.0,
                                                                                           "tokens": 7}


def test_sample_next_steps_batches_contexts_of_different_lengths(tiny_dir):
    """One left-padded decode call for several contexts gives each the steps it gets alone (near-greedy)."""
    policy, tokenizer = M.load_model(tiny_dir, "cpu"), M.load_tokenizer(tiny_dir)
    prompt_ids = tokenizer(kk_data.make_prompt(kk_data.generate(2, 1, seed=0)[0], "tiny"),
                           add_special_tokens=False).input_ids
    contexts, args = [prompt_ids, prompt_ids + [5, 6, 7, 8]], (list(range(3, len(tokenizer), 7)), 1e-4, 6)
    together = oreo.sample_next_steps(policy, tokenizer, contexts, 2, *args)
    alone = [oreo.sample_next_steps(policy, tokenizer, [c], 2, *args)[0] for c in contexts]
    assert together == alone and all(len(steps) == 2 for steps in together)


def test_lora_critic_gradient_reaches_only_the_adapters_and_the_head(tiny_dir, rows, tmp_path):
    """VALUE_LORA_RANK > 0: the value loss trains the LoRA adapters and the head, nothing of the backbone; the
    saved adapters + head load back (eval.load_value_model) to the same values."""
    torch.manual_seed(0)
    tokenizer = M.load_tokenizer(tiny_dir)
    value_model = oreo.ValueModel.from_pretrained(tiny_dir, "cpu", lora_rank=4)
    with torch.no_grad():
        value_model.head.weight.normal_()
    batch = oreo.encode_offline_batch(tokenizer, rows, "cpu")
    args = batch["input_ids"], batch["attention_mask"], batch["n_prompt"]
    values = value_model(*args)
    zeros = torch.zeros_like(values.detach())
    oreo.losses(zeros, zeros, values, batch["rewards"], batch["mask"], oreo.BETA)[1].backward()
    moved = {n for n, p in value_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "head.weight" in moved and any("lora_B" in n for n in moved)      # (lora_A's gradient is B^T... = 0)
    assert all(n == "head.weight" or "lora_" in n for n in moved)
    frozen = [n for n, p in value_model.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n for n in frozen)
    torch.optim.Adam([p for p in value_model.parameters() if p.requires_grad], lr=1e-2).step()
    value_model.save(tmp_path / "value")
    loaded = E.load_value_model(tmp_path / "value", "cpu")
    assert torch.allclose(loaded(*args), value_model(*args).detach(), atol=1e-5)
    assert not torch.allclose(oreo.ValueModel.from_pretrained(tiny_dir, "cpu")(*args), values.detach())
