"""Self-scores: models that can score text (hub, directory, gguf, embedded, llamacpp) read a
shared corpus and are scored by their own predictions: perplexity, bits per byte (comparable
across tokenizers), mean immediate reward r and TD reward.

The TD reward needs a critic on the model's own hidden states: the trained critic is used when
the model is the reward model's reference LM, or has the same hidden and vocabulary sizes (a
fine-tune of it); other models get an untrained critic (V = rbar + the reward centre: the
learning-free part of the value), and the result says so.
"""

from __future__ import annotations

import logging
import math

from tdreward.errors import TDRewardError
from tdreward.reward_model import TDRewardModel
from tdreward.specs import parse_spec

log = logging.getLogger("tdreward")

WINDOW = 256  # tokens per scored window


def corpus_text(corpus: str, config: str | None, split: str, max_chars: int) -> str:
    """The corpus's documents joined, cut at a whitespace to at most `max_chars` characters."""
    from tdreward.data.corpus import load_corpus

    return join_documents(load_corpus(corpus, config, split=split), max_chars)


def join_documents(docs: list[str], max_chars: int) -> str:
    text = "\n\n".join(d.strip() for d in docs)
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars)
        text = text[: cut if cut > max_chars // 2 else max_chars]
    return text


def scoring_spec(model: str) -> str | None:
    """The transformers spec that scores `model`, or None for servers."""
    spec = parse_spec(model)
    if spec.kind in ("ollama", "openai"):
        return None
    if spec.kind == "llamacpp":
        return spec.target if spec.target.startswith("embedded:") else f"gguf:{spec.target}"
    return spec.raw


def reward_model_for(spec: str, rm: TDRewardModel, reward_model_path: str | None
                     ) -> TDRewardModel:
    if spec == rm.base_model:
        return rm
    from tdreward.backends.hf import load_model

    lm, tok = load_model(spec, hardware=rm.placement)  # where and as the reference LM runs
    head = lm.get_output_embeddings()
    same_shape = (rm.trained and reward_model_path
                  and lm.config.hidden_size == rm.critic.hidden_size
                  and head is not None and head.weight.shape[0] == rm.critic.vocab_size)
    if same_shape:
        return TDRewardModel.from_pretrained(reward_model_path, base_model=spec, lm=lm,
                                             tokenizer=tok)
    return TDRewardModel.from_lm(lm, tok, spec, rm.config)


def self_score(rm: TDRewardModel, text: str, batch_size: int = 8) -> dict:
    """Token-weighted scores of `text` under `rm`'s own LM, in windows of WINDOW tokens."""
    ids = rm.tokenizer(text, add_special_tokens=True)["input_ids"]
    rows = [ids[a : a + WINDOW] for a in range(0, len(ids), WINDOW)]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise TDRewardError("the self-score corpus has fewer than 2 tokens")
    scores = rm.score(rows, batch_size=batch_size, progress=True)
    n = sum(len(s.logp) for s in scores)
    nll = -sum(sum(s.logp) for s in scores)
    n_bytes = sum(len(rm.tokenizer.decode(r[1:]).encode("utf-8")) for r in rows)
    return {
        "n_tokens": n,
        "n_bytes": n_bytes,
        "perplexity": math.exp(nll / n),
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "mean_r": sum(sum(s.r) for s in scores) / n,
        "td_reward": sum(sum(s.delta) for s in scores) / n,
        "negative_token_share": sum(sum(d < 0 for d in s.delta) for s in scores) / n,
        "critic": "trained" if rm.trained else "untrained",
    }


def self_score_models(models: list[str], rm: TDRewardModel, corpus: str, config: str | None,
                      split: str, max_chars: int, reward_model_path: str | None,
                      batch_size: int = 8) -> dict:
    """{"corpus", "n_chars", "models": {model: scores or {"skipped": why}}}."""
    text = corpus_text(corpus, config, split, max_chars)
    out: dict = {"corpus": corpus, "config": config, "n_chars": len(text), "window": WINDOW,
                 "models": {}}
    for model in models:
        spec = scoring_spec(model)
        if spec is None:
            out["models"][model] = {"skipped": "servers do not return log-probs of a given text"}
            continue
        log.info("self-scoring %s on %d characters of %s", model, len(text), corpus)
        model_rm = reward_model_for(spec, rm, reward_model_path)
        out["models"][model] = self_score(model_rm, text, batch_size)
        if model_rm is not rm:
            del model_rm  # free the model before loading the next one
    return out


__all__ = ["corpus_text", "join_documents", "reward_model_for", "scoring_spec", "self_score", "self_score_models"]
