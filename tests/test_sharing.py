"""Issue #19 items 3 and 5: critics with a model card and model_type, hub ids and pushes (the
offline failures, for real: this test machine cannot reach the hub), adapters that record
the base spec the user named, and --report_to tensorboard|wandb|none."""

from __future__ import annotations

import hashlib
import json
import random
import time

import pytest
from safetensors.torch import load_file, save_file

from conftest import EMBEDDED, REPO, assert_one_line_error, make_tiny_lm, run_cli
from tdreward.critic_files import CONFIG_METADATA_KEY, MODEL_TYPE
from tdreward.errors import TDRewardError
from tdreward.reward.config import RewardConfig
from tdreward.reward_model import TDRewardModel

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
SAMPLE = REPO / "data" / "sample_training_data.jsonl"
WORDS = ["river", "stone", "lamp", "quiet", "orbit", "velvet", "cedar", "harbor", "signal"]


@pytest.fixture
def online_env(monkeypatch):
    """No HF_HUB_OFFLINE: the short TCP check decides, as on a user's offline machine."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def _no_offline_env() -> dict:
    # run_cli adds to this process's environment (where conftest sets them to 1): "0" is off.
    return {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}


def _rm(tokenizer, base: str = HUB_BASE) -> TDRewardModel:
    lm = make_tiny_lm(len(tokenizer), seed=2)
    lm.config.pad_token_id = tokenizer.pad_token_id
    return TDRewardModel.from_lm(lm, tokenizer, base)


def test_save_writes_model_type_and_card_and_loads_back(tokenizer, tmp_path):
    rm = _rm(tokenizer)
    rm.trained = True
    rm.training_info = {"best_epoch": 7, "dataset": "wikitext", "max_tokens": 20000,
                        "validation": {"ev_mc": 0.4321, "delta_r2": 0.0123,
                                       "corr_delta_H": -0.0456, "mean_delta": 0.0789},
                        "n_tokens": {"train": 18000, "validation": 2000}}
    rm.save_pretrained(tmp_path / "c")
    back = TDRewardModel.from_pretrained(tmp_path / "c", lm=rm.lm, tokenizer=tokenizer)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["model_type"] == MODEL_TYPE and back.training_info["best_epoch"] == 7
    card = (tmp_path / "c" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: tdreward" in front and f"base_model: {HUB_BASE}" in front
    for text in (HUB_BASE, "0.4321", "0.0123", "-0.0456", "0.0789", "best epoch", "wikitext",
                 "20000", "TDRewardModel.from_pretrained", "tdreward score --reward_model_path",
                 '"gamma"'):
        assert text in card, text
    # A README.md of the user's own is never replaced; an embedded: base is no hub link.
    (tmp_path / "c" / "README.md").write_text("my notes\n")
    rm.base_model = EMBEDDED
    rm.save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "README.md").read_text() == "my notes\n"
    rm.save_pretrained(tmp_path / "e")
    assert "base_model:" not in (tmp_path / "e" / "README.md").read_text().split("---")[1]


def test_critic_saved_before_model_type_still_loads(tokenizer, tmp_path):
    rm = _rm(tokenizer)
    rm.save_pretrained(tmp_path / "old")
    cfg_path, weights = tmp_path / "old" / "config.json", tmp_path / "old" / "critic.safetensors"
    meta = json.loads(cfg_path.read_text())
    del meta["model_type"]
    cfg_path.write_text(json.dumps(meta))
    save_file(load_file(str(weights)), str(weights),
              metadata={CONFIG_METADATA_KEY: json.dumps(meta)})
    back = TDRewardModel.from_pretrained(tmp_path / "old", lm=rm.lm, tokenizer=tokenizer)
    assert back.base_model == HUB_BASE


def test_hub_id_offline_not_cached_is_one_line(online_env, tokenizer):
    start = time.perf_counter()
    with pytest.raises(TDRewardError) as e:
        TDRewardModel.from_pretrained("no-such-org/no-such-critic", lm=object(),
                                      tokenizer=tokenizer)
    assert time.perf_counter() - start < 15  # the 3 s check, not huggingface_hub's retries
    msg = str(e.value)
    assert "\n" not in msg and "'no-such-org/no-such-critic'" in msg and "offline" in msg


def test_push_to_hub_offline_fails_fast(online_env, tokenizer, tmp_path):
    rm = _rm(tokenizer)
    start = time.perf_counter()
    with pytest.raises(TDRewardError, match="cannot push to me/critic.*cannot be reached"):
        rm.push_to_hub("me/critic")
    assert time.perf_counter() - start < 15


def test_cli_hub_critic_and_push_offline_are_one_line(tmp_path):
    p = run_cli("score", "--reward_model_path", "no-such-org/no-such-critic", "hi",
                env=_no_offline_env())
    assert_one_line_error(p, "no-such-org/no-such-critic", "offline")
    p = run_cli("train-critic", "--dataset", "wikitext", "--output_dir", str(tmp_path / "o"),
                "--push_to_hub", "me/critic", env=_no_offline_env())
    assert_one_line_error(p, "--push_to_hub me/critic", "cannot be reached")
    assert not (tmp_path / "o" / "cache").exists()  # failed before any work


def test_cli_report_to_wandb_without_wandb_is_one_line(tmp_path):
    pytest.importorskip("tensorboard")
    if __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    for cmd in (["train-critic", "--dataset", "wikitext"], ["lora", "--dataset", str(SAMPLE)]):
        p = run_cli(*cmd, "--output_dir", str(tmp_path / "o"), "--report_to", "wandb")
        assert_one_line_error(p, "--report_to wandb", "pip install wandb")


def test_train_critic_logs_epochs_to_tensorboard_and_writes_card(tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tdreward.training.critic_trainer import CriticTrainingConfig, train_critic

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(6)] * 4
    rm = _rm(tokenizer)
    out = tmp_path / "critic"
    cfg = CriticTrainingConfig(
        base_model=HUB_BASE, dataset="synthetic", output_dir=str(out), epochs=3, batch_size=8,
        reward=RewardConfig(gamma=0.9), window=32, doc_end_terminal=True, patience=100,
        val_fraction=0.15, report_to="tensorboard")
    metrics = train_critic(cfg, rm=rm, docs=docs, progress=False)
    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("validation/ev_mc", "validation/delta_r2", "validation/corr_delta_H",
                "validation/mean_delta", "train/td_loss"):
        assert tag in tags, tags
    ev = acc.Scalars("validation/ev_mc")
    assert [e.step for e in ev] == [1, 2, 3]
    assert ev[-1].value == pytest.approx(metrics["epochs"][-1]["ev_mc"], rel=1e-5)
    card = (out / "README.md").read_text()
    assert f"best epoch (highest held-out EV_MC): {metrics['best_epoch']}" in card
    assert f"{metrics['validation']['ev_mc']:.4f}" in card and "synthetic" in card


def test_lora_adapter_records_the_spec_named_and_loads(tmp_path, capsys):
    """The smallest `tdreward lora` run (test_lora's CLI set-up, one step): the adapter names
    the embedded spec and its GGUF's sha256, not the dequantised cache folder; it has a card,
    TensorBoard events, and loads as a model by its folder."""
    pytest.importorskip("tensorboard")
    from tdreward.backends.adapters import adapter_base_model
    from tdreward.backends.hf import load_model, resolve_gguf
    from tdreward.cli import main
    from tdreward.specs import parse_spec

    out = tmp_path / "L"
    rc = main(["lora", "--base_model", EMBEDDED, "--dataset", str(SAMPLE), "--batch_size", "2",
               "--output_dir", str(out), "--max_steps", "1", "--max_length", "32",
               "--max_examples", "2", "--eval_examples", "0", "--no_progress",
               "--reward_scale", "0", "--report_to", "tensorboard"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == EMBEDDED
    meta = json.loads((out / "tdreward_lora.json").read_text())
    sha = hashlib.sha256(resolve_gguf(parse_spec(EMBEDDED)).read_bytes()).hexdigest()
    assert meta["base_model"] == EMBEDDED and meta["base_model_sha256"] == sha
    card = (out / "README.md").read_text()
    assert EMBEDDED in card and sha in card and "library_name: peft" in card
    assert ".cache" not in card and "base_model:" not in card.split("---")[1]
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert adapter_base_model(out) == EMBEDDED
    model, _ = load_model(str(out))  # the base by its spec, the adapter merged
    assert model is not None


def test_moved_gguf_base_maps_to_its_cached_copy(tmp_path, monkeypatch):
    """An adapter of gguf:/gone.gguf finds the dequantised copy by the recorded sha256."""
    from tdreward.backends.adapters import loadable_base

    monkeypatch.setenv("TDREWARD_CACHE", str(tmp_path / "cache"))
    sha = "ab" * 32
    cached = tmp_path / "cache" / "models" / sha[:24]
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    adapter = tmp_path / "A"
    adapter.mkdir()
    (adapter / "tdreward_lora.json").write_text(json.dumps(
        {"base_model": "gguf:/gone/m.gguf", "base_model_sha256": sha}))
    assert loadable_base(adapter, "gguf:/gone/m.gguf") == str(cached)
    assert loadable_base(adapter, EMBEDDED) == EMBEDDED
