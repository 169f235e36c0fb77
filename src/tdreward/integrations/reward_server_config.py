"""`tdreward serve-reward`'s settings: each field is a flag (tdreward.flags). No heavy imports,
so `tdreward --help` stays fast and a bad value fails before the model loads."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from tdreward.errors import TDRewardError
from tdreward.evaluation.score_config import check_scoring_spec
from tdreward.flags import setting
from tdreward.hardware import HardwareSettings
from tdreward.reward_settings import RewardSettings
from tdreward.specs import DEFAULT_MODEL
from tdreward.validation import validate

# The same variable as `tdreward serve`: one key for the machine's tdreward servers.
API_KEY_ENV = "TDREWARD_API_KEY"
# An RL step sends its whole rollout batch at once (OpenRLHF: every sample of the step, each
# up to --max_len tokens of text), so the limits are far above `serve`'s 4 MiB.
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
SERVER = "server"  # the help section of the HTTP flags


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: only these are known to resolve to loopback
        return host.lower() in ("localhost", "localhost.localdomain")


@dataclass
class RewardServerConfig:
    """Everything `tdreward serve-reward` takes: each field is a flag (tdreward.flags)."""

    base_model: str | None = setting(None, help="the reference LM's spec", default_help=(
        f"the critic's base model with --reward_model_path, else {DEFAULT_MODEL}"))
    reward: RewardSettings = field(default_factory=RewardSettings, metadata={"help": "nested"})
    hardware: HardwareSettings = field(default_factory=HardwareSettings,
                                       metadata={"help": "nested"})
    host: str = setting("127.0.0.1", group=SERVER, help="listen address")
    port: int = setting(5000, group=SERVER, help="listen port (0: any free port, printed at "
                        "start); 5000 is OpenRLHF's serve_rm default")
    allow_remote: bool = setting(
        False, group=SERVER, help="allow a --host beyond loopback (the server is then "
        "reachable from the network; give --api_key or firewall it)")
    api_key: str | None = setting(
        None, group=SERVER, help="require `Authorization: Bearer KEY` on /get_reward and "
        "/score", default_help=f"${API_KEY_ENV}, else no key")
    batch_size: int = setting(8, help="texts per forward pass; concurrent requests are "
                              "gathered into one scoring call")
    max_wait_ms: float = setting(10.0, help="how long the worker waits for more requests "
                                 "before it scores a batch that is not full")
    max_queue: int = setting(64, group=SERVER, help="requests waiting to be scored; beyond "
                             "it a request gets 503 with Retry-After")
    max_request_bytes: int = setting(DEFAULT_MAX_REQUEST_BYTES, group=SERVER,
                                     help="refuse larger request bodies with 413")
    max_texts: int = setting(4096, group=SERVER,
                             help="refuse requests of more texts with 413")
    max_length: int | None = setting(None, help="context window; longer texts are read in "
                                     "sliding windows", default_help="the model's")
    stride: int | None = setting(None, help="sliding-window stride for long texts",
                                 default_help="half the window")
    verbose: bool = False

    def __post_init__(self) -> None:
        validate(self, {"port": "[0, 65535]", "batch_size": ">=1", "max_wait_ms": "[0, 60000]",
                        "max_queue": ">=1", "max_request_bytes": ">=1024", "max_texts": ">=1",
                        "max_length": ">=2", "stride": ">=1"})
        if self.stride and self.max_length and self.stride > self.max_length:
            raise TDRewardError(f"--stride ({self.stride}) must not exceed --max_length "
                                f"({self.max_length})")
        # Refused rather than warned about: a reward server on 0.0.0.0 lets anyone who can
        # reach the machine run the model, and OpenRLHF's own serve_rm binds 0.0.0.0 by
        # default, so a copied command line would expose it without anyone deciding to.
        if not self.allow_remote and not is_loopback(self.host):
            raise TDRewardError(f"--host {self.host} is reachable from the network: pass "
                                "--allow_remote (and --api_key) to bind it, or use 127.0.0.1")
        if self.api_key is None:  # read when the config is built, not when the module loads
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.api_key is not None and not self.api_key.strip():
            raise TDRewardError("--api_key must not be empty")
        # The critic's own reference LM unless --base_model names another; a model whose
        # dimensions do not fit the critic fails here, before it is loaded.
        meta = self.reward.check_fits(self.base_model, "--base_model")
        self.base_model = self.base_model or (meta or {}).get("base_model") or DEFAULT_MODEL
        check_scoring_spec(self.base_model)
