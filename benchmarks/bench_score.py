"""Scoring benchmark: TD scoring vs a bare forward, vs one forward per position, and memory.

    python benchmarks/bench_score.py [--models embedded:smollm2-135m-instruct embedded:gemma3-270m]
                                     [--batch 8] [--length 256] [--json out.json]
                                     [--corpus ../shared/data/wikitext-2/wiki.test.dev.raw]

For each model, on a batch of `batch` x `length` tokens of WikiText (`--corpus`; by default the
12 articles shipped in data/wikitext-2/) it prints:

1. tokens/s of TD scoring (`TDRewardModel.score_batch`: LM forward + chunked log p / entropy
   + c + belief filter + value + delta) against a bare forward of the same model on the same
   batch (`model(...).logits`); goal >= 0.9.
2. the speed-up over recomputing the reward with one forward pass per position, as the
   original tool did; timed on every `--per_position_every`-th position of `--per_position_rows`
   rows (evenly spaced prefixes) and scaled to every position of the batch; goal >= 50x.
3. the peak memory of scoring against a bare forward that also builds the full log_softmax,
   each measured in a fresh subprocess as peak RSS (VmHWM, reset after loading so the load's
   own transient peak is not counted) above the RSS after loading; goal on Gemma <= 0.6x.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "data" / "wikitext-2" / "wiki.test.small.raw"


def make_batch(tok, batch: int, length: int) -> torch.Tensor:
    text = CORPUS.read_text(encoding="utf-8")
    ids = tok(text[:400_000], add_special_tokens=False)["input_ids"]
    if len(ids) < batch * length:
        raise SystemExit(f"{CORPUS} has {len(ids)} tokens, fewer than --batch x --length")
    rows = [ids[i * length : (i + 1) * length] for i in range(batch)]
    return torch.tensor(rows)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    """VmHWM: the peak resident set since the last reset_peak_rss()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so loading's transient peak (the model
    materialised more than once) does not count as scoring memory."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_probe(spec: str, mode: str, batch: int, length: int) -> None:
    """Child process: peak RSS above the post-load baseline for one scoring mode."""
    import gc

    from tdreward import TDRewardModel

    rm = TDRewardModel.from_base(spec)
    ids = make_batch(rm.tokenizer, batch, length)
    mask = torch.ones_like(ids)
    gc.collect()
    base = rss_mb()
    reset_peak_rss()
    with torch.no_grad():
        if mode == "score":
            rm.score_batch(ids, mask)
        else:
            logits = rm.lm(input_ids=ids, attention_mask=mask).logits.float()
            torch.log_softmax(logits, dim=-1)
    peak = _peak_rss_mb()
    print(json.dumps({"baseline_mb": base, "peak_mb": peak, "increment_mb": peak - base}))


def measure_memory(spec: str, mode: str, batch: int, length: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_memory_probe", spec, mode, "--batch", str(batch),
         "--length", str(length), "--corpus", str(CORPUS)], capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(spec: str, batch: int, length: int, repeats: int, per_position_rows: int,
          per_position_every: int) -> dict:
    from tdreward import TDRewardModel

    rm = TDRewardModel.from_base(spec)
    lm = rm.lm
    ids = make_batch(rm.tokenizer, batch, length)
    mask = torch.ones_like(ids)
    n_tok = ids.numel()

    def bare():
        with torch.no_grad():
            lm(input_ids=ids, attention_mask=mask).logits  # noqa: B018

    def td():
        rm.score_batch(ids, mask)

    t_bare = best_time(bare, repeats)
    t_td = best_time(td, repeats)

    def per_position():
        # The original tool: for each position, a fresh forward over the prefix, then the
        # log-softmax of the last position's logits.
        with torch.no_grad():
            for row in ids[:per_position_rows]:
                for t in range(1, length, per_position_every):
                    logits = lm(input_ids=row[None, :t]).logits[0, -1]
                    torch.log_softmax(logits.float(), -1)[row[t]]

    start = time.perf_counter()
    per_position()
    n_timed = len(range(1, length, per_position_every))
    t_pp = (time.perf_counter() - start) * batch / per_position_rows * (length - 1) / n_timed
    mem_score = measure_memory(spec, "score", batch, length)
    mem_bare = measure_memory(spec, "bare", batch, length)
    return {
        "model": spec,
        "batch": batch,
        "length": length,
        "torch_threads": torch.get_num_threads(),
        "bare_forward_tok_s": n_tok / t_bare,
        "td_scoring_tok_s": n_tok / t_td,
        "td_vs_bare_speed": t_bare / t_td,
        "per_position_s_scaled": t_pp,
        "td_vs_per_position_speedup": t_pp / t_td,
        "peak_mb_score": mem_score,
        "peak_mb_bare_logsoftmax": mem_bare,
        "memory_ratio_increment": mem_score["increment_mb"] / mem_bare["increment_mb"],
        "memory_ratio_total": mem_score["peak_mb"] / mem_bare["peak_mb"],
    }


def main() -> None:
    global CORPUS  # --corpus replaces the default for make_batch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["embedded:smollm2-135m-instruct", "embedded:gemma3-270m"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per_position_rows", type=int, default=1)
    ap.add_argument("--per_position_every", type=int, default=4)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--corpus", type=Path, default=CORPUS,
                    help="WikiText raw file to take the batch from (default: the shipped 12 "
                    "articles; ../shared/data/wikitext-2/wiki.test.dev.raw where present)")
    ap.add_argument("--memory_only", action="store_true",
                    help="only the memory comparison (timings need a quiet machine)")
    ap.add_argument("--_memory_probe", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    CORPUS = args.corpus
    if args._memory_probe:
        memory_probe(*args._memory_probe, args.batch, args.length)
        return
    results = []
    for spec in args.models if args.memory_only else []:
        ms, mb = (measure_memory(spec, m, args.batch, args.length) for m in ("score", "bare"))
        ratio = ms["increment_mb"] / mb["increment_mb"]
        results.append({"model": spec, "peak_mb_score": ms, "peak_mb_bare_logsoftmax": mb,
                        "memory_ratio_increment": ratio})
        print(f"{spec}: batch {args.batch} x {args.length}: peak memory above the loaded model: "
              f"scoring {ms['increment_mb']:.0f} MB, bare forward + log_softmax "
              f"{mb['increment_mb']:.0f} MB   ratio {ratio:.2f} (goal on Gemma <= 0.6)")
    for spec in [] if args.memory_only else args.models:
        r = bench(spec, args.batch, args.length, args.repeats, args.per_position_rows,
                  args.per_position_every)
        results.append(r)
        print(f"\n{spec}: batch {args.batch} x {args.length} tokens, "
              f"{r['torch_threads']} torch threads")
        print(f"  bare forward        {r['bare_forward_tok_s']:10.0f} tok/s")
        print(f"  TD scoring          {r['td_scoring_tok_s']:10.0f} tok/s   "
              f"ratio {r['td_vs_bare_speed']:.2f} (goal >= 0.9)")
        print(f"  one pass/position   {r['per_position_s_scaled']:10.1f} s for the batch   "
              f"TD scoring is {r['td_vs_per_position_speedup']:.0f}x faster (goal >= 50x)")
        ms, mb = r["peak_mb_score"], r["peak_mb_bare_logsoftmax"]
        print(f"  peak memory above the loaded model: scoring {ms['increment_mb']:.0f} MB, "
              f"bare forward + log_softmax {mb['increment_mb']:.0f} MB   "
              f"ratio {r['memory_ratio_increment']:.2f} (goal on Gemma <= 0.6)")
        print(f"  peak process memory: {ms['peak_mb']:.0f} MB vs {mb['peak_mb']:.0f} MB   "
              f"ratio {r['memory_ratio_total']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
