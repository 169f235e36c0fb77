"""A critic on disk: config.json + critic.safetensors (the config also in the weights' header),
read and checked without loading any model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

from tdreward.errors import TDRewardError, first_line
from tdreward.io import write_json

log = logging.getLogger("tdreward")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "critic.safetensors"
FORMAT = "tdreward-critic"
# config.json's `model_type`, the key hub tooling reads to tell what a folder holds (critics
# saved before it existed lack it and still load: only `format` is checked).
MODEL_TYPE = "tdreward-critic"
CARD_NAME = "README.md"
# What a critic on the hub is: the files `from_pretrained` reads, and its card.
HUB_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The weights file's header holds the config too: one file, written in one atomic step, that
# always describes the weights it carries (config.json is its readable copy).
CONFIG_METADATA_KEY = "tdreward_config"
_REQUIRED = ("base_model", "hidden_size", "vocab_size", "reward_config")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True)  # NaN-safe equality of two configs


def _weights_config(weights: Path) -> dict | None:
    """The config stored in the weights file's header (None in critics saved before it was).
    Reading the header also checks that the file is complete."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            text = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
    except (SafetensorError, OSError) as e:
        raise TDRewardError(f"{weights} is truncated or corrupt ({first_line(e)}); "
                            "copy or train the critic again") from e
    if text is None:
        return None
    try:
        stored = json.loads(text)
    except ValueError as e:
        raise TDRewardError(f"{weights} is corrupt (its stored config is not valid JSON); "
                            "copy or train the critic again") from e
    return stored if isinstance(stored, dict) else None


def read_critic_config(path: Path) -> dict:
    """The config of the critic in `path`, checked; one-line errors name the damaged file.

    The copy in the weights file wins over config.json when both exist and differ (a save
    interrupted between its two renames): config.json is then rewritten from it."""
    path = Path(path)
    cfg_path, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise TDRewardError(
            f"{path} is not a tdreward reward model (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "create one with `tdreward train-critic`"
        )
    stored = _weights_config(weights)
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        if stored is None:
            raise TDRewardError(f"{cfg_path} is not valid JSON ({first_line(e)}); copy or "
                                "train the critic again") from e
        meta = None
    if stored is not None and _canonical(stored) != _canonical(meta):
        log.warning("%s does not describe %s (a save cut short, or edited by hand); using the "
                    "config stored in the weights and rewriting %s", cfg_path, WEIGHTS_NAME,
                    CONFIG_NAME)
        with contextlib.suppress(OSError):  # a read-only critic still loads
            write_json(cfg_path, stored)
        meta = stored
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TDRewardError(f"{cfg_path} is not a tdreward reward model config")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise TDRewardError(f"{cfg_path} lacks {', '.join(missing)}; the critic is damaged")
    return meta


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub repo id (org/name) and names no local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def resolve_critic_dir(path: str | os.PathLike) -> Path:
    """The local folder of a critic: `path` itself, or for a hub id (org/name that is no local
    path) the folder of its files in the Hugging Face cache, downloaded when the hub answers.
    Offline and not cached: one line naming the id."""
    name = str(path)
    if not is_hub_id(name):
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download

    from tdreward.data.corpus import env_offline, hub_reachable

    # The same short reachability check as model loading: offline fails in seconds, not after
    # huggingface_hub's retries.
    offline = env_offline() or not hub_reachable()
    try:
        return Path(snapshot_download(name, allow_patterns=list(HUB_FILES),
                                      local_files_only=offline))
    except Exception as e:  # huggingface_hub raises many kinds (HTTP, cache, validation)
        if offline:
            raise TDRewardError(
                f"reward model {name!r} is not a local folder nor in the Hugging Face cache, and "
                "the hub cannot be reached (offline): download it where the hub is reachable, "
                "or pass a critic folder") from e
        raise TDRewardError(f"cannot download reward model {name!r} from the Hugging Face hub "
                            f"({first_line(e)})") from e


def check_critic_fits(path: str | os.PathLike, spec: str | None, flag: str) -> dict:
    """Read the critic at `path` and fail before any model loads when the model named by `spec`
    (None: the critic's own) cannot carry it: hidden size or vocabulary differ. The error names
    the flag that chose the model. Returns the critic's config."""
    from tdreward.backends.model_info import model_dims

    meta = read_critic_config(resolve_critic_dir(path))
    if spec is None:
        return meta
    dims = model_dims(spec)
    if dims is None:
        return meta  # not readable without loading: checked after loading
    want = (meta["hidden_size"], meta["vocab_size"])
    if dims != want:
        raise TDRewardError(
            f"{flag} {spec} has hidden size {dims[0]} and vocabulary {dims[1]}, but the critic "
            f"{path} was trained on {meta['base_model']} ({want[0]}, {want[1]}): give that model "
            f"or one with the same dimensions (or leave {flag} out to use the critic's own)")
    return meta


def check_state_name(name: str) -> None:
    from tdreward.reward.belief import STATE_REGISTRY

    if name not in STATE_REGISTRY:
        raise TDRewardError(f"--state must be one of {', '.join(sorted(STATE_REGISTRY))}, "
                            f"got {name!r}")
