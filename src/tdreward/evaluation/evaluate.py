"""`tdreward evaluate`: a base model against its fine-tune on a dataset.

1. Both models read the same dataset text (the first `num_samples` documents, at most
   `max_chars` characters) and are scored by their own predictions: perplexity, bits per byte,
   mean r, TD reward (the trained critic for any model with the reference LM's shapes).
2. Both complete the same prompts (`--prompts`, else the first words of the dataset's
   documents); the reward model scores the responses as in `compare`.
3. evaluation.json, the comparison PNG, a table and a few sample generations side by side.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from tdreward.backends.embedded import DEFAULT_MODEL
from tdreward.errors import TDRewardError
from tdreward.evaluation import report
from tdreward.evaluation.compare import (
    CompareConfig,
    check_generation_settings,
    compare_models,
    comparisons,
    load_scorer,
)
from tdreward.evaluation.selfscore import join_documents, reward_model_for, scoring_spec, self_score
from tdreward.io import write_json
from tdreward.validation import check_output_dir, validate


@dataclass
class EvaluateConfig:
    base_model: str = DEFAULT_MODEL
    fine_tuned_model: str = ""
    dataset: str = ""
    dataset_config: str | None = None
    split: str = "test"
    num_samples: int = 10
    prompts: str | None = None  # default: the first `prompt_words` words of each document
    prompt_words: int = 12
    max_chars: int = 20_000
    output_dir: str = "evaluate_out"
    reward_model_path: str | None = None
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    backend: str = "auto"
    prompt_format: str = "auto"
    batch_size: int = 8
    threads: int | None = None  # llama.cpp threads; default half the CPUs
    cache_dir: str | None = None
    no_cache: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        check_generation_settings(self)
        validate(self, {"prompt_words": ">=1", "max_chars": ">=1"})
        if not self.fine_tuned_model:
            raise TDRewardError("give --fine_tuned_model (a directory, hub id, gguf: or "
                                "embedded:)")
        if not self.dataset:
            raise TDRewardError("--dataset is required (HF dataset name or local file/folder)")
        for m in (self.base_model, self.fine_tuned_model):
            if scoring_spec(m) is None:
                raise TDRewardError(f"{m!r} cannot score text (a server): evaluate needs models "
                                    "that give log-probs of a given text")
        check_output_dir(self.output_dir, "--output_dir")


def dataset_prompts(docs: list[str], n: int, words: int) -> list[str]:
    """The first `words` words of each document long enough to continue."""
    out = [" ".join(d.split()[:words]) for d in docs if len(d.split()) > words]
    if not out:
        raise TDRewardError(f"no document of the dataset has more than {words} words to "
                            "prompt with; pass --prompts")
    return out[:n]


def run_evaluate(cfg: EvaluateConfig) -> dict:
    from tdreward.data.corpus import load_corpus
    from tdreward.evaluation.compare import load_prompt_texts

    start = time.perf_counter()
    docs = load_corpus(cfg.dataset, cfg.dataset_config, split=cfg.split)[: cfg.num_samples]
    text = join_documents(docs, cfg.max_chars)
    ccfg = CompareConfig(
        models=[cfg.base_model, cfg.fine_tuned_model], num_samples=cfg.num_samples,
        output_dir=cfg.output_dir, base_model=scoring_spec(cfg.base_model),
        reward_model_path=cfg.reward_model_path, alpha=cfg.alpha, beta=cfg.beta,
        gamma=cfg.gamma, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, seed=cfg.seed, backend=cfg.backend, prompt_format=cfg.prompt_format,
        batch_size=cfg.batch_size, threads=cfg.threads, cache_dir=cfg.cache_dir,
        no_cache=cfg.no_cache, verbose=cfg.verbose)
    rm = load_scorer(ccfg)
    dataset_scores = {}
    for role, model in (("base", cfg.base_model), ("fine_tuned", cfg.fine_tuned_model)):
        model_rm = reward_model_for(scoring_spec(model), rm, cfg.reward_model_path)
        dataset_scores[role] = {"model": model} | self_score(model_rm, text, cfg.batch_size)
    if cfg.prompts:
        prompts, source = load_prompt_texts(cfg.prompts)
    else:
        prompts, source = dataset_prompts(docs, cfg.num_samples, cfg.prompt_words), cfg.dataset
    models, traces, _ = compare_models(ccfg, prompts, rm)
    out = Path(cfg.output_dir)
    results = {
        "command": "evaluate",
        "config": dataclasses.asdict(ccfg) | {"evaluate": dataclasses.asdict(cfg)},
        "prompts_file": source,
        "dataset": {"name": cfg.dataset, "config": cfg.dataset_config, "split": cfg.split,
                    "documents": len(docs), "n_chars": len(text)},
        "dataset_scores": dataset_scores,
        "reward_model": {"base_model": rm.base_model, "path": cfg.reward_model_path,
                         "trained": rm.trained, "reward_config": rm.config.to_dict()},
        "models": models,
        "comparisons": comparisons(models),
        "files": {"results": str(out / "evaluation.json"), "plot": str(out / "comparison.png")},
    }
    results["seconds"] = time.perf_counter() - start
    report.write_comparison_plot(results["files"]["plot"], results)
    write_json(results["files"]["results"], results)
    return results


__all__ = ["EvaluateConfig", "dataset_prompts", "run_evaluate"]
