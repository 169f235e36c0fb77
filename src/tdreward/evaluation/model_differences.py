"""Differences between the models of a comparison, paired by prompt and seed: each model
against the first (`comparisons`), and, for a run with several reference LMs, the models x
references matrix with the paired differences of every pair of models under every reference
and the self-preference gap of models that are also references (`reference_matrix`)."""

from __future__ import annotations

from tdreward.evaluation import stats


def pair_keys(samples: list[dict]) -> list[tuple]:
    """Each sample's pairing key: (prompt, seed, k) for the k-th sample with that prompt and
    seed. k keeps keys unique when a backend reports no per-sample seed and prompts cycle."""
    seen: dict[tuple, int] = {}
    keys = []
    for s in samples:
        key = (s["prompt"], s.get("seed"))
        keys.append((*key, seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    return keys


def paired_difference(a: list[float | None], keys_a: list[tuple], b: list[float | None],
                      keys_b: list[tuple], n_boot: int = stats.N_BOOT) -> dict:
    """mean(b) - mean(a) with its bootstrap CI, paired by sample key when every sample of
    each model has its partner in the other (the two models answered the same prompts with
    the same seeds), else each group resampled on its own, and the reason why."""
    if len(keys_a) == len(a) and len(keys_b) == len(b) and set(keys_a) == set(keys_b):
        by_key = dict(zip(keys_b, b))
        res = stats.compare_paired(a, [by_key[k] for k in keys_a], n_boot)
        if res["n_pairs"]:
            return res
        reason = "no pair has a value for both models"
    else:
        missing = len(set(keys_a) ^ set(keys_b))
        reason = f"{missing} samples have no partner with the same prompt and seed"
    return stats.compare_means([v for v in a if v is not None],
                               [v for v in b if v is not None], n_boot) \
        | {"paired": False, "n_pairs": 0, "unpaired_reason": reason}


def _partners(ma: dict, mb: dict) -> tuple[list[int] | None, str | None]:
    """For each sample of a, the index of b's sample with the same (prompt, seed) key; None
    and the reason when the two models did not answer the same samples."""
    ka, kb = pair_keys(ma["samples"]), pair_keys(mb["samples"])
    if set(ka) != set(kb):
        missing = len(set(ka) ^ set(kb))
        return None, f"{missing} samples have no partner with the same prompt and seed"
    where = {k: i for i, k in enumerate(kb)}
    return [where[k] for k in ka], None


def _b_minus_a(ma: dict, mb: dict, partners: list[int], ref: str) -> list[float | None]:
    """Per sample of a: b's TD reward minus a's under reference `ref` (None if one is
    missing)."""
    ra, rb = ma["by_reference"][ref]["rewards"], mb["by_reference"][ref]["rewards"]
    return [None if x is None or rb[j] is None else rb[j] - x for x, j in zip(ra, partners)]


def reference_matrix(models: dict[str, dict], n_boot: int = stats.N_BOOT) -> dict | None:
    """The models x references view of a run with several reference LMs (models[m]
    ["by_reference"], from compare_models): per cell the TD reward's statistics (mean, its
    95% bootstrap CI, n, ...) and whether the model is the reference itself (`own`); the
    paired difference (b - a, same prompt and seed) of every pair of models under every
    reference; and, for two models that are both references, the self-preference gap:
    (a - b under a's reference) + (b - a under b's reference), per (prompt, seed) pair, with
    its paired bootstrap CI. A positive gap means each reference is kinder to its own model.
    None when the run had one reference (no `reference_models`)."""
    names = [m for m in models if "by_reference" in models[m]]
    if not names:
        return None
    refs = list(models[names[0]]["by_reference"])
    own = {m: next((r for r in refs if same_model(m, r)), None) for m in names}
    cells = {m: {r: stats.describe(models[m]["by_reference"][r]["rewards"], n_boot)
                 | {"own": own[m] == r} for r in refs} for m in names}
    critics = {r: models[names[0]]["by_reference"][r]["critic"] for r in refs}
    differences, self_preference = [], []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ka, kb = pair_keys(models[a]["samples"]), pair_keys(models[b]["samples"])
            for r in refs:
                differences.append({"reference": r, "a": a, "b": b, "td_reward": paired_difference(
                    models[a]["by_reference"][r]["rewards"], ka,
                    models[b]["by_reference"][r]["rewards"], kb, n_boot)})
            if own[a] is None or own[b] is None or own[a] == own[b]:
                continue
            entry = {"a": a, "b": b, "reference_a": own[a], "reference_b": own[b]}
            partners, reason = _partners(models[a], models[b])
            if partners is None:
                self_preference.append(entry | {"diff": None, "ci95": [None, None],
                                                "n_pairs": 0, "unpaired_reason": reason})
                continue
            # b - a under a's reference, then under b's: the gap is their paired difference.
            gap = stats.compare_paired(_b_minus_a(models[a], models[b], partners, own[a]),
                                       _b_minus_a(models[a], models[b], partners, own[b]),
                                       n_boot)
            self_preference.append(entry | {k: gap[k] for k in ("diff", "ci95", "n_pairs")})
    return {"references": refs, "models": names, "critics": critics, "cells": cells,
            "differences": differences, "self_preference": self_preference}


def same_model(model: str, reference: str) -> bool:
    """Whether generating `model` and scoring with `reference` use the same weights (an
    embedded model on llama.cpp and the same one dequantised in transformers)."""
    from tdreward.evaluation.selfscore import scoring_spec

    return scoring_spec(model) == scoring_spec(reference)


def comparisons(models: dict[str, dict], n_boot: int = stats.N_BOOT) -> list[dict]:
    """Each model against the first: differences of mean TD reward and of lengths, paired by
    prompt and seed (the models answered the same samples; see paired_difference)."""
    names = list(models)
    out = []
    for b in names[1:]:
        a = names[0]
        ma, mb = models[a], models[b]
        ka, kb = pair_keys(ma["samples"]), pair_keys(mb["samples"])
        out.append({
            "a": a, "b": b,
            "td_reward": paired_difference(ma["rewards"], ka, mb["rewards"], kb, n_boot),
            "words": paired_difference(ma["response_lengths"]["words"], ka,
                                       mb["response_lengths"]["words"], kb, n_boot),
            "tokens": paired_difference(ma["response_lengths"]["tokens"], ka,
                                        mb["response_lengths"]["tokens"], kb, n_boot),
        })
    return out


__all__ = ["comparisons", "pair_keys", "paired_difference", "reference_matrix", "same_model"]
