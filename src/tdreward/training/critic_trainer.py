"""`tdreward train-critic`: learn the critic's head W (and the belief filter) by TD(lambda).

One readable file, every hyperparameter in one dataclass (in the spirit of CleanRL).

1. The corpus is tokenised; p0 is its unigram base rate. The frozen reference LM reads every
   document whole, exactly as `score` reads a text (prefix token, window, stride); final
   hidden states (fp16), log p, entropy and E_p[c_t] are cached on disk, so head training
   never reruns the LM (tdreward.training.critic_features).
2. V_t = rbar_t + gamma (m_t / (1 - gamma) + W_t): rbar and the centre m are known, the head
   W learns by reward-centred TD(lambda) on whole documents (targets from the current critic,
   stop-gradient; no bootstrapping at cuts inside a document).
3. Held-out documents are measured every epoch with the well-posed diagnostics of
   tdreward.reward.metrics (mean delta^2 against the untrained critic, delta-R^2,
   corr(delta, H), EV_MC); early stopping keeps the epoch of the best held-out EV_MC, never
   the lowest mean delta^2 (a constant V minimises that). A checkpoint every epoch resumes.
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
from tdreward.hub import require_hub, upload_critic
from tdreward.io import atomic_path, json_safe, write_json
from tdreward.reward.belief import observation_features
from tdreward.reward.critic import LMFeatures
from tdreward.reward.metrics import MIN_TOKENS_LEFT, critic_diagnostics
from tdreward.reward_model import TDRewardModel
from tdreward.training.critic_config import CriticTrainingConfig
from tdreward.training.critic_features import build_feature_cache, feature_cache_key
from tdreward.training.tracking import Tracker

log = logging.getLogger("tdreward")

# Below this many training documents the learned head did not generalise in our measurements:
# on three long unseen articles every 20k-token critic (4 training documents) predicted the
# returns worse than the untrained default, while a 100k-token one (19) did not (README,
# "Critic training").
FEW_DOCUMENTS = 15
FEW_DOCUMENTS_WARNING = (
    "%d training documents (%d held out): a critic learned from this few did not generalise "
    "to unseen articles in our measurements (README, Critic training); the held-out "
    "diagnostics rest on little text. Prefer 100k tokens or more, many documents")

# What each epoch reports on the held-out documents, in this order.
DIAGNOSTICS = ("mean_delta_sq", "delta_r2", "corr_delta_H", "ev_mc", "mean_delta", "var_delta",
               "var_r_minus_rbar")


# --------------------------------------------------------------------------- documents
def doc_lengths(data: dict[str, torch.Tensor]) -> list[int]:
    return (data["offsets"][1:] - data["offsets"][:-1]).tolist()


def doc_features(data: dict[str, torch.Tensor], docs: list[int], eos_id: int | None,
                 doc_end_terminal: bool) -> LMFeatures:
    """The cached LM features of whole documents `docs`, right-padded into one batch.
    Terminal states: EOS tokens always; a document's end only when asked (by default it
    bootstraps, as the end of a text does in `score`)."""
    offs = data["offsets"].tolist()
    spans = [(offs[d], offs[d + 1]) for d in docs]
    B, T = len(docs), max(b - a for a, b in spans)
    D = data["hidden"].shape[1]
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    hidden = torch.zeros(B, T, D)
    logp, ent, ec = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T)
    done = torch.zeros(B, T, dtype=torch.bool)
    for i, (a, b) in enumerate(spans):
        n = b - a
        ids[i, :n], mask[i, :n] = data["input_ids"][a:b], 1
        hidden[i, :n] = data["hidden"][a:b].float()
        logp[i, :n], ent[i, :n], ec[i, :n] = (data["logp"][a:b], data["entropy"][a:b],
                                              data["expected_c"][a:b])
        done[i, n - 1] = doc_end_terminal
    if eos_id is not None:
        done |= (ids == eos_id) & mask.bool()
    return LMFeatures(ids, mask, hidden, logp[:, :-1] * mask[:, 1:], ent * mask, done, ec * mask)


def split_documents(lengths: list[int], val_fraction: float, seed: int,
                    min_tokens: int) -> tuple[list[int], list[int]]:
    """Hold out whole documents: first the one whose length is closest to `val_fraction` of
    the tokens among those long enough to measure (`min_tokens`), then more (in a seeded
    order) while the held-out share is under half the target. Never a document seen in
    training."""
    total = sum(lengths)
    target = val_fraction * total
    rng = random.Random(seed)
    docs = list(range(len(lengths)))
    rng.shuffle(docs)
    fit = [d for d in docs if lengths[d] >= min_tokens] or docs
    first = min(fit, key=lambda d: abs(lengths[d] - target))
    val = [first]
    for d in docs:
        if sum(lengths[v] for v in val) >= target / 2 or len(val) >= len(docs) - 1:
            break
        if d not in val and lengths[d] >= min_tokens:
            val.append(d)
    train = [d for d in range(len(lengths)) if d not in val]
    if not train:
        raise TDRewardError("the corpus is too small to keep a validation split")
    return train, sorted(val)


# --------------------------------------------------------------------------- measuring
def _docs_of(out: dict[str, torch.Tensor], feats: LMFeatures) -> list[dict[str, torch.Tensor]]:
    """Per-document 1-D tensors over the predicted tokens, as critic_diagnostics takes them."""
    rows = []
    for b in range(feats.mask.shape[0]):
        n = int(feats.mask[b].sum()) - 1
        rows.append({"r": out["r"][b, :n], "rbar": out["rbar"][b, :n],
                     "V": out["values"][b, :n], "delta": out["delta"][b, :n],
                     "H": feats.entropy[b, :n], "logp": feats.logp[b, :n], "c": out["c"][b, :n]})
    return rows


@torch.no_grad()
def evaluate(rm: TDRewardModel, data: dict, docs: list[int], cfg: CriticTrainingConfig) -> dict:
    """The held-out diagnostics of tdreward.reward.metrics on documents `docs`."""
    rows = []
    for a in range(0, len(docs), cfg.batch_size):
        feats = doc_features(data, docs[a : a + cfg.batch_size], rm.tokenizer.eos_token_id,
                             cfg.doc_end_terminal)
        rows += _docs_of(rm.critic(feats), feats)
    # Returns to a terminal end are exact at every position; to a cut, only far from it.
    min_left = 1 if cfg.doc_end_terminal else MIN_TOKENS_LEFT
    return critic_diagnostics(rows, rm.config.gamma, min_left=min_left)


def _init_scales(rm: TDRewardModel, data: dict, docs: list[int],
                 cfg: CriticTrainingConfig) -> None:
    """The head learns in units near 1. For the rbar form, W corrects the learning-free
    continuation m/(1-gamma), so its unit (value_scale) is the spread of what is left to
    correct: the std of G_t - V_t(untrained) on the training documents, G_t the discounted
    return to the document's end where it is nearly the full return (tens of nats: the spread
    of one reward, 3 nats, was too small a unit for the head to reach in a few hundred steps).
    The absolute form keeps its former scales: offset = mean(r)/(1-gamma), scale = std(r).
    The slow context is standardised on the training documents."""
    from tdreward.reward.metrics import discounted_returns_to_end

    critic, g = rm.critic, rm.config.gamma
    absolute = rm.config.value_form == "absolute"
    min_left = 1 if cfg.doc_end_terminal else MIN_TOKENS_LEFT
    rs, resid, ctxs = [], [], []
    with torch.no_grad():
        for a in range(0, min(len(docs), 32), 4):
            feats = doc_features(data, docs[a : a + 4], rm.tokenizer.eos_token_id,
                                 cfg.doc_end_terminal)
            c = critic.association(feats)
            if rm.config.context_timescales:
                scalars = observation_features(feats.logp, c, feats.entropy)
                ctxs.append(critic.context(scalars, feats.mask)[feats.mask.bool()])
            out = critic(feats, c)
            for b in range(feats.mask.shape[0]):
                n = int(feats.mask[b].sum()) - 1
                r = out["r"][b, :n]
                rs.append(r)
                keep = n - torch.arange(n) >= min_left
                G = discounted_returns_to_end(r, g).float()
                resid.append((G - out["values"][b, :n])[keep])
    if ctxs:
        ctx = torch.cat(ctxs)
        critic.context_mean.copy_(ctx.mean(0))
        critic.context_std.copy_(ctx.std(0).clamp_min(1e-4))
    r = torch.cat(rs)
    if absolute:
        critic.value_offset.fill_(float(r.mean()) / (1 - g) if g < 1 else 0.0)
        critic.value_scale.fill_(max(float(r.std()), 1e-3))
        return
    res = torch.cat(resid)
    scale = float(res.std()) if res.numel() > 1 else float(r.std())
    critic.value_offset.fill_(0.0)
    critic.value_scale.fill_(max(scale, float(r.std()), 1e-3))


# --------------------------------------------------------------------------- checkpoints
def _resume_settings(cfg: CriticTrainingConfig) -> dict:
    """A checkpoint resumes only a run with these settings (epochs may grow): all of them but
    those that change memory, speed or where the output goes."""
    d = dataclasses.asdict(cfg)
    for k in ("epochs", "patience", "output_dir", "lm_batch_size"):
        d.pop(k, None)
    d["reward"].pop("logit_tile_elems", None)
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
def _better(ev: float, best: float) -> bool:
    return not math.isnan(ev) and (math.isnan(best) or ev > best + 1e-6)


def train_critic(cfg: CriticTrainingConfig, rm: TDRewardModel | None = None,
                 docs: list[str] | None = None, progress: bool = True) -> dict:
    """Train and save a critic; returns the metrics written to metrics.json."""
    from tdreward.data.corpus import load_corpus

    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if cfg.push_to_hub:  # offline: one line now, not after the training
        require_hub(f"--push_to_hub {cfg.push_to_hub}")
    if docs is None:  # read (and check) the corpus before the model loads
        docs = load_corpus(cfg.dataset, cfg.dataset_config, split=cfg.split)
    if rm is None:
        rm = TDRewardModel.from_base(cfg.base_model, cfg.reward, hardware=cfg.hardware)
    else:
        rm = TDRewardModel.from_lm(rm.lm, rm.tokenizer, cfg.base_model, cfg.reward)
    features_key = feature_cache_key(cfg, rm, docs)
    data = build_feature_cache(cfg, rm, docs, out / "cache", features_key, progress=progress)
    # Only the LM pass wants the GPU: the small heads learn on the CPU, where the cached
    # features live (as they read back from disk).
    data = {k: v.cpu() for k, v in data.items()}
    rm.critic.cpu()
    if len(data["offsets"]) == 2:  # one document: its tail is held out as a second one
        n = int(data["offsets"][1])
        cut = max(1, min(n - 2, round(n * (1 - cfg.val_fraction))))
        data["offsets"] = torch.tensor([0, cut, n])
        log.info("one document: its last %d tokens are held out for validation", n - cut)
    lengths = doc_lengths(data)
    min_tokens = 2 if cfg.doc_end_terminal else MIN_TOKENS_LEFT + 64
    train_docs, val_docs = split_documents(lengths, cfg.val_fraction, cfg.seed, min_tokens)
    if len(train_docs) < FEW_DOCUMENTS:
        log.warning(FEW_DOCUMENTS_WARNING, len(train_docs), len(val_docs))
    _init_scales(rm, data, train_docs, cfg)
    untrained = evaluate(rm, data, val_docs, cfg)  # W = 0: the learning-free default
    opt = torch.optim.AdamW([p for p in rm.critic.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    ckpt = out / "checkpoint"
    start_epoch, history = 0, []
    best = {"epoch": 0, "val": untrained.get("ev_mc", math.nan), "bad": 0,
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

    eos = rm.tokenizer.eos_token_id
    tracker = Tracker(cfg.report_to, out, dataclasses.asdict(cfg))
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if best["bad"] >= cfg.patience:
            break
        rm.critic.train()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # resumable shuffling
        order = [train_docs[i] for i in torch.randperm(len(train_docs), generator=g).tolist()]
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not progress, leave=False)
        loss_sum, n_batches = 0.0, 0
        for a in bar:
            feats = doc_features(data, order[a : a + cfg.batch_size], eos, cfg.doc_end_terminal)
            loss = rm.critic.td_lambda_loss(feats)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rm.critic.parameters(), 1.0)
            opt.step()
            loss_sum += float(loss.detach())
            n_batches += 1
            bar.set_postfix(td_loss=f"{float(loss.detach()):.3f}")
        rm.critic.eval()
        va = evaluate(rm, data, val_docs, cfg)
        ratio = va["mean_delta_sq"] / untrained["mean_delta_sq"]
        history.append({"epoch": epoch, "loss": loss_sum / max(n_batches, 1),
                        "mean_delta_sq_ratio": ratio} | {k: va.get(k) for k in DIAGNOSTICS})
        tracker.log(history[-1], epoch)
        log.info("epoch %d: held-out EV_MC %.3f, delta-R^2 %.4f, corr(delta, H) %+.3f, "
                 "mean delta^2 %.2fx untrained", epoch, va["ev_mc"], va["delta_r2"],
                 va["corr_delta_H"], ratio)
        if _better(va["ev_mc"], best["val"]):
            best = {"epoch": epoch, "val": va["ev_mc"], "bad": 0,
                    "state": {k: v.detach().clone() for k, v in rm.critic.state_dict().items()}}
        else:
            best["bad"] += 1
        _save_checkpoint(ckpt, settings, rm, opt, epoch, best, history)
    rm.critic.load_state_dict(best["state"])
    final = evaluate(rm, data, val_docs, cfg)
    metrics = {
        "config": dataclasses.asdict(cfg),
        "n_documents": {"train": len(train_docs), "validation": len(val_docs)},
        "n_tokens": {"train": sum(lengths[d] for d in train_docs),
                     "validation": sum(lengths[d] for d in val_docs)},
        "untrained_validation": untrained,
        "best_epoch": best["epoch"],
        "early_stopping": "held-out EV_MC",
        "validation": final,
        "mean_delta_sq_ratio_vs_untrained": final["mean_delta_sq"] / untrained["mean_delta_sq"],
        "epochs": history,
    }
    rm.trained = True
    rm.training_info = json_safe({k: metrics[k] for k in (
        "best_epoch", "validation", "n_documents", "n_tokens")}) | {
        "dataset": cfg.dataset, "max_tokens": cfg.max_tokens}
    rm.save_pretrained(out)
    metrics = json_safe(metrics)
    write_json(out / "metrics.json", metrics)
    plot_learning_curve(out / "learning_curve.png", history, untrained)
    tracker.close()
    if cfg.push_to_hub:
        log.info("pushed the critic to %s", upload_critic(out, cfg.push_to_hub))
    return metrics


def plot_learning_curve(path: Path, history: list[dict], untrained: dict) -> None:
    """The four held-out diagnostics per epoch, the untrained critic's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [h["epoch"] for h in history]
    panels = [("mean_delta_sq_ratio", "mean delta^2 / untrained critic's", 1.0),
              ("delta_r2", "delta-R^2 (0 for the true V)", untrained.get("delta_r2")),
              ("corr_delta_H", "corr(delta, H) (0 for the true V)", untrained.get("corr_delta_H")),
              ("ev_mc", "EV_MC (early stopping: highest)", untrained.get("ev_mc"))]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, label, base) in zip(axes, panels):
        ax.plot(ep, [h.get(key) for h in history], marker=".", label="held-out, trained")
        if base is not None and not (isinstance(base, float) and math.isnan(base)):
            ax.axhline(base, color="grey", ls="--", label="untrained (W = 0)")
        ax.set(xlabel="epoch", title=label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


__all__ = ["CriticTrainingConfig", "build_feature_cache", "doc_features", "evaluate",
           "split_documents", "train_critic"]
