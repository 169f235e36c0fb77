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
from pathlib import Path

from tdreward.errors import TDRewardError
from tdreward.evaluation import report
from tdreward.evaluation.compare import CompareConfig, compare_models, load_scorer
from tdreward.evaluation.compare_config import GenerationSettings
from tdreward.evaluation.evaluate_config import EvaluateConfig
from tdreward.evaluation.model_differences import comparisons
from tdreward.evaluation.selfscore import join_documents, reward_model_for, scoring_spec, self_score
from tdreward.io import write_json


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
    generation = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GenerationSettings)}
    ccfg = CompareConfig(
        models=[cfg.base_model, cfg.fine_tuned_model], output_dir=cfg.output_dir,
        base_model=scoring_spec(cfg.base_model), reward=cfg.reward, verbose=cfg.verbose,
        **generation)
    rm = load_scorer(ccfg)
    dataset_scores = {}
    for role, model in (("base", cfg.base_model), ("fine_tuned", cfg.fine_tuned_model)):
        model_rm = reward_model_for(scoring_spec(model), rm, cfg.reward.reward_model_path)
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
        "reward_model": {"base_model": rm.base_model, "path": cfg.reward.reward_model_path,
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
