"""Generation speed: llama.cpp vs transformers on the embedded SmolLM2 (tokens per second).

    python benchmarks/bench_generate.py [--max_new_tokens 64] [--prompts 4] [--json out.json]

Both backends complete the same prompts (the bundled eval prompts, in the model's chat
template), greedily, one prompt at a time; transformers is also timed batched (all prompts in
one left-padded batch) and with one and with all torch threads, and the llama.cpp speed-up is
taken against the fastest transformers setting. tokens/s = generated tokens / wall time,
after one warm-up generation per setting. The goal: llama.cpp >= 5x transformers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from tdreward.backends.generation import BackendOptions, make_generator
from tdreward.workflows.compare import load_prompt_texts

MODEL = "embedded:smollm2-135m-instruct"


def timed(gen, prompts: list[str], max_new_tokens: int) -> dict:
    gen.generate(prompts[:1], max_new_tokens=4, temperature=0)  # warm-up
    start = time.perf_counter()
    outs = gen.generate(prompts, max_new_tokens=max_new_tokens, temperature=0)
    seconds = time.perf_counter() - start
    tokens = sum(o.n_tokens for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4, help="how many eval prompts")
    ap.add_argument("--torch_threads", default="1,all",
                    help="comma-separated torch thread counts to time transformers with")
    ap.add_argument("--llamacpp_threads", type=int,
                    help="also time llama.cpp with this many threads (default: half the CPUs)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    prompts = load_prompt_texts(None)[0][: args.prompts]
    rows = {}
    cpp = make_generator(MODEL, "llamacpp", BackendOptions())
    rows["llama.cpp (quantised Q4_1, 1 prompt at a time)"] = timed(cpp, prompts,
                                                                   args.max_new_tokens)
    cpp.close()
    if args.llamacpp_threads:
        opts = BackendOptions(extra={"n_threads": args.llamacpp_threads})
        cpp = make_generator(MODEL, "llamacpp", opts)
        rows[f"llama.cpp (Q4_1, 1 prompt at a time, {args.llamacpp_threads} threads)"] = timed(
            cpp, prompts, args.max_new_tokens)
        cpp.close()
    all_threads = torch.get_num_threads()
    hf = make_generator(MODEL, "transformers", BackendOptions(batch_size=1))
    wanted = {all_threads if t.strip() == "all" else int(t) for t in args.torch_threads.split(",")}
    for threads in sorted(wanted):
        torch.set_num_threads(threads)
        for batch in (1, len(prompts)):
            hf.batch_size = batch
            rows[f"transformers (float32, batch {batch}, {threads} thread"
                 f"{'s' if threads > 1 else ''})"] = timed(hf, prompts, args.max_new_tokens)
    torch.set_num_threads(all_threads)
    cpp_tps = next(iter(rows.values()))["tokens_per_second"]
    best_hf = max(v["tokens_per_second"] for k, v in rows.items() if k.startswith("trans"))
    seq_hf = max(v["tokens_per_second"] for k, v in rows.items()
                 if k.startswith("trans") and "batch 1," in k)
    print(f"{MODEL}: {len(prompts)} prompts, greedy, max_new_tokens {args.max_new_tokens}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'backend':58s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s}")
    for name, r in rows.items():
        print(f"{name:58s} {r['tokens']:7d} {r['seconds']:8.2f} {r['tokens_per_second']:9.1f}")
    print(f"llama.cpp / fastest transformers setting: {cpp_tps / best_hf:.1f}x "
          f"(vs one prompt at a time: {cpp_tps / seq_hf:.1f}x; goal >= 5x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": MODEL, "max_new_tokens": args.max_new_tokens,
                       "rows": rows, "speedup_vs_best": cpp_tps / best_hf,
                       "speedup_vs_sequential": cpp_tps / seq_hf}, f, indent=2)


if __name__ == "__main__":
    main()
