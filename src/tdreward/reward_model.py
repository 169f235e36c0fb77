"""TDRewardModel: a reference LM plus a TD critic; scores text with a per-token TD trace.

This sits above the pure-torch reward core and the backends: it loads the LM by spec, owns
tokenisation and batching, and saves/loads the critic (safetensors + config.json, no pickle).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tdreward import __version__
from tdreward.errors import TDRewardError
from tdreward.reward.config import RewardConfig
from tdreward.reward.critic import LMFeatures, TDCritic
from tdreward.reward.lm import context_length, extract_features
from tdreward.reward.td import discounted_return

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "critic.safetensors"
FORMAT = "tdreward-critic"


@dataclass
class TextScore:
    """The TD trace of one text. Lists run over the predicted tokens (2nd to last)."""

    token_ids: list[int]
    tokens: list[str]
    logp: list[float]
    c: list[float]
    H: list[float]
    r: list[float]
    V: list[float]
    delta: list[float]
    belief: list[list[float]]
    state_names: list[str]
    summary: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        keys = ("token", "logp", "c", "H", "r", "V", "delta", "belief")
        rows = zip(self.tokens, self.logp, self.c, self.H, self.r, self.V, self.delta, self.belief)
        return {
            "summary": self.summary,
            "state_names": self.state_names,
            "tokens": [dict(zip(keys, row)) for row in rows],
        }


class TDRewardModel:
    """Reference LM + base rate p0 + belief-state model + value function (DESIGN §2)."""

    def __init__(self, lm, tokenizer, critic: TDCritic, base_model: str, trained: bool = False):
        self.lm = lm
        self.tokenizer = tokenizer
        self.critic = critic
        self.base_model = base_model
        self.trained = trained
        self.training_info: dict = {}

    @property
    def config(self) -> RewardConfig:
        return self.critic.config

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_lm(cls, lm, tokenizer, base_model: str, config: RewardConfig | None = None):
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        vocab = head.weight.shape[0] if head is not None else lm.config.vocab_size
        critic = TDCritic(config or RewardConfig(), lm.config.hidden_size, vocab)
        critic.eval()
        return cls(lm, tokenizer, critic, base_model, trained=False)

    @classmethod
    def from_base(cls, spec: str, config: RewardConfig | None = None, verbose: bool = False):
        """An untrained critic on the reference LM named by `spec`."""
        from tdreward.backends.hf import load_model

        lm, tok = load_model(spec, verbose=verbose)
        return cls.from_lm(lm, tok, spec, config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base_model: str | None = None, lm=None,
                        tokenizer=None, verbose: bool = False) -> TDRewardModel:
        """Load a saved reward model; `base_model` overrides the stored reference spec and
        (lm, tokenizer) reuse an already loaded reference model."""
        path = Path(path)
        meta = read_critic_config(path)
        cfg = RewardConfig.from_dict(meta["reward_config"])
        spec = base_model or meta["base_model"]
        if lm is None:
            from tdreward.backends.hf import load_model

            lm, tokenizer = load_model(spec, verbose=verbose)
        critic = TDCritic(cfg, meta["hidden_size"], meta["vocab_size"])
        if lm.config.hidden_size != critic.hidden_size:
            raise TDRewardError(
                f"reward model {path} was trained on hidden size {critic.hidden_size}, "
                f"but {spec} has {lm.config.hidden_size}: pass the matching --base_model"
            )
        state = load_file(str(path / WEIGHTS_NAME))
        # Critics saved before the slow context existed lack its (identity) standardisation.
        for name in ("context_mean", "context_std"):
            state.setdefault(name, getattr(critic, name))
        critic.load_state_dict(state)
        critic.eval()
        model = cls(lm, tokenizer, critic, spec, trained=bool(meta.get("trained")))
        model.training_info = meta.get("training", {})
        return model

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write critic.safetensors + config.json into `path`, each file atomically (temporary
        file, then rename; the config last, so a reader never sees new config + old weights)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.critic.state_dict().items()}
        meta = {
            "format": FORMAT,
            "tdreward_version": __version__,
            "base_model": self.base_model,
            "hidden_size": self.critic.hidden_size,
            "vocab_size": self.critic.vocab_size,
            "state_names": self.critic.state_names,
            "trained": self.trained,
            "training": self.training_info,
            "reward_config": self.config.to_dict(),
        }
        tmp = path / f".{WEIGHTS_NAME}.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, path / WEIGHTS_NAME)
        tmp = path / f".{CONFIG_NAME}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, path / CONFIG_NAME)

    # ----------------------------------------------------------------- scoring
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token rows into (input_ids, attention_mask)."""
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def features(self, input_ids, attention_mask, done=None, max_length=None, stride=None):
        """LMFeatures of a batch: one forward pass of the reference LM (no gradient)."""
        with torch.no_grad():
            return extract_features(
                self.lm, input_ids, attention_mask, done, max_length, stride,
                self.config.logit_tile_elems,
            )

    def terminal_states(self, input_ids, attention_mask, terminal_at_end: bool = False):
        """done [B, T]: states after an EOS token, and each row's last state when
        `terminal_at_end`. Otherwise a text's end is treated as a cut and bootstraps from V:
        a text handed to us is rarely known to be the real end of its document."""
        done = torch.zeros_like(input_ids, dtype=torch.bool)
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            done |= (input_ids == eos) & attention_mask.bool()
        if terminal_at_end:
            last = (attention_mask.sum(1) - 1).clamp(min=0)
            done[torch.arange(len(last)), last] = True
        return done

    def score_batch(self, input_ids, attention_mask, done=None, max_length=None, stride=None,
                    terminal_at_end: bool = False):
        """All per-token tensors for a padded batch: logp, c, H, r, values, states, delta."""
        if done is None:
            done = self.terminal_states(input_ids, attention_mask, terminal_at_end)
        feats = self.features(input_ids, attention_mask, done, max_length, stride)
        with torch.no_grad():
            out = self.critic(feats)
        out.update(logp=feats.logp, H=feats.entropy, mask=feats.reward_mask, feats=feats)
        return out

    def score(self, texts: str | Sequence[str] | Sequence[Sequence[int]], batch_size: int = 8,
              max_length: int | None = None, stride: int | None = None,
              progress: bool = False, terminal_at_end: bool = False) -> list[TextScore]:
        """Score texts (or token-id rows): per-token trace + summary for each."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [list(map(int, t)) for t in texts] if texts and not isinstance(
            texts[0], str) else self.encode(texts)
        for i, r in enumerate(rows):
            if len(r) < 2:
                raise TDRewardError(f"text {i} has {len(r)} token(s): at least 2 are needed")
        window = max_length or context_length(self.lm)
        # Long rows are windowed one at a time; short ones share padded batches.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        batches, cur = [], []
        for i in order:
            if len(rows[i]) > window:
                batches.append([i])
                continue
            cur.append(i)
            if len(cur) == batch_size:
                batches.append(cur)
                cur = []
        if cur:
            batches.append(cur)
        results: list[TextScore | None] = [None] * len(rows)
        it = batches
        if progress and len(batches) > 1:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="scoring", unit="batch")
        for batch in it:
            ids, mask = self.pad([rows[i] for i in batch])
            out = self.score_batch(ids, mask, max_length=window, stride=stride,
                                   terminal_at_end=terminal_at_end)
            for j, i in enumerate(batch):
                results[i] = self._text_score(out, j, rows[i])
        return results

    def _text_score(self, out: dict, j: int, row: list[int]) -> TextScore:
        n = len(row) - 1
        cut = lambda x: x[j, :n].tolist()  # noqa: E731
        logp = out["logp"][j, :n]
        delta = out["delta"][j, :n]
        r = out["r"][j, :n]
        summary = {
            "td_reward": float(delta.mean()),
            "mean_r": float(r.mean()),
            "return": float(discounted_return(r[None], torch.ones_like(r[None]),
                                              self.config.gamma)[0]),
            "perplexity": float(math.exp(-float(logp.mean()))),
            "n_tokens": n,
        }
        return TextScore(
            token_ids=row,
            tokens=[self.tokenizer.decode([t]) for t in row[1:]],
            logp=logp.tolist(), c=cut(out["c"]), H=out["H"][j, :n].tolist(), r=r.tolist(),
            V=out["values"][j, :n].tolist(), delta=delta.tolist(),
            belief=out["states"][j, :n].tolist(), state_names=self.critic.state_names,
            summary=summary,
        )

    def compute_td_reward(self, context: str, prediction: str) -> float:
        """The TD reward (mean delta) of `prediction` as a continuation of `context`.

        Only the positions that predict the prediction's tokens count, so the value depends
        on what was predicted, not just on the context.
        """
        ctx = self.encode([context])[0]
        full = self.encode([context + prediction])[0]
        # Tokenisation may merge across the boundary: the prediction starts at the first
        # token where the two encodings differ.
        k = 0
        while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
            k += 1
        if len(full) <= max(k, 1):
            raise TDRewardError("the prediction adds no tokens to the context")
        out = self.score_batch(*self.pad([full]))
        start = max(k - 1, 0)  # position k-1 predicts token k, the first of the prediction
        return float(out["delta"][0, start : len(full) - 1].mean())


def read_critic_config(path: Path) -> dict:
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file() or not (Path(path) / WEIGHTS_NAME).is_file():
        raise TDRewardError(
            f"{path} is not a tdreward reward model (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "create one with `tdreward train-critic`"
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise TDRewardError(f"{cfg_path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise TDRewardError(f"{cfg_path} is not a tdreward reward model config")
    return meta


__all__ = ["TDRewardModel", "TextScore", "LMFeatures", "read_critic_config"]
