"""PPO checkpoints and epoch outputs: safetensors + JSON only (no pickle, so no torch.save).

    checkpoints/step_000012/
        policy.safetensors             trainable weights (LoRA adapter or full model) + value head
        optimizer.safetensors/.json    the optimiser's tensors / param groups and other values
        critic.safetensors             the critic's heads (they learn online)
        critic_optimizer.safetensors/.json
        rng_rank{R}.safetensors/.json  every process's torch (+cuda), Python and NumPy RNG
        state.json                     step, NaN streak, settings (written last)

A checkpoint is written into a hidden temporary directory and renamed into place when it is
complete, so a run killed at any moment leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tdreward.errors import TDRewardError
from tdreward.io import atomic_path, write_json, write_text
from tdreward.training.ppo_config import PPOConfig, upgrade_config_dict

PREFIX = "step_"


# --------------------------------------------------------------------------- optimiser state
def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors, JSON): tensors keyed 'pid.name', the rest as JSON."""
    tensors, other = {}, {}
    for pid, st in state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                other.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "other": other}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta.get("other", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _save_optimizer(opt, path: Path, name: str) -> None:
    tensors, meta = flatten_optimizer(opt.state_dict())
    save_file(tensors, str(path / f"{name}.safetensors"))
    write_json(path / f"{name}.json", meta)


def _load_optimizer(opt, path: Path, name: str) -> None:
    meta = json.loads((path / f"{name}.json").read_text())
    opt.load_state_dict(unflatten_optimizer(load_file(str(path / f"{name}.safetensors")), meta))


# --------------------------------------------------------------------------- RNG state
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    import numpy as np

    tensors = {"torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype("int64"))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    import numpy as np

    torch.random.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype("uint32"), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- save / load
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint needs of the model: the parameters that learn (LoRA + value head, or
    everything) and the value normalisation buffers (not the policy's own, fixed buffers)."""
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
             if p.requires_grad}
    state |= {n: b.detach().cpu().contiguous() for n, b in model.named_buffers()
              if not n.startswith("policy.")}
    return state


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
            and (p / "state.json").is_file()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(root: Path, step: int, accelerator, model, optimizer, reward, state: dict,
                    keep: int = 2) -> Path:
    """Every process calls this (each writes its own RNG state); the main process writes the
    shared parts, then renames the finished directory into place and drops old checkpoints."""
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tensors, meta = rng_state()
    rank = accelerator.process_index
    save_file(tensors, str(tmp / f"rng_rank{rank}.safetensors"))
    write_json(tmp / f"rng_rank{rank}.json", meta)
    if accelerator.is_main_process:
        save_file(trainable_state(accelerator.unwrap_model(model)), str(tmp / "policy.safetensors"))
        _save_optimizer(optimizer, tmp, "optimizer")
        if reward is not None and hasattr(reward, "rm"):
            crit = {k: v.detach().cpu().contiguous()
                    for k, v in reward.rm.critic.state_dict().items()}
            save_file(crit, str(tmp / "critic.safetensors"))
            if reward.optimizer is not None:
                _save_optimizer(reward.optimizer, tmp, "critic_optimizer")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "state.json", state | {"step": step,
                                               "num_processes": accelerator.num_processes})
        if final.exists():  # the same step saved again after a resume
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        for stale in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in root.glob(".tmp-*"):  # from a run killed while saving
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(spec: str, root: Path) -> Path | None:
    """`latest` -> the newest complete checkpoint under `root` (None if there is none yet);
    otherwise a checkpoint directory (or an output directory holding checkpoints)."""
    if spec == "latest":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(spec).expanduser()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.is_dir() and not (path / "state.json").is_file():
        found = checkpoint_dirs(path)
        if found:
            return found[-1]
    if not (path / "state.json").is_file():
        raise TDRewardError(f"--resume_from_checkpoint {spec}: no complete checkpoint there "
                            "(expected a step_N directory with state.json, or `latest`)")
    return path


def load_checkpoint(path: Path, accelerator, model, optimizer, reward) -> dict:
    """Restore weights, optimisers, critic and this process's RNG; returns state.json (its
    `config` in today's shape, also when an older version wrote it)."""
    state = json.loads((path / "state.json").read_text())
    if isinstance(state.get("config"), dict):
        state["config"] = upgrade_config_dict(state["config"])
    if state.get("num_processes") != accelerator.num_processes:
        raise TDRewardError(
            f"checkpoint {path} was written by {state.get('num_processes')} process(es), this "
            f"run has {accelerator.num_processes}: resume with the same number of processes")
    weights = load_file(str(path / "policy.safetensors"))
    unwrapped = accelerator.unwrap_model(model)
    params = dict(unwrapped.named_parameters()) | dict(unwrapped.named_buffers())
    if set(weights) != set(trainable_state(unwrapped)):
        raise TDRewardError(f"checkpoint {path} does not match this model (different base model "
                            "or LoRA settings?)")
    with torch.no_grad():
        for n, v in weights.items():
            params[n].copy_(v)
    _load_optimizer(optimizer, path, "optimizer")
    if reward is not None and hasattr(reward, "rm") and (path / "critic.safetensors").is_file():
        reward.rm.critic.load_state_dict(load_file(str(path / "critic.safetensors")))
        if reward.optimizer is not None and (path / "critic_optimizer.json").is_file():
            _load_optimizer(reward.optimizer, path, "critic_optimizer")
    rank = accelerator.process_index
    rng_meta = json.loads((path / f"rng_rank{rank}.json").read_text())
    set_rng_state(load_file(str(path / f"rng_rank{rank}.safetensors")), rng_meta)
    return state


# --------------------------------------------------------------------------- outputs
def config_dict(cfg: PPOConfig) -> dict:
    """The settings as saved (ppo_config.json, state.json, ppo_training.json); read one back
    with `PPOConfig.from_dict`."""
    return dataclasses.asdict(cfg)


def flat_config(cfg: PPOConfig) -> dict:
    """One level of plain values for trackers: nested settings (the reward's) are lifted up
    under their own names, which are their flags' names."""
    flat: dict = {}
    for k, v in config_dict(cfg).items():
        flat |= v if isinstance(v, dict) and k != "extra" else {k: v}
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in flat.items()}


def finite_stats(stats: dict, drop_none: bool = False) -> dict:
    """JSON has no NaN: non-finite numbers become null (or are dropped for trackers)."""
    out = {}
    for k, v in stats.items():
        bad = isinstance(v, float) and not math.isfinite(v)
        if bad and drop_none:
            continue
        out[k] = None if bad else v
    return out


def restart_metrics(path: Path, step: int) -> list[dict]:
    """Keep the metrics of steps up to `step` (a resumed run redoes the later ones)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)


def save_epoch(cfg: PPOConfig, accelerator, unwrapped, tokenizer, reward, epoch: int, step: int,
               history: list[dict]) -> None:
    """model_epoch_N/ (adapter, merged, or full model + value head) and reward_model_epoch_N/,
    each written to a temporary directory and renamed; then the training curve."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        final = out / f"model_epoch_{epoch}"
        tmp = out / f".tmp-model_epoch_{epoch}"
        shutil.rmtree(tmp, ignore_errors=True)
        policy = unwrapped.policy
        if cfg.use_lora and cfg.merge:
            policy = copy.deepcopy(policy).merge_and_unload()
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # V = value_mean + value_std * (weight . h + bias), h the final hidden state
        vh = {k: v.detach().cpu().contiguous() for k, v in unwrapped.value_head.state_dict().items()}
        vh |= {k: getattr(unwrapped, k).detach().cpu().reshape(1)
               for k in ("value_mean", "value_std")}
        save_file(vh, str(tmp / "value_head.safetensors"))
        write_json(tmp / "ppo_training.json", {"epoch": epoch, "step": step,
                                               "base_model": cfg.base_model,
                                               "adapter": cfg.use_lora and not cfg.merge,
                                               "config": config_dict(cfg)})
        _replace_dir(tmp, final)
        if hasattr(reward, "rm"):
            rm = reward.rm
            rm.training_info = dict(rm.training_info) | {"ppo_online_steps": step,
                                                         "ppo_output_dir": str(out)}
            tmp = out / f".tmp-reward_model_epoch_{epoch}"
            shutil.rmtree(tmp, ignore_errors=True)
            rm.save_pretrained(tmp)
            _replace_dir(tmp, out / f"reward_model_epoch_{epoch}")
        plot_training_curve(out / "training_curve.png", history)
    accelerator.wait_for_everyone()


def plot_training_curve(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    panels = [("reward", "TD reward (mean delta)"), ("kl", "KL to reference / token"),
              ("entropy", "entropy (nats)"), ("value_loss", "value loss"),
              ("clip_fraction", "clip fraction"), ("explained_variance", "explained variance")]
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (key, title) in zip(axes.flat, panels):
        ys = [h.get(key) for h in history]
        ax.plot(steps, [math.nan if y is None else y for y in ys], marker=".")
        ax.set(title=title, xlabel="step")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


