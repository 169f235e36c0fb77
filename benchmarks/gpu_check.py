"""One short check of tdreward on a GPU: scoring speed and memory, and one step of each trainer.

    python benchmarks/gpu_check.py [--device cuda] [--dtype bfloat16] [--size 1b] [--rounds 5]
                                   [--seq_len 1024] [--batch_size 16] [--new_tokens 64]
                                   [--json OUT] [--strict]

The GPU machine this is for reaches no hub and no package index, and the embedded models are
too large to carry there, so the model is a randomly initialised Llama built from a
`LlamaConfig` (`--size 1b`: hidden 2048, 16 layers, 32 heads, MLP 5632, vocabulary 32,000,
about 0.95B parameters; `--size tiny`: hidden 64, 2 layers, vocabulary 1,024, for a CPU smoke
run) with a word-level tokenizer built here whose token `tN` is id N, so texts of random ids
are written as words. Speed does not depend on what the weights say. Checks, in order:

1. score: TD scoring (`TDRewardModel.score_batch`: forward + tiled log p / entropy + E_p[c] +
   critic) against the fair bare baseline, a forward that also gives log p of every next token
   (`lm(ids).logits`, log_softmax in float32, gather); the plain forward (logits only) is shown
   too. `--batch_size` x `--seq_len` random ids; the modes run interleaved (A B C A B C ...)
   for `--rounds` rounds after a warm-up; tokens/s are medians (min-max in brackets); peak
   memory is measured in a separate call per mode. The log p of the two paths must agree
   (float32: 1e-3 nat, 16-bit: 0.5 nat).
2. train-critic: `train_critic` for one epoch on `--batch_size` generated documents of
   `--seq_len` tokens (the LM pass on the device, the heads on the CPU, as the command does).
3. PPO: one step of `train_ppo` with `--use_lora` on the same model, saved to a temporary
   folder and loaded by the trainer (min(batch_size, 8) prompts of 64 tokens, `--new_tokens`
   sampled tokens each).
4. lora: one optimizer step of `run_lora` (TD-weighted loss) on the same model.

Every output is checked to be finite: score tensors, the critic's epoch loss and weights, the
PPO statistics and adapter, the LoRA loss and adapter. It prints one table (check, model,
device, dtype, tokens/s, peak GiB, seconds, finite, TD/bare) and exits 1 if a check failed (or,
with `--strict`, if TD/bare is below the goal of 0.9), 2 on bad input (one line). Peak memory is
`torch.cuda.max_memory_allocated` on CUDA, the process's peak RSS on the CPU. Seconds: the
median batch for scoring, the whole `train_critic` call (fingerprint, LM pass, one epoch), the
PPO step, the LoRA `trainer.train()` call. A CPU smoke run (tests/test_gpu_check.py):
`--device cpu --dtype float32 --size tiny --rounds 2 --seq_len 64 --batch_size 4 --new_tokens 8`.
Choose the GPU with CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchtools import Device, Parser, fail, interleaved, paired_ratios, rate

PROG = "gpu_check.py"
GOAL = 0.9  # TD scoring tokens/s over the bare forward's (README: Performance)
SIZES = {
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
           "intermediate_size": 5632, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 1024},
}
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0-3; random text uses ids from 4 on
PROMPT_TOKENS = 64
PPO_BATCH = 8
LOGP_TOL = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.5}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = Parser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(LOGP_TOL))
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved scoring rounds")
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=64, help="PPO response length")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when TD/bare < 0.9 too")
    args = ap.parse_args(argv)
    for flag, low in (("rounds", 1), ("seq_len", 8), ("batch_size", 2), ("new_tokens", 1)):
        if getattr(args, flag) < low:
            fail(PROG, f"--{flag} must be at least {low}, got {getattr(args, flag)}")
    if args.json is not None and not args.json.parent.is_dir():
        fail(PROG, f"--json {args.json}: folder {args.json.parent} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        why = "torch built without CUDA" if torch.version.cuda is None else "no GPU visible"
        fail(PROG, f"--device cuda: CUDA is not available here (torch {torch.__version__}, "
                   f"{why}); use --device cpu --dtype float32 --size tiny for a smoke run")
    return args


# --------------------------------------------------------------------------- model and data
def make_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer: `tN` is id N, BOS added; built here, so nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)} | {f"t{i}": i for i in
                                                      range(len(SPECIALS), vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                      special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def build_lm(args: argparse.Namespace) -> torch.nn.Module:
    """The random Llama, initialised directly on the device (1B parameters initialise in
    seconds on a GPU, minutes on a CPU), then cast to the dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SIZES[args.size], max_position_embeddings=max(2048, args.seq_len + 64),
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    with torch.device(args.device):
        lm = LlamaForCausalLM(cfg)
    return lm.to(getattr(torch, args.dtype)).eval()


def random_rows(n_rows: int, n_tokens: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIALS), vocab, (n_rows, n_tokens), generator=g)


def as_text(row: torch.Tensor) -> str:
    return " ".join(f"t{i}" for i in row.tolist())


# --------------------------------------------------------------------------- measuring
def finite(*tensors: Any) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def finite_file(path: Path) -> bool:
    from safetensors.torch import load_file

    return finite(*load_file(str(path)).values())


def finite_numbers(*xs: Any) -> bool:
    return all(isinstance(x, int | float) and math.isfinite(x) for x in xs)


# --------------------------------------------------------------------------- the checks
def check_score(args: argparse.Namespace, lm: Any, tok: Any, dev: Device) -> list[dict]:
    from tdreward.reward_model import TDRewardModel

    rm = TDRewardModel.from_lm(lm, tok, f"random-llama-{args.size}")
    ids = random_rows(args.batch_size, args.seq_len, lm.config.vocab_size, 1).to(rm.device)
    mask = torch.ones_like(ids)
    n_tok = ids.numel()

    @torch.no_grad()
    def logits() -> torch.Tensor:
        return lm(input_ids=ids, attention_mask=mask).logits

    @torch.no_grad()
    def bare() -> torch.Tensor:  # what a user computing log-probs writes
        logp = torch.log_softmax(logits().float(), dim=-1)
        return logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)

    def td() -> dict:
        return rm.score_batch(ids, mask)

    modes = {"logits": logits, "bare": bare, "td": td}
    times = interleaved(modes, args.rounds, dev.sync)
    peaks = {k: dev.peak_of(f) for k, f in modes.items()}
    out_logits, out_bare, out_td = logits(), bare(), td()
    feats = out_td.pop("feats")
    td_ok = finite(*[v for v in out_td.values() if isinstance(v, torch.Tensor)], feats.hidden,
                   feats.entropy, feats.expected_c)
    diff = float((out_td["logp"][:, : args.seq_len - 1] - out_bare).abs().max())
    rates = {k: rate(n_tok, t) for k, t in times.items()}
    ratio = rates["td"]["median"] / rates["bare"]["median"]
    names = {"logits": "score: forward, logits only", "bare": "score: forward + log p (bare)",
             "td": "score: TD (score_batch)"}
    ok = {"logits": finite(out_logits), "bare": finite(out_bare),
          "td": td_ok and diff <= LOGP_TOL[args.dtype]}
    rows = []
    for k in modes:
        rows.append({"check": names[k], "tokens_per_s": rates[k], "peak_gib": peaks[k],
                     "seconds": rates[k]["seconds"], "finite": ok[k], "times_s": times[k]})
    rows[2] |= {"td_bare_ratio": ratio, "paired_ratio": paired_ratios(times["bare"], times["td"]),
                "td_logits_ratio": rates["td"]["median"] / rates["logits"]["median"],
                "logp_max_abs_diff": diff}
    if not ok["td"]:
        rows[2]["error"] = (f"TD log p differs from the bare forward's by {diff:.3g} nat"
                            if td_ok else "a score_batch output is not finite")
    return rows


def check_critic(args: argparse.Namespace, lm: Any, tok: Any, dev: Device, work: Path) -> dict:
    from tdreward.critic_files import WEIGHTS_NAME
    from tdreward.reward_model import TDRewardModel
    from tdreward.training.critic_config import CriticTrainingConfig
    from tdreward.training.critic_trainer import train_critic

    # seq_len - 1 words: with the BOS each document is seq_len tokens.
    docs = [as_text(r) for r in random_rows(args.batch_size, args.seq_len - 1,
                                            lm.config.vocab_size, 2)]
    out = work / "critic"
    cfg = CriticTrainingConfig(base_model=f"random-llama-{args.size}", dataset="generated ids",
                               output_dir=str(out), epochs=1, lm_batch_size=args.batch_size)
    rm = TDRewardModel.from_lm(lm, tok, cfg.base_model)
    dev.reset_peak()
    t = time.perf_counter()
    metrics = train_critic(cfg, rm=rm, docs=docs, progress=False)
    seconds = time.perf_counter() - t
    ok = finite_numbers(*(e["loss"] for e in metrics["epochs"])) and finite_file(out / WEIGHTS_NAME)
    return {"check": "train-critic: 1 epoch", "tokens_per_s": args.batch_size * args.seq_len
            / seconds, "peak_gib": dev.peak_gib(), "seconds": seconds, "finite": ok,
            "epoch_loss": metrics["epochs"][0]["loss"] if metrics["epochs"] else None}


def check_ppo(args: argparse.Namespace, model_dir: Path, dev: Device, work: Path) -> dict:
    from tdreward.hardware import HardwareSettings
    from tdreward.training.ppo_config import PPOConfig
    from tdreward.training.ppo_trainer import train_ppo

    batch = min(args.batch_size, PPO_BATCH)
    n_prompt = min(PROMPT_TOKENS, args.seq_len)
    vocab = SIZES[args.size]["vocab_size"]
    prompts = work / "prompts.txt"
    prompts.write_text("".join(as_text(r) + "\n" for r in random_rows(batch, n_prompt, vocab, 3)))
    out = work / "ppo"
    cfg = PPOConfig(base_model=str(model_dir), prompts=str(prompts), output_dir=str(out),
                    epochs=1, steps_per_epoch=1, batch_size=batch,
                    mini_batch_size=max(1, batch // 2), ppo_epochs=1,
                    max_new_tokens=args.new_tokens, use_lora=True, chat_template=False,
                    progress=False, hardware=HardwareSettings(device=args.device,
                                                              dtype=args.dtype))
    dev.reset_peak()
    result = train_ppo(cfg)
    stats = result.metrics[-1]
    keys = ("reward", "kl", "policy_loss", "value_loss", "total_reward", "critic_td_loss",
            "approx_kl", "entropy")
    lora = [p for n, p in result.model.named_parameters() if "lora_" in n]
    ok = (finite_numbers(*(stats[k] for k in keys)) and stats["nan_skipped"] == 0
          and bool(lora) and finite(*lora, *result.model.value_head.parameters()))
    bad = [k for k in keys if not finite_numbers(stats[k])]
    row = {"check": "PPO: 1 step, LoRA", "tokens_per_s": stats["tokens_per_s"],
           "peak_gib": dev.peak_gib(), "seconds": stats["step_time_s"], "finite": ok,
           "stats": {k: stats[k] for k in (*keys, "n_tokens", "nan_skipped")}}
    if not ok:
        row["error"] = f"not finite: {', '.join(bad) or 'skipped minibatches or adapter'}"
    return row


def check_lora(args: argparse.Namespace, model_dir: Path, dev: Device, work: Path) -> dict:
    from tdreward.hardware import TrainingHardwareSettings
    from tdreward.training.lora_trainer import LoraTrainingConfig, run_lora

    data = work / "lora.jsonl"
    rows = random_rows(args.batch_size, args.seq_len - 1, SIZES[args.size]["vocab_size"], 4)
    data.write_text("".join(json.dumps({"text": as_text(r)}) + "\n" for r in rows))
    out = work / "lora"
    cfg = LoraTrainingConfig(base_model=str(model_dir), dataset=str(data), output_dir=str(out),
                             max_steps=1, batch_size=args.batch_size, max_length=args.seq_len,
                             eval_examples=0, progress=False,
                             hardware=TrainingHardwareSettings(device=args.device,
                                                               dtype=args.dtype))
    dev.reset_peak()
    metrics = run_lora(cfg)
    seconds = metrics["train_wall_s"]
    losses = [h["loss"] for h in metrics["log_history"]]
    ok = (metrics["global_steps"] == 1 and finite_numbers(metrics["train_loss_mean"], *losses)
          and finite_file(out / "adapter_model.safetensors"))
    return {"check": "lora: 1 step, TD-weighted", "tokens_per_s": args.batch_size * args.seq_len
            / seconds, "peak_gib": dev.peak_gib(), "seconds": seconds, "finite": ok,
            "loss": metrics["train_loss_mean"]}


def guarded(name: str, fn: Callable[[], dict | list[dict]]) -> list[dict]:
    """Run one check; an exception makes a failed row (the other checks still run)."""
    try:
        # The trainers print their logs to stdout: there it would split the table from the
        # header line, so a check's own output goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            rows = fn()
    except Exception as e:  # an OOM or a bug in one check must not hide the others' results
        traceback.print_exc(file=sys.stderr)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return [{"check": name, "finite": False, "error": f"{type(e).__name__}: {msg}"}]
    return rows if isinstance(rows, list) else [rows]


# --------------------------------------------------------------------------- report
def cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "tokens_per_s":
        s = v if isinstance(v, dict) else {"median": v}
        text = f"{s['median']:.0f}"
        return text + (f" ({s['min']:.0f}-{s['max']:.0f})" if "min" in s else "")
    if key == "finite":
        return "yes" if v else "NO"
    return f"{v:.2f}" if key in ("peak_gib", "td_bare_ratio", "seconds") else str(v)


def print_table(rows: list[dict], args: argparse.Namespace, model: str, device: str) -> None:
    head = ["check", "model", "device", "dtype", "tokens/s", "peak GiB", "seconds", "finite",
            "TD/bare"]
    body = [[r["check"], model, device, args.dtype, cell(r, "tokens_per_s"), cell(r, "peak_gib"),
             cell(r, "seconds"), cell(r, "finite"), cell(r, "td_bare_ratio")] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    for line in [head, ["-" * w for w in widths], *body]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


def lm_checks(args: argparse.Namespace, dev: Device, work: Path) -> tuple[list[dict], str, int]:
    """Build the model, save it for the trainers that load a spec, score and train a critic
    on it; it is freed on return, before PPO and lora load their own copies."""
    from tdreward.backends.hf import set_pad

    tok = make_tokenizer(SIZES[args.size]["vocab_size"])
    t0 = time.perf_counter()
    lm = build_lm(args)
    set_pad(tok, lm)
    n = sum(p.numel() for p in lm.parameters())
    model = f"llama-{args.size} ({n / 1e9:.2f}B)" if n > 1e8 else f"llama-{args.size} " \
        f"({n / 1e6:.1f}M)"
    print(f"{PROG}: {model} on {dev.name} in {args.dtype}, built in "
          f"{time.perf_counter() - t0:.1f} s; scoring {args.batch_size} x {args.seq_len} "
          f"tokens, {args.rounds} interleaved rounds", flush=True)
    with contextlib.redirect_stdout(sys.stderr):
        lm.save_pretrained(work / "model")
        tok.save_pretrained(work / "model")
    rows = guarded("score", lambda: check_score(args, lm, tok, dev))
    rows += guarded("train-critic: 1 epoch", lambda: check_critic(args, lm, tok, dev, work))
    return rows, model, n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Everything is built here: on a machine without network a hub probe would only wait.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()  # the checks' own output is the table
    dev = Device(args.device)
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        work = Path(tmp)
        rows, model, n_params = lm_checks(args, dev, work)
        # PPO and lora load a model spec (the saved folder), as their commands do.
        rows += guarded("PPO: 1 step, LoRA", lambda: check_ppo(args, work / "model", dev, work))
        rows += guarded("lora: 1 step, TD-weighted",
                        lambda: check_lora(args, work / "model", dev, work))
    print()
    print_table(rows, args, model, dev.name)
    td = next((r for r in rows if "td_bare_ratio" in r), None)
    ratio = td["td_bare_ratio"] if td else None
    goal_met = ratio is not None and ratio >= GOAL
    failed = [r for r in rows if not r["finite"]]
    print(f"\nTD / bare throughput (ratio of medians): "
          f"{'n/a' if ratio is None else f'{ratio:.2f}'} (goal >= {GOAL}: "
          f"{'met' if goal_met else 'NOT met'})")
    for r in failed:
        print(f"FAILED {r['check']}: {r.get('error', 'an output is not finite')}")
    ok = not failed and (goal_met or not args.strict)
    print("all checks passed" if ok else "some checks FAILED")
    if args.json:
        args.json.write_text(json.dumps({
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "model": model, "parameters": n_params, "device": dev.name,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "cuda": torch.version.cuda},
            "checks": rows, "td_bare_ratio": ratio, "goal": GOAL, "goal_met": goal_met,
            "ok": ok}, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
