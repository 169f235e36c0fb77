"""TDRewardModel: a reference LM plus a TD critic; scores text with a per-token TD trace.

This sits above the pure-torch reward core and the backends: it loads the LM by spec, owns
tokenisation and batching, and saves/loads the critic (safetensors + config.json, no pickle).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tdreward.critic_files import (
    CONFIG_METADATA_KEY,
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    check_critic_fits,
    read_critic_config,
)
from tdreward.errors import TDRewardError, first_line
from tdreward.hardware import HardwareSettings, Placement, as_placement
from tdreward.hub import MODEL_TYPE, PushToHubMixin, resolve_critic_dir, save_card
from tdreward.io import atomic_path, write_json
from tdreward.reward.config import RewardConfig
from tdreward.reward.critic import LMFeatures, TDCritic
from tdreward.reward.lm import context_length, extract_features, unwrap
from tdreward.reward.td import discounted_return
from tdreward.reward_settings import RewardSettings
from tdreward.version import __version__

log = logging.getLogger("tdreward")


@dataclass
class TextScore:
    """The TD trace of one text. Lists run over the predicted tokens (2nd to last)."""

    token_ids: list[int]
    tokens: list[str]
    logp: list[float]
    c: list[float]
    H: list[float]
    r: list[float]
    rbar: list[float]
    V: list[float]
    delta: list[float]
    belief: list[list[float]]
    state_names: list[str]
    summary: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        keys = ("token", "logp", "c", "H", "r", "rbar", "V", "delta", "belief")
        rows = zip(self.tokens, self.logp, self.c, self.H, self.r, self.rbar, self.V, self.delta,
                   self.belief)
        return {
            "summary": self.summary,
            "state_names": self.state_names,
            "tokens": [dict(zip(keys, row)) for row in rows],
        }


class TDRewardModel(PushToHubMixin):  # push_to_hub(repo): tdreward.hub
    """Reference LM + base rate p0 + belief-state model + value function (docs/design.md §2)."""

    def __init__(self, lm, tokenizer, critic: TDCritic, base_model: str, trained: bool = False):
        self.lm = lm
        self.tokenizer = tokenizer
        self.critic = critic.to(self.device)  # small; it reads the LM's outputs where they are
        self.base_model = base_model
        self.trained = trained
        self.training_info: dict = {}
        # How the LM was loaded (None: handed in): other models of the same job load likewise.
        self.placement: Placement | None = None

    @property
    def device(self) -> torch.device:
        """Where the LM takes its inputs (a model spread over devices starts there): ids,
        masks and the critic go there. A trainer that moves the LM moves the critic too."""
        get = getattr(unwrap(self.lm), "get_input_embeddings", None)
        emb = get() if get is not None else None
        return emb.weight.device if emb is not None else next(self.lm.parameters()).device

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
    def from_base(cls, spec: str, config: RewardConfig | None = None, verbose: bool = False,
                  hardware: HardwareSettings | Placement | None = None) -> TDRewardModel:
        """An untrained critic on the reference LM named by `spec`, loaded as `hardware`
        says (None: float32 on the CPU)."""
        from tdreward.backends.hf import load_model

        place = as_placement(hardware)
        lm, tok = load_model(spec, verbose=verbose, hardware=place)
        model = cls.from_lm(lm, tok, spec, config)
        model.placement = place
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base_model: str | None = None, lm=None,
                        tokenizer=None, verbose: bool = False,
                        model_flag: str = "--base_model",
                        hardware: HardwareSettings | Placement | None = None) -> TDRewardModel:
        """Load a saved reward model; `base_model` overrides the stored reference spec and
        (lm, tokenizer) reuse an already loaded reference model; otherwise the reference
        loads as `hardware` says (None: float32 on the CPU). `model_flag` is the flag that
        named `base_model`, for error messages."""
        path = resolve_critic_dir(path)  # a hub id: its files in the HF cache
        meta = read_critic_config(path)
        if "value_form" not in meta.get("reward_config", {}):
            log.warning(OLD_LAYOUT_NOTE, path)
        try:
            cfg = RewardConfig.from_dict(meta["reward_config"])
        except (TypeError, ValueError, AttributeError) as e:
            raise TDRewardError(f"{path / CONFIG_NAME} has an unusable reward_config "
                                f"({first_line(e)}); the critic is damaged") from e
        spec = base_model or meta["base_model"]
        place = None
        if lm is None:
            check_critic_fits(path, spec, model_flag)
            from tdreward.backends.hf import load_model

            place = as_placement(hardware)
            lm, tokenizer = load_model(spec, verbose=verbose, hardware=place)
        critic = TDCritic(cfg, meta["hidden_size"], meta["vocab_size"])
        if lm.config.hidden_size != critic.hidden_size:
            raise TDRewardError(
                f"reward model {path} was trained on hidden size {critic.hidden_size}, "
                f"but {spec} has {lm.config.hidden_size}: pass the matching {model_flag}"
            )
        weights = path / WEIGHTS_NAME
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise TDRewardError(f"{weights} is truncated or corrupt ({first_line(e)}); "
                                "copy or train the critic again") from e
        # Critics saved before the slow context existed lack its (identity) standardisation.
        for name in ("context_mean", "context_std"):
            state.setdefault(name, getattr(critic, name))
        try:
            critic.load_state_dict(state)
        except RuntimeError as e:  # missing, unexpected or mis-shaped tensors, one per line
            what = " ".join(line.strip() for line in str(e).splitlines()[1:]) or first_line(e)
            raise TDRewardError(f"{weights} does not hold the critic {path / CONFIG_NAME} "
                                f"describes ({what}); the critic is damaged") from e
        critic.eval()
        model = cls(lm, tokenizer, critic, spec, trained=bool(meta.get("trained")))
        model.training_info = meta.get("training", {})
        model.placement = place
        return model

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write critic.safetensors + config.json (+ a README.md model card) into `path`.

        The weights file carries the config in its header: a complete, self-describing critic
        written in one atomic step (a temporary file, then a rename); config.json and the card
        follow the same way. A save cut short between renames leaves new weights beside the
        previous config.json: `read_critic_config` uses the copy in the weights and rewrites
        config.json. (No folder rename: train-critic's folder also holds caches and metrics.)"""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.critic.state_dict().items()}
        meta = {
            "format": FORMAT, "model_type": MODEL_TYPE,
            "tdreward_version": __version__,
            "base_model": self.base_model,
            "hidden_size": self.critic.hidden_size,
            "vocab_size": self.critic.vocab_size,
            "state_names": self.critic.state_names,
            "trained": self.trained,
            "training": self.training_info,
            "reward_config": self.config.to_dict(),
        }
        meta = json.loads(json.dumps(meta))  # as it reads back (tuples become lists)
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={CONFIG_METADATA_KEY: json.dumps(meta)})
        write_json(path / CONFIG_NAME, meta)
        save_card(path, meta)  # README.md, unless the user wrote one there

    # ----------------------------------------------------------------- scoring
    @property
    def prefix_token_id(self) -> int | None:
        """The token every text is read after: BOS, else EOS (as lm-evaluation-harness does for
        rolling log-likelihoods). So the first token of a text is scored too, from a context
        that says only "a text starts here"."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, starting with the prefix token (the tokenizer's own BOS when
        it adds one, else `prefix_token_id` put in front)."""
        prefix = self.prefix_token_id
        rows = [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        if prefix is None:
            return rows
        return [r if r[:1] == [prefix] else [prefix, *r] for r in rows]

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token rows into (input_ids, attention_mask), on the LM's device."""
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
        # Built on the CPU and copied once: row-by-row writes to a GPU tensor cost a copy each.
        return ids.to(self.device), mask.to(self.device)

    def features(self, input_ids, attention_mask, done=None, max_length=None, stride=None):
        """LMFeatures of a batch: one forward pass of the reference LM (no gradient). The
        tensors may be anywhere: they are moved to the LM's device, where the features are."""
        cfg = self.config
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        done = None if done is None else done.to(device)
        with torch.no_grad():
            return extract_features(
                self.lm, input_ids, attention_mask, done, max_length, stride,
                cfg.logit_tile_elems, (self.critic.log_p0, cfg.tau, cfg.lam),
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
            done[torch.arange(len(last), device=last.device), last] = True
        return done

    def score_batch(self, input_ids, attention_mask, done=None, max_length=None, stride=None,
                    terminal_at_end: bool = False):
        """All per-token tensors for a padded batch: logp, c, H, r, rbar, values, states, delta
        (and the value's parts, tdreward.reward.critic.TDCritic.value_parts), float32 on the
        LM's device whatever its dtype."""
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
                raise TDRewardError(f"text {i + 1} has {len(r)} token(s) with the prefix token: "
                                    "at least 2 are needed (is it empty?)")
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
            # To the CPU once per batch (not one device sync per list built below).
            out = {k: v.cpu() for k, v in out.items() if isinstance(v, torch.Tensor)}
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
            "mean_rbar": float(out["rbar"][j, :n].mean()),
            "return": float(discounted_return(r[None], torch.ones_like(r[None]),
                                              self.config.gamma)[0]),
            "perplexity": float(math.exp(-float(logp.mean()))),
            "n_tokens": n,
        }
        return TextScore(
            token_ids=row,
            tokens=[self.tokenizer.decode([t]) for t in row[1:]],
            logp=logp.tolist(), c=cut(out["c"]), H=out["H"][j, :n].tolist(), r=r.tolist(),
            rbar=out["rbar"][j, :n].tolist(), V=out["values"][j, :n].tolist(),
            delta=delta.tolist(),
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


# --------------------------------------------------------------------------- the reward a command uses
UNTRAINED_WARNING = (
    "no --reward_model_path: the critic's learned head is untrained, so V is its learning-free "
    "part (the LM's expected reward rbar plus the reward centre) and delta is surprise "
    "relative to the LM's own expectation; `tdreward train-critic` trains the head."
)
OLD_LAYOUT_NOTE = (
    "%s was saved before V = rbar + gamma C (value_form 'absolute'): its V is the learned head "
    "alone and delta = r + gamma V' - V as it was; train it again for the exact expected reward "
    "in V"
)


def load_reward_model(spec: str, settings: RewardSettings, *, state: str | None = None,
                      lm=None, tokenizer=None, verbose: bool = False,
                      model_flag: str = "--base_model", warn_untrained: bool = True,
                      hardware: HardwareSettings | Placement | None = None) -> TDRewardModel:
    """The one way a command gets its reward model: the critic of `settings` on the reference
    LM `spec` (or on an already loaded `lm`), its reward weights overridden where given;
    without a critic, untrained heads (`state` picks their state model) and a warning.
    `hardware` says where and in what dtype the LM loads (None: float32 on the CPU)."""
    overrides = settings.overrides()
    place = as_placement(hardware)  # resolved once: `auto` means one thing for the whole run
    if settings.reward_model_path:
        if state is not None:
            raise TDRewardError("--state cannot change the state model of a trained critic")
        model = TDRewardModel.from_pretrained(settings.reward_model_path, base_model=spec,
                                              lm=lm, tokenizer=tokenizer, verbose=verbose,
                                              model_flag=model_flag, hardware=place)
        if overrides:
            model.critic.config = RewardConfig.from_dict(model.config.to_dict() | overrides)
    else:
        cfg = RewardConfig(**overrides, **({"state": state} if state is not None else {}))
        if lm is not None:
            model = TDRewardModel.from_lm(lm, tokenizer, spec, cfg)
        else:
            model = TDRewardModel.from_base(spec, cfg, verbose=verbose, hardware=place)
        if warn_untrained:  # once the model is there: a bad spec stays a one-line error
            log.warning(UNTRAINED_WARNING)
    if hardware is not None:  # also for a handed-in LM, loaded (the caller says) this way
        model.placement = place
    return model


__all__ = ["HardwareSettings", "LMFeatures", "RewardSettings", "TDRewardModel", "TextScore",
           "load_reward_model"]
