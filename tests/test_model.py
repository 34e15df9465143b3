"""Tests for model.py: device helpers, the word tokenizer, the tiny model, token_logprobs, save_hf."""
import json
import sys
import types

import pytest
import torch
from safetensors import safe_open

import model as M

TEXTS = [
    'Zoey says, "Oliver is a knave." Oliver says, "Zoey is a knight and Oliver is a knave."',
    "So who is a knight and who is a knave?\n<think>",
    "We know Zoey is a knight.",
    "try Zoey knight Oliver knave : Zoey knight says Oliver knave T = T ok ; </think>",
    "<answer> (1) Zoey is a knight\n(2) Oliver is a knave </answer>",
]
SIZES = dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, max_positions=128)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return M.build_tiny(tmp_path_factory.mktemp("tiny"), TEXTS, **SIZES)


@pytest.fixture
def tiny(tiny_dir):
    return M.load_model(tiny_dir, "cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    """The tiny model with an LM head of its own, as Qwen2.5-7B has (every other test model ties them)."""
    return M.build_tiny(tmp_path_factory.mktemp("untied"), TEXTS, tie_embeddings=False, **SIZES)


@pytest.fixture(params=["tied", "untied"])
def tiny_either(request, tiny_dir, untied_dir):
    return M.load_model(tiny_dir if request.param == "tied" else untied_dir, "cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tok():
    return M.build_word_tokenizer(TEXTS)


def left_padded_batch(tok, prompts, completions):
    """Left-padded prompts + right-padded completions, as a rollout lays them out. -> ids, mask, n_prompt"""
    prompt = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    completion = tok(completions, padding=True, padding_side="right", return_tensors="pt")
    ids = torch.cat([prompt["input_ids"], completion["input_ids"]], dim=1)
    mask = torch.cat([prompt["attention_mask"], completion["attention_mask"]], dim=1)
    return ids, mask, prompt["input_ids"].shape[1]


def naive_logprobs(model, ids, mask, n_prompt, temperature):
    """The obvious implementation: full forward, full float32 log-softmax over [B, L, V], gather."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=M.position_ids_from_mask(mask)).logits
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)[:, n_prompt - 1 : -1]  # [B, C, V]
    logp = logp_all.gather(-1, ids[:, n_prompt:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


PROMPTS = ["Zoey says, \"Oliver is a knave.\"\n<think>", "Oliver is a knight ?\n<think>"]
COMPLETIONS = ["try Zoey knight Oliver knave : ok ; </think> <answer> (1) Zoey is a knight </answer>", "try Oliver"]


# ---- device helpers ---------------------------------------------------------------------------------------

def test_attention_implementation_is_sdpa_on_cpu():
    assert M.attention_implementation("cpu") == "sdpa"


def test_attention_implementation_uses_flash_attn_only_on_cuda_when_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert M.attention_implementation("cuda") == "flash_attention_2"
    assert M.attention_implementation("cpu") == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # None in sys.modules makes the import fail
    assert M.attention_implementation("cuda") == "sdpa"


def test_pick_dtype_is_bf16_on_cuda_fp32_on_cpu():
    assert M.pick_dtype("cpu") == torch.float32
    assert M.pick_dtype(torch.device("cuda", 0)) == torch.bfloat16


# ---- word tokenizer -----------------------------------------------------------------------------------------

def test_tags_are_single_tokens_even_when_glued(tok):
    tokens = tok.convert_ids_to_tokens(tok("knave?\n<think>try</think><answer>(1)</answer>")["input_ids"])
    assert tokens == ["knave", "?", "<think>", "try", "</think>", "<answer>", "(", "1", ")", "</answer>"]


def test_decode_joins_tokens_with_spaces_and_keeps_tags(tok):
    ids = tok("Zoey is a knight.\n<think> try")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "Zoey is a knight . <think> try"


def test_decode_drops_pad_and_eos(tok):
    ids = [tok.pad_token_id, tok.pad_token_id] + tok("<answer> Zoey </answer>")["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<answer> Zoey </answer>"


def test_unknown_words_map_to_unk(tok):
    ids = tok("Zoey is a dragon")["input_ids"]
    assert ids[-1] == tok.unk_token_id
    assert tok.unk_token_id not in ids[:-1]


def test_vocabulary_does_not_depend_on_text_order():
    assert M.build_word_tokenizer(TEXTS).get_vocab() == M.build_word_tokenizer(TEXTS[::-1]).get_vocab()


def test_special_and_tag_ids_come_first(tok):
    assert [tok.pad_token_id, tok.unk_token_id, tok.eos_token_id] == [0, 1, 2]
    assert tok.convert_tokens_to_ids(M.TAG_TOKENS) == [3, 4, 5, 6]


def test_build_word_tokenizer_rejects_a_bare_string():
    with pytest.raises(ValueError, match="list of strings"):
        M.build_word_tokenizer("Zoey is a knight")


def test_loaded_tiny_tokenizer_matches_the_built_one(tiny_dir, tok):
    loaded = M.load_tokenizer(tiny_dir)
    text = 'Zoey says, "Oliver is a knave."\n<think> try'
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.padding_side == "left"
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "<eos>"


def test_load_tokenizer_without_tokenizer_names_the_folder(tmp_path, tiny_dir):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=str(tmp_path)):
        M.load_tokenizer(tmp_path)


# ---- tiny model ---------------------------------------------------------------------------------------------

def test_build_tiny_same_seed_gives_same_weights(tmp_path, tiny_dir):
    again = M.load_model(M.build_tiny(tmp_path, TEXTS, **SIZES), "cpu")
    first = M.load_model(tiny_dir, "cpu")
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_build_tiny_other_seed_gives_other_weights(tmp_path, tiny_dir):
    other = M.load_model(M.build_tiny(tmp_path, TEXTS, seed=1, **SIZES), "cpu")
    first = M.load_model(tiny_dir, "cpu")
    assert not torch.equal(first.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight)


def test_build_tiny_reloads_with_the_saved_weights(tiny_dir):
    loaded = M.load_model(tiny_dir, "cpu").state_dict()
    with safe_open(tiny_dir / "model.safetensors", "pt") as saved:
        for name in saved.keys():
            assert torch.equal(saved.get_tensor(name), loaded[name]), name


def test_build_tiny_has_the_requested_sizes(tiny, tok):
    config = tiny.config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (32, 2, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == len(tok)
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight
    assert config.eos_token_id == tok.eos_token_id


def test_build_tiny_rejects_heads_that_do_not_divide_hidden(tmp_path):
    with pytest.raises(ValueError, match="heads"):
        M.build_tiny(tmp_path, TEXTS, hidden=30, heads=4)


def test_count_parameters_counts_tied_embeddings_once(tmp_path, tiny):
    untied = M.load_model(M.build_tiny(tmp_path, TEXTS, tie_embeddings=False, **SIZES), "cpu")
    vocab, hidden = tiny.lm_head.weight.shape
    assert M.count_parameters(untied) - M.count_parameters(tiny) == vocab * hidden
    tiny.model.requires_grad_(False)
    assert M.count_parameters(tiny, trainable_only=True) == 0


def test_load_model_gradient_checkpointing_turns_off_the_cache(tiny_dir):
    model = M.load_model(tiny_dir, "cpu", gradient_checkpointing=True)
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    assert model.training


def test_load_reference_is_frozen_and_in_eval_mode(tiny_dir):
    reference = M.load_reference(tiny_dir, "cpu")
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())


# ---- token_logprobs -----------------------------------------------------------------------------------------

def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert M.position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


@pytest.mark.exercise(4)
def test_token_logprobs_match_naive_full_log_softmax(tiny, tok):
    ids, mask, n_prompt = left_padded_batch(tok, PROMPTS, COMPLETIONS)
    logp, entropy = M.token_logprobs(tiny, ids, mask, n_prompt, temperature=0.7, with_entropy=True)
    naive_logp, naive_entropy = naive_logprobs(tiny, ids, mask, n_prompt, temperature=0.7)
    assert logp.shape == (2, ids.shape[1] - n_prompt)
    torch.testing.assert_close(logp, naive_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, naive_entropy, atol=1e-5, rtol=0)


def test_encode_pairs_lays_out_left_padded_prompts_then_right_padded_completions(tok):
    ids, attention, mask, n_prompt = M.encode_pairs(tok, PROMPTS, COMPLETIONS, "cpu")
    expected_ids, expected_attention, expected_n_prompt = left_padded_batch(tok, PROMPTS, COMPLETIONS)
    assert n_prompt == expected_n_prompt and torch.equal(ids, expected_ids)
    assert torch.equal(attention, expected_attention) and mask.dtype == torch.float32
    assert torch.equal(mask, expected_attention[:, n_prompt:].float())  # [B, C]: 1 on completion tokens


def test_micro_batches_group_similar_lengths_and_give_the_whole_batchs_logprobs(tiny, tok):
    completions = ["try", "try Zoey knight Oliver knave : ok ; </think>", "try Oliver", "try Zoey knight ok ;"]
    prompts = [PROMPTS[i % 2] for i in range(4)]
    ids, attention, mask, n_prompt = M.encode_pairs(tok, prompts, completions, "cpu")
    parts = M.micro_batches(attention, mask, n_prompt, 2)
    assert [sorted(p[0].tolist()) for p in parts] == [[0, 2], [1, 3]]            # the two short rows together
    assert parts[0][3] == int(mask[[0, 2]].sum(-1).max()) < mask.shape[1]        # cut to the columns they use
    pieces = [M.part_logprobs(tiny, ids, attention, part, 0.7) for part in parts]   # [b, W] each
    whole = M.token_logprobs(tiny, ids, attention, n_prompt, 0.7)
    torch.testing.assert_close(M.scatter_rows(parts, pieces, mask) * mask, whole * mask, atol=1e-5, rtol=0)


@pytest.mark.exercise(4)
def test_token_logprobs_small_chunks_equal_one_big_chunk(tiny, tok):
    ids, mask, n_prompt = left_padded_batch(tok, PROMPTS, COMPLETIONS)
    big = M.token_logprobs(tiny, ids, mask, n_prompt, with_entropy=True, chunk_size=1024)
    small = M.token_logprobs(tiny, ids, mask, n_prompt, with_entropy=True, chunk_size=3)
    torch.testing.assert_close(small[0], big[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(small[1], big[1], atol=1e-6, rtol=0)


@pytest.mark.exercise(4)
def test_left_padding_does_not_change_a_rows_logprobs(tiny, tok):
    short_prompt, completion = "Oliver is a knight ?\n<think>", "try Oliver knave ;"
    alone_ids, alone_mask, alone_n = left_padded_batch(tok, [short_prompt], [completion])
    batch_ids, batch_mask, batch_n = left_padded_batch(tok, [PROMPTS[0], short_prompt], [COMPLETIONS[0], completion])
    assert batch_n > alone_n  # the short prompt really is padded in the batch
    alone = M.token_logprobs(tiny, alone_ids, alone_mask, alone_n)[0]
    in_batch = M.token_logprobs(tiny, batch_ids, batch_mask, batch_n)[1, : alone.shape[0]]
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=0)


def test_a_training_forwards_logprobs_equal_a_no_grad_pass_exactly(tiny, tok):
    # train.rl_step takes logp_old from the update's own forward (detached) instead of a separate no-grad pass:
    # that is only the same algorithm if the two give bit-identical numbers (the PPO ratio is then exactly 1)
    ids, mask, n_prompt = left_padded_batch(tok, PROMPTS, COMPLETIONS)
    with torch.no_grad():
        separate = M.token_logprobs(tiny, ids, mask, n_prompt, temperature=0.7)
    in_update, _ = M.token_logprobs(tiny, ids, mask, n_prompt, temperature=0.7, with_entropy=True)
    assert in_update.requires_grad and torch.equal(in_update.detach(), separate)


@pytest.mark.exercise(4)
def test_token_logprobs_gradients_equal_naive_gradients(tiny, tok):
    ids, mask, n_prompt = left_padded_batch(tok, PROMPTS, COMPLETIONS)
    weights = torch.rand(2, ids.shape[1] - n_prompt)
    logp, entropy = M.token_logprobs(tiny, ids, mask, n_prompt, temperature=0.7, with_entropy=True, chunk_size=5)
    (weights * (logp + entropy)).sum().backward()
    grads = [p.grad.clone() for p in tiny.parameters()]
    tiny.zero_grad()
    naive_logp, naive_entropy = naive_logprobs(tiny, ids, mask, n_prompt, temperature=0.7)
    (weights * (naive_logp + naive_entropy)).sum().backward()
    assert grads[0].abs().sum() > 0
    for grad, p in zip(grads, tiny.parameters()):
        torch.testing.assert_close(grad, p.grad, atol=1e-5, rtol=1e-4)


def test_token_logprobs_rejects_a_prompt_length_outside_the_sequence(tiny, tok):
    ids, mask, _ = left_padded_batch(tok, PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="n_prompt"):
        M.token_logprobs(tiny, ids, mask, 0)
    with pytest.raises(ValueError, match="n_prompt"):
        M.token_logprobs(tiny, ids, mask, ids.shape[1])


# ---- save_hf ------------------------------------------------------------------------------------------------

def test_save_hf_writes_bf16_safetensors_and_extra(tmp_path, tiny, tok):
    M.save_hf(tiny, tok, tmp_path, extra={"step": 7, "accuracy": 0.5})
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert {saved.get_tensor(name).dtype for name in saved.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / M.EXTRA_FILE).read_text()) == {"step": 7, "accuracy": 0.5}
    assert M.load_tokenizer(tmp_path)("Zoey <think>")["input_ids"] == tok("Zoey <think>")["input_ids"]
    assert tiny.dtype == torch.float32  # the live model is not cast


def test_save_hf_reloads_to_trained_weights_up_to_bf16_rounding(tmp_path, tiny_either, tok):
    with torch.no_grad():  # stand-in for training: move every weight away from its initial value
        for p in tiny_either.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    M.save_hf(tiny_either, tok, tmp_path)
    reloaded = M.load_model(tmp_path, "cpu", dtype=torch.float32)
    for name, trained in tiny_either.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], trained.to(torch.bfloat16).float()), name
    tied = tiny_either.config.tie_word_embeddings
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied  # an untied head stays its own


# ---- LoRA ----------------------------------------------------------------------------------------------------
def with_trained_lora(model, rank=4, add=True):
    """model with LoRA adapters (added unless add=False) whose B is no longer 0 (a stand-in for training them)."""
    if add:
        M.add_lora(model, rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def test_lora_starts_as_the_base_and_only_its_adapters_get_gradients(tiny_dir):
    ids = torch.tensor([[1, 5, 7, 9, 4]])
    model = M.load_model(tiny_dir, "cpu", dtype=torch.float32)
    before = model(input_ids=ids).logits
    M.add_lora(model, 4)
    assert torch.equal(model(input_ids=ids).logits, before)  # B = 0: the adapters add nothing yet
    with_trained_lora(model, add=False)(input_ids=ids).logits.sum().backward()
    touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(".lora_A." in name or ".lora_B." in name for name in touched)
    assert all(not p.requires_grad for name, p in model.named_parameters() if ".lora_" not in name)


def test_iter_full_state_of_a_lora_model_gives_a_plain_model_its_outputs(tiny_either):
    """The sampler sync's and save_hf's path: W + (alpha / r) B A under the plain names, no adapter entries."""
    ids = torch.tensor([[1, 5, 7, 9, 4]])
    plain, base_logits = type(tiny_either)(tiny_either.config), tiny_either(input_ids=ids).logits
    lora = with_trained_lora(tiny_either)
    merged = dict(M.iter_full_state(lora))
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    assert torch.allclose(plain(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5)
    assert not torch.allclose(lora(input_ids=ids).logits, base_logits, atol=1e-3)  # the adapters do change it


def test_save_hf_of_a_lora_model_writes_the_adapters_that_load_model_merges(tmp_path, tiny_dir, tok):
    ids = torch.tensor([[1, 5, 7, 9, 4]])
    lora = with_trained_lora(M.load_model(tiny_dir, "cpu", dtype=torch.float32))
    M.save_hf(lora, tok, tmp_path, extra={"step": 1})
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()
    assert M.lora_base(tmp_path) == str(tiny_dir) and M.lora_base(tiny_dir) is None
    reloaded = M.load_model(tmp_path, "cpu", dtype=torch.float32)
    assert not M.has_lora(reloaded)  # merged: a plain model again
    assert torch.allclose(reloaded(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5)


# ---- resumable trainer state --------------------------------------------------------------------------------

def one_adam_step(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("tied", [True, False])
def test_trainer_state_restores_weights_optimizer_rng_and_extra(tmp_path, tiny_dir, untied_dir, tied):
    tiny_dir = tiny_dir if tied else untied_dir
    model = M.load_model(tiny_dir, "cpu", dtype=torch.float32)
    optimizer = one_adam_step(model)
    torch.manual_seed(5)
    M.save_trainer_state(tmp_path / "state.pt", model, optimizer, {"step": 7, "note": "x"})
    expected_draw = torch.rand(3)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moments = [s["exp_avg"].clone() for s in optimizer.state_dict()["state"].values()]

    restored = M.load_model(tiny_dir, "cpu", dtype=torch.float32)  # a fresh model and optimizer, as on resume
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    state = M.load_trainer_state(tmp_path / "state.pt")
    M.restore_trainer_state(state, restored, restored_optimizer)
    assert state["step"] == 7 and state["note"] == "x"
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in saved_weights.items())
    moments = [s["exp_avg"] for s in restored_optimizer.state_dict()["state"].values()]
    assert len(moments) == len(saved_moments) and all(map(torch.equal, moments, saved_moments))
    assert torch.equal(torch.rand(3), expected_draw)  # the torch RNG continues where it was saved


def test_load_trainer_state_is_none_without_a_file(tmp_path):
    assert M.load_trainer_state(tmp_path / "missing.pt") is None
    assert not list(tmp_path.iterdir())


def test_mean_over_ranks_is_the_identity_on_one_process():
    assert M.mean_over_ranks({"a": 1.5, "b": 2}) == {"a": 1.5, "b": 2.0}


# ---- non-finite guards --------------------------------------------------------------------------------------

def test_check_finite_passes_numbers_and_names_a_nan_or_inf():
    assert M.check_finite(torch.tensor(2.5), "loss") == 2.5
    for bad in (float("nan"), float("inf"), torch.tensor(float("-inf"))):
        with pytest.raises(M.NonFiniteError, match="the RL loss is"):
            M.check_finite(bad, "RL loss")


def test_no_save_replaces_the_last_good_state_with_non_finite_weights(tmp_path, tiny_dir, tok):
    model = M.load_model(tiny_dir, "cpu", dtype=torch.float32)
    optimizer = one_adam_step(model)
    M.save_trainer_state(tmp_path / "state.pt", model, optimizer, {"step": 1})
    good = (tmp_path / "state.pt").read_bytes()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(M.NonFiniteError, match="policy weights hold NaN"):
        M.save_trainer_state(tmp_path / "state.pt", model, optimizer, {"step": 2})
    with pytest.raises(M.NonFiniteError):
        M.save_hf(model, tok, tmp_path / "final")
    assert (tmp_path / "state.pt").read_bytes() == good and not (tmp_path / "final").exists()


def test_check_tiny_sizes_names_what_build_tiny_needs():
    M.check_tiny_sizes(SIZES)
    for bad in ({"hidden": 30, "heads": 4}, {"width": 8}, {"layers": 0}, {"ffn": 2.5}, {"seed": 1}):
        with pytest.raises(ValueError, match="whole numbers >= 1 for keys among"):
            M.check_tiny_sizes(bad)


def test_has_chat_template_reads_local_folders(tmp_path, tiny_dir):
    assert M.has_chat_template("tiny") is False and M.has_chat_template(tiny_dir) is False
    assert M.has_chat_template("Qwen/Qwen2.5-7B-Instruct-1M") is None  # a hub name: not known before loading
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert M.has_chat_template(tmp_path) is True
