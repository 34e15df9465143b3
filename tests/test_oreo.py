"""Tests for oreo.py: the losses reproduce the original OREO code (float64 reference case), the closed-form
gradients of the spec hold, step starts come from newlines, and ValueModel reads V at the right positions."""
import json
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import oreo
from conftest import SHARED

TOL = 1e-9


# ----------------------------------------------------------------------------------------------------------------
# The reference case, mapped onto our layout
# ----------------------------------------------------------------------------------------------------------------
# The original code works on whole sequences input_ids [B, L] (prompt and response together, LEFT-padded).
# Its per-state tensors (policy_logps, values, gradients w.r.t. them) are [B, L-1]: index t is the state
# "prefix input_ids[:, :t+1]", whose action is input_ids[:, t+1]; its logits are [B, L, V] with logits[:, t]
# predicting input_ids[:, t+1]. A token is an action where action_mask[:, t+1] = 1. So completion token j of row b
# is the j-th action of that row: with t_j the j-th index t where action_mask[b, 1:][t] = 1,
#     ours[b, j] = theirs[b, t_j]     for per-state tensors AND for logits (both are indexed by the state t),
# and our columns past the row's last action are padding (0). The step mask is their state_mask_step[:, :-1]
# (aligned with values) read at t_j. Gradients are mapped the same way, after checking that the original puts
# nothing outside the action states, so no gradient is lost by the mapping.

def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def to_completion_layout(theirs, action_mask, must_vanish_elsewhere=False):
    theirs = torch.as_tensor(theirs, dtype=torch.float64)
    acts = torch.as_tensor(action_mask)[:, 1:].bool()                                  # [B, L-1]
    B, C = acts.shape[0], int(acts.sum(-1).max())
    ours = torch.zeros((B, C) + tuple(theirs.shape[2:]), dtype=torch.float64)
    for b in range(B):
        t = acts[b].nonzero().flatten()
        ours[b, : len(t)] = theirs[b, t]
        if must_vanish_elsewhere:
            outside = torch.ones(theirs.shape[1], dtype=torch.bool)
            outside[t] = False
            assert theirs[b, outside].abs().max() == 0, "the original has gradient outside the action states"
    return ours


@pytest.fixture(scope="module")
def ref():
    case = json.loads((SHARED / "data" / "oreo_reference_case.json").read_text())
    hyper = case["hyperparameters"]
    case = case["cases"][0]
    inp, out, view = case["inputs"], case["outputs"], case["response_view"]
    act = inp["action_mask"]

    def ours(x, grad=False):
        return to_completion_layout(x, act, must_vanish_elsewhere=grad)

    r = dict(
        beta=hyper["beta"], alpha=hyper["kl_reg_alpha"], out=out,
        logp=ours(inp["policy_logps"]), ref_logp=ours(inp["ref_logps"]), values=ours(inp["values"]),
        rewards=torch.tensor(inp["rewards"], dtype=torch.float64),
        mask=to_completion_layout(torch.ones(len(act), len(act[0]) - 1), act),
        step_start=ours(f64(inp["state_mask_step"])[:, :-1]),
        policy_logits=ours(f64(inp["policy_logits"])[:, :-1]),
        ref_logits=ours(f64(inp["ref_logits"])[:, :-1]),
        tokens=ours(f64(inp["input_ids"])[:, 1:]).long(),   # the action of state t is input_ids[:, t+1]
        grad=lambda name: ours(out[name], grad=True),
        grad_logits=lambda name: ours(f64(out[name])[:, :-1], grad=True),
    )
    # the file also ships its own completion-layout view of the inputs: our mapping must agree with it
    for key, view_key in [("logp", "policy_logps"), ("ref_logp", "ref_logps"), ("values", "values"),
                          ("mask", "response_mask"), ("step_start", "step_start_mask"),
                          ("policy_logits", "policy_logits"), ("tokens", "response_token_ids")]:
        assert torch.equal(r[key], torch.tensor(view[view_key], dtype=r[key].dtype)), key
    return r


def run_losses(r, level, logp=None):
    logp = (r["logp"] if logp is None else logp).clone().requires_grad_()
    values = r["values"].clone().requires_grad_()
    policy_loss, value_loss = oreo.losses(logp, r["ref_logp"], values, r["rewards"], r["mask"], r["beta"],
                                          level=level, step_start_mask=r["step_start"])
    return policy_loss, value_loss, logp, values


def logp_of_tokens(logits, r):
    """Log-probs of the sampled completion tokens, differentiable w.r.t. the logits.  [B, C, V] -> [B, C]"""
    return logits.log_softmax(-1).gather(-1, r["tokens"][..., None]).squeeze(-1) * r["mask"]


def grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, allow_unused=True, retain_graph=True)
    return torch.zeros_like(x) if g is None else g


def close(a, b):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------------------------------
# Loss values and gradients against the original code
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.exercise(11)
@pytest.mark.parametrize("level", ["token", "step"])
def test_value_loss_matches_reference(ref, level):
    _, value_loss, _, values = run_losses(ref, level)
    assert close(value_loss, ref["out"][f"value_loss_{level}"])
    assert close(grad(value_loss, values), ref["grad"](f"grad_value_loss_{level}_wrt_values"))


@pytest.mark.exercise(11)
@pytest.mark.parametrize("level", ["token", "step", "response"])
def test_policy_loss_matches_reference(ref, level):
    policy_loss, _, logp, _ = run_losses(ref, level)
    assert close(policy_loss, ref["out"][f"policy_loss_{level}"])
    assert close(grad(policy_loss, logp), ref["grad"](f"grad_policy_loss_{level}_wrt_policy_logps"))


@pytest.mark.exercise(11)
def test_response_level_value_loss_scores_only_the_first_state(ref):
    _, value_loss, _, values = run_losses(ref, "response")
    assert close(value_loss, ref["out"]["policy_loss_response"])             # same value as the policy loss
    g = grad(value_loss, values)
    assert g[:, 1:].abs().max() == 0 and g[:, 0].abs().min() > 0


@pytest.mark.exercise(11)
@pytest.mark.parametrize("level", ["token", "step", "response"])
def test_stop_gradients_separate_the_two_losses(ref, level):
    policy_loss, value_loss, logp, values = run_losses(ref, level)
    assert grad(policy_loss, values).abs().max() == 0
    assert grad(value_loss, logp).abs().max() == 0


def test_policy_loss_gradient_through_logits_matches_reference(ref):
    logits = ref["policy_logits"].clone().requires_grad_()
    logp = logp_of_tokens(logits, ref)
    assert close(logp, ref["logp"])
    policy_loss, _ = oreo.losses(logp, ref["ref_logp"], ref["values"], ref["rewards"], ref["mask"], ref["beta"])
    assert close(grad(policy_loss, logits), ref["grad_logits"]("grad_policy_loss_token_wrt_policy_logits"))


def test_full_kl_matches_reference(ref):
    logits = ref["policy_logits"].clone().requires_grad_()
    kl = oreo.full_kl(logits, ref["ref_logits"], ref["mask"])
    assert close(kl, ref["out"]["kl_full_reverse"])
    assert close(grad(kl, logits), ref["grad_logits"]("grad_kl_full_reverse_wrt_policy_logits"))


def test_full_kl_gives_no_gradient_to_the_reference(ref):
    ref_logits = ref["ref_logits"].clone().requires_grad_()
    kl = oreo.full_kl(ref["policy_logits"].clone().requires_grad_(), ref_logits, ref["mask"])
    assert grad(kl, ref_logits).abs().max() == 0


def test_k3_kl_matches_reference(ref):
    logp = ref["logp"].clone().requires_grad_()
    kl = oreo.k3_kl(logp, ref["ref_logp"], ref["mask"])
    assert close(kl, ref["out"]["kl_k3_sampled"])
    assert close(grad(kl, logp), ref["grad"]("grad_kl_k3_wrt_policy_logps"))


def test_actor_total_matches_reference(ref):
    logits = ref["policy_logits"].clone().requires_grad_()
    logp = logp_of_tokens(logits, ref)
    policy_loss, _ = oreo.losses(logp, ref["ref_logp"], ref["values"], ref["rewards"], ref["mask"], ref["beta"])
    total = policy_loss + ref["alpha"] * oreo.full_kl(logits, ref["ref_logits"], ref["mask"])
    assert close(total, ref["out"]["actor_total_token"])
    assert close(grad(total, logits), ref["grad_logits"]("grad_actor_total_token_wrt_policy_logits"))


# ----------------------------------------------------------------------------------------------------------------
# Closed forms and building blocks on random inputs
# ----------------------------------------------------------------------------------------------------------------

def random_batch(seed=0, B=5, C=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    lengths[0] = C
    mask = (torch.arange(C)[None] < lengths[:, None]).double()
    logp = -torch.rand(B, C, generator=g, dtype=torch.float64) * 3 * mask
    ref_logp = -torch.rand(B, C, generator=g, dtype=torch.float64) * 3 * mask
    values = torch.randn(B, C, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 2, (B,), generator=g).double()
    return logp, ref_logp, values, rewards, mask


def test_log_ratio_to_go_sums_from_the_right():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, -1.0]])
    assert torch.equal(oreo.log_ratio_to_go(x, torch.zeros_like(x), torch.ones_like(x)),
                       torch.tensor([[6.0, 5.0, 3.0], [3.0, -1.0, -1.0]]))


@pytest.mark.exercise(11)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_level_gradients_have_the_closed_form(seed):
    logp, ref_logp, values, rewards, mask = random_batch(seed)
    logp.requires_grad_(), values.requires_grad_()
    beta = 0.03
    policy_loss, value_loss = oreo.losses(logp, ref_logp, values, rewards, mask, beta)
    A = ((logp - ref_logp) * mask).detach().flip(-1).cumsum(-1).flip(-1)
    delta = beta * A + values.detach() - rewards[:, None]
    B, n = mask.shape[0], mask.sum(-1, keepdim=True)
    assert close(grad(value_loss, values), 2 * delta * mask / (B * n))
    assert close(grad(policy_loss, logp), 2 * beta * delta * mask / (B * n))


@pytest.mark.exercise(11)
def test_policy_and_value_losses_have_equal_values():
    logp, ref_logp, values, rewards, mask = random_batch(3)
    starts = oreo.step_starts_from_newlines(torch.randint(0, 4, mask.shape), mask, [0])
    for level in oreo.LEVELS:
        policy_loss, value_loss = oreo.losses(logp, ref_logp, values, rewards, mask, 0.03, level, starts)
        assert close(policy_loss, value_loss), level


@pytest.mark.exercise(11)
def test_padding_does_not_change_the_losses():
    logp, ref_logp, values, rewards, mask = random_batch(4)
    noise = torch.randn_like(logp) * (1 - mask)                    # garbage in the padded columns
    for level in ("token", "response"):
        clean = oreo.losses(logp, ref_logp, values, rewards, mask, 0.03, level)
        dirty = oreo.losses(logp + noise, ref_logp - noise, values + noise, rewards, mask, 0.03, level)
        assert close(torch.stack(clean), torch.stack(dirty)), level


@pytest.mark.exercise(11)
def test_step_level_with_every_token_a_step_is_token_level():
    logp, ref_logp, values, rewards, mask = random_batch(5)
    logp.requires_grad_()
    token, _ = oreo.losses(logp, ref_logp, values, rewards, mask, 0.03, "token")
    step, _ = oreo.losses(logp, ref_logp, values, rewards, mask, 0.03, "step", step_start_mask=mask)
    assert close(token, step) and close(grad(token, logp), grad(step, logp))


def test_step_starts_from_newlines_hand_example():
    NL, EOS, PAD = 9, 2, 0
    ids = torch.tensor([[5, NL, 6, 7, NL, 8, EOS, PAD],
                        [NL, NL, 5, NL, EOS, PAD, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1, 0, 0, 0]])
    expected = torch.tensor([[1, 0, 1, 0, 0, 1, 0, 0],
                             [1, 1, 1, 0, 1, 0, 0, 0]])
    assert torch.equal(oreo.step_starts_from_newlines(ids, mask, [NL]), expected)


def test_step_end_ids_finds_tokens_containing_a_newline():
    class FakeTokenizer:                                           # decode is all that is needed
        vocab = ["a", "\n", "b.\n\n", "c"]

        def __len__(self):
            return len(self.vocab)

        def batch_decode(self, sequences):
            return ["".join(self.vocab[i] for i in seq) for seq in sequences]

    assert oreo.step_end_ids(FakeTokenizer()) == [1, 2]


@pytest.mark.parametrize("bad, message", [
    (dict(level="sentence"), "level must be one of"),
    (dict(level="step"), "needs step_start_mask"),
    (dict(level="step", step_start_mask=torch.zeros(2, 3)), "must mark the first completion token"),
    (dict(values=torch.zeros(2, 4)), "values has shape"),
    (dict(rewards=torch.zeros(3)), "rewards must be"),
    (dict(mask=torch.tensor([[1.0, 1, 0], [0, 0, 0]])), r"sequences \[1\] have no completion tokens"),
])
def test_losses_reject_bad_input(bad, message):
    args = dict(logp=torch.zeros(2, 3), ref_logp=torch.zeros(2, 3), values=torch.zeros(2, 3),
                rewards=torch.zeros(2), mask=torch.ones(2, 3), beta=0.03, level="token", step_start_mask=None)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        oreo.losses(**args)


# ----------------------------------------------------------------------------------------------------------------
# ValueModel on a tiny Qwen2
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    config = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    lm.save_pretrained(path)
    return path


def load_value_model(path):
    # float64 for exact comparisons; default (sdpa) attention: eager attention in float64 turns fully masked
    # left-padding rows into NaN that leaks into real positions (0 * NaN), a transformers quirk
    return oreo.ValueModel.from_pretrained(path, "cpu", dtype=torch.float64)


def randomise_head(model, seed=0):
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(seed)))


def batch(B=2, P=4, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (B, P + C), generator=g)
    return ids, torch.ones_like(ids), P


def test_value_model_is_zero_at_init_with_completion_shape(tiny_lm_dir):
    model = load_value_model(tiny_lm_dir)
    ids, attn, P = batch()
    values = model(ids, attn, P)
    assert values.shape == (2, 5)
    assert values.abs().max() == 0


def test_value_model_keeps_the_language_models_backbone(tiny_lm_dir):
    model = load_value_model(tiny_lm_dir)
    lm = Qwen2ForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float64)
    theirs = dict(lm.model.named_parameters())
    for name, p in model.backbone.named_parameters():
        assert torch.equal(p, theirs[name]), name


def test_value_at_column_j_sees_only_tokens_before_completion_token_j(tiny_lm_dir):
    model = load_value_model(tiny_lm_dir)
    randomise_head(model)
    ids, attn, P = batch()
    before = model(ids, attn, P)
    k = 2                                                           # change completion token k
    changed = ids.clone()
    changed[:, P + k] = (changed[:, P + k] % 49) + 1
    after = model(changed, attn, P)
    assert torch.equal(before[:, : k + 1], after[:, : k + 1])      # states before token k+1 do not contain it
    assert (before[:, k + 1] - after[:, k + 1]).abs().min() > 0     # the state before token k+1 does


def test_value_reads_the_hidden_state_before_each_completion_token(tiny_lm_dir):
    model = load_value_model(tiny_lm_dir)
    randomise_head(model)
    ids, attn, P = batch()
    hidden = model.backbone(input_ids=ids, attention_mask=attn).last_hidden_state
    expected = hidden[:, P - 1:-1] @ model.head.weight[0]
    assert torch.allclose(model(ids, attn, P), expected, atol=1e-12)


def test_value_model_ignores_left_padding(tiny_lm_dir):
    model = load_value_model(tiny_lm_dir)
    randomise_head(model)
    ids, attn, P = batch(B=1)
    padded_ids = torch.cat([torch.zeros(1, 2, dtype=ids.dtype), ids], -1)
    padded_attn = torch.cat([torch.zeros(1, 2, dtype=attn.dtype), attn], -1)
    assert torch.allclose(model(ids, attn, P), model(padded_ids, padded_attn, P + 2), atol=1e-10)


def test_value_model_save_and_load_round_trip(tiny_lm_dir, tmp_path):
    model = load_value_model(tiny_lm_dir)
    randomise_head(model, seed=1)
    with torch.no_grad():
        model.backbone.norm.weight.add_(0.5)                       # a trained backbone differs from the LM's
    model.save(tmp_path / "critic")
    loaded = load_value_model(tmp_path / "critic")
    ids, attn, P = batch(seed=2)
    assert torch.equal(model(ids, attn, P), loaded(ids, attn, P))


def test_value_model_rejects_n_prompt_out_of_range(tiny_lm_dir):
    model = load_value_model(tiny_lm_dir)
    ids, attn, _ = batch()
    with pytest.raises(ValueError, match="n_prompt must be in"):
        model(ids, attn, ids.shape[1])


def test_last_value_is_the_value_of_the_state_after_the_last_token(tiny_lm_dir):
    model = load_value_model(tiny_lm_dir)
    randomise_head(model)
    ids, attn, P = batch()
    values = model(ids, attn, P)                                    # values[:, j] = V(state before token j)
    k = 2                                                           # the state made of the prompt + tokens 0..k
    assert torch.allclose(model.last_value(ids[:, :P + k + 1], attn[:, :P + k + 1]), values[:, k + 1], atol=1e-12)
    padded_ids = torch.cat([torch.zeros(2, 3, dtype=ids.dtype), ids[:, :P + k + 1]], -1)
    padded_attn = torch.cat([torch.zeros(2, 3, dtype=attn.dtype), attn[:, :P + k + 1]], -1)
    assert torch.allclose(model.last_value(padded_ids, padded_attn), values[:, k + 1], atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Offline data
# ----------------------------------------------------------------------------------------------------------------

import kk_data  # noqa: E402
import model as M  # noqa: E402
import rollout  # noqa: E402


def right_response(record):
    return kk_data.sft_completion(record)                           # what follows the pre-filled "<think>"


def wrong_response(record):
    swapped = record["solution_text_format"].replace("knight", "#").replace("knave", "knight").replace("#", "knave")
    return f" guess </think>\n<answer> {swapped} </answer>"


class ScriptedSampler:
    """Stands in for a rollout sampler: returns given completions per prompt, in order."""

    def __init__(self, completions_by_prompt):
        self.completions_by_prompt, self.calls = completions_by_prompt, []

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256):
        self.calls.append(dict(prompts=len(prompts), n=n, temperature=temperature, max_new_tokens=max_new_tokens))
        texts = [text for p in prompts for text in self.completions_by_prompt[p][:n]]
        empty = torch.zeros(len(texts), 1, dtype=torch.long)
        return rollout.Rollout(empty, empty, empty, empty.float(), empty.float(), texts)


@pytest.fixture(scope="module")
def records():
    return kk_data.generate(2, 2, seed=0) + kk_data.generate(3, 1, seed=0)


def scripted_for(records, pattern):
    """pattern: a string of R (right) / W (wrong) completions, the same for every record."""
    return {kk_data.make_prompt(r, "tiny"): [right_response(r) if c == "R" else wrong_response(r) for c in pattern]
            for r in records}


def test_sample_offline_data_rows_and_rewards(records):
    sampler = ScriptedSampler(scripted_for(records, "RWW"))
    rows = oreo.sample_offline_data(sampler, records, "tiny", None, k=3, temperature=0.7, max_new_tokens=50,
                                    prompts_per_call=2)
    assert [c["prompts"] for c in sampler.calls] == [2, 1]
    assert all(c["n"] == 3 and c["temperature"] == 0.7 and c["max_new_tokens"] == 50 for c in sampler.calls)
    assert len(rows) == 9 and [row["reward"] for row in rows] == [1.0, 0.0, 0.0] * 3
    for i, row in enumerate(rows):
        record = records[i // 3]
        assert set(row) == set(oreo.OFFLINE_FIELDS)
        assert row["prompt"] == kk_data.make_prompt(record, "tiny")
        assert (row["size"], row["index"]) == (len(record["names"]), record["index"])


def test_broken_format_earns_no_reward(records):
    record = records[0]
    no_think_close = right_response(record).replace("</think>", "")  # right roles, broken format
    assert oreo.binary_reward(right_response(record), record["solution_text_format"]) == 1.0
    assert oreo.binary_reward(no_think_close, record["solution_text_format"]) == 0.0


def test_balancing_keeps_at_most_m_per_class_and_prompt(records):
    sampler = ScriptedSampler(scripted_for(records, "WRRWRW"))
    rows = oreo.sample_offline_data(sampler, records, "tiny", None, k=6, balance=2)
    for record in records:
        mine = [row["reward"] for row in rows if row["prompt"] == kk_data.make_prompt(record, "tiny")]
        assert mine == [0.0, 1.0, 1.0, 0.0]                        # the first two of each class, in order
    with pytest.raises(ValueError, match="m must be >= 1"):
        oreo.balance_rows(rows, 0)


def test_offline_file_round_trip(records, tmp_path):
    rows = oreo.sample_offline_data(ScriptedSampler(scripted_for(records, "RW")), records, "tiny", None, k=2)
    path = tmp_path / "data" / "offline.jsonl"
    oreo.save_offline(rows, path)
    assert oreo.load_offline(path) == rows


@pytest.mark.parametrize("change, message", [
    (lambda row: row.pop("response"), "missing field 'response'"),
    (lambda row: row.update(reward="1"), "field 'reward' has type str"),
    (lambda row: row.update(reward=True), "field 'reward' has type bool"),
    (lambda row: row.update(size=2.0), "field 'size' has type float"),
    (lambda row: row.update(reward=float("nan")), "field .reward. is nan, expected a finite number"),
])
def test_load_offline_names_file_and_line_of_a_bad_row(tmp_path, change, message):
    good = {"prompt": "p", "response": " r", "reward": 1.0, "size": 2, "index": 0}
    bad = dict(good)
    change(bad)
    path = tmp_path / "offline.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3: {message}"):
        oreo.load_offline(path)


def test_load_offline_names_invalid_json(tmp_path):
    path = tmp_path / "offline.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=f"{path}:1: expected a JSON object"):
        oreo.load_offline(path)
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match=f"{path}:1: invalid JSON"):
        oreo.load_offline(path)


# ----------------------------------------------------------------------------------------------------------------
# The joint training step, on tiny models (float64 so that hand computations agree to rounding)
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny policy and a differently initialised reference (so that log pi / pi_ref is not zero)."""
    sizes = dict(hidden=32, layers=2, heads=2, kv_heads=2, ffn=64)
    policy_dir = M.build_tiny(tmp_path_factory.mktemp("policy"), kk_data.corpus_text(), seed=0, **sizes)
    reference_dir = M.build_tiny(tmp_path_factory.mktemp("reference"), kk_data.corpus_text(), seed=1, **sizes)
    return policy_dir, reference_dir


def tiny_models(tiny_dirs, head_seed=None):
    policy_dir, reference_dir = tiny_dirs
    policy = M.load_model(policy_dir, "cpu", dtype=torch.float64)
    reference = M.load_reference(reference_dir, "cpu", dtype=torch.float64)
    value_model = oreo.ValueModel.from_pretrained(policy_dir, "cpu", dtype=torch.float64)
    if head_seed is not None:
        randomise_head(value_model, head_seed)
        with torch.no_grad():
            value_model.head.weight.mul_(0.1)
    return policy, reference, value_model, M.load_tokenizer(policy_dir)


@pytest.fixture(scope="module")
def rows(records):
    """Four rows of different lengths, two right (reward 1) and two wrong (reward 0)."""
    return [{"prompt": kk_data.make_prompt(r, "tiny"), "response": response(r), "reward": reward,
             "size": len(r["names"]), "index": r["index"]}
            for r, response, reward in [(records[0], right_response, 1.0), (records[1], wrong_response, 0.0),
                                        (records[2], right_response, 1.0), (records[0], wrong_response, 0.0)]]


def adam_pair(policy, value_model, lr=1e-3):
    return torch.optim.Adam(policy.parameters(), lr=lr), torch.optim.Adam(value_model.parameters(), lr=lr)


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_encode_offline_batch_appends_eos_as_an_action(tiny_dirs, rows):
    tokenizer = M.load_tokenizer(tiny_dirs[0])
    batch = oreo.encode_offline_batch(tokenizer, rows, "cpu")
    for b, row in enumerate(rows):
        n_response = len(tokenizer(row["response"], add_special_tokens=False).input_ids)
        assert batch["mask"][b].sum() == n_response + 1             # the response's tokens and the EOS
        assert batch["completion_ids"][b, n_response] == tokenizer.eos_token_id
        n_prompt_tokens = len(tokenizer(row["prompt"], add_special_tokens=False).input_ids)
        assert batch["attention_mask"][b, :batch["n_prompt"]].sum() == n_prompt_tokens   # left-padded prompt
    assert batch["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_step_end_ids_of_the_word_tokenizer_is_the_semicolon(tiny_dirs):
    tokenizer = M.load_tokenizer(tiny_dirs[0])
    assert oreo.step_end_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(";")]


def test_completion_logits_give_token_logprobs(tiny_dirs, rows):
    policy, _, _, tokenizer = tiny_models(tiny_dirs)
    batch = oreo.encode_offline_batch(tokenizer, rows, "cpu")
    args = batch["input_ids"], batch["attention_mask"], batch["n_prompt"]
    logits = oreo.completion_logits(policy, *args)                  # [B, C, V]
    assert logits.shape == batch["completion_ids"].shape + (len(tokenizer),)
    logp, with_logits = oreo.completion_logprobs(policy, batch, with_logits=True)
    assert torch.equal(with_logits, logits)
    assert torch.allclose(logp * batch["mask"], M.token_logprobs(policy, *args).double() * batch["mask"],
                          atol=1e-6)                                # token_logprobs works in float32


def test_oreo_step_trains_the_value_head_and_the_policy_not_the_reference(tiny_dirs, rows):
    policy, reference, value_model, tokenizer = tiny_models(tiny_dirs)
    policy_before, reference_before = snapshot(policy), snapshot(reference)
    assert value_model.head.weight.abs().max() == 0
    metrics = oreo.oreo_step(policy, reference, value_model, *adam_pair(policy, value_model), tokenizer, rows,
                             beta=0.03, alpha=0.01, level="token", micro_batch=2)
    assert value_model.head.weight.abs().max() > 0
    assert any(not torch.equal(p, policy_before[n]) for n, p in policy.named_parameters())
    assert all(torch.equal(p, reference_before[n]) for n, p in reference.named_parameters())
    expected = {"value_loss", "policy_loss", "kl", "value_first", "reward", "completion_length",
                "grad_norm_value", "grad_norm_policy"}
    assert set(metrics) == expected and all(math.isfinite(v) for v in metrics.values())
    assert metrics["reward"] == 0.5


@pytest.mark.parametrize("kl", ["full", "k3"])
def test_oreo_step_losses_equal_a_hand_computation(tiny_dirs, rows, kl):
    policy, reference, value_model, tokenizer = tiny_models(tiny_dirs, head_seed=3)
    beta, alpha = 0.03, 0.01
    batch = oreo.encode_offline_batch(tokenizer, rows, "cpu")
    args = batch["input_ids"], batch["attention_mask"], batch["n_prompt"]
    with torch.no_grad():                                           # by hand, before the step
        positions = M.position_ids_from_mask(args[1])
        logits = policy(args[0], attention_mask=args[1], position_ids=positions).logits
        ref_logits = reference(args[0], attention_mask=args[1], position_ids=positions).logits
        P = batch["n_prompt"]
        logits, ref_logits = logits[:, P - 1:-1], ref_logits[:, P - 1:-1]
        logp = logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
        ref_logp = ref_logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
        values = value_model(*args)
        policy_loss, value_loss = oreo.losses(logp, ref_logp, values, batch["rewards"], batch["mask"], beta)
        kl_value = (oreo.full_kl(logits, ref_logits, batch["mask"]) if kl == "full"
                    else oreo.k3_kl(logp, ref_logp, batch["mask"]))
    metrics = oreo.oreo_step(policy, reference, value_model, *adam_pair(policy, value_model), tokenizer, rows,
                             beta=beta, alpha=alpha, level="token", micro_batch=len(rows), kl=kl)
    # (rel 1e-6: the step takes some log-probs from model.token_logprobs, which works in float32)
    assert metrics["value_loss"] == pytest.approx(value_loss.item(), rel=1e-6)
    assert metrics["policy_loss"] == pytest.approx(policy_loss.item(), rel=1e-6)   # with pre-update values
    assert metrics["kl"] == pytest.approx(kl_value.item(), rel=1e-6)
    assert metrics["value_first"] == pytest.approx(values[:, 0].mean().item(), rel=1e-9)


def test_actor_loss_uses_the_values_from_before_the_critic_update(tiny_dirs, rows, monkeypatch):
    policy, reference, value_model, tokenizer = tiny_models(tiny_dirs, head_seed=3)
    calls, real_losses = [], oreo.losses

    def recording_losses(logp, ref_logp, values, *args, **kwargs):
        calls.append(values.detach().clone())
        return real_losses(logp, ref_logp, values, *args, **kwargs)

    parts = [oreo.encode_offline_batch(tokenizer, part, "cpu") for part in oreo.by_length(rows, 2)]  # micro-batches
    parts = [(batch["input_ids"], batch["attention_mask"], batch["n_prompt"]) for batch in parts]
    with torch.no_grad():
        before_update = [value_model(*args) for args in parts]        # [2, C_i] each
    monkeypatch.setattr(oreo, "losses", recording_losses)
    oreo.oreo_step(policy, reference, value_model, *adam_pair(policy, value_model), tokenizer, rows,
                   beta=0.03, alpha=0.01, level="token", micro_batch=2)
    critic_1, actor_1, critic_2, actor_2 = calls                   # per micro-batch: critic call, then actor call
    assert torch.equal(actor_1, critic_1) and torch.equal(actor_2, critic_2)
    # the second micro-batch still sees the critic of the batch's start: it steps once, after the last micro-batch
    for seen, before in zip((critic_1, critic_2), before_update):
        torch.testing.assert_close(seen, before, rtol=0, atol=1e-12)
    with torch.no_grad():
        after_update = value_model(*parts[0])
    assert not torch.allclose(after_update, before_update[0])


def test_one_optimizer_step_of_each_model_per_batch(tiny_dirs, rows):
    policy, reference, value_model, tokenizer = tiny_models(tiny_dirs)
    policy_opt, value_opt, policy_sched, value_sched = oreo.make_oreo_optimizers(policy, value_model, 1e-3, 1e-3,
                                                                                 total_steps=10)
    oreo.oreo_step(policy, reference, value_model, policy_opt, value_opt, tokenizer, rows, beta=0.03, alpha=0.01,
                   level="token", micro_batch=3, policy_scheduler=policy_sched, value_scheduler=value_sched)
    assert policy_sched.last_epoch == value_sched.last_epoch == 1   # 4 rows in micro-batches of 3: one step each
    assert all(state["step"] == 1 for opt in (policy_opt, value_opt) for state in opt.state.values())


@pytest.mark.parametrize("kl", ["full", "k3"])
def test_micro_batches_accumulate_to_the_step_of_the_whole_batch(tiny_dirs, rows, kl):
    CLIP = 0.01
    results = []
    for micro_batch in (len(rows), 1, 3):
        policy, reference, value_model, tokenizer = tiny_models(tiny_dirs, head_seed=3)
        optimizers = (torch.optim.SGD(policy.parameters(), lr=0.1), torch.optim.SGD(value_model.parameters(), lr=0.1))
        metrics = oreo.oreo_step(policy, reference, value_model, *optimizers, tokenizer, rows, beta=0.03, alpha=0.01,
                                 level="token", micro_batch=micro_batch, kl=kl, grad_clip=CLIP)
        results.append((metrics, snapshot(policy), snapshot(value_model)))
    (whole, policy_whole, value_whole), *split = results
    assert min(whole["grad_norm_policy"], whole["grad_norm_value"]) > CLIP   # the clip acts on the summed gradient
    for metrics, policy_weights, value_weights in split:
        assert metrics == pytest.approx(whole, rel=1e-6)            # (token_logprobs works in float32)
        for name, weight in {**policy_weights, **value_weights}.items():
            expected = {**policy_whole, **value_whole}[name]
            torch.testing.assert_close(weight, expected, rtol=0, atol=1e-7, msg=name)


def test_actor_gradient_has_the_closed_form_with_frozen_zero_values(tiny_dirs, rows):
    policy, reference, value_model, tokenizer = tiny_models(tiny_dirs)
    beta, lr = 0.03, 1e-2
    batch = oreo.encode_offline_batch(tokenizer, rows, "cpu")
    args, mask = (batch["input_ids"], batch["attention_mask"], batch["n_prompt"]), batch["mask"]
    logp = M.token_logprobs(policy, *args)                          # with gradient
    with torch.no_grad():
        ref_logp = M.token_logprobs(reference, *args)
    A = (((logp - ref_logp) * mask).detach()).flip(-1).cumsum(-1).flip(-1)
    delta = beta * A - batch["rewards"][:, None]                    # V = 0
    dL_dlogp = 2 * beta * delta * mask / (len(rows) * mask.sum(-1, keepdim=True))
    params = [p for _, p in policy.named_parameters()]
    expected = torch.autograd.grad((dL_dlogp * logp).sum(), params)

    before = snapshot(policy)
    policy_opt = torch.optim.SGD(policy.parameters(), lr=lr)
    value_opt = torch.optim.SGD(value_model.parameters(), lr=0.0)  # the critic stays at V = 0
    oreo.oreo_step(policy, reference, value_model, policy_opt, value_opt, tokenizer, rows, beta=beta, alpha=0.0,
                   level="token", micro_batch=len(rows), kl="k3", grad_clip=1e9)
    for (name, p), g in zip(policy.named_parameters(), expected):
        assert torch.allclose((before[name] - p.detach()) / lr, g, atol=1e-10), name
    assert value_model.head.weight.abs().max() == 0


@pytest.mark.parametrize("level", ["step", "response"])
def test_oreo_step_runs_at_step_and_response_level(tiny_dirs, rows, level):
    policy, reference, value_model, tokenizer = tiny_models(tiny_dirs)
    metrics = oreo.oreo_step(policy, reference, value_model, *adam_pair(policy, value_model), tokenizer, rows,
                             beta=0.03, alpha=oreo.KL_ALPHA[level], level=level, micro_batch=4)
    assert metrics["policy_loss"] == pytest.approx(metrics["value_loss"])    # equal values at V = 0 before
    assert value_model.head.weight.abs().max() > 0


@pytest.mark.parametrize("bad, message", [
    (dict(kl="k2"), "kl must be"), (dict(level="word"), "level must be"), (dict(micro_batch=0), "micro_batch"),
])
def test_oreo_step_rejects_bad_arguments(tiny_dirs, rows, bad, message):
    policy, reference, value_model, tokenizer = tiny_models(tiny_dirs)
    kwargs = dict(beta=0.03, alpha=0.01, level="token", micro_batch=2)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=message):
        oreo.oreo_step(policy, reference, value_model, *adam_pair(policy, value_model), tokenizer, rows, **kwargs)


def test_make_oreo_optimizers_adam_settings_and_schedule(tiny_dirs):
    policy, _, value_model, _ = tiny_models(tiny_dirs)
    policy_opt, value_opt, policy_sched, _ = oreo.make_oreo_optimizers(policy, value_model, 5e-6, 1e-4, 100)
    for opt, lr in ((policy_opt, 5e-6), (value_opt, 1e-4)):
        group = opt.param_groups[0]
        assert isinstance(opt, torch.optim.Adam) and group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0
        assert group["initial_lr"] == lr
    assert policy_opt.param_groups[0]["lr"] == pytest.approx(5e-6 / 3)          # 3% of 100 steps of warm-up


def test_warmup_cosine_shape():
    factors = [M.warmup_cosine(step, 100, 3) for step in range(101)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and factors[3] == 1.0
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))                 # decreasing after warm-up
    assert factors[100] == pytest.approx(0.1)
