"""`tdreward serve-reward`: the TD reward over HTTP for RL frameworks (OpenRLHF's
`--remote_rm_url`), with per-token traces; tdreward.integrations.reward_server says how."""

from __future__ import annotations

import argparse
import logging

from tdreward.commands import add_command
from tdreward.commands.serve import warn_if_exposed
from tdreward.flags import from_args
from tdreward.integrations.reward_server_config import RewardServerConfig

ORDER = 65
log = logging.getLogger("tdreward")


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "serve-reward", RewardServerConfig, run,
        help="serve the TD reward over HTTP for RL training (OpenRLHF --remote_rm_url)",
        description="Serve the TD reward of a reference LM (+ critic): POST /get_reward "
        "(OpenRLHF's remote reward model protocol: {\"query\", \"prompts\"} -> {\"rewards\"}; "
        "a query's reward is the mean delta of its response, the tokens after its prompt), "
        "POST /score (per-token traces), GET /health. Concurrent requests are scored together "
        "in batches.")


def run(args: argparse.Namespace) -> int:
    cfg = from_args(RewardServerConfig, args, verbose=args.verbose)
    # Warned before the model loads, so that it is not lost in the loading messages.
    warn_if_exposed(cfg.host, cfg.api_key is not None)
    from tdreward.integrations.reward_server import RewardServer
    from tdreward.reward_model import load_reward_model

    model = load_reward_model(cfg.base_model, cfg.reward, verbose=cfg.verbose,
                              hardware=cfg.hardware)
    server = RewardServer(model, cfg)
    print(f"serving the TD reward of {cfg.base_model} at {server.url}  (POST /get_reward, "
          f"POST /score, GET /health; OpenRLHF: --remote_rm_url {server.url}/get_reward)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how a foreground server is meant to stop
        print("stopped", flush=True)
    return 0
