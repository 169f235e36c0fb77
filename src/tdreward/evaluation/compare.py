"""`compare`, `experiment`, `test-instruct`: generate with several models, score the responses
with one TD reward model, summarise, save.

1. Sample i uses prompt i mod len(prompts) and seed `seed + i`; each model generates every
   sample (the fast llama.cpp path for GGUF models), cached on disk per sample, so an
   interrupted run resumes without redoing finished samples.
2. One reward model (`base_model` + `reward_model_path`) scores every response: servers do not
   return log-probs of a given text, so the reward comes from the reference LM reading the
   prompt and the response; only the response's tokens count. With `reference_models`, each
   of several reference LMs scores every response in turn (loaded once, freed before the
   next): a models x references matrix, paired differences of every pair of models under
   each reference, and the self-preference gap of models that are also references
   (model_differences.py).
3. Per model: mean, median, std, 95% bootstrap CI, min, max and every TD reward, the share of
   negative rewards, response lengths; differences against the first model with bootstrap CIs
   of the per-sample differences (paired by prompt and seed; unpaired if samples lack a
   partner, recorded as "paired" / "n_pairs" / "unpaired_reason"; model_differences.py).
4. results.json (atomic), a bar + box plot PNG, optionally an HTML report with per-sample
   dopamine traces, and optionally self-scores on a corpus (`self_score`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import time
from pathlib import Path

from tdreward.backends.registry import BackendOptions, Generation, backend_for, make_generator
from tdreward.errors import TDRewardError
from tdreward.evaluation import stats
from tdreward.evaluation.compare_config import CompareConfig
from tdreward.evaluation.gen_cache import (
    GenerationCache,
    default_cache_dir,
    model_fingerprint,
    placement_key,
)
from tdreward.evaluation.model_differences import comparisons, reference_matrix
from tdreward.io import write_json
from tdreward.reward_model import TDRewardModel, TextScore, load_reward_model
from tdreward.specs import DEFAULT_MODELS, parse_spec

log = logging.getLogger("tdreward")

EVAL_PROMPTS = "eval_prompts.jsonl"
TRAINING_DATA = "sample_training_data.jsonl"


def bundled_data(name: str) -> Path:
    """A data file shipped with tdreward: package data when installed with it, else the
    repository's data/ folder (editable installs and checkouts)."""
    from importlib.resources import files

    import tdreward

    candidates = []
    with contextlib.suppress(ModuleNotFoundError, TypeError):
        candidates.append(Path(str(files("tdreward.data") / name)))
    candidates.append(Path(tdreward.__file__).resolve().parents[2] / "data" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise TDRewardError(f"the bundled data file {name} is missing from this installation; "
                        "pass your own file (--prompts / --dataset)")


def load_prompt_texts(path: str | None) -> tuple[list[str], str]:
    from tdreward.data.prompts import load_prompts

    source = Path(path) if path else bundled_data(EVAL_PROMPTS)
    return [p.prompt for p in load_prompts(str(source))], str(source)


# --------------------------------------------------------------------------- generation
def _backend_options(cfg: CompareConfig) -> BackendOptions:
    return BackendOptions(prompt_format=cfg.prompt_format, batch_size=cfg.batch_size,
                          ollama_host=cfg.ollama_host, pull=cfg.pull,
                          concurrency=cfg.concurrency, timeout=cfg.timeout, retries=cfg.retries,
                          hardware=cfg.hardware,
                          n_gpu_layers=cfg.llamacpp.gpu_layers(cfg.hardware.device),
                          extra={"openai_extra_body": cfg.openai_extra_body}
                          | ({"n_threads": cfg.threads} if cfg.threads else {}))


def generate_samples(model: str, prompts: list[str], seeds: list[int], cfg: CompareConfig,
                     cache: GenerationCache) -> tuple[list[Generation], dict]:
    """Every sample's generation for `model`: from the cache, else generated (and cached as
    soon as its chunk is done). The model is loaded only if something is missing."""
    spec = parse_spec(model)
    backend = backend_for(spec, cfg.backend)
    base_key = {"model": spec.raw, "weights": model_fingerprint(spec, backend, cfg.ollama_host),
                "backend": backend, "prompt_format": cfg.prompt_format,
                "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "top_p": cfg.top_p}
    if backend == "llamacpp":  # sampled by tdreward (numpy), no longer by llama.cpp: new key
        base_key["sampler"] = "tdreward-numpy-1"
    if spec.kind == "openai" and cfg.openai_extra_body:
        base_key["extra_body"] = cfg.openai_extra_body
    base_key |= placement_key(backend, cfg.hardware, cfg.llamacpp)
    keys = [base_key | {"prompt": p, "seed": s} for p, s in zip(prompts, seeds)]
    gens: list[Generation | None] = [cache.get(k) for k in keys]
    todo = [i for i, g in enumerate(gens) if g is None]
    info = {"backend": backend, "generated": len(todo), "from_cache": len(gens) - len(todo),
            "seconds": 0.0, "new_tokens": 0}
    if todo:
        from tqdm.auto import tqdm

        gen = make_generator(spec, backend, _backend_options(cfg))
        # llama.cpp refills a finished sequence's slot at once, so it gets several batches'
        # worth per call; the cache is still written after every call.
        chunk = max(1, cfg.batch_size if backend == "transformers" else
                    4 * cfg.batch_size if backend == "llamacpp" else
                    cfg.concurrency if backend in ("ollama", "openai") else 1)
        start = time.perf_counter()
        try:
            with tqdm(total=len(todo), desc=f"generate {model}", unit="sample") as bar:
                for a in range(0, len(todo), chunk):
                    idx = todo[a : a + chunk]
                    outs = gen.generate([prompts[i] for i in idx], cfg.max_new_tokens,
                                        cfg.temperature, top_p=cfg.top_p,
                                        seeds=[seeds[i] for i in idx])
                    for i, g in zip(idx, outs):
                        cache.put(keys[i], g)
                        gens[i] = g
                    bar.update(len(idx))
        finally:
            gen.close()
        info["seconds"] = time.perf_counter() - start
        info["new_tokens"] = sum(gens[i].n_tokens or 0 for i in todo)
        if info["seconds"] > 0 and info["new_tokens"]:
            info["tokens_per_second"] = info["new_tokens"] / info["seconds"]
    info["prompt_format"] = "chat" if gens and gens[0].chat else "raw"
    return gens, info


# --------------------------------------------------------------------------- scoring
def scoring_context(gen: Generation) -> str:
    """The text the reward model reads before the response: the prompt, and a line break
    after it when the model answered a chat turn (a raw completion continues the prompt)."""
    return gen.prompt + "\n" if gen.chat else gen.prompt


def _boundary(ctx: list[int], full: list[int]) -> int:
    """Index of the first token of `full` that is not the context's (tokenisation may merge
    across the boundary, so compare token by token)."""
    k = 0
    while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
        k += 1
    return k


def _response_part(s: TextScore, start: int, gamma: float) -> tuple[dict, TextScore]:
    """Summary and trace of the predicted tokens from `start` on (the response)."""
    delta, r, logp = s.delta[start:], s.r[start:], s.logp[start:]
    n = len(delta)
    ret = sum(gamma**t * x for t, x in enumerate(r))
    summary = {"td_reward": sum(delta) / n, "mean_r": sum(r) / n, "return": ret,
               "perplexity": math.exp(-sum(logp) / n), "n_tokens": n,
               "negative_tokens": sum(d < 0 for d in delta)}
    part = TextScore(token_ids=s.token_ids[start:], tokens=s.tokens[start:], logp=logp,
                     c=s.c[start:], H=s.H[start:], r=r, rbar=s.rbar[start:], V=s.V[start:],
                     delta=delta,
                     belief=s.belief[start:], state_names=s.state_names,
                     summary={k: v for k, v in summary.items() if k != "negative_tokens"})
    return summary, part


def score_responses(rm: TDRewardModel, gens: list[Generation],
                    batch_size: int = 8) -> tuple[list[dict | None], list[TextScore | None]]:
    """Response-only TD summaries and traces; None for a response that adds no token."""
    ctx_ids = rm.encode([scoring_context(g) for g in gens])
    full_ids = rm.encode([scoring_context(g) + g.text for g in gens])
    starts = [max(_boundary(c, f) - 1, 0) for c, f in zip(ctx_ids, full_ids)]
    keep = [i for i, (f, s) in enumerate(zip(full_ids, starts)) if len(f) - 1 > s]
    summaries: list[dict | None] = [None] * len(gens)
    traces: list[TextScore | None] = [None] * len(gens)
    if keep:
        scores = rm.score([full_ids[i] for i in keep], batch_size=batch_size, progress=True)
        for i, s in zip(keep, scores):
            summaries[i], traces[i] = _response_part(s, starts[i], rm.config.gamma)
    return summaries, traces


def summarise_model(gens: list[Generation], summaries: list[dict | None], info: dict,
                    n_boot: int = stats.N_BOOT) -> dict:
    rewards = [s["td_reward"] if s else None for s in summaries]
    words = [len(g.text.split()) for g in gens]
    chars = [len(g.text) for g in gens]
    tokens = [g.n_tokens for g in gens]
    rm_tokens = [s["n_tokens"] if s else 0 for s in summaries]
    n_tok = sum(rm_tokens)
    samples = []
    for i, (g, s) in enumerate(zip(gens, summaries)):
        samples.append({
            "index": i, "prompt": g.prompt, "seed": g.seed, "response": g.text,
            "finish_reason": g.finish_reason, "gen_tokens": g.n_tokens, "n_words": words[i],
            "n_chars": chars[i],
            "gen_mean_logprob": (sum(g.logprobs) / len(g.logprobs)) if g.logprobs else None,
            **({k: s[k] for k in ("td_reward", "mean_r", "return", "perplexity")}
               | {"reward_tokens": s["n_tokens"]} if s else {"td_reward": None}),
        })
    return {
        "backend": info["backend"],
        "prompt_format": info["prompt_format"],
        "td_reward": stats.describe(rewards, n_boot),
        "rewards": rewards,
        "negative_share": stats.share_negative(rewards),
        "negative_token_share": (sum(s["negative_tokens"] for s in summaries if s) / n_tok)
        if n_tok else None,
        "mean_r": stats.describe([s["mean_r"] if s else None for s in summaries], n_boot),
        "perplexity": stats.describe([s["perplexity"] if s else None for s in summaries], n_boot),
        "response_length": {"words": stats.describe(words, n_boot),
                            "tokens": stats.describe([t for t in tokens if t is not None], n_boot),
                            "chars": stats.describe(chars, n_boot),
                            "reward_model_tokens": stats.describe(rm_tokens, n_boot)},
        "response_lengths": {"words": words, "tokens": tokens, "chars": chars},
        "n_empty": sum(r is None for r in rewards),
        "finish_reasons": {r: sum(g.finish_reason == r for g in gens)
                           for r in sorted({g.finish_reason for g in gens})},
        "generation": {k: v for k, v in info.items() if k not in ("backend", "prompt_format")},
        "samples": samples,
    }


# --------------------------------------------------------------------------- the run
def load_scorer(cfg: CompareConfig) -> TDRewardModel:
    """The reward model that scores every response: `cfg.reward` on `cfg.base_model`."""
    return load_reward_model(cfg.base_model, cfg.reward, verbose=cfg.verbose,
                             hardware=cfg.hardware)


def load_reference(spec: str, cfg: CompareConfig, warn_untrained: bool = True
                   ) -> TDRewardModel:
    """One of `cfg.reference_models` as a reward model. The critic of
    `--reward_model_path` goes to a reference with its hidden and vocabulary sizes (read from
    the model's metadata, else from the loaded model, as for self-scores); any other
    reference gets an untrained critic with the same reward weight overrides. Without a
    critic the usual warning is logged if `warn_untrained`."""
    from tdreward.backends.hf import load_model
    from tdreward.backends.model_info import model_dims
    from tdreward.critic_files import read_critic_config

    place = cfg.hardware.resolve()
    lm, tok = load_model(spec, verbose=cfg.verbose, hardware=place)
    settings = cfg.reward
    if settings.reward_model_path:
        meta = read_critic_config(Path(settings.reward_model_path))
        dims = model_dims(spec)
        if dims is None:
            head = lm.get_output_embeddings()
            dims = (lm.config.hidden_size, head.weight.shape[0] if head is not None else None)
        if dims != (meta["hidden_size"], meta["vocab_size"]):
            log.warning("--reward_model_path was trained on %s; reference %s (hidden size %s, "
                        "vocabulary %s) is scored with an untrained critic", meta["base_model"],
                        spec, *dims)
            settings = dataclasses.replace(settings, reward_model_path=None)
    return load_reward_model(spec, settings, lm=lm, tokenizer=tok, verbose=cfg.verbose,
                             model_flag="--reference_models", hardware=place,
                             warn_untrained=warn_untrained and not cfg.reward.reward_model_path)


def compare_models(cfg: CompareConfig, prompts: list[str], rm: TDRewardModel | None = None
                   ) -> tuple[dict, dict[str, list[TextScore | None]], TDRewardModel]:
    """Generate, score and summarise every model on `num_samples` samples of `prompts`.

    `rm` (optional): the already loaded reward model of the first reference. With
    `cfg.reference_models`, every reference scores every response, one reference loaded at a
    time (the first last, kept and returned: it gives the table, the traces and the
    self-scores); each model's `by_reference` holds every reference's per-sample rewards."""
    for m in cfg.models:  # a model this backend cannot run fails before any work
        backend_for(parse_spec(m), cfg.backend)
    sample_prompts = [prompts[i % len(prompts)] for i in range(cfg.num_samples)]
    seeds = [(cfg.seed + i) & 0x7FFFFFFF for i in range(cfg.num_samples)]
    cache = GenerationCache(None if cfg.no_cache else (cfg.cache_dir or default_cache_dir()))
    generated = {m: generate_samples(m, sample_prompts, seeds, cfg, cache) for m in cfg.models}
    models, traces = {}, {}
    if not cfg.reference_models:
        rm = rm or load_scorer(cfg)
        for m, (gens, info) in generated.items():
            summaries, traces[m] = score_responses(rm, gens, cfg.batch_size)
            models[m] = summarise_model(gens, summaries, info, cfg.bootstrap)
        return models, traces, rm
    refs = list(cfg.reference_models)
    first = refs[0]
    by_ref: dict[str, dict[str, dict]] = {m: {} for m in generated}
    first_summaries: dict[str, list[dict | None]] = {}
    order = [*refs[1:], first]
    for ref in order:
        scorer = (rm if ref == first and rm is not None else
                  load_reference(ref, cfg, warn_untrained=ref == order[0]))
        log.info("scoring every response with reference %s (%s critic)", ref,
                 "trained" if scorer.trained else "untrained")
        for m, (gens, _) in generated.items():
            summaries, tr = score_responses(scorer, gens, cfg.batch_size)
            by_ref[m][ref] = {"critic": "trained" if scorer.trained else "untrained",
                              "rewards": [s["td_reward"] if s else None for s in summaries]}
            if ref == first:
                first_summaries[m], traces[m] = summaries, tr
        if ref == first:
            rm = scorer
        else:  # free this reference before the next one loads
            del scorer
            gc.collect()
    for m, (gens, info) in generated.items():
        models[m] = summarise_model(gens, first_summaries[m], info, cfg.bootstrap)
        models[m]["by_reference"] = {r: by_ref[m][r] for r in refs}
    return models, traces, rm


def run_compare(cfg: CompareConfig) -> dict:
    """The whole run; returns the results document (also written to output_dir)."""
    from tdreward.evaluation import report

    prompts, source = load_prompt_texts(cfg.prompts)
    start = time.perf_counter()
    models, traces, rm = compare_models(cfg, prompts)
    out = Path(cfg.output_dir)
    results = {
        "command": cfg.command,
        "config": dataclasses.asdict(cfg),
        "prompts_file": source,
        "num_prompts": len(prompts),
        "reward_model": {"base_model": rm.base_model, "path": cfg.reward.reward_model_path,
                         "trained": rm.trained, "reward_config": rm.config.to_dict()},
        "models": models,
        "comparisons": comparisons(models, cfg.bootstrap),
    }
    matrix = reference_matrix(models, cfg.bootstrap)
    if matrix is not None:
        results["reference_matrix"] = matrix
    if cfg.self_score:
        from tdreward.evaluation.selfscore import self_score_models

        corpus = cfg.self_score_corpus or str(bundled_data(TRAINING_DATA))
        results["self_scores"] = self_score_models(
            cfg.models, rm, corpus, cfg.self_score_config, cfg.self_score_split,
            cfg.self_score_chars, cfg.reward.reward_model_path, cfg.batch_size)
    results["seconds"] = time.perf_counter() - start
    files = {"results": str(out / "results.json"), "plot": str(out / "comparison.png")}
    if cfg.html_report:
        files["report"] = str(out / "report.html")
    results["files"] = files
    report.write_comparison_plot(files["plot"], results)
    if cfg.html_report:
        report.write_report(files["report"], results, traces, cfg.trace_samples)
    write_json(files["results"], results)
    return results


__all__ = ["CompareConfig", "DEFAULT_MODELS", "bundled_data", "compare_models",
           "generate_samples", "load_prompt_texts", "load_reference", "run_compare",
           "score_responses"]
