"""How good is a critic's V? Well-posed diagnostics on held-out documents, against baselines.

    python benchmarks/critic_quality.py --heldout data/wikitext-2/wiki.test.small.raw \\
        [--critic D ...] [--model SPEC] [--max_docs N] [--skip_docs K] [--docs I ...]
        [--json OUT]

Reads the held-out articles once with the reference LM, as `tdreward score` reads a text (the
features are shared by every critic: each recomputes E_p[c] under its own p0), and prints one
table, a row per value function V:

* V = 0 (delta = r);
* best constant: V = k, k = mean r / (1 - gamma), the constant that minimises mean delta^2
  of delta = r + gamma k - k;
* rbar alone: V = rbar, the LM's exact one-step expected reward;
* rbar + best constant: V = rbar + k', k' = mean(r + gamma rbar' - rbar) / (1 - gamma);
* linear ceiling (EV_MC only): least squares of the returns G_t on rbar_t, moving averages of
  rbar and of the rewards seen, and log position, fitted on the held-out documents' own
  returns (tdreward.reward.metrics.linear_value_ceiling): no V linear in those features, however
  trained, reaches more on these documents;
* the untrained default: the model's own V and delta without a critic (V = rbar + gamma
  m / (1 - gamma), delta reward-centred);
* each --critic D, labelled by its state model (belief / csc / hidden) and folder name.

For the first four delta_t = r_t + gamma V_t+1 - V_t over each document, the state after the
last token bootstrapping from the variant's own value there (rbar extended by its last value):
a held-out article is scored as a cut, as `TDRewardModel.score` does by default.

Columns (tdreward.reward.metrics.critic_diagnostics): mean delta^2 over that of V = 0 on the
same rewards; mean delta; Var(delta); Var(r - rbar), the one-step floor of Var(delta);
delta-R^2, the cross-validated (by document) R^2 of delta_t on what is known at s_t (about 0
for the true V); corr(delta, H); EV_MC, the part of the discounted return to the document's
end that V predicts (positions with >= 460 tokens left); the number of tokens. Mean delta^2 is
no goal in itself (a stochastic text puts the true V's moves into delta): read it with the rest.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

EXIT_ERROR = 2
COLUMNS = (  # (key, header, width, decimals; None: an integer)
    ("msq_ratio", "msd/V0", 7, 3),
    ("mean_delta", "mean d", 8, 4),
    ("var_delta", "Var d", 8, 4),
    ("var_r_minus_rbar", "Var(r-rbar)", 11, 4),
    ("delta_r2", "d-R2", 7, 4),
    ("corr_delta_H", "corr(d,H)", 9, 4),
    ("ev_mc", "EV_MC", 7, 3),
    ("n_tokens", "n tok", 7, None),
)
LEGEND = ("msd/V0: mean delta^2 / that of V=0 on the same rewards; d-R2: cross-validated R^2 "
          "of delta on features known at s_t (0 for the true V); Var(r-rbar): the one-step "
          "floor of Var(delta); EV_MC: 1 - mean (G - V)^2 / Var(G), G the discounted return to "
          "the document end ({n_ev} positions with >= {left} tokens left); linear ceiling: "
          "EV_MC of least squares of G on rbar, moving averages of rbar and r and log position, "
          "fitted on these documents' own returns (the most any V linear in them reaches here)")


class BenchError(Exception):
    """A one-line error for the user."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heldout", required=True, help="held-out corpus file (WikiText raw: "
                   "one document per article) or folder")
    p.add_argument("--critic", nargs="+", action="extend", default=[], metavar="D",
                   help="a trained critic folder (repeatable)")
    p.add_argument("--model", default=None, help="reference LM spec (default: the first "
                   "critic's base model, else the shipped default)")
    p.add_argument("--max_docs", type=int, default=None, help="documents to score")
    p.add_argument("--skip_docs", type=int, default=0, help="documents to skip first")
    p.add_argument("--docs", type=int, nargs="+", default=None, metavar="I",
                   help="score these documents only (0-based indices; after --skip_docs)")
    p.add_argument("--batch_size", type=int, default=1, help="documents per LM batch")
    p.add_argument("--json", default=None, metavar="OUT", help="write the rows here")
    args = p.parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        p.error(f"--max_docs must be at least 1, got {args.max_docs}")
    if args.skip_docs < 0:
        p.error(f"--skip_docs must be at least 0, got {args.skip_docs}")
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    return args


def load_docs(path: str, skip: int, max_docs: int | None,
              indices: list[int] | None = None) -> list[str]:
    from tdreward.data.corpus import load_corpus

    if not Path(path).expanduser().exists():
        raise BenchError(f"--heldout {path}: no such file or folder")
    docs = load_corpus(path)
    picked = docs[skip : None if max_docs is None else skip + max_docs]
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(picked)]
        if bad:
            raise BenchError(f"--docs {bad[0]}: {path} has {len(picked)} documents to pick from")
        picked = [picked[i] for i in indices]
    if not picked:
        raise BenchError(f"--heldout {path} has {len(docs)} documents: none left after "
                         f"--skip_docs {skip}")
    return picked


def title(doc: str) -> str:
    first = doc.strip().splitlines()[0].strip()
    return first.strip("= ").strip() if first.startswith("=") else first[:40]


def read_critics(paths: list[str]) -> list[tuple[str, dict]]:
    """(path, config) of each critic, read before anything loads."""
    from tdreward.critic_files import read_critic_config

    out = []
    for d in paths:
        if not Path(d).is_dir():
            raise BenchError(f"--critic {d}: no such folder")
        out.append((d, read_critic_config(Path(d))))
    return out


def critic_label(path: str, meta: dict) -> str:
    """The state model and the folder as given (two critics may share a folder name)."""
    state = meta.get("reward_config", {}).get("state", "belief")
    return f"{state} ({path})"


def td_over_doc(r: torch.Tensor, V: torch.Tensor, gamma: float) -> torch.Tensor:
    """delta_t = r_t + gamma V_t+1 - V_t, V of the state after the last token = V's last."""
    V_next = torch.cat([V[1:], V[-1:]])
    return r + gamma * V_next - V


def variant(docs: list[dict], V_of_doc, gamma: float) -> list[dict]:
    """The documents under another value V_of_doc(doc) [n], delta computed here."""
    out = []
    for d in docs:
        V = V_of_doc(d).double()
        out.append(d | {"V": V, "delta": td_over_doc(d["r"], V, gamma)})
    return out


def baselines(docs: list[dict], gamma: float) -> list[tuple[str, list[dict]]]:
    """V = 0, the best constant, rbar, rbar + the best constant (module docstring)."""
    docs = [d for d in docs if d["r"].shape[0] >= 2]  # as critic_diagnostics counts
    r = torch.cat([d["r"] for d in docs])
    k = float(r.mean()) / (1 - gamma) if gamma < 1 else 0.0
    e = torch.cat([td_over_doc(d["r"], d["rbar"], gamma) for d in docs])
    k2 = float(e.mean()) / (1 - gamma) if gamma < 1 else 0.0
    return [
        ("V=0", variant(docs, lambda d: torch.zeros_like(d["r"]), gamma)),
        (f"best constant ({k:.3g})", variant(docs, lambda d: torch.full_like(d["r"], k), gamma)),
        ("rbar", variant(docs, lambda d: d["rbar"], gamma)),
        (f"rbar + best constant ({k2:.3g})", variant(docs, lambda d: d["rbar"] + k2, gamma)),
    ]


def measure(label: str, docs: list[dict], gamma: float) -> dict:
    from tdreward.reward.metrics import critic_diagnostics

    m = critic_diagnostics(docs, gamma)
    if not m:
        raise BenchError("no document has 2 or more tokens to measure")
    v0 = mean_sq_r(docs)  # mean delta^2 of V = 0 on the same rewards and tokens
    m["mean_delta_sq_v0"] = v0
    m["msq_ratio"] = m["mean_delta_sq"] / v0 if v0 > 0 else math.nan
    return {"V": label, "gamma": gamma} | m


def mean_sq_r(docs: list[dict]) -> float:
    """mean r^2 over the documents critic_diagnostics counts (2 or more tokens)."""
    return float(torch.cat([d["r"] for d in docs if d["r"].shape[0] >= 2]).pow(2).mean())


def fmt(x, width: int, decimals: int | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "nan".rjust(width)
    return f"{int(x):{width}d}" if decimals is None else f"{x:{width}.{decimals}f}"


def table(rows: list[dict]) -> str:
    w = max(len("V"), *(len(r["V"]) for r in rows))
    head = "  ".join(["V".ljust(w), *(h.rjust(n) for _, h, n, _ in COLUMNS)])
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join([r["V"].ljust(w), *(fmt(r.get(k), n, dec)
                                                   for k, _, n, dec in COLUMNS)]))
    return "\n".join(lines)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def lm_pass(rm, texts: list[str], batch_size: int) -> list[tuple[list[int], object, object]]:
    """The reference LM read once over the texts, as `TDRewardModel.score` reads them (prefix
    token, window, stride; only EOS terminal): (text indices, LMFeatures, log Z) per batch.
    Every critic is then applied to these features: the LM pass is what costs."""
    from tdreward.reward.lm import context_length, logits_fn
    from tdreward.reward.terms import next_token_stats

    rows = rm.encode(texts)
    window = context_length(rm.lm)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches = [order[a : a + batch_size] for a in range(0, len(order), batch_size)]
    head, softcap = logits_fn(rm.lm)
    passes = []
    for batch in batches:
        ids, mask = rm.pad([rows[i] for i in batch])
        feats = rm.features(ids, mask, rm.terminal_states(ids, mask), max_length=window)
        targets = torch.cat([feats.input_ids[:, 1:], feats.input_ids[:, :1]], dim=1)
        with torch.no_grad():  # log Z of every prediction: E_p[c] under another p0 needs it
            _, _, log_z = next_token_stats(feats.hidden.to(head.weight.dtype), head, targets,
                                           rm.config.logit_tile_elems, softcap)
        passes.append((batch, feats, log_z))
    return passes


@torch.no_grad()
def docs_under(model, passes: list, lm) -> list[dict]:
    """critic_diagnostics documents of `model`'s critic on the shared LM features: E_p[c_t]
    recomputed under its own p0, tau and lam, then its r, rbar, V and delta."""
    from dataclasses import replace

    from tdreward.reward.lm import logits_fn
    from tdreward.reward.terms import expected_association

    head, softcap = logits_fn(lm)
    cfg, critic = model.config, model.critic
    out_docs: dict[int, dict] = {}
    for batch, feats, log_z in passes:
        ec = expected_association(feats.hidden.to(head.weight.dtype), head, log_z,
                                  feats.input_ids, feats.mask, critic.log_p0, cfg.tau, cfg.lam,
                                  softcap)
        f = replace(feats, expected_c=ec.float())
        out = critic(f)
        for b, i in enumerate(batch):
            n = int(f.mask[b].sum()) - 1
            out_docs[i] = {k: v[b, :n].double().cpu() for k, v in (
                ("r", out["r"]), ("rbar", out["rbar"]), ("V", out["values"]),
                ("delta", out["delta"]), ("H", f.entropy), ("logp", f.logp), ("c", out["c"]))}
    return [out_docs[i] for i in sorted(out_docs)]


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    before = loadavg()
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"load average before: {before}  (cpus: {os.cpu_count()}, torch threads: "
          f"{torch.get_num_threads()})")

    texts = load_docs(args.heldout, args.skip_docs, args.max_docs, args.docs)
    critics = read_critics(args.critic)
    from tdreward.critic_files import check_critic_fits
    from tdreward.reward_model import TDRewardModel, load_reward_model
    from tdreward.reward_settings import RewardSettings
    from tdreward.specs import DEFAULT_MODEL

    spec = args.model or (critics[0][1]["base_model"] if critics else DEFAULT_MODEL)
    for d, _ in critics:  # a critic the LM cannot carry fails before the LM loads
        check_critic_fits(d, spec, "--model")
    first = args.skip_docs
    which = (" ".join(str(first + i) for i in args.docs) if args.docs is not None
             else f"{first}..{first + len(texts) - 1}")
    print(f"held-out: {args.heldout}, documents {which}: " + "; ".join(title(t) for t in texts))

    timing: dict[str, float] = {}
    t = time.perf_counter()
    rm = load_reward_model(spec, RewardSettings(), warn_untrained=False)
    timing["load_lm"] = time.perf_counter() - t
    gamma = rm.config.gamma
    print(f"reference LM: {spec} (loaded in {timing['load_lm']:.1f}s), gamma {gamma}",
          flush=True)

    t = time.perf_counter()
    passes = lm_pass(rm, texts, args.batch_size)
    timing["lm_pass"] = time.perf_counter() - t
    docs = docs_under(rm, passes, rm.lm)
    n_tok = sum(d["r"].shape[0] for d in docs)
    print(f"read {len(docs)} documents, {n_tok} tokens, in {timing['lm_pass']:.1f}s "
          f"({n_tok / max(timing['lm_pass'], 1e-9):.0f} tokens/s); every critic reuses it",
          flush=True)

    t = time.perf_counter()
    rows = [measure(label, vd, gamma) for label, vd in baselines(docs, gamma)]
    from tdreward.reward.metrics import linear_value_ceiling

    rows.append({"V": "linear ceiling (fit on these G)", "gamma": gamma,
                 "ev_mc": linear_value_ceiling(docs, gamma)})
    rows.append(measure(f"untrained default ({rm.config.state})", docs, gamma))
    timing["diagnostics"] = time.perf_counter() - t

    notes = []
    for d, meta in critics:
        label = critic_label(d, meta)
        t = time.perf_counter()
        crm = TDRewardModel.from_pretrained(d, base_model=spec, lm=rm.lm,
                                            tokenizer=rm.tokenizer, model_flag="--model")
        cdocs = docs_under(crm, passes, rm.lm)
        rows.append(measure(label, cdocs, crm.config.gamma) | {"critic": str(d)})
        timing[f"critic {label}"] = time.perf_counter() - t
        same_r = all(a["r"].shape == b["r"].shape and torch.allclose(a["r"], b["r"], atol=1e-5)
                     for a, b in zip(docs, cdocs))
        if not same_r or crm.config.gamma != gamma:
            notes.append(f"{label}: its reward (p0, alpha, beta) or gamma differs from the "
                         f"untrained default's (mean r^2 {mean_sq_r(cdocs):.4g} vs "
                         f"{mean_sq_r(docs):.4g}, gamma {crm.config.gamma}): its msd/V0 is "
                         "against V=0 on its own rewards")

    print()
    print(table(rows))
    n_ev = rows[0].get("n_ev_positions", 0)
    from tdreward.reward.metrics import MIN_TOKENS_LEFT

    print(LEGEND.format(n_ev=n_ev, left=MIN_TOKENS_LEFT))
    for n in notes:
        print("note:", n)
    timing["total"] = time.perf_counter() - t_start
    after = loadavg()
    print("timing: " + ", ".join(f"{k} {v:.1f}s" for k, v in timing.items()))
    print(f"load average after: {after}")
    if args.json:
        out = {"command": [sys.executable, *sys.argv], "heldout": args.heldout,
               "documents": [title(t) for t in texts], "skip_docs": args.skip_docs,
               "model": spec, "gamma": gamma, "loadavg_before": before, "loadavg_after": after,
               "timing_s": timing, "notes": notes, "rows": rows}
        try:
            from tdreward.io import json_safe, write_json

            write_json(args.json, json_safe(out))  # atomic: temporary file, then rename
        except OSError as e:
            raise BenchError(f"--json {args.json}: cannot write ({e.strerror or e})") from None
        print(f"rows written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tdreward.errors import TDRewardError, first_line

    try:
        return run(args)
    except (BenchError, TDRewardError) as e:
        print(f"critic_quality: error: {first_line(e)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
