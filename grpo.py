"""The policy-gradient math of online RL: advantages, KL estimators, the clipped loss and its aggregation.

Pure functions on tensors (../shared/spec/algorithms.md): `rewards [B]`, prompt i's G samples in rows i*G .. i*G+G-1;
per-token `[B, C]`: `logp` (policy, with grad), `logp_old` (sampler), `logp_ref` (reference), `mask` (EOS too).
- GRPO (arXiv 2402.03300): `A_i = (R_i - mean_g R) / (std_g R + eps)` on every token of completion i, PPO-clip,
  KL in the loss. Dr. GRPO (2503.20783): `A_i = R_i - mean_g R`. RLOO: baseline = mean of the OTHER G-1 rewards.
- REINFORCE++ (arXiv 2501.03262): the KL goes into a per-token reward, R onto the last completion token,
  returns (gamma = 1) whitened over the whole batch; "-baseline" subtracts the group mean of R first.
- KL (Schulman 2020), r = logp - logp_ref: k1 = r, k2 = r^2 / 2, k3 = exp(-r) + r - 1 (unbiased, >= 0, no clamp).
- Aggregation: "seq-mean" (GRPO), "token-mean" (DAPO), "constant" (Dr. GRPO), over WHOLE-batch counts so that
  micro-batch losses add up; `OWN_AGGREGATION`. Where peers differ (std, epsilons, clamps): NOTES.md.
"""
import torch
import torch.distributed as dist

STD_UNBIASED = True  # GRPO's group std: True = unbiased (÷(G-1)), False = population (÷G)
ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")
KL_KINDS = ("k1", "k2", "k3")
AGGREGATION_MODES = ("seq-mean", "token-mean", "constant")
OWN_AGGREGATION = {"grpo": "seq-mean", "rloo": "seq-mean", "drgrpo": "constant",  # as published (spec); RLOO: GRPO's
                   "reinforce++": "token-mean", "reinforce++-baseline": "token-mean"}


def _check_same_shape(**tensors):
    """Raise ValueError unless every named tensor has the shape of the first one."""
    (first_name, first), *others = tensors.items()
    for name, tensor in others:
        if tensor.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(first.shape)} like {first_name}")


def _rewards_as_groups(rewards, group_size):
    """Check `rewards [B]` and view them as `[B // G, G]`."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"batch of {rewards.numel()} rewards is not divisible by group_size={group_size}; "
                         f"rows must be whole groups (prompt i's samples are rows i*G..i*G+G-1)")
    return rewards.view(-1, group_size)  # [n_groups, G]


# exercise 5: group advantages (GRPO, Dr. GRPO, RLOO)
def group_advantages(rewards, group_size, estimator="grpo", eps=1e-6):
    """One advantage per completion [B] from its group's rewards (std per STD_UNBIASED):
    grpo (R - mean_g) / (std_g + eps);  drgrpo R - mean_g;  rloo R - mean of the other G-1 rewards of the group."""
    grouped = _rewards_as_groups(rewards, group_size).float()  # [n_groups, G]
    mean = grouped.mean(dim=1, keepdim=True)  # [n_groups, 1]
    if estimator == "grpo":
        std = grouped.std(dim=1, keepdim=True, unbiased=STD_UNBIASED)  # [n_groups, 1]
        advantages = (grouped - mean) / (std + eps)
    elif estimator == "drgrpo":
        advantages = grouped - mean
    elif estimator == "rloo":
        advantages = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # R - others' mean
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ADVANTAGE_ESTIMATORS}")
    return advantages.reshape(-1)  # [B]


def zero_variance_fraction(rewards, group_size):
    """Share of groups whose G rewards are all equal: they give zero advantage, hence no learning signal."""
    grouped = _rewards_as_groups(rewards, group_size)  # [n_groups, G]
    return (grouped == grouped[:, :1]).all(dim=1).float().mean().item()  # mean of [n_groups] bools


# exercise 6: the KL estimators k1, k2, k3
def kl_estimate(logp, logp_ref, kind="k3"):
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled by the policy. [B, C]"""
    _check_same_shape(logp=logp, logp_ref=logp_ref)
    log_ratio = logp - logp_ref  # [B, C]  log pi(x) / pi_ref(x)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1  # = exp(logp_ref - logp) - (logp_ref - logp) - 1 >= 0
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {KL_KINDS}")


# exercise 10: whitening over the whole batch
def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / sqrt(var + eps), mean and POPULATION variance over mask == 1, zeros where mask == 0. [B, C]
    With torch.distributed initialised, the statistics are those of the global batch (all ranks)."""
    _check_same_shape(x=x, mask=mask)
    mask = mask.to(x.dtype)
    # Sums in float64: var = E[x^2] - E[x]^2 loses digits in float32 when the mean is large.
    sums = torch.stack([mask.sum(), (x * mask).sum(), (x * x * mask).sum()]).double()  # [3]
    if dist.is_available() and dist.is_initialized():
        sums = sums.detach()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    count, total, total_sq = sums
    if count <= 0:
        raise ValueError("masked_whiten: mask selects no positions (no valid tokens in the whole batch)")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp(min=0.0)
    return (x - mean.to(x.dtype)) * torch.rsqrt(var + eps).to(x.dtype) * mask  # [B, C]


# ---- REINFORCE++ (and REINFORCE++-baseline) --------------------------------------------------------------------
def _last_valid_index(mask):
    """Column of the last position where mask == 1, per row. [B] (long)"""
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, C]
    last = torch.where(mask > 0, columns, torch.full_like(columns, -1)).amax(dim=1)  # [B]
    empty_rows = (last < 0).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"rows {empty_rows} have no completion tokens (mask all 0): nowhere to put the reward")
    return last


# exercise 9: REINFORCE++ token rewards and returns
def reinforce_pp_returns(rewards, logp_old, logp_ref, mask, kl_coef, group_size=None, gamma=1.0, kl_clamp=10.0):
    """Returns G_t = sum_{s>=t} gamma^(s-t) r_s, r_t = -kl_coef * clamp(logp_old_t - logp_ref_t, -kl_clamp, kl_clamp)
    on each completion token plus R on the last one (R minus its group mean when group_size is given:
    REINFORCE++-baseline). No gradient; zero where masked. [B, C]"""
    _check_same_shape(logp_old=logp_old, logp_ref=logp_ref, mask=mask)
    if rewards.shape != (logp_old.shape[0],):
        raise ValueError(f"rewards must have shape [B] = ({logp_old.shape[0]},), got {tuple(rewards.shape)}")
    with torch.no_grad():
        mask = mask.float()
        seq_rewards = rewards.float()  # [B]
        if group_size is not None:
            grouped = _rewards_as_groups(seq_rewards, group_size)  # [n_groups, G]
            seq_rewards = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # [B]
        kl = (logp_old.float() - logp_ref.float()).clamp(-kl_clamp, kl_clamp)  # [B, C]  k1, clamped
        token_rewards = -kl_coef * kl * mask  # [B, C]
        last = _last_valid_index(mask)  # [B]
        token_rewards[torch.arange(len(last), device=last.device), last] += seq_rewards  # R on the last token
        returns = torch.zeros_like(token_rewards)  # [B, C]
        running = torch.zeros_like(seq_rewards)  # [B]
        for t in reversed(range(token_rewards.shape[1])):
            running = token_rewards[:, t] + gamma * running
            returns[:, t] = running
        return returns * mask


def reinforce_pp_advantages(rewards, logp_old, logp_ref, mask, kl_coef, group_size=None, gamma=1.0, kl_clamp=10.0):
    """REINFORCE++ advantages: reinforce_pp_returns whitened over the whole batch (all ranks), 0 if masked. [B, C]"""
    returns = reinforce_pp_returns(rewards, logp_old, logp_ref, mask, kl_coef, group_size, gamma, kl_clamp)
    return masked_whiten(returns, mask.float())


# ---- PPO-clip surrogate, aggregation, full loss ----------------------------------------------------------------
# exercise 7: the PPO-clip surrogate
def clipped_surrogate(logp, logp_old, advantages, clip_low=0.2, clip_high=0.2):
    """Per-token PPO-clip loss -min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A), rho = exp(logp - logp_old), A [B]
    (broadcast over tokens) or [B, C]; logp_old and A are constants. Returns (loss_tok [B, C], clipped [B, C] bool:
    the clipped branch was the smaller one, so the token gets no gradient)."""
    _check_same_shape(logp=logp, logp_old=logp_old)
    if not (0.0 <= clip_low < 1.0) or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [B, 1], broadcast over tokens
    if advantages.shape[0] != logp.shape[0] or advantages.shape[1] not in (1, logp.shape[1]):
        raise ValueError(f"advantages must be [B] or [B, C] for logp of shape {tuple(logp.shape)}, "
                         f"got {tuple(advantages.shape)}")
    ratio = torch.exp(logp - logp_old.detach())  # [B, C]
    unclipped_objective = ratio * advantages  # [B, C]
    clipped_objective = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages  # [B, C]
    loss_tok = -torch.minimum(unclipped_objective, clipped_objective)  # [B, C]
    return loss_tok, clipped_objective < unclipped_objective  # [B, C], [B, C] (clipped)


# exercise 8: loss aggregation with whole-batch normalisers
def aggregate(loss_tok, mask, mode, n_seqs, n_tokens, max_len):
    """Per-token loss [B, C] -> scalar; n_seqs, n_tokens are WHOLE-batch totals, so micro-batch results add up.
    seq-mean:   sum_b (sum_t loss*mask / sum_t mask) / n_seqs   (original GRPO; a row without tokens gives 0)
    token-mean: sum loss*mask / n_tokens                        (DAPO)
    constant:   sum loss*mask / (n_seqs * max_len)              (Dr. GRPO)"""
    _check_same_shape(loss_tok=loss_tok, mask=mask)
    mask = mask.to(loss_tok.dtype)
    masked_loss = loss_tok * mask  # [B, C]
    if mode == "seq-mean":
        if n_seqs <= 0:
            raise ValueError(f"aggregate(seq-mean): n_seqs must be > 0, got {n_seqs}")
        tokens_per_seq = mask.sum(dim=1).clamp(min=1.0)  # [B]  clamp: an empty row gives 0, not 0/0
        return (masked_loss.sum(dim=1) / tokens_per_seq).sum() / n_seqs
    if mode == "token-mean":
        if n_tokens <= 0:
            raise ValueError(f"aggregate(token-mean): n_tokens must be > 0, got {n_tokens}")
        return masked_loss.sum() / n_tokens
    if mode == "constant":
        if n_seqs <= 0 or max_len <= 0:
            raise ValueError(f"aggregate(constant): n_seqs and max_len must be > 0, got {n_seqs}, {max_len}")
        return masked_loss.sum() / (n_seqs * max_len)
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}")


def _masked_mean(x, mask):
    """Mean of x over positions where mask == 1, as a python float (0.0 if there are none)."""
    mask = mask.to(x.dtype)
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()


def policy_loss(logp, logp_old, logp_ref, advantages, mask, *, clip_low=0.2, clip_high=0.2, kl_coef=0.0,
                kl_kind="k3", entropy=None, entropy_coef=0.0, mode, n_seqs, n_tokens, max_len):
    """(loss, stats): `surrogate + kl_coef * KL - entropy_coef * entropy` per token, aggregated by `mode` (logp_ref
    may be None if kl_coef = 0); stats: THIS micro-batch's token means of kl, entropy (given), clip_frac, ratio_mean."""
    _check_same_shape(logp=logp, logp_old=logp_old, mask=mask)
    loss_tok, clipped = clipped_surrogate(logp, logp_old, advantages, clip_low, clip_high)  # [B, C]
    if kl_coef != 0.0 and logp_ref is None:
        raise ValueError(f"policy_loss: kl_coef={kl_coef} needs logp_ref, got None")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"policy_loss: entropy_coef={entropy_coef} needs the per-token entropy, got None")
    stats = {}
    if logp_ref is not None:  # the KL penalty
        kl = kl_estimate(logp, logp_ref.detach(), kl_kind)  # [B, C]
        stats["kl"] = _masked_mean(kl.detach(), mask)
        loss_tok = loss_tok + kl_coef * kl if kl_coef != 0.0 else loss_tok
    if entropy is not None:  # the entropy bonus
        _check_same_shape(logp=logp, entropy=entropy)
        stats["entropy"] = _masked_mean(entropy.detach(), mask)
        loss_tok = loss_tok - entropy_coef * entropy if entropy_coef != 0.0 else loss_tok
    stats.update(clip_frac=_masked_mean(clipped.to(logp.dtype), mask),
                 ratio_mean=_masked_mean(torch.exp(logp.detach() - logp_old), mask))
    return aggregate(loss_tok, mask, mode, n_seqs, n_tokens, max_len), stats
