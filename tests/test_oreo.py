"""Tests for oreo.py: the losses reproduce the original OREO code (float64 reference case), the closed-form
gradients of the spec hold, step starts come from newlines, and ValueModel reads V at the right positions."""
import json

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

@pytest.mark.parametrize("level", ["token", "step"])
def test_value_loss_matches_reference(ref, level):
    _, value_loss, _, values = run_losses(ref, level)
    assert close(value_loss, ref["out"][f"value_loss_{level}"])
    assert close(grad(value_loss, values), ref["grad"](f"grad_value_loss_{level}_wrt_values"))


@pytest.mark.parametrize("level", ["token", "step", "response"])
def test_policy_loss_matches_reference(ref, level):
    policy_loss, _, logp, _ = run_losses(ref, level)
    assert close(policy_loss, ref["out"][f"policy_loss_{level}"])
    assert close(grad(policy_loss, logp), ref["grad"](f"grad_policy_loss_{level}_wrt_policy_logps"))


def test_response_level_value_loss_scores_only_the_first_state(ref):
    _, value_loss, _, values = run_losses(ref, "response")
    assert close(value_loss, ref["out"]["policy_loss_response"])             # same value as the policy loss
    g = grad(value_loss, values)
    assert g[:, 1:].abs().max() == 0 and g[:, 0].abs().min() > 0


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


def test_reverse_cumsum():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, -1.0]])
    assert torch.equal(oreo.reverse_cumsum(x), torch.tensor([[6.0, 5.0, 3.0], [3.0, -1.0, -1.0]]))


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


def test_policy_and_value_losses_have_equal_values():
    logp, ref_logp, values, rewards, mask = random_batch(3)
    starts = oreo.step_starts_from_newlines(torch.randint(0, 4, mask.shape), mask, [0])
    for level in oreo.LEVELS:
        policy_loss, value_loss = oreo.losses(logp, ref_logp, values, rewards, mask, 0.03, level, starts)
        assert close(policy_loss, value_loss), level


def test_padding_does_not_change_the_losses():
    logp, ref_logp, values, rewards, mask = random_batch(4)
    noise = torch.randn_like(logp) * (1 - mask)                    # garbage in the padded columns
    for level in ("token", "response"):
        clean = oreo.losses(logp, ref_logp, values, rewards, mask, 0.03, level)
        dirty = oreo.losses(logp + noise, ref_logp - noise, values + noise, rewards, mask, 0.03, level)
        assert close(torch.stack(clean), torch.stack(dirty)), level


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


def test_newline_token_ids_finds_tokens_containing_a_newline():
    class FakeTokenizer:                                           # decode is all that is needed
        vocab = ["a", "\n", "b.\n\n", "c"]

        def __len__(self):
            return len(self.vocab)

        def batch_decode(self, sequences):
            return ["".join(self.vocab[i] for i in seq) for seq in sequences]

    assert oreo.newline_token_ids(FakeTokenizer()) == [1, 2]


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
