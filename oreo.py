"""OREO: Offline REasoning Optimization (arXiv 2412.16145) -- the losses and the value model.

Spec: ../shared/spec/oreo.md. Checked against the original loss code (float64 reference case
../shared/data/oreo_reference_case.json) in tests/test_oreo.py.

The MDP
-------
Token-level and undiscounted: a state s_t is the prompt plus the tokens generated so far, an action a_t is the
next token, and the only reward is R in {0, 1} at the end. OREO maximises the KL-regularised return

    E[R] - beta * KL(pi || pi_ref),        pi_ref = the starting (SFT) model, beta = 0.03 in every published run.

Soft Bellman consistency
------------------------
The optimal policy and soft value of that objective satisfy, for every step,

    V(s_t) - V(s_{t+1}) = r_t - beta * log pi(a_t|s_t) / pi_ref(a_t|s_t),

and with the reward only at the end this telescopes to

    V(s_t) = R - beta * A_t,        A_t = sum_{i >= t} log pi(a_i|s_i) / pi_ref(a_i|s_i).

OREO trains both sides of this equation towards each other on offline (prompt, response, reward) rows. With the
residual  delta_t = beta * A_t + V(s_t) - R  both losses are  mean_b( sum_t delta_t^2 / n_b ):  a mean over the
sequence's scored states, then a mean over the batch.  They have the SAME value and differ only in where the
gradient goes:

    loss          gradient flows into                                       stop-gradient on
    value  L_V    V(s_t)                                                    all log-probs
    policy L_pi   token level:    log pi(a_t) of the current token only     V, A_{t+1}
                  step level:     log pi of the current step's tokens       V, A at the next step start
                  response level: log pi of every token (one state, s_0)    V

Levels (which states are scored, and the weight alpha of the KL regulariser added to the policy loss):
    token     every completion token is a state                             alpha = 0.01
    step      only the first token of each step (steps end at a newline)    alpha = 0.1
    response  only the first completion token                               alpha = 0.3
The three are one computation: a "state" owns the tokens up to the next state, and the policy gradient flows
through exactly the tokens it owns.

KL regulariser (added to the policy loss as alpha * KL): the exact reverse KL over the whole vocabulary at every
action position, sum_v pi(v) (log pi(v) - log pi_ref(v)), as the paper did; the sampled k3 estimate is the
cheaper fallback.

The value function is a separate copy of the starting model with a bias-free linear head on its last hidden state,
initialised to zero so that V = 0 at the start.

Layout: everything here is in the project's completion-token layout [B, C] (column j = completion token j, see
NOTES.md), where the original code kept full-sequence tensors with state masks; the numbers are the same.
What we changed on purpose: the paper trained its 7B critic with LoRA; ValueModel fine-tunes the whole copy.
"""
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel

LEVELS = ("token", "step", "response")
KL_ALPHA = {"token": 0.01, "step": 0.1, "response": 0.3}  # weight of the KL regulariser per level
BETA = 0.03  # KL coefficient of the objective in every published run
HEAD_FILE = "value_head.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# 1. Soft Bellman consistency, telescoped
# ----------------------------------------------------------------------------------------------------------------

def reverse_cumsum(x):
    """out[..., j] = sum_{i >= j} x[..., i] over the last dim."""
    return x.flip(-1).cumsum(-1).flip(-1)


def log_ratio_to_go(logp, ref_logp, mask):
    """A[b, j] = sum_{i >= j} (log pi - log pi_ref)(token i), real tokens only.  [B, C] -> [B, C]"""
    return reverse_cumsum((logp - ref_logp) * mask)


def consistency_residual(log_ratio_sum, values, rewards, beta):
    """delta = beta * A + V - R: how far V is from the telescoped soft value R - beta * A.  [B, C]"""
    return beta * log_ratio_sum + values - rewards[:, None]


def sequence_mean(x, mask):
    """Mean of x over each sequence's masked entries, then mean over the batch.  [B, C] -> scalar"""
    return ((x * mask).sum(-1) / mask.sum(-1)).mean()


# ----------------------------------------------------------------------------------------------------------------
# 2. Which states are scored: token, step or response level
# ----------------------------------------------------------------------------------------------------------------

def newline_token_ids(tokenizer):
    """Ids of every vocabulary token whose text contains a newline (those tokens end a step)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if "\n" in text]


def step_starts_from_newlines(completion_ids, mask, newline_ids):
    """1 on completion tokens that start a step: the first token, and every token right after a newline token.

    completion_ids, mask: [B, C]; newline_ids: ids of the tokens that end a step.  Returns [B, C] in mask's dtype.
    """
    if completion_ids.shape != mask.shape:
        raise ValueError(f"completion_ids {tuple(completion_ids.shape)} and mask {tuple(mask.shape)} differ in shape")
    newline_ids = torch.as_tensor(list(newline_ids), dtype=completion_ids.dtype, device=completion_ids.device)
    ends_step = torch.isin(completion_ids, newline_ids)                                 # [B, C]
    after_newline = torch.cat([torch.zeros_like(ends_step[:, :1]), ends_step[:, :-1]], -1)
    after_newline[:, 0] = True                                                          # the first token
    return (after_newline & mask.bool()).to(mask.dtype)


def state_mask_for_level(level, mask, step_start_mask):
    """1 on the completion tokens whose preceding state is scored at this level.  [B, C]"""
    if level == "token":
        return mask
    if level == "step":
        return step_start_mask.to(mask.dtype) * mask
    first_token = torch.zeros_like(mask)
    first_token[:, 0] = 1
    return first_token * mask


def next_state_index(states):
    """For each column j, the column of the first scored state after j (C when there is none).  [B, C] -> [B, C]"""
    B, C = states.shape
    columns = torch.arange(C, device=states.device).expand(B, C)
    state_columns = torch.where(states.bool(), columns, C)                             # C marks "no state here"
    first_at_or_after = state_columns.flip(-1).cummin(-1).values.flip(-1)
    return torch.cat([first_at_or_after[:, 1:], torch.full_like(columns[:, :1], C)], -1)


def at_next_state(x, states):
    """x read at the next scored state after each column, 0 past the last one.  [B, C] -> [B, C]"""
    padded = torch.cat([x, torch.zeros_like(x[:, :1])], -1)                            # [B, C + 1]
    return padded.gather(-1, next_state_index(states))


# ----------------------------------------------------------------------------------------------------------------
# 3. The losses
# ----------------------------------------------------------------------------------------------------------------

def check_loss_inputs(logp, ref_logp, values, rewards, mask, level, step_start_mask):
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, C], got shape {tuple(logp.shape)}")
    for name, t in (("ref_logp", ref_logp), ("values", values), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logp has {tuple(logp.shape)}")
    if rewards.shape != logp.shape[:1]:
        raise ValueError(f"rewards must be [B] = [{logp.shape[0]}], got shape {tuple(rewards.shape)}")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sequences {empty} have no completion tokens (mask is all zero)")
    if level == "step":
        if step_start_mask is None:
            raise ValueError("level='step' needs step_start_mask (see step_starts_from_newlines)")
        if step_start_mask.shape != logp.shape:
            raise ValueError(f"step_start_mask has shape {tuple(step_start_mask.shape)}, "
                             f"logp has {tuple(logp.shape)}")
        if not step_start_mask[:, 0].bool().all():
            rows = (~step_start_mask[:, 0].bool()).nonzero().flatten().tolist()
            raise ValueError(f"step_start_mask must mark the first completion token; rows {rows} do not")


def losses(logp, ref_logp, values, rewards, mask, beta, level="token", step_start_mask=None):
    """OREO's (policy_loss, value_loss) -- equal values, different gradients (see the module docstring).

    logp, ref_logp: [B, C] log-probs of the completion tokens under the policy / reference;
    values: [B, C], values[:, j] = V(state before completion token j), computed BEFORE this micro-batch's critic
    update (the policy loss detaches it, the value loss backpropagates into it);
    rewards: [B]; mask: [B, C] 1 on real completion tokens; step_start_mask: [B, C], needed for level="step".
    """
    check_loss_inputs(logp, ref_logp, values, rewards, mask, level, step_start_mask)
    mask = mask.to(logp.dtype)
    states = state_mask_for_level(level, mask, step_start_mask)                        # [B, C]
    A = log_ratio_to_go(logp, ref_logp.detach(), mask)                                  # [B, C]

    # value loss: the log-probs are data, the gradient goes into V only
    value_delta = consistency_residual(A.detach(), values, rewards, beta)               # [B, C]
    value_loss = sequence_mean(value_delta ** 2, states)

    # policy loss: each state's A splits into the tokens it owns (up to the next state) and the rest;
    # the rest is a stop-gradient, so the gradient reaches only the tokens this state owns
    rest = at_next_state(A, states)                                                     # [B, C]
    own_then_rest = (A - rest) + rest.detach()                                          # same value as A
    policy_delta = consistency_residual(own_then_rest, values.detach(), rewards, beta)  # [B, C]
    policy_loss = sequence_mean(policy_delta ** 2, states)
    return policy_loss, value_loss


# ----------------------------------------------------------------------------------------------------------------
# 4. The KL regulariser (added to the policy loss as alpha * KL)
# ----------------------------------------------------------------------------------------------------------------

def full_kl(policy_logits, ref_logits, mask):
    """Exact reverse KL(pi || pi_ref) over the vocabulary at each action position, per-sequence mean over the
    action tokens, then batch mean.  Gradient through pi only.

    policy_logits, ref_logits: [B, C, V] (column j = the logits that predict completion token j); mask: [B, C].
    """
    if policy_logits.shape != ref_logits.shape or policy_logits.shape[:2] != mask.shape:
        raise ValueError(f"policy_logits {tuple(policy_logits.shape)}, ref_logits {tuple(ref_logits.shape)} "
                         f"and mask {tuple(mask.shape)} must agree as [B, C, V] / [B, C]")
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    log_pi = policy_logits.to(dtype).log_softmax(-1)                                    # [B, C, V]
    log_ref = ref_logits.detach().to(dtype).log_softmax(-1)                             # [B, C, V]
    kl = (log_pi.exp() * (log_pi - log_ref)).sum(-1)                                    # [B, C]
    return sequence_mean(kl, mask.to(dtype))


def k3_kl(logp, ref_logp, mask):
    """Sampled k3 estimate of KL(pi || pi_ref): exp(x) - x - 1 with x = log pi_ref - log pi of the sampled token,
    same reduction as full_kl.  Gradient through logp only.  [B, C] -> scalar"""
    if logp.shape != ref_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, ref_logp {tuple(ref_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [B, C] shape")
    x = ref_logp.detach() - logp                                                        # [B, C]
    return sequence_mean(torch.exp(x) - x - 1, mask.to(logp.dtype))


# ----------------------------------------------------------------------------------------------------------------
# 5. The value model: a separate backbone and a zero-initialised bias-free head
# ----------------------------------------------------------------------------------------------------------------

class ValueModel(nn.Module):
    """V(s) = head(last hidden state of s).  The head starts at zero, so V = 0 before any training.

    The head is kept in float32 (or float64) even when the backbone is bf16: values are compared with beta-sized
    log-ratio sums, which bf16 would round away.
    """

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        head_dtype = torch.promote_types(backbone.dtype, torch.float32)
        self.head = nn.Linear(backbone.config.hidden_size, 1, bias=False, device=backbone.device, dtype=head_dtype)
        nn.init.zeros_(self.head.weight)

    @classmethod
    def from_pretrained(cls, path, device, dtype=torch.float32, attn_implementation=None):
        """Backbone of the causal LM (or of a folder written by save) at path; the saved head if there is one.

        Loading a causal-LM folder reports lm_head.weight as UNEXPECTED: that is the LM head we leave out."""
        backbone = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
        model = cls(backbone.to(device))
        head_file = Path(path) / HEAD_FILE
        if head_file.exists():
            model.head.load_state_dict(load_file(head_file, device=str(device)))
        return model

    def save(self, out_dir):
        """Backbone as a Hugging Face folder, head as value_head.safetensors next to it."""
        out_dir = Path(out_dir)
        self.backbone.save_pretrained(out_dir)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, out_dir / HEAD_FILE)
        return out_dir

    def forward(self, input_ids, attention_mask, n_prompt):
        """values [B, C], C = L - n_prompt: values[:, j] = V(state before completion token j), read at position
        n_prompt - 1 + j (the same slice as the logits that predict token j).  input_ids, attention_mask: [B, L]."""
        L = input_ids.shape[1]
        if not 1 <= n_prompt < L:
            raise ValueError(f"n_prompt must be in [1, {L - 1}] for sequences of length {L}, got {n_prompt}")
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                    # [B, L]
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state                      # [B, L, H]
        before_each_token = hidden[:, n_prompt - 1:-1]                                  # [B, C, H]
        return self.head(before_each_token.to(self.head.weight.dtype)).squeeze(-1)      # [B, C]
