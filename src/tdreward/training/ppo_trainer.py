"""`tdreward train`: PPO with TD-shaped per-token rewards (docs/design.md §2.5), CleanRL style.

One step:
 1. rollout   each process samples `batch_size` prompts and generates continuations (left-padded
              batched sampling from the policy's full distribution);
 2. reward    per response token: the critic's delta_t (potential-based shaping of r_t) minus
              kl_coef * KL(policy || reference) (k1 or k3 estimate); the critic then takes a
              TD(lambda) step on the batch, so it keeps learning online;
 3. GAE       advantages with (gamma, gae_lambda) from the policy's value head, whitened over all
              processes' tokens;
 4. update    ppo_epochs passes of minibatches: clipped policy loss, clipped value loss, entropy
              bonus, gradient clipping. A non-finite loss skips its minibatch; too many in a row
              stop the run with an error.
With --use_lora the reference is the base model with the adapter disabled (one model in memory),
otherwise a frozen copy. `accelerate.Accelerator` wraps the policy (DDP under `accelerate launch`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tdreward.errors import TDRewardError
from tdreward.hardware import Placement
from tdreward.io import write_json
from tdreward.training import ppo_checkpoint as ckpt
from tdreward.training.ppo_checkpoint import config_dict, finite_stats, flat_config
from tdreward.training.ppo_config import PPOConfig
from tdreward.training.ppo_policy import PolicyWithValue, build_policy
from tdreward.training.rollout import (
    Rollout,
    TDShapedReward,
    entropy,
    epoch_order,
    explained_variance,
    gae,
    generate,
    kl_penalty,
    masked_mean,
    prompt_rows,
    read_prompt_source,
    repetition_rate,
    response_forward,
    token_logprobs,
    whiten,
)

log = logging.getLogger("tdreward")

RewardFn = Callable[[Rollout], Tensor]  # rollout -> per-token rewards [B, L]
TIMING_KEYS = ("tokens_per_s", "step_time_s", "elapsed_s")


# --------------------------------------------------------------------------- the trainer
class NaNGuard:
    """Counts non-finite minibatches in a row; too many stop the run with a clear error."""

    def __init__(self, limit: int, streak: int = 0) -> None:
        self.limit, self.streak, self.skipped = limit, streak, 0

    def check(self, finite: bool, step: int, what: str) -> bool:
        if finite:
            self.streak = 0
            return True
        self.streak += 1
        self.skipped += 1
        log.warning("step %d: %s is NaN/inf; minibatch skipped (%d in a row)", step, what,
                    self.streak)
        if self.streak >= self.limit:
            raise TDRewardError(
                f"the PPO {what} was NaN/inf in {self.streak} minibatches in a row (step "
                f"{step}); lower --lr, check the reward model, or raise --max_nan_streak")
        return False


@dataclass
class PPOResult:
    model: PolicyWithValue  # unwrapped
    ref_lm: nn.Module
    ref_context: Callable
    tokenizer: object
    reward: object
    metrics: list[dict]
    output_dir: Path


@dataclass
class PPORun:
    """What every PPO step of a run shares, built once by `train_ppo`."""

    accelerator: object
    model: nn.Module  # the policy as prepared by accelerate (DDP-wrapped under several processes)
    unwrapped: PolicyWithValue
    optimizer: torch.optim.Optimizer
    ref_lm: nn.Module
    ref_context: Callable  # makes ref_lm the reference (the LoRA adapter disabled)
    tokenizer: object
    reward: RewardFn  # a TDShapedReward, or the caller's reward_fn
    gamma: float  # the GAE discount: the critic's, so the TD shaping telescopes
    guard: NaNGuard


def _reward_model(cfg: PPOConfig, ref_lm, tokenizer, ref_context, accelerator):
    from tdreward.reward_model import load_reward_model

    lm = ref_lm.get_base_model() if hasattr(ref_lm, "get_base_model") else ref_lm
    rm = load_reward_model(cfg.base_model, cfg.reward, lm=lm, tokenizer=tokenizer,
                           warn_untrained=accelerator.is_main_process)
    rm.critic.to(accelerator.device)

    def reduce_grads(params, loss):
        for p in params:
            p.grad = accelerator.reduce(p.grad, "mean")

    return TDShapedReward(rm, ref_context, lr=cfg.critic_lr, learn=cfg.critic_updates,
                          reduce_grads=reduce_grads if accelerator.num_processes > 1 else None,
                          eos_terminal=cfg.eos_terminal)


def _accelerator(cfg: PPOConfig):
    from accelerate import Accelerator

    # `accelerate launch --multi_gpu` on a machine without GPUs: DDP over CPU processes (gloo).
    # Accelerate only picks that when told cpu=True.
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    on_cpu = cfg.hardware.device == "cpu" or (int(os.environ.get("WORLD_SIZE", "1")) > 1
                                              and not gpu)
    kw = {"cpu": True} if on_cpu else {}
    # `accelerate launch --config_file fsdp.yaml` says so in the environment; with cpu=True
    # accelerate drops the sharding settings without a word.
    sharding = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"),
                                       ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                if os.environ.get(var, "").lower() in ("1", "true")]
    if on_cpu and sharding:
        log.warning("%s was asked for, but on the CPU accelerate runs PPO as plain DDP: "
                    "nothing is sharded (docs/distributed.md)", sharding[0])
    if cfg.report_to:
        import importlib.util

        pkgs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[cfg.report_to]
        if not any(importlib.util.find_spec(p) for p in pkgs):
            raise TDRewardError(f"--report_to {cfg.report_to} needs the {pkgs[0]} package: "
                                f"pip install {pkgs[0]}")
        return Accelerator(log_with=cfg.report_to, project_dir=cfg.output_dir, **kw)
    return Accelerator(**kw)


def policy_placement(cfg: PPOConfig) -> Placement:
    """The policy loads on the CPU in --dtype; accelerate then moves it to each process's
    device. `auto` is float32 for a policy trained whole (AdamW's small steps vanish in
    bfloat16 weights) and the device's dtype (bfloat16 on CUDA) under LoRA, whose adapters
    PEFT keeps in float32."""
    place = cfg.hardware.resolve()
    dtype = place.dtype if cfg.use_lora or cfg.hardware.dtype != "auto" else "float32"
    return Placement("cpu", dtype)


def train_ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None, lm=None,
              tokenizer=None) -> PPOResult:
    """Run PPO; returns the trained policy (and the online critic). `reward_fn` replaces the TD
    reward (a toy reward in tests); `lm`/`tokenizer` replace loading `cfg.base_model`."""
    from accelerate.utils import set_seed

    texts = read_prompt_source(cfg)  # bad or empty data fails before anything heavy
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)  # identical initialisation on every process
    if lm is None:
        from tdreward.backends.hf import load_model

        lm, tokenizer = load_model(cfg.base_model, hardware=policy_placement(cfg))
    rows = prompt_rows(cfg, texts, tokenizer)
    hidden = lm.config.hidden_size
    model, ref_lm, ref_context = build_policy(cfg, lm, hidden)
    ref_lm.to(accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    reward = reward_fn or _reward_model(cfg, ref_lm, tokenizer, ref_context, accelerator)
    gamma = cfg.reward.gamma if cfg.reward.gamma is not None else (
        reward.rm.config.gamma if hasattr(reward, "rm") else 0.99)

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.batch_size * world
    steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(len(rows) / global_batch))
    total_steps = cfg.epochs * steps_per_epoch
    set_seed(cfg.seed + rank)  # different samples on every process from here on

    step, guard = 0, NaNGuard(cfg.max_nan_streak)
    run = PPORun(accelerator, model, unwrapped, optimizer, ref_lm, ref_context, tokenizer,
                 reward, gamma, guard)
    ckpt_root = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []
    if cfg.resume_from_checkpoint:
        path = ckpt.resolve_checkpoint(cfg.resume_from_checkpoint, ckpt_root)
        if path is None:
            log.warning("no checkpoint in %s yet: starting from scratch", ckpt_root)
        else:
            state = ckpt.load_checkpoint(path, accelerator, model, optimizer, reward)
            if state["steps_per_epoch"] != steps_per_epoch:
                raise TDRewardError(f"checkpoint {path} has {state['steps_per_epoch']} steps per "
                                    f"epoch, this run {steps_per_epoch}: pass the same "
                                    "--steps_per_epoch and --batch_size")
            step, guard.streak = state["step"], state["nan_streak"]
            guard.skipped = state.get("nan_skipped", 0)
            if main:
                print(f"tdreward: resumed from {path} at step {step} of {total_steps}",
                      file=sys.stderr, flush=True)
    if main:
        print(f"tdreward: PPO plan: {total_steps} steps = {cfg.epochs} epoch(s) x "
              f"{steps_per_epoch} steps of {global_batch} prompts ({len(rows)} prompts, "
              f"{world} process(es)), {cfg.max_new_tokens} new tokens each; the time estimate "
              "follows the first step", file=sys.stderr, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        history = ckpt.restart_metrics(metrics_path, step)
        write_json(out / "ppo_config.json", config_dict(cfg) | {"num_processes": world})
    if cfg.report_to:
        accelerator.init_trackers("tdreward_ppo", config=flat_config(cfg))

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="PPO", unit="step",
               disable=not (cfg.progress and main))
    t_start, first_step = time.perf_counter(), step
    while step < total_steps:
        epoch, in_epoch = step // steps_per_epoch + 1, step % steps_per_epoch
        order = epoch_order(len(rows), steps_per_epoch * global_batch, cfg.seed, epoch)
        start = in_epoch * global_batch + rank * cfg.batch_size
        batch = [rows[i] for i in order[start : start + cfg.batch_size]]
        t0 = time.perf_counter()
        stats = ppo_step(cfg, run, batch, step + 1)
        step += 1
        dt = time.perf_counter() - t0
        stats = {"step": step, "epoch": epoch} | stats | {
            "tokens_per_s": stats["n_tokens"] / dt, "step_time_s": dt,
            "elapsed_s": time.perf_counter() - t_start}
        if main:
            history.append(stats)
            with metrics_path.open("a") as f:
                f.write(json.dumps(finite_stats(stats)) + "\n")
        if cfg.report_to:
            accelerator.log(finite_stats(stats, drop_none=True), step=step)
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
        if main and step == first_step + 1 and step < total_steps:
            left = (total_steps - step) * dt
            bar.write(f"tdreward: first step took {dt:.1f} s: about {left / 60:.1f} min for the "
                      f"{total_steps - step} steps left", file=sys.stderr)
        epoch_end = step % steps_per_epoch == 0
        if epoch_end:
            ckpt.save_epoch(cfg, accelerator, unwrapped, tokenizer, reward, epoch, step, history)
        if epoch_end or (cfg.save_steps and step % cfg.save_steps == 0):
            state = {"steps_per_epoch": steps_per_epoch, "nan_streak": guard.streak,
                     "nan_skipped": guard.skipped, "config": config_dict(cfg)}
            ckpt.save_checkpoint(ckpt_root, step, accelerator, model, optimizer, reward, state,
                                 keep=cfg.save_total_limit)
    bar.close()
    if cfg.report_to:
        accelerator.end_training()
    return PPOResult(unwrapped, ref_lm, ref_context, tokenizer, reward, history, out)


def ppo_step(cfg: PPOConfig, run: PPORun, batch: list[list[int]], step: int) -> dict:
    """One rollout and its PPO update; returns this step's statistics (averaged over processes)."""
    accelerator, model, unwrapped, optimizer = (run.accelerator, run.model, run.unwrapped,
                                                run.optimizer)
    ref_lm, ref_context, tokenizer, reward = run.ref_lm, run.ref_context, run.tokenizer, run.reward
    gamma, guard = run.gamma, run.guard
    dev = accelerator.device
    # 1. rollout
    ro = generate(unwrapped.policy, tokenizer, batch, cfg.max_new_tokens, cfg.temperature, dev)
    ids, attn, resp, m = ro.input_ids, ro.attention_mask, ro.response, ro.response_mask.float()
    L = resp.shape[1]
    with torch.no_grad():
        unwrapped.eval()
        logits, values = unwrapped(ids, attn, L, cfg.temperature)
        logp = token_logprobs(logits, resp)
        with ref_context():
            ref_logits, _ = response_forward(ref_lm, ids, attn, L, cfg.temperature)
        ref_logp = token_logprobs(ref_logits, resp)
        del logits, ref_logits
    # 2. reward: TD error per token (the critic learns online inside reward_fn) minus KL
    score = reward(ro).to(dev).float() * m
    kl = kl_penalty(logp, ref_logp, cfg.kl_estimator) * m
    rewards = score - cfg.kl_coef * kl
    # 3. advantages; the value normalisation follows the returns (all processes' tokens)
    values = values * m
    adv, returns = gae(rewards, values, m, gamma, cfg.gae_lambda)
    if cfg.normalize_values:
        rs = accelerator.reduce(torch.stack([(returns * m).sum(), (returns**2 * m).sum(),
                                            m.sum()]), "sum")
        mean = float(rs[0] / rs[2])
        std = math.sqrt(max(float(rs[1] / rs[2]) - mean**2, 0.0))
        old_mean, old_std = float(unwrapped.value_mean), float(unwrapped.value_std)
        if unwrapped.update_value_stats(mean, std, cfg.value_norm_momentum):
            # First batch: V jumped to the new normalisation; map the rollout's values with it.
            values = (float(unwrapped.value_mean) + float(unwrapped.value_std)
                      * (values - old_mean) / old_std) * m
            adv, returns = gae(rewards, values, m, gamma, cfg.gae_lambda)
    if cfg.whiten_advantages:
        adv = whiten(adv, m, lambda t: accelerator.reduce(t, "sum"))
    # 4. PPO epochs over minibatches
    unwrapped.train()
    acc = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clip_fraction",
                           "value_clip_fraction", "approx_kl")}
    B = len(batch)
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B)
        for a in range(0, B - cfg.mini_batch_size + 1, cfg.mini_batch_size):
            mb = perm[a : a + cfg.mini_batch_size].to(dev)
            mm = m[mb]
            new_logits, vpred = model(ids[mb], attn[mb], L, cfg.temperature)
            new_logp = token_logprobs(new_logits, resp[mb])
            ent = masked_mean(entropy(new_logits), mm)
            log_ratio = new_logp - logp[mb]
            ratio = torch.exp(log_ratio)
            pg = torch.max(-adv[mb] * ratio,
                           -adv[mb] * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
            pg_loss = masked_mean(pg, mm)
            # Value clip and loss in the head's normalised units (value_std = 1 without them).
            vs = unwrapped.value_std
            v_clip = values[mb] + (vpred - values[mb]).clamp(-cfg.cliprange_value * vs,
                                                             cfg.cliprange_value * vs)
            vf = torch.max((vpred - returns[mb]) ** 2, (v_clip - returns[mb]) ** 2) / vs**2
            vf_loss = 0.5 * masked_mean(vf, mm)
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * ent
            # Every process must take the same branch, or DDP's collectives would hang.
            ok = accelerator.reduce(torch.isfinite(loss).float().reshape(1), "sum").item()
            if not guard.check(ok == accelerator.num_processes, step, "loss"):
                optimizer.zero_grad()
                continue
            accelerator.backward(loss)
            gnorm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if not guard.check(bool(torch.isfinite(torch.as_tensor(gnorm))), step, "gradient"):
                optimizer.zero_grad()
                continue
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                acc["policy_loss"].append(pg_loss)
                acc["value_loss"].append(vf_loss)
                acc["entropy"].append(ent)
                acc["clip_fraction"].append(masked_mean(
                    ((ratio - 1).abs() > cfg.cliprange).float(), mm))
                acc["value_clip_fraction"].append(masked_mean(
                    ((vpred - values[mb]).abs() > cfg.cliprange_value * vs).float(), mm))
                acc["approx_kl"].append(masked_mean(0.5 * log_ratio**2, mm))
    unwrapped.eval()
    n = m.sum(1)
    local = {
        "reward": masked_mean(score, m), "score_per_response": (score.sum(1)).mean(),
        "kl": masked_mean(kl, m), "kl_k1": masked_mean(logp - ref_logp, m),
        "kl_k3": masked_mean(kl_penalty(logp, ref_logp, "k3"), m),
        "kl_per_response": ((logp - ref_logp) * m).sum(1).mean(),
        "total_reward": masked_mean(rewards, m), "value_mean": masked_mean(values, m),
        "return_mean": masked_mean(returns, m), "response_length": n.mean(),
        "repetition_rate": torch.tensor(sum(repetition_rate(r) for r in ro.responses()) / B),
        "explained_variance": torch.tensor(explained_variance(values, returns, m)),
        "critic_td_loss": torch.tensor(getattr(reward, "last_td_loss", math.nan)),
    }
    local |= {k: torch.stack(v).mean() if v else torch.tensor(math.nan) for k, v in acc.items()}
    keys = sorted(local)
    vec = accelerator.reduce(torch.stack([local[k].float().to(dev) for k in keys]), "mean")
    stats = {k: float(v) for k, v in zip(keys, vec.detach())}
    stats["n_tokens"] = float(accelerator.reduce(m.sum(), "sum"))
    stats["nan_skipped"] = guard.skipped
    return stats


__all__ = ["PPOConfig", "PPOResult", "PPORun", "PolicyWithValue", "train_ppo", "ppo_step", "gae",
           "whiten"]
