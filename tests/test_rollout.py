"""Tests for rollout.py: the Rollout layout and HFSampler, above all that its log-probs equal the trainer's."""
import pytest
import torch

import model as M
import rollout as R

TEXTS = [
    'Zoey says, "Oliver is a knave." Oliver says, "Zoey is a knight and Oliver is a knave."',
    "So who is a knight and who is a knave?\n<think>",
    "try Zoey knight Oliver knave : Zoey knight says Oliver knave T = T ok ; </think>",
    "<answer> (1) Zoey is a knight\n(2) Oliver is a knave </answer>",
]
PROMPTS = ['Zoey says, "Oliver is a knave." So who is a knight and who is a knave?\n<think>', "Oliver says\n<think>"]
EOS_BIAS = 2.5  # makes EOS likely enough (~1 in 3 at temperature 1) that sampled rows end at different lengths


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return M.build_tiny(tmp_path_factory.mktemp("tiny"), TEXTS, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64,
                        max_positions=128)


@pytest.fixture
def tok(tiny_dir):
    return M.load_tokenizer(tiny_dir)


@pytest.fixture
def tiny(tiny_dir, tok):
    """The tiny model (fp32) with a bias on the EOS logit, so that generation actually stops sometimes."""
    model = M.load_model(tiny_dir, "cpu", dtype=torch.float32)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    head = torch.nn.Linear(hidden, vocab, bias=True)
    head.weight = model.lm_head.weight  # keep the (tied) weight; only add a bias
    with torch.no_grad():
        head.bias.zero_()
        head.bias[tok.eos_token_id] = EOS_BIAS
    model.lm_head = head
    return model


def sample(tiny, tok, seed=0, **kwargs):
    torch.manual_seed(seed)
    return R.HFSampler(tiny, tok).generate(PROMPTS, **{"n": 4, "max_new_tokens": 12, **kwargs})


def test_mask_through_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert R.mask_through_first_eos(ids, eos_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_rollout_concatenates_prompt_and_completion():
    rollout = R.Rollout(
        prompt_ids=torch.tensor([[0, 9]]), prompt_mask=torch.tensor([[0, 1]]),
        completion_ids=torch.tensor([[8, 2, 0]]), completion_mask=torch.tensor([[1.0, 1.0, 0.0]]),
        sampler_logprobs=torch.zeros(1, 3), completions=["x"],
    )
    assert rollout.input_ids().tolist() == [[0, 9, 8, 2, 0]]
    assert rollout.attention_mask().tolist() == [[0, 1, 1, 1, 0]]
    assert rollout.attention_mask().dtype == torch.long


def test_shapes_and_dtypes(tiny, tok):
    rollout = sample(tiny, tok)
    batch, n_prompt = rollout.prompt_ids.shape
    assert batch == len(PROMPTS) * 4 and rollout.prompt_mask.shape == (batch, n_prompt)
    n_completion = rollout.completion_ids.shape[1]
    assert 1 <= n_completion <= 12
    assert rollout.completion_mask.shape == rollout.sampler_logprobs.shape == (batch, n_completion)
    assert rollout.completion_mask.dtype == torch.float32 and rollout.completion_ids.dtype == torch.long
    assert rollout.input_ids().shape == rollout.attention_mask().shape == (batch, n_prompt + n_completion)
    assert len(rollout.completions) == batch
    assert rollout.completion_mask.sum(1).max() == n_completion  # trimmed to the longest row


def test_rows_are_grouped_by_prompt(tiny, tok):
    rollout = sample(tiny, tok, n=3)
    expected = tok(PROMPTS, padding=True, return_tensors="pt")
    assert torch.equal(rollout.prompt_ids, expected["input_ids"].repeat_interleave(3, dim=0))
    assert torch.equal(rollout.prompt_mask, expected["attention_mask"].repeat_interleave(3, dim=0))
    assert rollout.prompt_mask[-1, 0] == 0  # the short prompt is left-padded


def test_mask_covers_tokens_through_eos_and_pads_after(tiny, tok):
    rollout = sample(tiny, tok)
    lengths = rollout.completion_mask.sum(1).long()
    eos_rows = 0
    for ids, mask, length in zip(rollout.completion_ids, rollout.completion_mask, lengths):
        assert mask[:length].eq(1).all() and mask[length:].eq(0).all()
        assert ids[length:].eq(tok.pad_token_id).all()
        assert tok.eos_token_id not in ids[: length - 1].tolist()  # no EOS before the end
        eos_rows += int(ids[length - 1] == tok.eos_token_id)
    assert eos_rows > 0 and lengths.min() < lengths.max()  # some rows stopped early, at different lengths


def test_sampler_logprobs_are_zero_where_masked(tiny, tok):
    rollout = sample(tiny, tok)
    assert rollout.sampler_logprobs[rollout.completion_mask == 0].eq(0).all()
    assert rollout.sampler_logprobs[rollout.completion_mask == 1].lt(0).all()


def test_completions_decode_without_pad_or_eos(tiny, tok):
    rollout = sample(tiny, tok)
    for text, ids, mask in zip(rollout.completions, rollout.completion_ids, rollout.completion_mask):
        kept = [t for t in tok.convert_ids_to_tokens(ids[mask.bool()].tolist()) if t not in tok.all_special_tokens]
        assert text.split() == kept  # tags, words and punctuation stay; only pad/EOS/unk go
        assert "<eos>" not in text and "<pad>" not in text


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_teacher_forced_logprobs(tiny, tok, temperature):
    rollout = sample(tiny, tok, temperature=temperature)
    lengths = rollout.completion_mask.sum(dim=1)
    assert lengths.min() < lengths.max() == rollout.completion_ids.shape[1]  # rows left the batch at different steps
    n_prompt = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        trainer = M.token_logprobs(tiny, rollout.input_ids(), rollout.attention_mask(), n_prompt,
                                   temperature=temperature)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampler_logprobs[mask], trainer[mask], atol=1e-5, rtol=0)


def test_greedy_is_deterministic_and_scored_at_temperature_one(tiny, tok):
    first = sample(tiny, tok, seed=0, temperature=0.0)
    second = sample(tiny, tok, seed=1, temperature=0.0)
    assert torch.equal(first.completion_ids, second.completion_ids)
    with torch.no_grad():
        trainer = M.token_logprobs(tiny, first.input_ids(), first.attention_mask(), first.prompt_ids.shape[1])
    mask = first.completion_mask.bool()
    torch.testing.assert_close(first.sampler_logprobs[mask], trainer[mask], atol=1e-5, rtol=0)


def test_top_p_keeps_the_nucleus_and_scores_the_full_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)  # [b, V]
    torch.manual_seed(0)
    token, logp = R.next_token(logits, temperature=1.0, top_p=0.75)  # nucleus: 0.5 + 0.3 (mass before 0.15: 0.8)
    assert set(token.tolist()) == {0, 1}
    assert 0.55 < (token == 0).float().mean() < 0.70  # renormalised: 0.5 / 0.8 = 0.625
    torch.testing.assert_close(logp, torch.log(torch.tensor([0.5, 0.3]))[token])  # untruncated log-probs
    token, _ = R.next_token(logits, temperature=1.0, top_p=1.0)
    assert set(token.tolist()) == {0, 1, 2, 3}


def test_model_generation_defaults_do_not_leak_in(tiny, tok):
    # A checkpoint's generation_config.json may carry top-k, penalties or suppressed tokens; none may apply.
    only_allowed = tok.convert_tokens_to_ids("knave")
    poisoned = tiny.generation_config
    poisoned.suppress_tokens = [i for i in range(len(tok)) if i != only_allowed]
    poisoned.repetition_penalty = 100.0
    poisoned.top_k = 1
    greedy = sample(tiny, tok, temperature=0.0, max_new_tokens=8)
    with torch.no_grad():
        logits = tiny(input_ids=greedy.input_ids(), attention_mask=greedy.attention_mask(),
                      position_ids=M.position_ids_from_mask(greedy.attention_mask())).logits
    n_prompt = greedy.prompt_ids.shape[1]
    argmax = logits[:, n_prompt - 1 : -1].argmax(-1)  # [B, C] what plain greedy decoding must pick
    mask = greedy.completion_mask.bool()
    assert torch.equal(greedy.completion_ids[mask], argmax[mask])
    sampled = sample(tiny, tok, temperature=1.0, n=8)
    assert len(set(sampled.completions[:8])) > 1  # a leaked top_k=1 would make all 8 samples identical
    assert tiny.generation_config is poisoned  # the model's own config is back in place


def test_sampling_uses_the_whole_vocabulary_not_a_top_k(tmp_path):
    # generate's global default would be top_k=50; with 100 extra words some draws must fall outside the top 50.
    big_dir = M.build_tiny(tmp_path, TEXTS + [" ".join(f"w{i}" for i in range(100))], hidden=32, layers=1,
                           heads=4, kv_heads=2, ffn=64, max_positions=128)
    big, big_tok = M.load_model(big_dir, "cpu"), M.load_tokenizer(big_dir)
    rollout = sample(big, big_tok, n=4, max_new_tokens=12)
    with torch.no_grad():
        logits = big(input_ids=rollout.input_ids(), attention_mask=rollout.attention_mask(),
                     position_ids=M.position_ids_from_mask(rollout.attention_mask())).logits
    n_prompt = rollout.prompt_ids.shape[1]
    step_logits = logits[:, n_prompt - 1 : -1]  # [B, C, V]
    drawn = step_logits.gather(-1, rollout.completion_ids[..., None])  # [B, C, 1]
    rank = (step_logits > drawn).sum(-1)  # [B, C] 0 = the most likely token
    assert rank[rollout.completion_mask.bool()].max() >= 50


def test_generate_restores_mode_and_cache_setting(tiny, tok):
    tiny.train()
    tiny.config.use_cache = False
    sample(tiny, tok)
    assert tiny.training and tiny.config.use_cache is False


def test_sampler_sees_updated_weights(tiny, tok):
    sampler = R.HFSampler(tiny, tok)
    with torch.no_grad():  # an optimizer step, in place, on the shared module
        for p in tiny.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sampler.sync_weights(tiny)
    torch.manual_seed(0)
    rollout = sampler.generate(PROMPTS, n=2, max_new_tokens=8)
    with torch.no_grad():
        trainer = M.token_logprobs(tiny, rollout.input_ids(), rollout.attention_mask(), rollout.prompt_ids.shape[1])
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampler_logprobs[mask], trainer[mask], atol=1e-5, rtol=0)


def test_generate_rejects_bad_arguments(tiny, tok):
    sampler = R.HFSampler(tiny, tok)
    with pytest.raises(ValueError, match="list of prompt strings"):
        sampler.generate("Zoey says\n<think>")
    with pytest.raises(ValueError, match="temperature"):
        sampler.generate(PROMPTS, temperature=-1.0)


def test_sampling_from_non_finite_weights_raises_non_finite_error(tiny, tok):
    with torch.no_grad():
        tiny.lm_head.bias[3] = float("inf")  # inf - inf in the softmax: NaN probabilities
    with pytest.raises(M.NonFiniteError, match="sampling probabilities are not finite"):
        sample(tiny, tok, temperature=1.0)


def test_growing_kv_layer_holds_what_was_written_and_keeps_only_selected_rows():
    layer, written = R.GrowingKVLayer(), []
    for length in (5, 1, 1, 6):  # a prompt, two tokens, then more than the room left (5 -> room 10 -> 26)
        keys = torch.randn(3, 2, length, 4)
        got, _ = layer.update(keys, keys + 1)
        written.append(keys)
        assert torch.equal(got, torch.cat(written, dim=2))                          # [b, heads, L, d], in order
    assert layer.key_buffer.shape[2] == 26                                           # doubled once, not per step
    layer.select_rows(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, torch.cat(written, dim=2)[[2, 0]])
    assert torch.equal(layer.values, torch.cat(written, dim=2)[[2, 0]] + 1)
    assert layer.key_buffer.shape[2] == 26                                           # same room, fewer rows


def test_the_written_out_block_gives_hfs_logits_before_and_after_the_cache(tiny, tok):
    encoded = R.encode_prompts(tok, PROMPTS)  # left-padded: the second prompt is shorter
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    step = torch.tensor([[5], [7]])  # one more token per row
    full_ids, full_mask = torch.cat([ids, step], 1), torch.cat([mask, torch.ones_like(step)], 1)
    with torch.no_grad():
        hf = tiny.eval()(input_ids=full_ids, attention_mask=full_mask,
                         position_ids=M.position_ids_from_mask(full_mask)).logits  # [B, P + 1, V]
        caches = [R.GrowingKVLayer() for _ in tiny.model.layers]
        first = R.forward_with_cache(tiny, ids, M.position_ids_from_mask(mask), mask, caches)  # [B, V]
        second = R.forward_with_cache(tiny, step, M.position_ids_from_mask(full_mask)[:, -1:], full_mask, caches)
    torch.testing.assert_close(first, hf[:, -2], atol=1e-5, rtol=0)
    torch.testing.assert_close(second, hf[:, -1], atol=1e-5, rtol=0)


def test_decoding_refuses_a_model_whose_block_it_does_not_write_out(tiny, tok):
    tiny.config.use_sliding_window = True  # forward_with_cache would attend beyond the window
    with pytest.raises(ValueError, match="without a sliding window"):
        sample(tiny, tok)
    tiny.config.use_sliding_window, tiny.config.model_type = False, "qwen3"  # (per-head q/k norms: another block)
    with pytest.raises(ValueError, match="qwen3 model with the vLLM sampler"):
        sample(tiny, tok)


def test_a_prompt_read_once_for_its_samples_gives_the_samples_of_a_prompt_per_row(tiny, tok):
    encoded = R.encode_prompts(tok, PROMPTS)
    ids, mask = encoded["input_ids"].repeat_interleave(3, 0), encoded["attention_mask"].repeat_interleave(3, 0)
    runs = []
    for n in (3, 1):  # n = 3: each prompt's forward once, then its cache 3 times; n = 1: every row on its own
        torch.manual_seed(0)
        runs.append(R.decode(tiny.eval(), ids, mask, 1.0, 1.0, 12, tok.eos_token_id, tok.pad_token_id, n))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-5)


def test_a_prompt_read_once_for_its_group_gives_each_rows_logprobs(tiny, tok):
    completions = ["try", "try Zoey knight Oliver knave : ok ; </think>", "try Oliver", "try Zoey knight ok ;"]
    prompts = [PROMPTS[i // 2] for i in range(4)]  # rows 0, 1 share a prompt, rows 2, 3 the other (group of 2)
    ids, attention, mask, n_prompt = M.encode_pairs(tok, prompts, completions, "cpu")
    parts = M.micro_batches(attention, mask, n_prompt, 2)  # rows of different prompts in one micro-batch
    pieces = R.shared_prompt_logprobs(tiny, ids, attention, parts, n_prompt, 2, 0.7, chunk_size=3)  # [b, W] each
    whole = M.token_logprobs(tiny, ids, attention, n_prompt, 0.7)
    torch.testing.assert_close(M.scatter_rows(parts, pieces, mask) * mask, whole * mask, atol=1e-5, rtol=0)
