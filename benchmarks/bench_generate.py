"""Generation speed: llama.cpp vs transformers on the embedded SmolLM2 (tokens per second).

    python benchmarks/bench_generate.py [--max_new_tokens 64] [--prompts 8] [--json out.json]
        [--llamacpp_threads N] [--busy]

Both backends complete the same prompts (the bundled eval prompts, in the model's chat
template), greedily: one prompt at a time, and all prompts together (transformers: one
left-padded batch; llama.cpp: that many sequences sharing each decode call). llama.cpp runs
with its default threads (half the CPUs) and, with --llamacpp_threads, with that many;
transformers with one and with all torch threads. tokens/s = generated tokens / wall time,
after one warm-up generation per setting. The goal: llama.cpp >= 5x transformers, taken both
at the same batch size and fastest setting against fastest setting. It also times llama.cpp
reading all the eval prompts, 8 per decode call: its arithmetic-bound rate, a ceiling for
batched generation. --busy keeps one other process spinning on a core during the llama.cpp runs (what
a shared machine does to a thread count).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time

import torch

from tdreward.backends.registry import BackendOptions, make_generator
from tdreward.evaluation.compare import load_prompt_texts

MODEL = "embedded:smollm2-135m-instruct"


def timed(gen, prompts: list[str], max_new_tokens: int) -> dict:
    gen.generate(prompts[:1], max_new_tokens=4, temperature=0)  # warm-up
    start = time.perf_counter()
    outs = gen.generate(prompts, max_new_tokens=max_new_tokens, temperature=0)
    seconds = time.perf_counter() - start
    tokens = sum(o.n_tokens for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def _spin() -> None:
    while True:
        pass


def prompt_rate(threads: int | None) -> float:
    """Prompt tokens/s of llama.cpp reading all eval prompts (chat template), 8 sequences per
    decode, one new token each: its arithmetic-bound rate, a ceiling for batched generation."""
    opts = BackendOptions(batch_size=8, extra={"n_threads": threads} if threads else {})
    gen = make_generator(MODEL, "llamacpp", opts)
    try:
        texts = [gen.format(p) for p in load_prompt_texts(None)[0]]
        n_tokens = sum(len(gen.model.tokenize(t)) for t in texts)
        gen.model.generate(texts[:1], max_new_tokens=1)  # warm-up
        start = time.perf_counter()
        gen.model.generate(texts, max_new_tokens=1)
        return n_tokens / (time.perf_counter() - start)
    finally:
        gen.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8, help="how many eval prompts (8)")
    ap.add_argument("--torch_threads", default="1,all",
                    help="comma-separated torch thread counts to time transformers with")
    ap.add_argument("--llamacpp_threads", type=int,
                    help="also time llama.cpp with this many threads (default: half the CPUs)")
    ap.add_argument("--busy", action="store_true",
                    help="spin another process on one core during the llama.cpp runs")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    prompts = load_prompt_texts(None)[0][: args.prompts]
    batches = sorted({1, len(prompts)})
    rows: dict[str, dict] = {}  # name -> figures, with "backend" and "batch"
    cpp_threads = [None] + ([args.llamacpp_threads] if args.llamacpp_threads else [])
    spinner = multiprocessing.Process(target=_spin, daemon=True) if args.busy else None
    if spinner:
        spinner.start()
    prompts_read = {f"{t or 'default'} threads": prompt_rate(t) for t in cpp_threads}
    for threads in cpp_threads:
        for batch in batches:
            opts = BackendOptions(batch_size=batch,
                                  extra={"n_threads": threads} if threads else {})
            cpp = make_generator(MODEL, "llamacpp", opts)
            label = f"{threads} threads" if threads else "default threads"
            rows[f"llama.cpp (Q4_1, batch {batch}, {label})"] = {
                "backend": "llama.cpp", "batch": batch, **timed(cpp, prompts, args.max_new_tokens)}
            cpp.close()
    if spinner:
        spinner.terminate()
    all_threads = torch.get_num_threads()
    hf = make_generator(MODEL, "transformers", BackendOptions(batch_size=1))
    wanted = {all_threads if t.strip() == "all" else int(t) for t in args.torch_threads.split(",")}
    for threads in sorted(wanted):
        torch.set_num_threads(threads)
        for batch in batches:
            hf.batch_size = batch
            rows[f"transformers (float32, batch {batch}, {threads} thread"
                 f"{'s' if threads > 1 else ''})"] = {
                "backend": "transformers", "batch": batch,
                **timed(hf, prompts, args.max_new_tokens)}
    torch.set_num_threads(all_threads)

    def best(backend: str, batch: int | None = None) -> float:
        return max(r["tokens_per_second"] for r in rows.values()
                   if r["backend"] == backend and batch in (None, r["batch"]))

    ratios = {f"batch {b}": best("llama.cpp", b) / best("transformers", b) for b in batches}
    ratios["fastest vs fastest"] = best("llama.cpp") / best("transformers")
    print(f"{MODEL}: {len(prompts)} prompts, greedy, max_new_tokens {args.max_new_tokens}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    if args.busy:
        print("(llama.cpp timed with another process spinning on one core)")
    print(f"{'backend':52s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s}")
    for name, r in rows.items():
        print(f"{name:52s} {r['tokens']:7d} {r['seconds']:8.2f} {r['tokens_per_second']:9.1f}")
    print("llama.cpp reading the prompts (8 per decode), prompt tokens/s: "
          + ", ".join(f"{k}: {v:.1f}" for k, v in prompts_read.items()))
    print("llama.cpp / transformers (best thread setting of each; goal >= 5x): "
          + ", ".join(f"{k}: {v:.1f}x" for k, v in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": MODEL, "max_new_tokens": args.max_new_tokens,
                       "busy": args.busy, "rows": rows, "speedups": ratios,
                       "llamacpp_prompt_tokens_per_second": prompts_read}, f, indent=2)


if __name__ == "__main__":
    main()
