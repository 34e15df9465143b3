"""OREO: Offline REasoning Optimization (arXiv 2412.16145) -- the losses, the value model, training and search.

Spec: ../shared/spec/oreo.md (tests/test_oreo.py checks the losses against the original code); reasoning: NOTES.md.
A token-level undiscounted MDP, one reward R in {0, 1} at the end; OREO maximises E[R] - beta * KL(pi || pi_ref),
pi_ref the SFT model. Soft Bellman, V(s_t) - V(s_{t+1}) = r_t - beta * log pi(a_t|s_t) / pi_ref(a_t|s_t), telescopes:

    V(s_t) = R - beta * A_t,        A_t = sum_{i >= t} log pi(a_i|s_i) / pi_ref(a_i|s_i).

With delta_t = beta * A_t + V(s_t) - R, L_V and L_pi both are mean_b(sum_t delta_t^2 / n_b) over the scored states
(level token: every completion token; step: each step's first; response: the first). L_V's gradient goes into V
only, L_pi's into log pi of the tokens each state owns (up to the next state); L_pi adds alpha * KL (exact or k3).
"""
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoModel

import kk_data
from model import (add_lora, check_finite, check_finite_weights, clip_and_step, encode_pairs, lora_base, merged_lora,
                   position_ids_from_mask, restore_trainer_state, save_weights, token_logprobs, warmup_cosine)
from reward import score
from rollout import decode, encode_prompts, generation_mode

LEVELS = ("token", "step", "response")
KL_ALPHA = {"token": 0.01, "step": 0.1, "response": 0.3}  # weight of the KL regulariser per level
BETA = 0.03  # KL coefficient of the objective in every published run
HEAD_FILE = "value_head.safetensors"


# ---- 1. Soft Bellman consistency, telescoped -------------------------------------------------------------------
def log_ratio_to_go(logp, ref_logp, mask):
    """A[b, j] = sum_{i >= j} (log pi - log pi_ref)(token i), real tokens only.  [B, C] -> [B, C]"""
    return ((logp - ref_logp) * mask).flip(-1).cumsum(-1).flip(-1)                   # sums from the right


def consistency_residual(log_ratio_sum, values, rewards, beta):
    """delta = beta * A + V - R: how far V is from the telescoped soft value R - beta * A.  [B, C]"""
    return beta * log_ratio_sum + values - rewards[:, None]


def sequence_mean(x, mask):
    """Mean of x over each sequence's masked entries, then mean over the batch.  [B, C] -> scalar"""
    return ((x * mask).sum(-1) / mask.sum(-1)).mean()


# ---- 2. Which states are scored: token, step or response level -------------------------------------------------
def step_end_ids(tokenizer):
    """Token ids that end a reasoning step: those containing a newline; without any (the tiny tokenizer), ";"."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    newline_ids = [i for i, text in enumerate(texts) if "\n" in text]
    if newline_ids:
        return newline_ids
    semicolon = tokenizer.convert_tokens_to_ids(";")
    if semicolon is None or semicolon == tokenizer.unk_token_id:
        raise ValueError("step_end_ids: the tokenizer has no newline token and no ';' token to end a step with")
    return [semicolon]


def step_starts_from_newlines(completion_ids, mask, newline_ids):
    """1 on the first completion token and on each token right after a newline_ids one.  [B, C] -> [B, C]"""
    newline_ids = torch.as_tensor(list(newline_ids), dtype=completion_ids.dtype, device=completion_ids.device)
    ends_step = torch.isin(completion_ids, newline_ids)                                 # [B, C]
    after_newline = torch.cat([torch.ones_like(ends_step[:, :1]), ends_step[:, :-1]], -1)  # and the first token
    return (after_newline & mask.bool()).to(mask.dtype)


def state_mask_for_level(level, mask, step_start_mask):
    """1 on the completion tokens whose preceding state is scored at this level.  [B, C]"""
    if level == "token":
        return mask
    if level == "step":
        return step_start_mask.to(mask.dtype) * mask
    return torch.cat([mask[:, :1], torch.zeros_like(mask[:, 1:])], -1)                # the first token only


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


# ---- 3. The losses ---------------------------------------------------------------------------------------------
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
    if level == "step" and step_start_mask is None:
        raise ValueError("level='step' needs step_start_mask (see step_starts_from_newlines)")
    if level == "step" and step_start_mask.shape != logp.shape:
        raise ValueError(f"step_start_mask has shape {tuple(step_start_mask.shape)}, logp has {tuple(logp.shape)}")
    if level == "step" and not step_start_mask[:, 0].bool().all():
        rows = (~step_start_mask[:, 0].bool()).nonzero().flatten().tolist()
        raise ValueError(f"step_start_mask must mark the first completion token; rows {rows} do not")


# exercise 11: OREO's value loss and policy loss
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


# ---- 4. The KL regulariser (added to the policy loss as alpha * KL) --------------------------------------------
def full_kl(policy_logits, ref_logits, mask):
    """Exact reverse KL(pi || pi_ref) over the vocabulary, sequence mean then batch mean.  [B, C, V], mask [B, C]"""
    if policy_logits.shape != ref_logits.shape or policy_logits.shape[:2] != mask.shape:
        raise ValueError(f"policy_logits {tuple(policy_logits.shape)}, ref_logits {tuple(ref_logits.shape)} "
                         f"and mask {tuple(mask.shape)} must agree as [B, C, V] / [B, C]")
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    log_pi = policy_logits.to(dtype).log_softmax(-1)                                    # [B, C, V]
    log_ref = ref_logits.detach().to(dtype).log_softmax(-1)                             # [B, C, V]
    kl = (log_pi.exp() * (log_pi - log_ref)).sum(-1)                                    # [B, C]
    return sequence_mean(kl, mask.to(dtype))


def k3_kl(logp, ref_logp, mask):
    """Sampled k3 estimate of KL(pi || pi_ref): exp(x) - x - 1, x = log pi_ref - log pi, reduced as full_kl.  [B, C]"""
    x = ref_logp.detach() - logp                                                        # [B, C]
    return sequence_mean(torch.exp(x) - x - 1, mask.to(logp.dtype))


# ---- 5. The value model: a separate backbone and a zero-initialised bias-free head -----------------------------
class ValueModel(nn.Module):
    """V(s) = head(last hidden state of s); the head starts at zero (V = 0) and stays float32 on a bf16 backbone."""

    def __init__(self, backbone, lora_rank=0):
        super().__init__()
        self.backbone = add_lora(backbone, lora_rank) if lora_rank else backbone
        head_dtype = torch.promote_types(backbone.dtype, torch.float32)
        self.head = nn.Linear(backbone.config.hidden_size, 1, bias=False, device=backbone.device, dtype=head_dtype)
        nn.init.zeros_(self.head.weight)

    @classmethod
    def from_pretrained(cls, path, device, dtype=torch.float32, attn_implementation=None, lora_rank=0):
        """Backbone of a causal LM or saved ValueModel (a LoRA one: merged), and its saved head; lora_rank: add_lora."""
        base = lora_base(path)
        backbone = AutoModel.from_pretrained(base or path, dtype=dtype, attn_implementation=attn_implementation)
        model = cls((merged_lora(backbone, path) if base else backbone).to(device), lora_rank)
        head_file = Path(path) / HEAD_FILE
        if head_file.exists():
            model.head.load_state_dict(load_file(head_file, device=str(device)))
        return model

    def save(self, out_dir):
        """Backbone as a Hugging Face folder (a LoRA backbone: its adapters only), head as value_head.safetensors."""
        save_weights(self.backbone, out_dir)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, Path(out_dir) / HEAD_FILE)
        return Path(out_dir)

    def hidden_states(self, input_ids, attention_mask):
        """Last hidden states [B, L, H], positions counted from each row's first real token (left padding)."""
        position_ids = position_ids_from_mask(attention_mask)                           # [B, L]
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state                        # [B, L, H]

    def forward(self, input_ids, attention_mask, n_prompt):
        """values [B, C]: values[:, j] = V(state before completion token j), read where the logits predict it."""
        L = input_ids.shape[1]
        if not 1 <= n_prompt < L:
            raise ValueError(f"n_prompt must be in [1, {L - 1}] for sequences of length {L}, got {n_prompt}")
        hidden = self.hidden_states(input_ids, attention_mask)                          # [B, L, H]
        before_each_token = hidden[:, n_prompt - 1:-1]                                  # [B, C, H]
        return self.head(before_each_token.to(self.head.weight.dtype)).squeeze(-1)      # [B, C]

    def last_value(self, input_ids, attention_mask):
        """V of the state AFTER each row's LAST real token (forward's "state before the next token").  [B, L] -> [B]"""
        hidden = self.hidden_states(input_ids, attention_mask)                          # [B, L, H]
        last = input_ids.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)              # [B] column of the last 1
        at_last = hidden[torch.arange(len(last), device=hidden.device), last]           # [B, H]
        return self.head(at_last.to(self.head.weight.dtype)).squeeze(-1)                # [B]


# ---- 6. Offline data: K sampled completions per training prompt, each with a 0/1 reward ------------------------
OFFLINE_FIELDS = {"prompt": str, "response": str, "reward": (int, float), "size": int, "index": int}
save_offline = kk_data.save_jsonl  # (rows, path): one JSON object per line, written atomically


def binary_reward(response, solution):
    """The paper's reward: 1.0 when "<think>" (pre-filled by the prompt) + response is strictly correct, else 0.0."""
    return 1.0 if score("<think>" + response, solution).correct else 0.0


def balance_rows(rows, m):
    """The first m rows with reward 1 and the first m with reward 0 of each prompt (paper's 7B run: m = 4 of 16)."""
    if m < 1:
        raise ValueError(f"balance_rows: m must be >= 1, got {m}")
    kept, counts = [], {}
    for row in rows:
        key = (row["prompt"], row["reward"] > 0)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] <= m:
            kept.append(row)
    return kept


def sample_offline_data(sampler, records, template, tokenizer, k, temperature=1.0, max_new_tokens=400,
                        balance=None, prompts_per_call=8, progress=False):
    """OFFLINE_FIELDS rows, k per record (completions without the pre-filled "<think>"); balance: balance_rows' m."""
    if k < 1 or prompts_per_call < 1:
        raise ValueError(f"sample_offline_data needs k >= 1 and prompts_per_call >= 1, got {k}, {prompts_per_call}")
    rows = []
    with tqdm(total=len(records) * k, desc="offline data", unit="seq", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(records), prompts_per_call):
            batch = records[start:start + prompts_per_call]
            prompts = [kk_data.make_prompt(record, template, tokenizer) for record in batch]
            out = sampler.generate(prompts, n=k, temperature=temperature, max_new_tokens=max_new_tokens)
            for row, response in enumerate(out.completions):           # rows i*k .. i*k+k-1 belong to prompt i
                record = batch[row // k]
                rows.append({"prompt": prompts[row // k], "response": response,
                             "reward": binary_reward(response, record["solution_text_format"]),
                             "size": len(record["names"]), "index": record["index"]})
            bar.update(len(out.completions))
    return rows if balance is None else balance_rows(rows, balance)


def check_offline_row(row):
    """ValueError (without location) unless row has every OFFLINE_FIELDS key with a value of the right type."""
    kk_data.check_fields(row, OFFLINE_FIELDS)
    if not math.isfinite(row["reward"]):
        raise ValueError(f"field 'reward' is {row['reward']}, expected a finite number")


def load_offline(path):
    """The rows of a file written by save_offline; a bad line raises ValueError naming path:line."""
    return kk_data.read_jsonl(path, check_offline_row)


# ---- 7. One joint training step on a batch of offline rows -----------------------------------------------------
def encode_offline_batch(tokenizer, rows, device):
    """prompt + response + " " + EOS (the spec's text; no " " token: EOS only) as input_ids, attention_mask [B, P + C]
    (prompt LEFT-, completion RIGHT-padded), completion_ids, mask [B, C] (EOS included), n_prompt = P, rewards [B]"""
    input_ids, attention_mask, mask, n_prompt = encode_pairs(
        tokenizer, [row["prompt"] for row in rows], [row["response"] + " " + tokenizer.eos_token for row in rows],
        device)  # [B, P + C] (two), [B, C], P
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_ids": input_ids[:, n_prompt:],
            "mask": mask, "n_prompt": n_prompt,
            "rewards": torch.tensor([float(row["reward"]) for row in rows], device=device)}  # [B]


def completion_logits(model, input_ids, attention_mask, n_prompt):
    """Logits [B, C, V] that predict the C completion tokens (the LM head runs on those positions only)."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return model.lm_head(hidden[:, n_prompt - 1:-1])                                    # [B, C, V]


def completion_logprobs(model, batch, with_logits):
    """(log-probs [B, C] of batch's completion tokens, float32 at least; logits [B, C, V] if with_logits else None)"""
    args = batch["input_ids"], batch["attention_mask"], batch["n_prompt"]
    if not with_logits:
        return token_logprobs(model, *args), None
    logits = completion_logits(model, *args)                                            # [B, C, V]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(dtype).log_softmax(-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1), logits


def adam_cosine(module, lr, total_steps, warmup_frac=0.03):
    """As the original code: Adam (0.9, 0.95) without weight decay; warmup_frac linear warm-up, cosine to 10%."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, math.ceil(warmup_frac * total_steps)))


def make_oreo_optimizers(policy, value_model, lr_policy, lr_value, total_steps, warmup_frac=0.03):
    """(policy_opt, value_opt, policy_scheduler, value_scheduler) of adam_cosine; total_steps: one a batch."""
    if total_steps < 1:
        raise ValueError(f"make_oreo_optimizers: total_steps must be >= 1, got {total_steps}")
    policy_opt, policy_scheduler = adam_cosine(policy, lr_policy, total_steps, warmup_frac)
    value_opt, value_scheduler = adam_cosine(value_model, lr_value, total_steps, warmup_frac)
    return policy_opt, value_opt, policy_scheduler, value_scheduler


def oreo_step(policy, reference, value_model, policy_opt, value_opt, tokenizer, rows, beta, alpha, level,
              micro_batch, step_ids=None, grad_clip=1.0, kl="full", policy_scheduler=None, value_scheduler=None):
    """ONE optimizer step of the critic and one of the policy on `rows`, in micro-batches weighted by their share (any
    micro_batch gives the same step); step_ids end a step. Returns the batch means of the losses, kl and more."""
    if kl not in ("full", "k3"):
        raise ValueError(f"kl must be 'full' or 'k3', got {kl!r}")
    if not rows or micro_batch < 1:
        raise ValueError(f"oreo_step needs at least one row and micro_batch >= 1, got {len(rows)} rows, "
                         f"micro_batch={micro_batch}")
    step_ids = step_end_ids(tokenizer) if level == "step" and step_ids is None else step_ids
    totals = {}
    for part in by_length(rows, micro_batch):                                          # micro-batches
        batch, starts = encode_with_step_starts(tokenizer, part, next(policy.parameters()).device, level, step_ids)
        rewards, mask = batch["rewards"], batch["mask"]                                 # [b], [b, C]
        share = len(part) / len(rows)                                                   # micro-batch means -> batch
        # 1. log-probs without gradient: the critic's targets are data
        with torch.no_grad():
            ref_logp, ref_logits = completion_logprobs(reference, batch, kl == "full")  # [b, C], [b, C, V] or None
            logp_now, _ = completion_logprobs(policy, batch, with_logits=False)         # [b, C]
        # 2. critic gradient (the critic steps once, after the last micro-batch)
        values = value_model(batch["input_ids"], batch["attention_mask"], batch["n_prompt"])  # [b, C]
        _, value_loss = losses(logp_now, ref_logp, values, rewards, mask, beta, level, starts)
        (value_loss * share).backward()
        values_before_update = values.detach()                                          # [b, C]
        # 3. actor gradient, against the values of the critic as it was when the batch began
        logp, logits = completion_logprobs(policy, batch, kl == "full")                 # [b, C], [b, C, V] or None
        kl_value = full_kl(logits, ref_logits, mask) if kl == "full" else k3_kl(logp, ref_logp, mask)
        policy_loss, _ = losses(logp, ref_logp, values_before_update, rewards, mask, beta, level, starts)
        ((policy_loss + alpha * kl_value) * share).backward()
        for name, value in (("value_loss", value_loss.item()), ("policy_loss", policy_loss.item()),
                            ("kl", kl_value.item()), ("value_first", values_before_update[:, 0].mean().item()),
                            ("reward", rewards.mean().item()), ("completion_length", mask.sum(-1).mean().item())):
            totals[name] = totals.get(name, 0.0) + value * share
    totals["grad_norm_value"] = clip_and_step(value_model, value_opt, value_scheduler, grad_clip, "value model")
    totals["grad_norm_policy"] = clip_and_step(policy, policy_opt, policy_scheduler, grad_clip, "policy")
    return totals


def encode_with_step_starts(tokenizer, rows, device, level, step_ids=None):
    """(encode_offline_batch's dict, step-start mask [B, C] for level "step", else None)."""
    batch = encode_offline_batch(tokenizer, rows, device)
    if level != "step":
        return batch, None
    step_ids = step_end_ids(tokenizer) if step_ids is None else step_ids
    return batch, step_starts_from_newlines(batch["completion_ids"], batch["mask"], step_ids)


def critic_step(value_model, optimizer, tokenizer, rows, level, micro_batch, grad_clip=1.0, scheduler=None):
    """One step of the critic alone, micro-batched as oreo_step: before any policy step pi = pi_ref, so A = 0."""
    total, step_ids = 0.0, step_end_ids(tokenizer) if level == "step" else None
    for part in by_length(rows, micro_batch):
        batch, starts = encode_with_step_starts(tokenizer, part, value_model.head.weight.device, level, step_ids)
        values = value_model(batch["input_ids"], batch["attention_mask"], batch["n_prompt"])  # [b, C]
        zeros = torch.zeros_like(values.detach())                                         # log pi = log pi_ref
        _, value_loss = losses(zeros, zeros, values, batch["rewards"], batch["mask"], BETA, level, starts)
        (value_loss * len(part) / len(rows)).backward()
        total += value_loss.item() * len(part) / len(rows)
    return {"value_loss": total, "grad_norm_value": clip_and_step(value_model, optimizer, scheduler, grad_clip,
                                                                   "value model")}


def fit_critic(value_model, tokenizer, rows, steps, batch_size, lr, level, micro_batch, grad_clip=1.0, seed=0):
    """Yields the metrics of `steps` critic_steps on batches of rows reshuffled every pass; its own adam_cosine."""
    optimizer, scheduler = adam_cosine(value_model, lr, steps)
    rng, queue = random.Random(seed), []
    for _ in range(steps):
        while len(queue) < batch_size:
            queue += rng.sample(rows, len(rows))
        batch, queue = queue[:batch_size], queue[batch_size:]
        yield critic_step(value_model, optimizer, tokenizer, batch, level, micro_batch, grad_clip, scheduler)


def split_by_prompt(rows, share, seed):
    """(train rows, held-out rows): a seeded `share` of the distinct prompts, with all their rows, held out."""
    prompts = sorted({row["prompt"] for row in rows})
    held = set(random.Random(seed).sample(prompts, round(share * len(prompts))))
    return [r for r in rows if r["prompt"] not in held], [r for r in rows if r["prompt"] in held]


@torch.no_grad()
def offline_values(value_model, tokenizer, rows, batch_size=32):
    """Per row, encoded as in training: V at the first and last states, mean_t (V - R)^2, R.  Four [N] float64"""
    first, last, square_error, rewards = [], [], [], []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["response"]))           # little padding
    for part in by_length([rows[i] for i in order], batch_size):
        batch = encode_offline_batch(tokenizer, part, value_model.head.weight.device)
        values = value_model(batch["input_ids"], batch["attention_mask"], batch["n_prompt"]).double()  # [b, C]
        mask, R = batch["mask"].double(), batch["rewards"].double()                      # [b, C], [b]
        first.append(values[:, 0])
        last.append(values.gather(1, mask.sum(-1).long()[:, None] - 1).squeeze(1))
        square_error.append(((values - R[:, None]) ** 2 * mask).sum(-1) / mask.sum(-1))
        rewards.append(R)
    unsort = torch.tensor(order).argsort()
    return tuple(torch.cat(x)[unsort] for x in (first, last, square_error, rewards))


def by_length(rows, size):
    """The rows in chunks of `size`, the shortest responses together (padding costs compute)."""
    rows = sorted(rows, key=lambda row: len(row["response"]))
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def auc(scores, labels):
    """P(a random label-1 row scores above a label-0 one), ties half; None without both.  scores, labels: [N]"""
    pos, neg = scores[labels > 0], scores[labels <= 0]
    if not len(pos) or not len(neg):
        return None
    diff = pos[:, None] - neg[None, :]                                                   # [N+, N-]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def critic_quality(value_model, tokenizer, rows, batch_size=32):
    """How well V predicts R on held-out rows: AUC of V at the first / last state, explained variance, mean V, R."""
    first, last, square_error, R = offline_values(value_model, tokenizer, rows, batch_size)
    variance = R.var(unbiased=False).item()
    return {"value_auc_first": auc(first, R), "value_auc_last": auc(last, R),
            "value_explained_variance": 1 - square_error.mean().item() / variance if variance > 0 else None,
            "value_first_mean": first.mean().item(), "reward_mean": R.mean().item()}


# ---- 8. A whole run (train.py's ALGO="oreo"): the critic alone, then the critic and the policy jointly ---------
def train_offline(policy, reference, value_model, tokenizer, rows, heldout, log, evaluate, save, state=None, *,
                  steps, batch_size, value_steps, value_steps_lr, lr, value_lr, level, kl, micro_batch, grad_clip,
                  eval_every, save_every, seed, step_offset, progress):
    """value_steps of fit_critic, then an oreo_step per batch (at most `steps`); returns the joint steps' count."""
    random.Random(seed).shuffle(rows)
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)][:steps]
    policy_opt, *rest = make_oreo_optimizers(policy, value_model, lr, value_lr, len(batches))  # 1 step a batch
    parts = dict(zip(("value", "value_optimizer", "scheduler", "value_scheduler"), (value_model, *rest)))
    first = state["step"] if state else 0  # joint steps done (the critic-only ones come first: global steps)
    if state is not None:  # the policy and its optimizer as in SFT and RL, the rest in `parts`
        restore_trainer_state(state, policy, policy_opt)
        for name, part in parts.items():
            part.load_state_dict(state[name])

    def write(metrics, at_eval, stage, step, global_step):
        quality = critic_quality(value_model, tokenizer, heldout, micro_batch) if at_eval and heldout else {}
        log({**metrics, **quality, "kind": "train", "stage": stage, "step": step, "global_step": global_step})

    def save_all(step):
        check_finite_weights(value_model, "value model")
        save(step, policy_opt, **{name: part.state_dict() for name, part in parts.items()})

    if state is None:  # critic-only steps, then a trainer state at joint step 0 (a kill before it: redone)
        for step, metrics in enumerate(fit_critic(value_model, tokenizer, rows, value_steps, batch_size,
                                                  value_steps_lr, level, micro_batch, grad_clip, seed)):
            at_eval = step == 0 or (step + 1) % eval_every == 0 or step + 1 == value_steps
            write(metrics, at_eval, "oreo-critic", step + 1, step_offset + step + 1)
        if value_steps:
            save_all(0)
    for step in tqdm(range(first, len(batches)), desc="oreo", initial=first, total=len(batches)):
        progress["at"] = f"oreo step {step + 1}"
        metrics = oreo_step(policy, reference, value_model, policy_opt, rest[0], tokenizer, batches[step], BETA,
                            KL_ALPHA[level], level, micro_batch, grad_clip=grad_clip, kl=kl,
                            policy_scheduler=rest[1], value_scheduler=rest[2])
        for name in ("value_loss", "policy_loss", "kl"):  # (a non-finite gradient norm never reached a step)
            check_finite(metrics[name], f"OREO {name}")
        at_eval = (step + 1) % eval_every == 0 or step + 1 == len(batches)
        global_step = step_offset + value_steps + step + 1
        write(metrics, at_eval, "oreo", step + 1, global_step)
        if at_eval:
            evaluate(step + 1, global_step)
        if (step + 1) % save_every == 0 or step + 1 == len(batches):
            save_all(step + 1)
    return len(batches)


# ---- 9. Test-time search: value-guided step-level beam search --------------------------------------------------
@dataclass
class SearchResult:
    text: str            # the chosen completion, decoded without special tokens (as HFSampler's completions)
    token_ids: list      # its generated token ids, the final EOS included when there is one
    value: float         # V at its last token
    finished: bool       # it ended with EOS or reached max_new_tokens
    expansions: int      # rounds of expansion that were run
    generated: int = 0   # tokens sampled by the whole search (every candidate step)


def through_first_stop(tokens, stop_ids):
    """tokens up to and including the first stop token (all of them if there is none)."""
    ends = [i + 1 for i, token in enumerate(tokens) if token in stop_ids]
    return tokens[:ends[0]] if ends else tokens


def left_padded(rows, pad_id, device):
    """Token lists of different lengths as (input_ids, attention_mask) [R, L], padded on the left."""
    longest = max(map(len, rows))
    input_ids = torch.tensor([[pad_id] * (longest - len(r)) + r for r in rows], device=device)
    return input_ids, torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=device)


@torch.no_grad()
def sample_next_steps(policy, tokenizer, contexts, n, step_ids, temperature, max_step_tokens):
    """Per context (prompt + prefix ids), n sampled next steps (id lists through the step end or EOS): ONE decode."""
    rows = [context for context in contexts for _ in range(n)]  # rows i*n .. share context i
    input_ids, attention = left_padded(rows, tokenizer.pad_token_id, next(policy.parameters()).device)  # [R, L]
    stops = [tokenizer.eos_token_id] + list(step_ids)
    with generation_mode(policy):
        new_tokens, _ = decode(policy, input_ids, attention, temperature, 1.0, max_step_tokens, stops,
                               tokenizer.pad_token_id, n)  # [R, T], padded after a stop
    steps = [through_first_stop(tokens, set(stops)) for tokens in new_tokens.tolist()]
    return [steps[i:i + n] for i in range(0, len(steps), n)]


@torch.no_grad()
def prefix_values(value_model, contexts, pad_id):
    """V at the last token of each context (prompt + prefix ids): a list of floats."""
    input_ids, attention = left_padded(contexts, pad_id, value_model.head.weight.device)  # [N, L]
    return value_model.last_value(input_ids, attention).float().tolist()


# exercise 12: one step of value-guided beam search
def keep_best(candidates, values, beam, is_finished):
    """The `beam` candidates of highest value (ties: the earlier first), split into (partial, finished) lists of
    (tokens, value) pairs."""
    order = sorted(range(len(candidates)), key=lambda i: -values[i])[:beam]           # sorted() is stable
    partial, finished = [], []
    for i in order:
        (finished if is_finished(candidates[i]) else partial).append((candidates[i], values[i]))
    return partial, finished


def beam_search(policy, value_model, tokenizer, prompt, beam, step_ids, **settings):
    """beam_search_many for one prompt: its SearchResult."""
    return beam_search_many(policy, value_model, tokenizer, [prompt], beam, step_ids, **settings)[0]


def beam_search_many(policy, value_model, tokenizer, prompts, beam, step_ids, max_expansions=20, max_step_tokens=256,
                     temperature=1.0, max_new_tokens=4096, expand=None):
    """Value-guided step-level beam search, a SearchResult per prompt, all in lockstep (a round: one sample, one
    score call); expand steps per kept one (default beam), beam x expand from the root."""
    expand = beam if expand is None else expand
    if min(beam, expand, max_expansions, max_step_tokens, max_new_tokens) < 1 or temperature <= 0:
        raise ValueError("beam_search needs beam, expand, max_expansions, max_step_tokens, max_new_tokens >= 1 and "
                         f"temperature > 0, got {(beam, expand, max_expansions, max_step_tokens, max_new_tokens)}, "
                         f"{temperature}")
    encoded = encode_prompts(tokenizer, prompts)
    prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]

    def is_finished(tokens):
        return tokens[-1] == tokenizer.eos_token_id or len(tokens) >= max_new_tokens

    searches = range(len(prompts))
    partial, finished = [[([], None)] for _ in searches], [[] for _ in searches]  # per prompt: (tokens, value)
    rounds, generated = [0 for _ in searches], [0 for _ in searches]
    for expansion in range(max_expansions):
        kept = [(i, prefix) for i in searches for prefix, _ in partial[i]]  # every live prompt's partial candidates
        if not kept:
            break
        budget = min(max_step_tokens, max_new_tokens - min(len(prefix) for _, prefix in kept))
        n = beam * expand if expansion == 0 else expand  # (the original code samples only B from the root)
        steps = sample_next_steps(policy, tokenizer, [prompt_ids[i] + prefix for i, prefix in kept], n, step_ids,
                                  temperature, budget)
        candidates = {i: [] for i, _ in kept}
        for (i, prefix), its_steps in zip(kept, steps):
            generated[i] += sum(map(len, its_steps))
            candidates[i] += [prefix + step[:max_new_tokens - len(prefix)] for step in its_steps]
        candidates = {i: [list(c) for c in dict.fromkeys(map(tuple, cs))] for i, cs in candidates.items()}  # no dups
        contexts = [prompt_ids[i] + (c[:-1] if c[-1] == tokenizer.eos_token_id else c)  # scored without EOS
                    for i, cs in candidates.items() for c in cs]
        values = iter(prefix_values(value_model, contexts, tokenizer.pad_token_id))  # in the candidates' order
        for i, cs in candidates.items():
            partial[i], newly_finished = keep_best(cs, [next(values) for _ in cs], beam, is_finished)
            finished[i] += newly_finished
            rounds[i] = expansion + 1
    best = [max(finished[i] or partial[i], key=lambda pair: pair[1]) for i in searches]  # the first of the best
    return [SearchResult(text=tokenizer.decode(tokens, skip_special_tokens=True), token_ids=tokens, value=value,
                         finished=bool(finished[i]), expansions=rounds[i], generated=generated[i])
            for i, (tokens, value) in enumerate(best)]
