"""Sharing critics on the Hugging Face hub: `TDRewardModel.push_to_hub` and train-critic's
--push_to_hub. Downloading is `critic_files.resolve_critic_dir`, where every reader goes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tdreward.critic_files import (
    CARD_NAME,
    CONFIG_NAME,
    MODEL_TYPE,
    WEIGHTS_NAME,
    read_critic_config,
    resolve_critic_dir,
)
from tdreward.errors import TDRewardError, first_line
from tdreward.model_card import critic_card, write_card

# What train-critic uploads beside the critic: its diagnostics, not its caches or checkpoint.
EXTRA_FILES = ("metrics.json", "learning_curve.png")


def require_hub(action: str) -> None:
    """Fail with one line, in seconds, when the hub cannot be reached: the same short TCP
    check as model loading (an upload would otherwise retry for minutes)."""
    from tdreward.data.corpus import env_offline, hub_reachable

    if env_offline():
        raise TDRewardError(f"{action}: HF_HUB_OFFLINE is set (offline); unset it to upload")
    if not hub_reachable():
        raise TDRewardError(f"{action}: the Hugging Face hub cannot be reached (offline); "
                            "push again once it can (TDRewardModel.push_to_hub)")


def upload_critic(folder: str | os.PathLike, repo_id: str, private: bool = False,
                  token: str | None = None, extra: tuple[str, ...] = EXTRA_FILES) -> str:
    """Upload the critic in `folder` (and the `extra` files that exist) to hub repo `repo_id`
    in one commit, creating the repo when needed; its card says to load it by `repo_id`.
    Returns the repo's URL."""
    action = f"cannot push to {repo_id}"
    require_hub(action)
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    meta = read_critic_config(folder)  # a damaged critic is not uploaded
    card = critic_card(meta, repo_id).encode("utf-8")
    ops = [CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card)]
    for name in (CONFIG_NAME, WEIGHTS_NAME, *extra):
        if (folder / name).is_file():
            ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations=ops, commit_message="Upload tdreward critic")
    except Exception as e:  # HTTP, auth and validation errors of huggingface_hub
        raise TDRewardError(f"{action} ({type(e).__name__}: {first_line(e)})") from e
    return str(url)


def save_card(folder: str | os.PathLike, meta: dict) -> bool:
    """The critic card (README.md) of config `meta` into `folder`, unless a README.md there
    is not ours; it says to load the folder by the name it was saved under."""
    return write_card(folder, critic_card(meta, str(folder)))


class PushToHubMixin:
    """`push_to_hub` for a model with `save_pretrained(folder)`: saved to a temporary folder
    (critic files and card), then uploaded."""

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        require_hub(f"cannot push to {repo_id}")  # before saving anything
        with tempfile.TemporaryDirectory(prefix="tdreward-push-") as tmp:
            self.save_pretrained(tmp)  # type: ignore[attr-defined]
            return upload_critic(tmp, repo_id, private=private, token=token, extra=())


__all__ = ["EXTRA_FILES", "MODEL_TYPE", "resolve_critic_dir", "save_card", "PushToHubMixin", "require_hub", "upload_critic"]
