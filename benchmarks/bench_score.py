"""Scoring benchmark: TD scoring vs a bare forward, float32 vs bfloat16, 1 vs 2 processes, vs
one forward per position, and memory. Interleaved, so that it holds on a shared machine.

    python benchmarks/bench_score.py [--models SPEC ...] [--batch 8] [--length 256] [--rounds 5]
        [--dtypes float32 bfloat16] [--processes 1 2] [--device cpu]
        [--sections speed per_position memory processes] [--json out.json]
        [--corpus ../shared/data/wikitext-2/wiki.test.dev.raw]

Flags: --models (default: the two embedded models); --batch x --length tokens of WikiText
(--corpus; by default the 12 articles shipped in data/wikitext-2/); --rounds (alias --repeats):
interleaved rounds, at least 5 for a figure; --dtypes: the dtypes each model loads in
(tdreward.hardware.HardwareSettings); --device: cpu or cuda; --sections: what to run (default
all; --memory_only = --sections memory); --per_position_rows (0 skips)/--per_position_every;
--processes, --process_docs, --process_chars, --process_batch: the multi-process comparison;
--json: also write every sample there. Bad flags: one line, exit 2.

Sections, for each model:

* speed: tokens/s of TD scoring (`TDRewardModel.score_batch`: LM forward + tiled log p /
  entropy + E_p[c] + belief filter + value + delta) and of a bare forward (`model(...).logits`)
  on the same batch, in each dtype. All modes run interleaved (bare, TD, bare bf16, TD bf16,
  then again) for --rounds rounds after one warm-up call each, so a change in the machine's
  load hits every mode alike. Reported: median tokens/s, min-max and interquartile range per
  mode; TD/bare as the ratio of medians (goal >= 0.9) and the median of the per-round ratios;
  bfloat16/float32 per mode.
* per_position: the original tool's one forward per position, timed on every
  --per_position_every-th prefix of --per_position_rows rows and scaled to the batch (float32,
  or the first dtype); the speed-up of TD scoring over it (goal >= 50x).
* memory: peak memory of scoring against a bare forward that also builds the full
  log_softmax, each in a fresh subprocess, above the memory after loading and one 2-token
  forward (which reads the memory-mapped weights in); CPU: peak RSS (VmHWM, reset after the
  baseline), CUDA: max_memory_allocated; goal on Gemma <= 0.6x. One pair per dtype.
* processes: `tdreward score --documents --file DOCS --jsonl OUT --verbose` (the first
  --process_docs articles, each cut to --process_chars characters, in chunks of
  --process_batch texts, first dtype) as one plain process with torch's default threads, one
  with 1 thread, and under `accelerate launch --multi_gpu --num_processes N` (1 thread each)
  for each N > 1 in --processes (`--cpu` starts only one process in accelerate 1.16; without
  GPUs tdreward joins the processes over gloo; docs/distributed.md). Runs interleaved;
  reported: wall time of the whole command (start-up and loading included) and the scoring
  time the main process logs (`scored N tokens in X s`), medians and min-max, the speed-up
  over the first run, and whether every run wrote the same JSONL bytes.

The load average (1, 5, 15 min) is printed before and after: a figure for the README wants
a quiet machine (load well under the number of cores throughout).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchtools import (
    Device,
    Parser,
    fail,
    fmt_load,
    fmt_spread,
    free_port,
    interleaved,
    loadavg,
    paired_ratios,
    rate,
    rss_mb,
    spread,
)

from tdreward.errors import TDRewardError

PROG = "bench_score.py"
HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "data" / "wikitext-2" / "wiki.test.small.raw"
SECTIONS = ("speed", "per_position", "memory", "processes")
SCORED = re.compile(r"scored (\d+) tokens in ([\d.]+) s on (\d+) process")


def make_batch(tok: Any, batch: int, length: int) -> torch.Tensor:
    text = CORPUS.read_text(encoding="utf-8")
    ids = tok(text[:400_000], add_special_tokens=False)["input_ids"]
    if len(ids) < batch * length:
        fail(PROG, f"{CORPUS} has {len(ids)} tokens, fewer than --batch x --length")
    return torch.tensor([ids[i * length : (i + 1) * length] for i in range(batch)])


def load(spec: str, device: str, dtype: str) -> Any:
    from tdreward import TDRewardModel
    from tdreward.hardware import HardwareSettings

    return TDRewardModel.from_base(spec, hardware=HardwareSettings(device=device, dtype=dtype))


# --------------------------------------------------------------------------- speed
def speed(spec: str, args: argparse.Namespace, dev: Device) -> dict:
    models = {d: load(spec, args.device, d) for d in args.dtypes}
    first = models[args.dtypes[0]]
    ids = make_batch(first.tokenizer, args.batch, args.length).to(first.device)
    mask = torch.ones_like(ids)
    fns = {}
    for d, rm in models.items():
        def bare(lm=rm.lm) -> None:
            with torch.no_grad():
                lm(input_ids=ids, attention_mask=mask).logits  # noqa: B018

        fns[f"bare {d}"] = bare
        fns[f"TD {d}"] = lambda rm=rm: rm.score_batch(ids, mask)
    times = interleaved(fns, args.rounds, dev.sync)
    n_tok = ids.numel()
    modes = {k: rate(n_tok, t) | {"times_s": t} for k, t in times.items()}
    res = {"modes": modes, "td_vs_bare": {}, "bf16_vs_fp32": {}, "torch_threads":
           torch.get_num_threads(), "td_seconds": modes[f"TD {args.dtypes[0]}"]["seconds"]}
    for d in args.dtypes:
        res["td_vs_bare"][d] = {
            "ratio_of_medians": modes[f"TD {d}"]["median"] / modes[f"bare {d}"]["median"],
            "per_round": paired_ratios(times[f"bare {d}"], times[f"TD {d}"])}
    if {"float32", "bfloat16"} <= set(args.dtypes):
        for kind in ("bare", "TD"):
            res["bf16_vs_fp32"][kind] = {
                "ratio_of_medians": (modes[f"{kind} bfloat16"]["median"]
                                     / modes[f"{kind} float32"]["median"]),
                "per_round": paired_ratios(times[f"{kind} float32"], times[f"{kind} bfloat16"])}
    print(f"  {'mode':<16} {'tok/s median (min-max)':>26} {'IQR':>13} {'s/batch':>8}")
    for k, m in modes.items():
        print(f"  {k:<16} {fmt_spread(m):>26} {m['q1']:>6.0f}-{m['q3']:<6.0f} "
              f"{m['seconds']:>8.2f}")
    for d, r in res["td_vs_bare"].items():
        print(f"  TD / bare ({d}): {r['ratio_of_medians']:.2f} ratio of medians, per round "
              f"{fmt_spread(r['per_round'], '.2f')} (goal >= 0.9)")
    for kind, r in res["bf16_vs_fp32"].items():
        print(f"  bfloat16 / float32 ({kind}): {r['ratio_of_medians']:.2f}, per round "
              f"{fmt_spread(r['per_round'], '.2f')}")
    return res


def per_position(spec: str, args: argparse.Namespace, dev: Device,
                 td_seconds: float | None) -> dict:
    dtype = "float32" if "float32" in args.dtypes else args.dtypes[0]
    rm = load(spec, args.device, dtype)
    ids = make_batch(rm.tokenizer, args.batch, args.length).to(rm.device)
    if td_seconds is None:  # no speed section: time TD scoring here
        td_seconds = spread(interleaved({"td": lambda: rm.score_batch(ids, torch.ones_like(
            ids))}, args.rounds, dev.sync)["td"])["median"]
    with torch.no_grad():
        rm.lm(input_ids=ids[:1, :2])  # a fresh model: read in its mapped weights untimed
        dev.sync()
        start = time.perf_counter()
        # The original tool: for each position, a fresh forward over the prefix, then the
        # log-softmax of the last position's logits.
        for row in ids[: args.per_position_rows]:
            for t in range(1, args.length, args.per_position_every):
                logits = rm.lm(input_ids=row[None, :t]).logits[0, -1]
                torch.log_softmax(logits.float(), -1)[row[t]]
    dev.sync()
    n_timed = len(range(1, args.length, args.per_position_every))
    scaled = ((time.perf_counter() - start) * args.batch / args.per_position_rows
              * (args.length - 1) / n_timed)
    print(f"  one pass/position ({dtype}) {scaled:10.1f} s for the batch   TD scoring is "
          f"{scaled / td_seconds:.0f}x faster (goal >= 50x)")
    return {"per_position_dtype": dtype, "per_position_s_scaled": scaled,
            "td_vs_per_position_speedup": scaled / td_seconds}


# --------------------------------------------------------------------------- memory
def memory_probe(spec: str, mode: str, args: argparse.Namespace) -> None:
    """Child process: peak memory above the post-load baseline for one scoring mode."""
    import gc

    dev = Device(args.device)
    rm = load(spec, args.device, args.dtypes[0])
    ids = make_batch(rm.tokenizer, args.batch, args.length).to(rm.device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        # Weights loaded from safetensors are memory-mapped: the first forward reads them into
        # RAM (about the model's size in float32). A 2-token forward first, so that the baseline
        # holds the weights and the increment is what scoring itself allocates.
        rm.lm(input_ids=ids[:1, :2])
    gc.collect()
    base = torch.cuda.memory_allocated() / 2**20 if dev.cuda else rss_mb()

    def run() -> None:
        with torch.no_grad():
            if mode == "score":
                rm.score_batch(ids, mask)
            else:
                logits = rm.lm(input_ids=ids, attention_mask=mask).logits.float()
                torch.log_softmax(logits, dim=-1)

    peak = dev.peak_of(run) * 1024
    print(json.dumps({"baseline_mb": base, "peak_mb": peak, "increment_mb": peak - base}))


def measure_memory(spec: str, mode: str, dtype: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_memory_probe", spec, mode, "--batch", str(args.batch),
           "--length", str(args.length), "--corpus", str(CORPUS), "--device", args.device,
           "--dtypes", dtype]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        fail(PROG, f"memory probe {spec} {mode} {dtype} failed: "
                   f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def memory(spec: str, args: argparse.Namespace) -> dict:
    res = {}
    for d in args.dtypes:
        ms, mb = (measure_memory(spec, m, d, args) for m in ("score", "bare"))
        ratio = ms["increment_mb"] / mb["increment_mb"]
        res[d] = {"peak_mb_score": ms, "peak_mb_bare_logsoftmax": mb,
                  "memory_ratio_increment": ratio,
                  "memory_ratio_total": ms["peak_mb"] / mb["peak_mb"]}
        print(f"  peak memory above the loaded model ({d}): scoring {ms['increment_mb']:.0f} "
              f"MB, bare forward + log_softmax {mb['increment_mb']:.0f} MB   ratio {ratio:.2f} "
              f"(goal on Gemma <= 0.6); whole process {ms['peak_mb']:.0f} vs "
              f"{mb['peak_mb']:.0f} MB")
    return res


# --------------------------------------------------------------------------- processes
def score_command(spec: str, n: int, docs: Path, out: Path, args: argparse.Namespace) -> list[str]:
    score = ["-m", "tdreward.cli", "score", "--verbose", "--documents", "--file", str(docs),
             "--jsonl", str(out), "--model", spec, "--device", args.device, "--dtype",
             args.dtypes[0], "--batch_size", str(args.process_batch)]
    if n == 1:
        return [sys.executable, *score]
    accelerate = Path(sys.executable).with_name("accelerate")
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *score]


def process_runs(args: argparse.Namespace) -> dict[str, tuple[int, dict[str, str]]]:
    """label -> (processes, environment). The plain process has torch's default threads; each
    launched one 1 (accelerate's). A plain 1-thread run separates the split's effect from the
    thread count's (under load, threads wait for descheduled siblings at every barrier)."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
    runs = {f"1 x {threads} threads": (1, {})}
    if threads != "1" and not os.environ.get("OMP_NUM_THREADS"):
        runs["1 x 1 thread"] = (1, {"OMP_NUM_THREADS": "1"})
    for n in args.processes[1:]:
        runs[f"{n} x 1 thread"] = (n, {})
    return runs


def processes(spec: str, args: argparse.Namespace) -> dict:
    from tdreward.data.corpus import load_corpus

    texts = [d[: args.process_chars] for d in load_corpus(str(CORPUS))[: args.process_docs]]
    work = Path(tempfile.mkdtemp(prefix="bench_score."))
    docs = work / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    runs = process_runs(args)
    samples: dict[str, dict[str, list]] = {k: {"wall": [], "scoring": []} for k in runs}
    outputs: set[bytes] = set()
    tokens: list[int] = []

    def run(label: str) -> None:
        n, extra = runs[label]
        out = work / "out.jsonl"
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **extra)
        t = time.perf_counter()
        p = subprocess.run(score_command(spec, n, docs, out, args), capture_output=True,
                           text=True, env=env)
        wall = time.perf_counter() - t
        found = SCORED.findall(p.stderr)
        if p.returncode != 0 or not found:
            fail(PROG, f"{label} score of {spec} failed (exit {p.returncode}): "
                       f"{(p.stderr.strip().splitlines() or ['no output'])[-1]}")
        samples[label]["wall"].append(wall)
        samples[label]["scoring"].append(float(found[-1][1]))
        outputs.add(out.read_bytes())
        tokens.append(int(found[-1][0]))

    try:
        interleaved({k: (lambda k=k: run(k)) for k in runs}, args.rounds,
                    warmup=False)  # each run is a fresh process: nothing to warm up
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next(iter(samples.values()))
    res = {"texts": len(texts), "tokens": tokens[0], "identical_outputs": len(outputs) == 1,
           "runs": {}}
    print(f"  {len(texts)} texts, {tokens[0]} tokens, {args.dtypes[0]}, chunks of "
          f"{args.process_batch}; outputs identical across runs: "
          f"{'yes' if len(outputs) == 1 else 'NO'}")
    print(f"  {'processes':<16} {'wall s median (min-max)':>24} "
          f"{'scoring s median (min-max)':>27} {'speed-up wall / scoring':>24}")
    for label, s in samples.items():
        wall, scoring = spread(s["wall"]), spread(s["scoring"])
        up = (spread(base["wall"])["median"] / wall["median"],
              spread(base["scoring"])["median"] / scoring["median"])
        res["runs"][label] = {"processes": runs[label][0], "wall_s": wall | {
            "samples": s["wall"]}, "scoring_s": scoring | {"samples": s["scoring"]},
            "speedup_wall": up[0], "speedup_scoring": up[1]}
        print(f"  {label:<16} {fmt_spread(wall, '.1f'):>24} {fmt_spread(scoring, '.1f'):>27} "
              f"{up[0]:>11.2f} / {up[1]:.2f}")
    return res


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = Parser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["embedded:smollm2-135m-instruct", "embedded:gemma3-270m"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--rounds", "--repeats", type=int, default=5, dest="rounds")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--per_position_rows", type=int, default=1)
    ap.add_argument("--per_position_every", type=int, default=4)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--process_docs", type=int, default=8)
    ap.add_argument("--process_chars", type=int, default=6000)
    ap.add_argument("--process_batch", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--corpus", type=Path, default=CORPUS,
                    help="WikiText raw file to take the batch from (default: the shipped 12 "
                    "articles; ../shared/data/wikitext-2/wiki.test.dev.raw where present)")
    ap.add_argument("--memory_only", action="store_true", help="= --sections memory")
    ap.add_argument("--_memory_probe", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag in ("batch", "length", "rounds", "per_position_every", "process_docs",
                 "process_chars", "process_batch"):
        if getattr(args, flag) < 1:
            fail(PROG, f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.per_position_rows < 0 or args.per_position_rows > args.batch:
        fail(PROG, f"--per_position_rows must be 0 to --batch ({args.batch})")
    if sorted(set(args.processes)) != sorted(args.processes) or min(args.processes) < 1:
        fail(PROG, f"--processes takes distinct counts >= 1, got {args.processes}")
    args.processes = sorted({1, *args.processes})  # every count is compared with one process
    if not args.corpus.is_file():
        fail(PROG, f"--corpus {args.corpus}: no such file")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail(PROG, "--device cuda: CUDA is not available on this machine; use --device cpu")
    if args.memory_only:
        args.sections = ["memory"]
    if args.json is not None and not args.json.parent.is_dir():
        fail(PROG, f"--json {args.json}: folder {args.json.parent} does not exist")
    return args


def bench_model(spec: str, args: argparse.Namespace, dev: Device) -> dict:
    print(f"\n{spec}: batch {args.batch} x {args.length} tokens, {torch.get_num_threads()} "
          f"torch threads, dtypes {' '.join(args.dtypes)}", flush=True)
    r: dict = {"model": spec, "batch": args.batch, "length": args.length,
               "rounds": args.rounds, "load_before": loadavg()}
    if "speed" in args.sections:
        r["speed"] = speed(spec, args, dev)
        first = r["speed"]["modes"]  # the figures of earlier versions, first dtype
        d = args.dtypes[0]
        r |= {"bare_forward_tok_s": first[f"bare {d}"]["median"],
              "td_scoring_tok_s": first[f"TD {d}"]["median"],
              "td_vs_bare_speed": r["speed"]["td_vs_bare"][d]["ratio_of_medians"]}
    if "per_position" in args.sections and args.per_position_rows > 0:
        r |= per_position(spec, args, dev, r.get("speed", {}).get("td_seconds"))
    if "memory" in args.sections:
        r["memory"] = memory(spec, args)
    if "processes" in args.sections and len(args.processes) > 1:
        print(f"  processes (tdreward score --jsonl), {args.rounds} rounds:", flush=True)
        r["processes"] = processes(spec, args)
    r["load_after"] = loadavg()
    return r


def main(argv: list[str] | None = None) -> None:
    global CORPUS  # --corpus replaces the default for make_batch
    args = parse_args(argv)
    CORPUS = args.corpus
    if args._memory_probe:
        memory_probe(*args._memory_probe, args)
        return
    dev = Device(args.device)
    before = loadavg()
    print(f"load average (1, 5, 15 min) before: {fmt_load(before)} on {os.cpu_count()} CPUs; "
          f"{args.rounds} interleaved rounds, device {args.device}, sections "
          f"{' '.join(args.sections)}")
    try:
        results = [bench_model(spec, args, dev) for spec in args.models]
    except TDRewardError as e:  # a bad model spec, a missing file: one line
        fail(PROG, str(e).splitlines()[0])
    after = loadavg()
    print(f"\nload average (1, 5, 15 min) after: {fmt_load(after)} (before: {fmt_load(before)})")
    if args.json:
        args.json.write_text(json.dumps({"load_before": before, "load_after": after,
                                         "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
