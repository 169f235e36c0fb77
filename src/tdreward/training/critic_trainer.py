"""`tdreward train-critic`: learn the belief filter and value function by TD(lambda).

One readable file, every hyperparameter in one dataclass (in the spirit of CleanRL).

1. The corpus is tokenised and cut into windows; p0 is its unigram base rate.
2. The frozen reference LM reads every window once; final hidden states (fp16), log p and
   entropy are cached on disk, so head training never reruns the LM.
3. The heads learn by TD(lambda): targets G^lambda from the current critic (stop-gradient),
   loss mean (G^lambda - V)^2 in the critic's normalised units; a validation split of whole
   documents, early stopping on its TD error, a checkpoint every epoch (resumable).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tdreward.errors import TDRewardError, first_line
from tdreward.io import atomic_path, write_json
from tdreward.reward.belief import observation_features
from tdreward.reward.config import RewardConfig
from tdreward.reward.critic import LMFeatures
from tdreward.reward.td import lambda_returns, td_errors
from tdreward.reward.terms import immediate_reward
from tdreward.reward_model import TDRewardModel
from tdreward.training.critic_config import CriticTrainingConfig
from tdreward.training.critic_features import build_feature_cache, feature_cache_key

log = logging.getLogger("tdreward")


# --------------------------------------------------------------------------- data + LM cache
def terminal_states(rm: TDRewardModel, data: dict, doc_end_terminal: bool) -> torch.Tensor:
    """done: EOS tokens always; the cached document ends only when asked."""
    done = data["done"] & doc_end_terminal
    if rm.tokenizer.eos_token_id is not None:
        done = done | ((data["input_ids"] == rm.tokenizer.eos_token_id) & data["mask"].bool())
    return done


def window_features(data: dict[str, torch.Tensor], idx: torch.Tensor) -> LMFeatures:
    """The cached LM features of windows `idx` (hidden states back to float32)."""
    return LMFeatures(data["input_ids"][idx], data["mask"][idx], data["hidden"][idx].float(),
                      data["logp"][idx], data["entropy"][idx], data["done"][idx])


def split_documents(data: dict[str, torch.Tensor], val_fraction: float, seed: int):
    """Hold out whole documents (never windows of a document seen in training)."""
    docs = sorted(set(data["doc"].tolist()))
    random.Random(seed).shuffle(docs)
    n_val = max(1, round(len(docs) * val_fraction)) if len(docs) > 1 else 0
    val_docs = set(docs[:n_val])
    is_val = torch.tensor([d in val_docs for d in data["doc"].tolist()])
    if n_val == 0:  # one document: hold out its last windows instead
        is_val = torch.zeros(len(is_val), dtype=torch.bool)
        is_val[-max(1, round(len(is_val) * val_fraction)) :] = True
    train, val = torch.nonzero(~is_val).squeeze(1), torch.nonzero(is_val).squeeze(1)
    if len(train) == 0:
        raise TDRewardError("the corpus is too small to keep a validation split")
    return train, val


# --------------------------------------------------------------------------- TD(lambda)
def _step_tensors(rm: TDRewardModel, feats: LMFeatures):
    """(r masked to the valid rewards, V of every state, the reward mask)."""
    critic, cfg = rm.critic, rm.config
    c = critic.association(feats)
    r = immediate_reward(feats.logp, c, feats.entropy[:, :-1], cfg.alpha, cfg.beta)
    values, _ = critic.values(feats, c)
    rmask = feats.reward_mask.to(r.dtype)
    return r * rmask, values, rmask


@torch.no_grad()
def evaluate(rm: TDRewardModel, data: dict, idx: torch.Tensor, batch_size: int) -> dict:
    """Mean squared TD error and explained variance of the lambda-returns on `idx`."""
    sq, n, g_all, err_all = 0.0, 0, [], []
    for a in range(0, len(idx), batch_size):
        feats = window_features(data, idx[a : a + batch_size])
        r, values, rmask = _step_tensors(rm, feats)
        G = lambda_returns(r, values, feats.done, rmask, rm.config.gamma, rm.config.td_lambda)
        delta = td_errors(r, values, feats.done, rm.config.gamma) * rmask
        sq += float((delta**2).sum())
        n += int(rmask.sum())
        m = rmask.bool()
        g_all.append(G[m])
        err_all.append((G - values[:, :-1])[m])
    g, e = torch.cat(g_all), torch.cat(err_all)
    return {"td_mse": sq / max(n, 1), "explained_variance": float(1 - e.var() / g.var()),
            "n_tokens": n}


def _init_value_scale(rm: TDRewardModel, data: dict, idx: torch.Tensor) -> None:
    """V = offset + scale * head: start the offset at the value of an average stream of rewards
    and the scale at the spread of one reward, so the head learns in units near 1."""
    with torch.no_grad():
        feats = window_features(data, idx[:256])
        r, _, rmask = _step_tensors(rm, feats)
        mean_r = float(r.sum() / rmask.sum())
        if rm.config.context_timescales:
            critic = rm.critic
            scalars = observation_features(feats.logp, critic.association(feats), feats.entropy)
            ctx = critic.context(scalars, feats.mask)[feats.mask.bool()]
            critic.context_mean.copy_(ctx.mean(0))
            critic.context_std.copy_(ctx.std(0).clamp_min(1e-4))
        std_r = float(((r - mean_r) ** 2 * rmask).sum() / rmask.sum()) ** 0.5
    g = rm.config.gamma
    rm.critic.value_offset.fill_(mean_r / (1 - g) if g < 1 else 0.0)
    rm.critic.value_scale.fill_(max(std_r, 1e-3))


# --------------------------------------------------------------------------- checkpoints
# The reward settings train-critic had before RewardConfig was nested whole.
_FORMER_REWARD_SETTINGS = ("alpha", "beta", "gamma", "td_lambda", "state", "context_timescales",
                           "value_uses_hidden")


def _resume_settings(cfg: CriticTrainingConfig) -> dict:
    """A checkpoint resumes only a run with these settings (epochs may grow). Flat, as they
    were before the reward settings were nested: the other reward settings count only where
    they differ from their defaults, so that a checkpoint written then still resumes."""
    d = dataclasses.asdict(cfg)
    reward, default = d.pop("reward"), RewardConfig().to_dict()
    d |= {k: v for k, v in reward.items() if k in _FORMER_REWARD_SETTINGS or v != default[k]}
    # Memory and speed only: the same run either way.
    for k in ("epochs", "patience", "output_dir", "lm_batch_size", "logit_tile_elems"):
        d.pop(k, None)
    return d


def _save_checkpoint(path: Path, settings: dict, rm, opt, epoch: int, best: dict,
                     history: list) -> None:
    """checkpoint.safetensors holds the tensors and, in its header, the state that goes with
    them: one atomic file, so a kill never pairs one epoch's weights with another epoch's
    counters. checkpoint.json is its readable copy, written after it."""
    tensors = {f"critic.{k}": v.detach().contiguous() for k, v in rm.critic.state_dict().items()}
    tensors |= {f"best.{k}": v.contiguous() for k, v in best["state"].items()}
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).contiguous()
    meta = {"settings": settings, "epoch": epoch, "best_epoch": best["epoch"], "best_val": best["val"],
            "bad_epochs": best["bad"], "history": history,
            "param_groups": opt_state["param_groups"]}
    meta = json.loads(json.dumps(meta))
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "checkpoint.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"checkpoint": json.dumps(meta)})
    write_json(path / "checkpoint.json", meta)


def _checkpoint_meta(path: Path) -> dict | None:
    """The state saved with the checkpoint in `path`; None when there is none or it is damaged
    (a checkpoint only saves time: a damaged one means starting over, with a warning)."""
    tensors = path / "checkpoint.safetensors"
    if not tensors.is_file():
        return None
    try:
        with safe_open(str(tensors), framework="pt") as f:
            text = (f.metadata() or {}).get("checkpoint")
        if text is None:  # written before the state moved into the tensor file
            return json.loads((path / "checkpoint.json").read_text())
        return json.loads(text)
    except (SafetensorError, OSError, ValueError) as e:
        first = first_line(e)
        log.warning("the checkpoint in %s is damaged (%s): starting over", path, first)
        return None


def _load_checkpoint(path: Path, meta: dict, rm, opt) -> tuple[int, dict, list]:
    t = load_file(str(path / "checkpoint.safetensors"))
    rm.critic.load_state_dict({k[7:]: v for k, v in t.items() if k.startswith("critic.")})
    state: dict = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    best = {"epoch": meta["best_epoch"], "val": meta["best_val"], "bad": meta["bad_epochs"],
            "state": {k[5:]: v for k, v in t.items() if k.startswith("best.")}}
    return meta["epoch"], best, meta["history"]


# --------------------------------------------------------------------------- main loop
def train_critic(cfg: CriticTrainingConfig, rm: TDRewardModel | None = None,
                 docs: list[str] | None = None, progress: bool = True) -> dict:
    """Train and save a critic; returns the metrics written to metrics.json."""
    from tdreward.data.corpus import load_corpus

    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    reward_cfg = cfg.reward
    if docs is None:  # read (and check) the corpus before the model loads
        docs = load_corpus(cfg.dataset, cfg.dataset_config, split=cfg.split)
    if rm is None:
        rm = TDRewardModel.from_base(cfg.base_model, reward_cfg)
    else:
        rm = TDRewardModel.from_lm(rm.lm, rm.tokenizer, cfg.base_model, reward_cfg)
    features_key = feature_cache_key(cfg, rm, docs)
    data = build_feature_cache(cfg, rm, docs, out / "cache", features_key)
    data["done"] = terminal_states(rm, data, cfg.doc_end_terminal)
    counts = torch.bincount(data["input_ids"][data["mask"].bool()],
                            minlength=rm.critic.vocab_size)[: rm.critic.vocab_size]
    rm.critic.set_base_rate(counts)
    train_idx, val_idx = split_documents(data, cfg.val_fraction, cfg.seed)
    _init_value_scale(rm, data, train_idx)
    untrained = evaluate(_untrained_copy(rm), data, val_idx if len(val_idx) else train_idx,
                         cfg.batch_size)
    opt = torch.optim.AdamW([p for p in rm.critic.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    ckpt = out / "checkpoint"
    start_epoch, history = 0, []
    best = {"epoch": 0, "val": float("inf"), "bad": 0,
            "state": {k: v.clone() for k, v in rm.critic.state_dict().items()}}
    # Features of another corpus or model make another run, whatever the flags say.
    settings = json.loads(json.dumps(_resume_settings(cfg) | {"features": features_key}))
    saved = _checkpoint_meta(ckpt)
    if saved is not None:
        if saved.get("settings") == settings:
            start_epoch, best, history = _load_checkpoint(ckpt, saved, rm, opt)
            log.info("resuming after epoch %d from %s", start_epoch, ckpt)
        else:
            log.warning("%s holds a checkpoint of other settings or data: starting over", ckpt)
    from tqdm.auto import tqdm

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if best["bad"] >= cfg.patience:
            break
        rm.critic.train()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # resumable shuffling
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not progress, leave=False)
        loss_sum, n_batches = 0.0, 0
        for a in bar:
            feats = window_features(data, order[a : a + cfg.batch_size])
            r, values, rmask = _step_tensors(rm, feats)
            loss = rm.critic.td_lambda_loss(values, r, feats.done, rmask, rm.config.gamma,
                                            rm.config.td_lambda)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rm.critic.parameters(), 1.0)
            opt.step()
            loss_sum += float(loss.detach())
            n_batches += 1
            with torch.no_grad():
                d = td_errors(r, values, feats.done, rm.config.gamma) * rmask
                bar.set_postfix(td_mse=f"{float((d**2).sum() / rmask.sum()):.3f}")
        rm.critic.eval()
        tr = evaluate(rm, data, train_idx, cfg.batch_size)
        va = evaluate(rm, data, val_idx, cfg.batch_size) if len(val_idx) else tr
        history.append({"epoch": epoch, "loss": loss_sum / max(n_batches, 1),
                        "train_td_mse": tr["td_mse"], "val_td_mse": va["td_mse"],
                        "train_explained_variance": tr["explained_variance"],
                        "val_explained_variance": va["explained_variance"]})
        log.info("epoch %d: train TD mse %.3f, val TD mse %.3f, val EV %.3f", epoch,
                 tr["td_mse"], va["td_mse"], va["explained_variance"])
        if va["td_mse"] < best["val"] - 1e-6:
            best = {"epoch": epoch, "val": va["td_mse"], "bad": 0,
                    "state": {k: v.detach().clone() for k, v in rm.critic.state_dict().items()}}
        else:
            best["bad"] += 1
        _save_checkpoint(ckpt, settings, rm, opt, epoch, best, history)
    rm.critic.load_state_dict(best["state"])
    final = evaluate(rm, data, val_idx, cfg.batch_size) if len(val_idx) else {}
    metrics = {
        "config": dataclasses.asdict(cfg),
        "n_windows": {"train": len(train_idx), "validation": len(val_idx)},
        "untrained_validation": untrained,
        "best_epoch": best["epoch"],
        "validation": final,
        "td_mse_ratio_vs_untrained": final.get("td_mse", math.nan) / untrained["td_mse"],
        "epochs": history,
    }
    rm.trained = True
    rm.training_info = {k: metrics[k] for k in ("best_epoch", "validation", "n_windows")} | {
        "dataset": cfg.dataset, "max_tokens": cfg.max_tokens}
    rm.save_pretrained(out)
    write_json(out / "metrics.json", metrics)
    plot_learning_curve(out / "learning_curve.png", history, untrained)
    return metrics


def _untrained_copy(rm: TDRewardModel) -> TDRewardModel:
    """The same reward with an untrained critic (V = 0): the baseline the trained one must beat."""
    fresh = TDRewardModel.from_lm(rm.lm, rm.tokenizer, rm.base_model, rm.config)
    fresh.critic.log_p0.copy_(rm.critic.log_p0)
    return fresh


def plot_learning_curve(path: Path, history: list[dict], untrained: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_td_mse"] for h in history], label="train")
    a.plot(ep, [h["val_td_mse"] for h in history], label="validation")
    a.axhline(untrained["td_mse"], color="grey", ls="--", label="untrained critic")
    a.set(xlabel="epoch", ylabel="mean squared TD error", yscale="log")
    a.legend()
    b.plot(ep, [h["train_explained_variance"] for h in history], label="train")
    b.plot(ep, [h["val_explained_variance"] for h in history], label="validation")
    b.set(xlabel="epoch", ylabel="explained variance of G^lambda")
    b.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


__all__ = ["CriticTrainingConfig", "build_feature_cache", "evaluate", "split_documents",
           "terminal_states", "train_critic", "window_features"]
