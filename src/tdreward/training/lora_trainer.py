"""`tdreward lora`: LoRA / QLoRA fine-tuning with a TD-weighted causal-LM loss (docs/design.md §2.5).

Every hyperparameter in one dataclass (`lora_config.py`); data and model set-up live in
`lora_setup.py`. The loss of `TDRewardTrainer` is

    L = (1 - reward_scale) * L_SFT + reward_scale * sum_t m_t w_t CE_t / N
    w_t = min(exp(A_t / temperature), w_max)                (advantage-weighted regression)
    A_t = delta_t - mean of delta over the batch's targets  (baseline "batch"; "none": delta_t)

where CE_t is the cross-entropy of target token x_{t+1}, m_t marks the target tokens
(completion tokens of a prompt/completion pair), N counts them, and delta_t is the critic's TD
error of that token read by the frozen reference: the same network with its LoRA adapter
disabled (peft's `disable_adapter()`), so no second model sits in memory. With `weighting =
"sequence"` each example's tokens share one weight, from the mean delta over its targets.
`reward_scale = 0` is plain SFT: the model's own loss function, bit for bit.

Public API (also used by `tdreward ollama-finetune`): `LoraTrainingConfig`, `run_lora(cfg)`,
`merge_adapter(adapter_dir, output_dir, base_model)`, `resolve_model_dir(spec)`,
`default_target_modules(model)`, `td_weights(...)`, `TDRewardTrainer`. See docs/lora.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer

from tdreward.cache_files import make_temp_dir, owner_tag, sweep_stale, temp_pattern
from tdreward.errors import TDRewardError
from tdreward.io import write_json
from tdreward.reward_model import TDRewardModel
from tdreward.training.lora_config import BASELINES, WEIGHTINGS, LoraTrainingConfig
from tdreward.training.lora_records import base_record, set_adapter_base, write_adapter_card
from tdreward.training.lora_setup import (
    IGNORE,
    ListDataset,
    PadCollator,
    build_reward_model,
    default_target_modules,
    describe_examples,
    linear_module_names,
    load_base_model,
    load_training_data,
    resolve_model_dir,
    resolve_target_modules,
    training_args,
)
from tdreward.training.tracking import lora_callbacks

__all__ = [
    "LoraTrainingConfig", "TDRewardTrainer", "td_weights", "run_lora", "merge_adapter",
    "build_reward_model", "load_base_model", "resolve_model_dir", "default_target_modules",
    "linear_module_names", "resolve_target_modules", "load_training_data",
]

log = logging.getLogger("tdreward")
META_NAME = "tdreward_lora.json"  # written last: its presence marks a complete adapter dir


# --------------------------------------------------------------------------- the loss
def td_weights(delta: torch.Tensor, mask: torch.Tensor, weighting: str = "token",
               temperature: float = 1.0, w_max: float = 5.0,
               baseline: str = "batch") -> torch.Tensor:
    """w = min(exp(A / temperature), w_max) on the target tokens (mask), 0 elsewhere ([B, T-1]).

    A is delta, per token or (weighting "sequence") each example's mean over its targets.
    baseline "batch" subtracts the mean delta of the batch's targets, so A is an advantage and
    the weights average near 1 whatever the critic's offset (an untrained critic has
    delta = r, about -3 nats, which would shrink every weight to ~0.05); "none" uses delta as is.
    """
    m = mask.to(delta.dtype)
    if weighting == "sequence":
        mean = (delta * m).sum(1) / m.sum(1).clamp(min=1)
        delta = mean[:, None].expand_as(delta)
    if baseline == "batch":
        delta = delta - (delta * m).sum() / m.sum().clamp(min=1)
    # min(exp(x), w_max) = exp(min(x, log w_max)): never overflows to inf.
    return torch.exp(torch.clamp(delta / temperature, max=math.log(w_max))) * m


class TDRewardTrainer(Trainer):
    """A `transformers.Trainer` whose causal-LM loss is weighted per token by the TD reward.

    `reward_model.lm` must be the trained model itself (a peft model): the reference pass
    runs it with the adapter disabled. Batches carry `labels` (-100 = no loss) and optionally
    `example_id` (to remember each example's reference deltas).
    """

    def __init__(self, *args, reward_model: TDRewardModel, weighting: str = "token",
                 temperature: float = 1.0, w_max: float = 5.0, reward_scale: float = 1.0,
                 baseline: str = "batch", cache_deltas: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if weighting not in WEIGHTINGS or baseline not in BASELINES:
            raise TDRewardError(f"weighting must be one of {WEIGHTINGS}, baseline of {BASELINES}")
        if temperature <= 0 or w_max <= 0:
            raise TDRewardError("temperature and w_max must be positive")
        if not 0 <= reward_scale <= 1:
            raise TDRewardError(f"reward_scale must be in [0, 1], got {reward_scale}")
        self.reward_model = reward_model
        self.weighting, self.temperature, self.w_max = weighting, temperature, w_max
        self.reward_scale, self.baseline = reward_scale, baseline
        self.cache_deltas = cache_deltas
        self._delta_cache: dict[int, torch.Tensor] = {}
        self._stats: dict[str, list[float]] = {}
        reward_model.critic.to(self.args.device)

    def reference_deltas(self, input_ids, attention_mask, example_ids=None) -> torch.Tensor:
        """delta [B, T-1] of the frozen reference: the model with its adapter disabled."""
        B, T = input_ids.shape
        ids = example_ids.tolist() if example_ids is not None and self.cache_deltas else None
        if ids is not None and all(i in self._delta_cache for i in ids):
            out = input_ids.new_zeros((B, T - 1), dtype=torch.float32)
            for b, i in enumerate(ids):
                d = self._delta_cache[i]
                out[b, : len(d)] = d.to(out.device)
            return out
        lm = self.reward_model.lm
        adapter_off = lm.disable_adapter() if hasattr(lm, "disable_adapter") else (
            contextlib.nullcontext())
        # No terminal states here: with r ~ log p < 0 the values sit near r / (1 - gamma), so a
        # terminal EOS would get delta = r - V ~ +300 nats and swamp every other weight. Each
        # token's delta bootstraps from the next state, an EOS included.
        done = torch.zeros_like(input_ids, dtype=torch.bool)
        was_training = lm.training
        lm.eval()  # the reference is a frozen model: no dropout
        try:
            with adapter_off, torch.no_grad():
                delta = self.reward_model.score_batch(input_ids, attention_mask, done)["delta"]
        finally:
            lm.train(was_training)
        if ids is not None:
            lengths = attention_mask.sum(1).tolist()
            for b, i in enumerate(ids):
                self._delta_cache[i] = delta[b, : max(lengths[b] - 1, 0)].detach().cpu()
        return delta.float()

    def loss_terms(self, model, inputs: dict, num_items_in_batch=None) -> dict:
        """The SFT loss, the TD-weighted loss and per-batch statistics for one batch."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        example_ids = inputs.pop("example_id", None)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    use_cache=False)
        logits = out.logits
        targets = labels[:, 1:]
        mask = targets != IGNORE
        n = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                             ignore_index=IGNORE, reduction="none").view_as(targets)
        terms = {"outputs": out, "ce_sum": ce.sum().detach(), "n": mask.sum()}
        if self.reward_scale < 1:
            # Exactly what model(..., labels=labels).loss computes: same function, same logits.
            base = _base_lm(self.accelerator.unwrap_model(model))
            terms["sft"] = base.loss_function(logits=logits, labels=labels,
                                              vocab_size=logits.shape[-1],
                                              num_items_in_batch=num_items_in_batch)
        if self.reward_scale > 0:
            delta = self.reference_deltas(inputs["input_ids"], inputs["attention_mask"],
                                          example_ids)
            w = td_weights(delta, mask, self.weighting, self.temperature, self.w_max,
                           self.baseline)
            terms["td"] = (w * ce).sum() / n
            terms["w_sum"], terms["delta_sum"] = w.sum().detach(), (delta * mask).sum()
        return terms

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        t = self.loss_terms(model, inputs, num_items_in_batch)
        s = self.reward_scale
        if s == 0:
            loss = t["sft"]
        elif s == 1:
            loss = t["td"]
        else:
            loss = (1 - s) * t["sft"] + s * t["td"]
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
        if model.training:
            n = max(int(t["n"]), 1)
            self._record("sft_loss", float(t["ce_sum"]) / n)
            if "td" in t:
                self._record("td_weight_mean", float(t["w_sum"]) / n)
                self._record("ref_delta_mean", float(t["delta_sum"]) / n)
        return (loss, t["outputs"]) if return_outputs else loss

    def _record(self, key: str, value: float) -> None:
        self._stats.setdefault(key, []).append(value)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the means since the last one
            for k, v in self._stats.items():
                if v:
                    logs[k] = sum(v) / len(v)
            self._stats = {}
        super().log(logs, *args, **kwargs)

    @torch.no_grad()
    def dataset_losses(self, examples: list[dict], batch_size: int | None = None,
                       desc: str = "loss probe") -> dict:
        """Mean plain CE and TD-weighted CE over `examples` (no gradient, eval mode)."""
        from tqdm.auto import tqdm

        model = self.model
        was_training = model.training
        model.eval()
        collate = self.data_collator
        bs = batch_size or self.args.per_device_train_batch_size
        ce = td = n = 0.0
        try:
            for a in tqdm(range(0, len(examples), bs), desc=desc, unit="batch",
                          disable=self.args.disable_tqdm):
                batch = {k: v.to(self.args.device) for k, v in
                         collate(examples[a: a + bs]).items()}
                t = self.loss_terms(model, batch)
                n_b = float(t["n"])
                ce, n = ce + float(t["ce_sum"]), n + n_b
                td += float(t["td"]) * n_b if "td" in t else 0.0
        finally:
            model.train(was_training)
        res = {"sft_loss": ce / max(n, 1), "n_tokens": int(n)}
        if self.reward_scale > 0:
            res["td_weighted_loss"] = td / max(n, 1)
        return res


def _base_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --------------------------------------------------------------------------- the run
def _save_adapter(model, tokenizer, out: Path, base: dict) -> None:
    """adapter_config.json (naming the base spec `base`) + adapter_model.safetensors
    (+ tokenizer) into `out`, each file renamed into place from a temporary folder beside it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".adapter-{owner_tag()}.", dir=out))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        set_adapter_base(tmp, base)
        tokenizer.save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir()):
            if f.is_file():
                os.chmod(f, 0o644)  # some writers create 0600 files
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_lora(cfg: LoraTrainingConfig) -> dict:
    """Train a LoRA adapter with the TD-weighted loss; returns the metrics it writes to
    OUTPUT_DIR/tdreward_lora.json (plus `merged_dir` when cfg.merge)."""
    from tdreward.backends.adapters import import_peft

    # First: bitsandbytes' 4-bit kernel notice only when 4-bit is used.
    import_peft(quiet_bitsandbytes=not cfg.hardware.load_in_4bit)
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    out = Path(cfg.output_dir).expanduser()  # checked to be writable when cfg was built
    set_seed(cfg.seed)
    model, tok = load_base_model(cfg)
    data = load_training_data(tok, cfg.dataset, cfg.dataset_config, cfg.split, cfg.max_length,
                              cfg.chat_template, cfg.max_examples)
    targets = resolve_target_modules(model, cfg.target_modules)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    n_quantized = sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    rm = build_reward_model(cfg, model, tok)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA on %s (%s): %d trainable parameters; %s, %d target tokens",
             cfg.base_model, ", ".join(targets), n_train,
             describe_examples(len(data.examples), data.kind), data.n_target_tokens)
    out.mkdir(parents=True, exist_ok=True)
    # Temporary folders name their process: those of a killed run are removed here.
    sweep_stale(out, [".trainer-*", ".adapter-*"])
    trainer_dir = tempfile.mkdtemp(prefix=f".trainer-{owner_tag()}.", dir=out)
    try:
        trainer = TDRewardTrainer(
            model=model, args=training_args(cfg, trainer_dir),
            callbacks=lora_callbacks(cfg.report_to, out),
            train_dataset=ListDataset(data.examples),
            data_collator=PadCollator(tok.pad_token_id), processing_class=tok,
            reward_model=rm, weighting=cfg.weighting, temperature=cfg.temperature,
            w_max=cfg.w_max, reward_scale=cfg.reward_scale, baseline=cfg.baseline,
            cache_deltas=cfg.cache_deltas)
        probe = data.examples[: cfg.eval_examples]
        before = trainer.dataset_losses(probe, desc="loss before") if probe else {}
        start = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - start
        after = trainer.dataset_losses(probe, desc="loss after") if probe else {}
        base = base_record(cfg.base_model)
        _save_adapter(model, tok, out, base)
    finally:
        shutil.rmtree(trainer_dir, ignore_errors=True)
    steps = [h for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "config": dataclasses.asdict(cfg),
        **base,  # the spec as named (and a GGUF's sha256), not the cache folder loaded
        "target_modules": targets,
        "trainable_parameters": n_train,
        "quantization": {"bits": cfg.hardware.bits,
                         "quantized_layers": n_quantized},
        "data": {"kind": data.kind, "documents": data.n_documents,
                 "examples": len(data.examples), "target_tokens": data.n_target_tokens},
        "reward_model": {"path": cfg.reward.reward_model_path, "trained": rm.trained,
                         "reward_config": rm.config.to_dict()},
        "global_steps": trainer.state.global_step,
        "train_wall_s": round(wall, 2),
        "train_loss_mean": result.training_loss,
        "before": before, "after": after, "eval_examples": len(probe),
        "log_history": steps,
    }
    del trainer, model, rm
    gc.collect()
    if cfg.merge:
        metrics["merged_dir"] = str(merge_adapter(out, out / "merged", cfg.base_model))
    write_adapter_card(out, base, metrics)
    write_json(out / META_NAME, metrics)
    return metrics


def merge_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                  base_model: str | None = None) -> Path:
    """Merge a LoRA adapter into its (unquantised, fp32) base and save a transformers model
    directory (safetensors + tokenizer) at `output_dir` (default ADAPTER_DIR/merged).
    `base_model` is a model spec; by default the one the adapter was trained on."""
    from tdreward.backends.adapters import import_peft

    import_peft()  # first: keeps bitsandbytes' 4-bit kernel notice out of the output
    from peft import PeftModel

    from tdreward.backends.hf import load_model

    adapter_dir = Path(adapter_dir).expanduser()
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise TDRewardError(f"{adapter_dir} has no adapter_config.json: not a LoRA adapter")
    meta_path = adapter_dir / META_NAME
    spec = base_model or (json.loads(meta_path.read_text()).get("base_model")
                          if meta_path.is_file() else None)
    spec = spec or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not spec:
        raise TDRewardError(f"{adapter_dir}: base model unknown; pass base_model")
    out = Path(output_dir).expanduser() if output_dir else adapter_dir / "merged"
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise TDRewardError(f"{out} exists and is not a model directory; refusing to replace it")
    model, tok = load_model(spec)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    sweep_stale(out.parent, [temp_pattern(out.name)])  # merges killed mid-write
    tmp = make_temp_dir(out.parent, out.name)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        base = base_record(spec)
        write_json(tmp / "tdreward_merged.json", base | {"adapter": str(adapter_dir.resolve())})
        write_adapter_card(tmp, base, merged=True)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
