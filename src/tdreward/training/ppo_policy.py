"""The PPO policy: the LM plus a value head on its final hidden states, and the reference it is
held to (the base with the LoRA adapter disabled, or a frozen copy)."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

from tdreward.errors import TDRewardError, first_line
from tdreward.training.ppo_config import PPOConfig
from tdreward.training.rollout import response_forward


class PolicyWithValue(nn.Module):
    """The policy LM plus a scalar value head on its final hidden states (one module, so DDP
    syncs both).

    The head predicts in normalised units, V = value_mean + value_std * head(h), and the
    normalisation follows the returns (PopArt, van Hasselt et al. 2016): a response's summed TD
    rewards reach tens of nats, which a zero-initialised head under a value clip of 0.2 would
    take thousands of steps to reach."""

    def __init__(self, policy: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.register_buffer("value_mean", torch.zeros(()))
        self.register_buffer("value_std", torch.ones(()))
        self.register_buffer("value_updates", torch.zeros(()))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, n_response: int,
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        logits, h = response_forward(self.policy, input_ids, attention_mask, n_response,
                                     temperature)
        v = self.value_head(h.float()).squeeze(-1)
        return logits, self.value_mean + self.value_std * v

    @torch.no_grad()
    def update_value_stats(self, mean: float, std: float, momentum: float) -> bool:
        """Move (value_mean, value_std) toward a batch's return statistics. The first call sets
        them (V jumps from 0 to the mean return, returns True); later calls rescale the head so
        that every V stays what it was (PopArt's "preserving outputs")."""
        std = max(std, 1e-3)
        if int(self.value_updates) == 0:
            self.value_mean.fill_(mean)
            self.value_std.fill_(std)
            self.value_updates += 1
            return True
        old_mean, old_std = float(self.value_mean), float(self.value_std)
        new_mean = momentum * old_mean + (1 - momentum) * mean
        new_std = momentum * old_std + (1 - momentum) * std
        self.value_head.weight.mul_(old_std / new_std)
        self.value_head.bias.copy_((old_std * self.value_head.bias + old_mean - new_mean) / new_std)
        self.value_mean.fill_(new_mean)
        self.value_std.fill_(new_std)
        self.value_updates += 1
        return False


def build_policy(cfg: PPOConfig, lm, hidden_size: int):
    """-> (PolicyWithValue, reference LM, context that makes the reference LM the base)."""
    if cfg.use_lora:
        from tdreward.backends.adapters import import_peft

        import_peft()  # first: keeps bitsandbytes' 4-bit kernel notice out of the output
        from peft import LoraConfig, get_peft_model

        targets = cfg.target_modules
        if targets and len(targets) == 1 and targets[0] == "all-linear":
            targets = "all-linear"  # PEFT's keyword for every linear layer but the output head
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        try:
            peft_model = get_peft_model(lm, lcfg)
        except ValueError as e:
            raise TDRewardError(f"LoRA setup failed: {first_line(e)} "
                                "(check --target_modules)") from e
        # One model in memory: the reference is the same network with the adapter switched off.
        return PolicyWithValue(peft_model, hidden_size), peft_model, peft_model.disable_adapter
    ref = copy.deepcopy(lm).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return PolicyWithValue(lm, hidden_size), ref, contextlib.nullcontext


__all__ = ["PolicyWithValue", "build_policy"]
