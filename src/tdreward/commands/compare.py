"""`tdreward compare | experiment | test-instruct | evaluate`: compare models by TD reward."""

from __future__ import annotations

import argparse
import json
import sys

from tdreward.commands import DEFAULT_MODEL, flag, reward_flags
from tdreward.errors import TDRewardError

ORDER = 30
DEFAULT_MODELS = ["embedded:smollm2-135m-instruct", "embedded:gemma3-270m"]


def _generation_flags(p: argparse.ArgumentParser, num_samples: int, max_new_tokens: int = 100,
                      servers: bool = True) -> None:
    flag(p, "--num_samples", type=int, default=num_samples,
         help=f"samples per model; prompts are cycled (default {num_samples})")
    p.add_argument("--prompts", help="prompt file, .jsonl with a 'prompt' key or .txt one per "
                   "line (default: the bundled data/eval_prompts.jsonl)")
    flag(p, "--max_new_tokens", type=int, default=max_new_tokens,
         help=f"tokens generated per sample at most (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    flag(p, "--top_p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
    p.add_argument("--backend", default="auto", choices=["auto", "llamacpp", "transformers"],
                   help="GGUF / embedded models run on llama.cpp by default (fast); "
                   "transformers forces the dequantised path")
    flag(p, "--prompt_format", default="auto", choices=["auto", "chat", "raw"],
         help="auto: the model's chat template when it has one (instruct models), else raw")
    flag(p, "--batch_size", type=int, default=8,
         help="prompts generated together (transformers: one padded batch; llama.cpp: "
         "sequences sharing each decode) and the reward scoring batch (default 8)")
    flag(p, "--threads", type=int,
         help="llama.cpp threads (default: half the CPUs, which stays fast when other "
         "processes want cores; all of them is faster on an otherwise idle machine)")
    flag(p, "--cache_dir", help="generation cache (default $TDREWARD_CACHE/generations)")
    flag(p, "--no_cache", action="store_true", help="neither read nor write the cache")
    if servers:
        flag(p, "--ollama_host", help="Ollama server (default $OLLAMA_HOST or "
             "http://127.0.0.1:11434)")
        p.add_argument("--pull", action="store_true",
                       help="pull an Ollama model that the server does not have")
        p.add_argument("--concurrency", type=int, default=4,
                       help="requests in flight to a server (default 4)")
        p.add_argument("--timeout", type=float, default=300.0,
                       help="seconds per server request (default 300)")
        p.add_argument("--retries", type=int, default=3,
                       help="retries of a failed OpenAI-compatible request (default 3)")
        flag(p, "--openai_extra_body", type=json.loads, default={},
             help="JSON merged into every OpenAI-compatible request, e.g. "
             "'{\"top_k\": 0, \"repeat_penalty\": 1.0}' for llama.cpp's server")


def _compare_parser(sub, common, name: str, help_: str, num_samples: int, **kw):
    p = sub.add_parser(name, parents=[common], help=help_, **kw)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                   help="model specs (`tdreward models`; default: the two embedded models)")
    flag(p, "--output_dir", default=f"{name.replace('-', '_')}_out",
         help="where results.json and the plot go")
    flag(p, "--base_model", default=DEFAULT_MODEL,
         help="the reward model's reference LM (must match --reward_model_path)")
    reward_flags(p)
    _generation_flags(p, num_samples)
    flag(p, "--self_score", action="store_true",
         help="also score models that can score text on a corpus by their own predictions")
    flag(p, "--self_score_corpus",
         help="corpus for --self_score (file, folder or dataset; default the bundled "
         "data/sample_training_data.jsonl)")
    flag(p, "--self_score_config", help="dataset config for --self_score_corpus")
    flag(p, "--self_score_chars", type=int, default=20_000,
         help="characters of the corpus to self-score (default 20000)")
    return p


def register(sub, common: argparse.ArgumentParser) -> None:
    p = _compare_parser(sub, common, "compare", "generate with several models and compare "
                        "their TD rewards", 10)
    p.set_defaults(func=run_compare, html_report=False, command_name="compare")
    p = _compare_parser(sub, common, "experiment", "compare models on many samples: "
                        "results.json, plot and an HTML report with dopamine traces", 50)
    flag(p, "--trace_samples", type=int, default=3, help="dopamine traces per model (default 3)")
    p.set_defaults(func=run_compare, html_report=True, command_name="experiment")

    p = sub.add_parser("test-instruct", aliases=["test_instruct"], parents=[common],
                       help="score an instruction-tuned Ollama model's responses with the "
                       "TD reward of a base model")
    flag(p, "--ollama_model", required=True, help="the Ollama model (NAME[:TAG])")
    flag(p, "--base_model", default=DEFAULT_MODEL, help="the reward model's reference LM")
    flag(p, "--with_base", action="store_true",
         help="also generate with --base_model and compare")
    flag(p, "--output_dir", default="test_instruct_out")
    reward_flags(p)
    _generation_flags(p, 10)
    p.set_defaults(func=run_test_instruct)

    p = sub.add_parser("evaluate", parents=[common],
                       help="base vs fine-tuned model: perplexity and TD reward on a dataset, "
                       "and sample generations")
    flag(p, "--base_model", default=DEFAULT_MODEL, help="the base model (reward reference)")
    flag(p, "--fine_tuned_model", required=True, help="the fine-tuned model (dir, hub id, ...)")
    p.add_argument("--dataset", required=True, help="HF dataset name or local file/folder")
    flag(p, "--dataset_config", help="HF dataset config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="test", help="HF dataset split (default test)")
    flag(p, "--output_dir", default="evaluate_out")
    flag(p, "--max_chars", type=int, default=20_000,
         help="dataset characters scored for perplexity (default 20000)")
    flag(p, "--prompt_words", type=int, default=12,
         help="words of each document used as a prompt when --prompts is not given")
    reward_flags(p)
    _generation_flags(p, 10, max_new_tokens=64, servers=False)
    p.set_defaults(func=run_evaluate)


def _compare_config(args: argparse.Namespace, models: list[str]):
    from tdreward.evaluation.compare import CompareConfig

    return CompareConfig(
        models=models, num_samples=args.num_samples, prompts=args.prompts,
        output_dir=args.output_dir, base_model=args.base_model,
        reward_model_path=args.reward_model_path, alpha=args.alpha, beta=args.beta,
        gamma=args.gamma, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, backend=args.backend,
        prompt_format=args.prompt_format, ollama_host=args.ollama_host, pull=args.pull,
        concurrency=args.concurrency, timeout=args.timeout, retries=args.retries,
        batch_size=args.batch_size, threads=args.threads,
        openai_extra_body=args.openai_extra_body, cache_dir=args.cache_dir, no_cache=args.no_cache,
        self_score=getattr(args, "self_score", False),
        self_score_corpus=getattr(args, "self_score_corpus", None),
        self_score_config=getattr(args, "self_score_config", None),
        self_score_chars=getattr(args, "self_score_chars", 20_000),
        html_report=getattr(args, "html_report", False),
        trace_samples=getattr(args, "trace_samples", 3), verbose=args.verbose,
        command=getattr(args, "command_name", "test-instruct"),
    )


def run_compare(args: argparse.Namespace) -> int:
    from tdreward.evaluation.compare import run_compare as run

    results = run(_compare_config(args, args.models))
    print_results(results)
    return 0


def run_test_instruct(args: argparse.Namespace) -> int:
    from tdreward.evaluation.compare import run_compare as run

    name = args.ollama_model.removeprefix("ollama:")
    if not name:
        raise TDRewardError("--ollama_model is empty")
    models = [f"ollama:{name}"] + ([args.base_model] if args.with_base else [])
    results = run(_compare_config(args, models))
    print_results(results, samples=3)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from tdreward.evaluation.evaluate import EvaluateConfig
    from tdreward.evaluation.evaluate import run_evaluate as run

    cfg = EvaluateConfig(
        base_model=args.base_model, fine_tuned_model=args.fine_tuned_model,
        dataset=args.dataset, dataset_config=args.dataset_config, split=args.split,
        num_samples=args.num_samples, prompts=args.prompts, prompt_words=args.prompt_words,
        max_chars=args.max_chars, output_dir=args.output_dir,
        reward_model_path=args.reward_model_path, alpha=args.alpha, beta=args.beta,
        gamma=args.gamma, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, backend=args.backend,
        prompt_format=args.prompt_format, batch_size=args.batch_size, threads=args.threads,
        cache_dir=args.cache_dir, no_cache=args.no_cache, verbose=args.verbose)
    results = run(cfg)
    from rich.console import Console
    from rich.table import Table

    from tdreward.display import fmt_num, print_table

    table = Table(title=f"{args.dataset}: scored by each model's own predictions")
    for col in ("model", "perplexity", "bits/byte", "mean r", "TD reward", "critic"):
        table.add_column(col, justify="left" if col == "model" else "right",
                         overflow="fold" if col == "model" else "ellipsis")
    for role, s in results["dataset_scores"].items():
        table.add_row(f"{role}: {s['model']}", fmt_num(s["perplexity"], ".2f"),
                      fmt_num(s["bits_per_byte"], ".3f"), fmt_num(s["mean_r"], ".4f"),
                      fmt_num(s["td_reward"], ".4f"), s["critic"])
    print_table(table, Console(width=None if sys.stdout.isatty() else 160))
    print_results(results, samples=2)
    return 0


def print_results(results: dict, samples: int = 0) -> None:
    from rich.console import Console
    from rich.table import Table

    from tdreward.display import fmt_num, print_table
    from tdreward.evaluation.report import SUMMARY_HEADER, pairing, summary_rows

    console = Console(width=None if sys.stdout.isatty() else 160)
    rm = results["reward_model"]
    table = Table(title=f"TD reward of the responses (reward model {rm['base_model']}"
                  + ("" if rm["trained"] else ", untrained critic") + ")")
    for col in SUMMARY_HEADER:
        table.add_column(col, justify="left" if col in ("model", "prompt") else "right",
                         overflow="fold" if col == "model" else "ellipsis")
    for row in summary_rows(results):
        table.add_row(*row)
    print_table(table, console)
    for c in results.get("comparisons", []):
        td, w = c["td_reward"], c["words"]
        console.print(f"{c['b']} - {c['a']}: TD reward {fmt_num(td['diff'], '+.4f')} "
                      f"[{fmt_num(td['ci95'][0], '+.4f')}, {fmt_num(td['ci95'][1], '+.4f')}], "
                      f"response words {fmt_num(w['diff'], '+.1f')} "
                      f"[{fmt_num(w['ci95'][0], '+.1f')}, {fmt_num(w['ci95'][1], '+.1f')}] "
                      f"({pairing(td)})", highlight=False, markup=False)
    for m, v in (results.get("self_scores") or {}).get("models", {}).items():
        if "skipped" in v:
            console.print(f"self-score {m}: skipped ({v['skipped']})", highlight=False)
        else:
            console.print(f"self-score {m}: perplexity {fmt_num(v['perplexity'], '.2f')}, "
                          f"bits/byte {fmt_num(v['bits_per_byte'], '.3f')}, mean r "
                          f"{fmt_num(v['mean_r'], '.4f')}, TD reward "
                          f"{fmt_num(v['td_reward'], '.4f')} ({v['critic']} critic)",
                          highlight=False)
    for m, r in results["models"].items():
        for s in r["samples"][:samples]:
            console.print(f"[{m}] {s['prompt']!r} -> {s['response'][:200]!r}", highlight=False,
                          markup=False)
    for kind, path in results.get("files", {}).items():
        console.print(f"{kind}: {path}", highlight=False)
