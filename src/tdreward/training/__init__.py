"""Training: the critic by TD(lambda), PPO with TD-shaped rewards, LoRA with a TD-weighted loss (a config file beside each trainer)."""
