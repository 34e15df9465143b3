"""Tests for grpo.py: hand-computed advantages, KL estimators, REINFORCE++ returns, PPO-clip, aggregation."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo

# Two groups of G=4. Group 1: [0, 0, 0, 4], mean 1, deviations (-1, -1, -1, 3), sum of squares 12.
# Group 2: [2, 0, 2, 0], mean 1, deviations (+1, -1, +1, -1), sum of squares 4.
REWARDS = torch.tensor([0.0, 0.0, 0.0, 4.0, 2.0, 0.0, 2.0, 0.0])


# ---------------------------------------------------------------------------------------------------------
# group advantages


@pytest.mark.exercise(5)
def test_grpo_advantages_use_unbiased_group_std():
    # unbiased std: group 1 sqrt(12/3) = 2, group 2 sqrt(4/3) = 2/sqrt(3)
    expected = torch.tensor([-0.5, -0.5, -0.5, 1.5,
                             math.sqrt(3) / 2, -math.sqrt(3) / 2, math.sqrt(3) / 2, -math.sqrt(3) / 2])
    assert grpo.STD_UNBIASED is True
    got = grpo.group_advantages(REWARDS, group_size=4, estimator="grpo")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.exercise(5)
def test_grpo_advantages_population_std_when_constant_flipped(monkeypatch):
    monkeypatch.setattr(grpo, "STD_UNBIASED", False)
    # population std: group 1 sqrt(12/4) = sqrt(3), group 2 sqrt(4/4) = 1
    s3 = math.sqrt(3)
    expected = torch.tensor([-1 / s3, -1 / s3, -1 / s3, 3 / s3, 1.0, -1.0, 1.0, -1.0])
    got = grpo.group_advantages(REWARDS, group_size=4, estimator="grpo")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.exercise(5)
def test_grpo_advantages_zero_for_all_equal_group():
    got = grpo.group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 3.0, 0.0]), group_size=3)
    assert torch.equal(got[:3], torch.zeros(3))
    assert torch.isfinite(got).all()


@pytest.mark.exercise(5)
def test_drgrpo_advantages_are_mean_centred_without_std():
    expected = torch.tensor([-1.0, -1.0, -1.0, 3.0, 1.0, -1.0, 1.0, -1.0])
    got = grpo.group_advantages(REWARDS, group_size=4, estimator="drgrpo")
    torch.testing.assert_close(got, expected)


@pytest.mark.exercise(5)
def test_rloo_advantages_subtract_mean_of_the_others():
    # row 0: others (0, 0, 4) mean 4/3; row 3: others (0, 0, 0) mean 0
    # row 4: others (0, 2, 0) mean 2/3; row 5: others (2, 2, 0) mean 4/3
    expected = torch.tensor([-4 / 3, -4 / 3, -4 / 3, 4.0, 4 / 3, -4 / 3, 4 / 3, -4 / 3])
    got = grpo.group_advantages(REWARDS, group_size=4, estimator="rloo")
    torch.testing.assert_close(got, expected)


def test_group_advantages_reject_batch_not_divisible_by_group_size():
    with pytest.raises(ValueError, match="not divisible"):
        grpo.group_advantages(torch.zeros(7), group_size=4)


def test_group_advantages_reject_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        grpo.group_advantages(REWARDS, group_size=4, estimator="ppo")


def test_zero_variance_fraction_counts_all_equal_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 3.0, 3.0])  # groups of 2: equal, not, equal, equal
    assert grpo.zero_variance_fraction(rewards, group_size=2) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="not divisible"):
        grpo.zero_variance_fraction(rewards, group_size=3)


# ---------------------------------------------------------------------------------------------------------
# KL estimators

LOG2 = math.log(2.0)


@pytest.mark.exercise(6)
def test_kl_k1_k2_k3_on_known_numbers():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    logp_ref = torch.log(torch.tensor([[0.25, 0.5]]))  # log_ratio = (+log 2, -log 2)
    torch.testing.assert_close(grpo.kl_estimate(logp, logp_ref, "k1"), torch.tensor([[LOG2, -LOG2]]))
    torch.testing.assert_close(grpo.kl_estimate(logp, logp_ref, "k2"),
                               torch.tensor([[0.5 * LOG2 ** 2, 0.5 * LOG2 ** 2]]))
    # k3 = exp(-r) + r - 1: r = log 2 -> 0.5 + log 2 - 1; r = -log 2 -> 2 - log 2 - 1
    torch.testing.assert_close(grpo.kl_estimate(logp, logp_ref, "k3"),
                               torch.tensor([[LOG2 - 0.5, 1.0 - LOG2]]))


@pytest.mark.exercise(6)
def test_kl_k3_is_nonnegative_and_zero_when_equal():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=gen) * 5
    logp_ref = -torch.rand(4, 6, generator=gen) * 5
    assert (grpo.kl_estimate(logp, logp_ref, "k3") >= 0).all()
    assert torch.equal(grpo.kl_estimate(logp, logp, "k3"), torch.zeros(4, 6))


def test_kl_unknown_kind_raises():
    with pytest.raises(ValueError, match="kind"):
        grpo.kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "k4")


# ---------------------------------------------------------------------------------------------------------
# REINFORCE++

# Row 0 has 3 completion tokens, row 1 has 2; logp_old - logp_ref = DIFF (row 1, token 0 is 20 -> clamped to 10).
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0],
                     [1.0, 1.0, 0.0, 0.0]])
DIFF = torch.tensor([[0.1, -0.2, 0.3, 9.0],
                     [20.0, 0.5, 7.0, 7.0]])
LOGP_REF = torch.full((2, 4), -1.0)
LOGP_OLD = LOGP_REF + DIFF


@pytest.mark.exercise(9)
def test_reinforce_pp_returns_hand_example():
    # kl_coef 0.1: r row 0 = (-0.01, +0.02, -0.03 + R=1) ; r row 1 = (-0.1*10, -0.05 + R=-1)
    # reverse cumsum: row 0 = (0.98, 0.99, 0.97, 0), row 1 = (-2.05, -1.05, 0, 0)
    got = grpo.reinforce_pp_returns(torch.tensor([1.0, -1.0]), LOGP_OLD, LOGP_REF, MASK, kl_coef=0.1)
    expected = torch.tensor([[0.98, 0.99, 0.97, 0.0],
                             [-2.05, -1.05, 0.0, 0.0]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.exercise(9)
def test_reinforce_pp_returns_discount_with_gamma():
    # row 0 with gamma 0.5: G2 = 0.97, G1 = 0.02 + 0.5*0.97, G0 = -0.01 + 0.5*G1
    got = grpo.reinforce_pp_returns(torch.tensor([1.0, -1.0]), LOGP_OLD, LOGP_REF, MASK, kl_coef=0.1,
                                    gamma=0.5)
    torch.testing.assert_close(got[0], torch.tensor([0.2425, 0.505, 0.97, 0.0]), atol=1e-5, rtol=1e-5)


@pytest.mark.exercise(9)
def test_reinforce_pp_reward_lands_on_last_valid_token_only():
    got = grpo.reinforce_pp_returns(torch.tensor([5.0, 7.0]), LOGP_OLD, LOGP_REF, MASK, kl_coef=0.0,
                                    gamma=0.0)
    expected = torch.tensor([[0.0, 0.0, 5.0, 0.0],
                             [0.0, 7.0, 0.0, 0.0]])
    torch.testing.assert_close(got, expected)


@pytest.mark.exercise(9)
def test_reinforce_pp_baseline_subtracts_group_mean():
    mask = torch.ones(4, 2)
    zeros = torch.zeros(4, 2)
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])  # groups of 2: means 0.5 and 3
    got = grpo.reinforce_pp_returns(rewards, zeros, zeros, mask, kl_coef=0.0, group_size=2)
    expected = torch.tensor([[0.5, 0.5], [-0.5, -0.5], [0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(got, expected)


def test_reinforce_pp_advantages_are_whitened_over_valid_tokens():
    adv = grpo.reinforce_pp_advantages(torch.tensor([1.0, -1.0]), LOGP_OLD, LOGP_REF, MASK, kl_coef=0.1)
    valid = adv[MASK.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(adv[~MASK.bool()], torch.zeros(3))


def test_reinforce_pp_rejects_row_without_tokens():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="no completion tokens"):
        grpo.reinforce_pp_returns(torch.ones(2), torch.zeros(2, 2), torch.zeros(2, 2), mask, kl_coef=0.1)


# ---------------------------------------------------------------------------------------------------------
# masked whitening (single process and across 2 gloo ranks)


@pytest.mark.exercise(10)
def test_masked_whiten_uses_population_statistics_and_zeroes_pads():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # valid values 1, 3, 5, 7: mean 4, population variance (9 + 1 + 1 + 9) / 4 = 5
    expected = torch.tensor([[-3.0, -1.0, 0.0], [1.0, 3.0, 0.0]]) / math.sqrt(5.0)
    torch.testing.assert_close(grpo.masked_whiten(x, mask), expected)


def _whiten_on_rank(rank, world_size, init_file, x, mask, out_dir):
    """Worker for the gloo test: whiten this rank's half of the rows, save the result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rows = slice(rank * 2, rank * 2 + 2)
        torch.save(grpo.masked_whiten(x[rows], mask[rows]), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_masked_whiten_across_two_gloo_ranks_equals_full_batch(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=gen) * 3 + 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]).float()
    mp.spawn(_whiten_on_rank, args=(2, str(tmp_path / "init"), x, mask, str(tmp_path)), nprocs=2, join=True)
    distributed = torch.cat([torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")])
    torch.testing.assert_close(distributed, grpo.masked_whiten(x, mask))
    # each half alone would whiten differently: the all-reduce is what made them agree
    assert not torch.allclose(grpo.masked_whiten(x[:2], mask[:2]), distributed[:2])


# ---------------------------------------------------------------------------------------------------------
# clipped surrogate


def _surrogate_at(ratio, advantage, clip_low=0.2, clip_high=0.2):
    logp = torch.log(torch.tensor([[ratio]]))
    loss, clipped = grpo.clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([advantage]),
                                           clip_low, clip_high)
    return loss.item(), clipped.item()


@pytest.mark.exercise(7)
def test_surrogate_inside_clip_range_is_minus_ratio_times_advantage():
    loss, clipped = _surrogate_at(1.1, 2.0)
    assert loss == pytest.approx(-2.2) and clipped is False
    loss, clipped = _surrogate_at(0.9, -2.0)
    assert loss == pytest.approx(1.8) and clipped is False


@pytest.mark.exercise(7)
def test_surrogate_clips_positive_advantage_above_one_plus_clip():
    assert _surrogate_at(1.5, 1.0) == (pytest.approx(-1.2), True)
    # below 1 - clip the pessimistic min keeps the unclipped (smaller) objective
    assert _surrogate_at(0.5, 1.0) == (pytest.approx(-0.5), False)


@pytest.mark.exercise(7)
def test_surrogate_clips_negative_advantage_below_one_minus_clip():
    assert _surrogate_at(0.5, -1.0) == (pytest.approx(0.8), True)
    assert _surrogate_at(1.5, -1.0) == (pytest.approx(1.5), False)


@pytest.mark.exercise(7)
def test_surrogate_honours_asymmetric_clip_low_and_high():
    # clip_high = 0.28: ratio 1.25 is inside for A > 0; clip_low = 0.1: ratio 0.85 is clipped to 0.9 for A < 0
    assert _surrogate_at(1.25, 1.0, clip_low=0.1, clip_high=0.28) == (pytest.approx(-1.25), False)
    assert _surrogate_at(1.25, 1.0, clip_low=0.28, clip_high=0.2) == (pytest.approx(-1.2), True)
    assert _surrogate_at(0.85, -1.0, clip_low=0.1, clip_high=0.28) == (pytest.approx(0.9), True)


@pytest.mark.exercise(7)
def test_surrogate_clipped_mask_and_broadcast_of_per_sequence_advantage():
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))
    loss, clipped = grpo.clipped_surrogate(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.2, -0.5], [1.0, 1.5, 0.8]]))
    assert clipped.tolist() == [[False, True, False], [False, False, True]]


@pytest.mark.exercise(7)
def test_surrogate_gradient_is_minus_advantage_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    advantages = torch.tensor([[0.7, -1.3], [2.0, 0.1]])
    loss, _ = grpo.clipped_surrogate(logp, logp.detach().clone(), advantages)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -advantages)


# ---------------------------------------------------------------------------------------------------------
# aggregation

# 8 rows of uneven lengths, split into 4 micro-batches of 2 rows each.
LENGTHS = [5, 1, 3, 6, 2, 2, 4, 1]
MAX_LEN = 8


def _uneven_mask():
    columns = torch.arange(max(LENGTHS))
    return (columns < torch.tensor(LENGTHS).unsqueeze(1)).float()  # [8, 6]


@pytest.mark.exercise(8)
@pytest.mark.parametrize("mode", ["seq-mean", "token-mean", "constant"])
def test_aggregate_sum_over_micro_batches_equals_full_batch(mode):
    mask = _uneven_mask()
    n_seqs, n_tokens = mask.shape[0], int(mask.sum())
    theta = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1), requires_grad=True)

    full = grpo.aggregate(theta ** 2, mask, mode, n_seqs, n_tokens, MAX_LEN)
    (full_grad,) = torch.autograd.grad(full, theta)

    total = 0.0
    for start in range(0, 8, 2):
        rows = slice(start, start + 2)
        width = int(mask[rows].sum(dim=1).max())  # each micro-batch trimmed to its own longest row
        total = total + grpo.aggregate(theta[rows, :width] ** 2, mask[rows, :width], mode, n_seqs, n_tokens,
                                       MAX_LEN)
    (micro_grad,) = torch.autograd.grad(total, theta)

    torch.testing.assert_close(total, full)
    assert torch.allclose(micro_grad, full_grad)


@pytest.mark.exercise(8)
def test_aggregate_seq_mean_differs_from_token_mean_on_uneven_lengths():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss_tok = torch.tensor([[1.0, 1.0, 1.0], [4.0, 9.0, 9.0]])
    # seq-mean: (3/3 + 4/1) / 2 = 2.5 ; token-mean: (3 + 4) / 4 = 1.75 ; constant: 7 / (2 * 5) = 0.7
    assert grpo.aggregate(loss_tok, mask, "seq-mean", 2, 4, 5).item() == pytest.approx(2.5)
    assert grpo.aggregate(loss_tok, mask, "token-mean", 2, 4, 5).item() == pytest.approx(1.75)
    assert grpo.aggregate(loss_tok, mask, "constant", 2, 4, 5).item() == pytest.approx(0.7)


@pytest.mark.exercise(8)
def test_aggregate_seq_mean_row_without_tokens_contributes_zero():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss = grpo.aggregate(torch.ones(2, 2), mask, "seq-mean", 2, 2, 2)
    assert loss.item() == pytest.approx(0.5)


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        grpo.aggregate(torch.ones(1, 2), torch.ones(1, 2), "sum", 1, 2, 2)


# ---------------------------------------------------------------------------------------------------------
# full policy loss


def _policy_inputs():
    gen = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    logp_old = -torch.rand(2, 4, generator=gen) * 2
    logp = (logp_old + 0.1 * torch.randn(2, 4, generator=gen)).requires_grad_(True)
    logp_ref = -torch.rand(2, 4, generator=gen) * 2
    return logp, logp_old, logp_ref, torch.tensor([1.0, -0.5]), mask


def test_policy_loss_kl_term_adds_kl_coef_times_token_mean_kl():
    logp, logp_old, logp_ref, adv, mask = _policy_inputs()
    common = dict(clip_low=0.2, clip_high=0.2, kl_kind="k3", mode="token-mean", n_seqs=2, n_tokens=5,
                  max_len=4)
    without_kl, _ = grpo.policy_loss(logp, logp_old, logp_ref, adv, mask, kl_coef=0.0, **common)
    with_kl, stats = grpo.policy_loss(logp, logp_old, logp_ref, adv, mask, kl_coef=0.05, **common)
    mean_kl = (grpo.kl_estimate(logp, logp_ref, "k3") * mask).sum() / mask.sum()
    torch.testing.assert_close(with_kl - without_kl, 0.05 * mean_kl)
    assert stats["kl"] == pytest.approx(mean_kl.item())


def test_policy_loss_entropy_bonus_subtracts_entropy_coef_times_mean_entropy():
    logp, logp_old, logp_ref, adv, mask = _policy_inputs()
    entropy = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 5.0, 50.0, 50.0]])  # mean over valid tokens: 3
    common = dict(kl_coef=0.0, mode="token-mean", n_seqs=2, n_tokens=5, max_len=4)
    base, _ = grpo.policy_loss(logp, logp_old, logp_ref, adv, mask, **common)
    bonus, stats = grpo.policy_loss(logp, logp_old, logp_ref, adv, mask, entropy=entropy, entropy_coef=0.01,
                                    **common)
    torch.testing.assert_close(bonus - base, torch.tensor(-0.03))
    assert stats["entropy"] == pytest.approx(3.0)


def test_policy_loss_stats_are_token_means_over_valid_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    ratio = torch.tensor([[1.5, 1.0, 9.0], [1.0, 1.0, 1.0]])  # one clipped token out of 5 valid
    logp = torch.log(ratio)
    _, stats = grpo.policy_loss(logp, torch.zeros(2, 3), None, torch.tensor([1.0, 1.0]), mask,
                                mode="seq-mean", n_seqs=2, n_tokens=5, max_len=3)
    assert stats["clip_frac"] == pytest.approx(0.2)
    assert stats["ratio_mean"] == pytest.approx(5.5 / 5)
    assert "kl" not in stats


def test_policy_loss_kl_coef_without_reference_raises():
    logp, logp_old, _, adv, mask = _policy_inputs()
    with pytest.raises(ValueError, match="logp_ref"):
        grpo.policy_loss(logp, logp_old, None, adv, mask, kl_coef=0.1, mode="token-mean", n_seqs=2,
                         n_tokens=5, max_len=4)
