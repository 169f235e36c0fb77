"""Caches that survive concurrency and crashes: concurrent cold-cache loads, abandoned
temporary files swept, damaged cache entries rebuilt, damaged critics named in one line, the
train-critic feature cache keyed by content, and model loading that leaves the process's
transformers logging as it found it. Real files and real processes throughout."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, make_tiny_lm
from tdreward.cache_files import host_id, sweep_stale
from tdreward.critic_files import CONFIG_NAME, WEIGHTS_NAME
from tdreward.errors import TDRewardError
from tdreward.reward.config import RewardConfig
from tdreward.reward_model import TDRewardModel


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _env(cache: Path) -> dict[str, str]:
    return os.environ | {"TDREWARD_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                         "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


# A child that loads a model by spec with tdreward's log on stderr (INFO).
LOAD = """
import logging, sys
h = logging.StreamHandler(sys.stderr)
h.setFormatter(logging.Formatter("tdreward: %(levelname)s: %(message)s"))
log = logging.getLogger("tdreward"); log.addHandler(h); log.setLevel(logging.INFO)
from tdreward.backends.hf import load_model
model, tok = load_model(sys.argv[1], verbose=True)
print(sum(p.numel() for p in model.parameters()))
"""


def _load_in_child(spec: str, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOAD, spec], env=_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _leftovers(root: Path) -> list[str]:
    """Temporary entries anywhere under `root` (ours and those of tdreward 0.1)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith((".tmp", ".partial")) or ".tmp" in p.name)


@pytest.fixture(scope="module")
def tiny_gguf(tokenizer, tmp_path_factory) -> Path:
    """A tiny random Llama on the SmolLM2 tokenizer, exported to an f32 GGUF by `export`."""
    from tdreward.export.gguf_writer import write_gguf

    lm = make_tiny_lm(len(tokenizer), seed=7)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    with torch.no_grad():
        write_gguf(lm, tokenizer, path, "f32")
    return path


# --------------------------------------------------------------------------- (a) concurrency
def test_four_concurrent_cold_cache_loads_all_succeed(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    start = time.perf_counter()
    procs = [_load_in_child(f"gguf:{tiny_gguf}", cache) for _ in range(4)]
    results = [(*p.communicate(timeout=600), p.returncode) for p in procs]
    results = [(rc, out, err) for out, err, rc in results]
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    counts = {out.strip() for _, out, _ in results}
    assert len(counts) == 1, counts  # all four loaded the same model
    # One process dequantised; the others waited for it and loaded its copy.
    n_dequantised = sum(f"dequantising {tiny_gguf.name} once" in err for _, _, err in results)
    assert n_dequantised == 1, [err[-500:] for _, _, err in results]
    models = cache / "models"
    folders = [p for p in models.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    record = json.loads((folders[0] / "tdreward_source.json").read_text())
    assert record["gguf"] == str(tiny_gguf.resolve()) and "model.safetensors" in record["files"]
    assert _leftovers(cache) == []
    index = json.loads((models / "hashes.json").read_text())  # the shared index stays valid
    assert len(index) == 1 and next(iter(index.values())).startswith(folders[0].name)
    print(f"four concurrent cold loads: {time.perf_counter() - start:.1f} s")


CACHE_FILES = REPO / "src" / "tdreward" / "cache_files.py"
WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("cache_files", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
for i in range(int(sys.argv[4])):
    m.update_json_dict(sys.argv[2], {f"{sys.argv[3]}-{i}": i})
"""


def test_json_index_keeps_every_concurrent_entry(tmp_path):
    """Six processes add 30 entries each to one index at once: none is lost, the file stays
    valid JSON and no temporary file is left."""
    index = tmp_path / "index.json"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(CACHE_FILES), str(index),
                               f"w{k}", "30"]) for k in range(6)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    data = json.loads(index.read_text())
    assert len(data) == 6 * 30
    assert not list(tmp_path.glob(".index.json.*.tmp"))


# --------------------------------------------------------------------------- (b) sweeping
def test_abandoned_temporaries_are_swept_by_the_next_run(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    dead, host = _dead_pid(), host_id()
    models = cache / "models"
    stale = [
        models / f"0123456789abcdef01234567.tmp{dead}",  # tdreward 0.1's model folder
        models / f".0123456789abcdef01234567.pid{dead}-{host}.k2j3.tmp",
    ]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    live = models / f".0123456789abcdef01234567.pid{os.getpid()}-{host}.a1b2.tmp"
    live.mkdir()
    other_host = models / f".0123456789abcdef01234567.pid{dead}-00000000.c3d4.tmp"
    other_host.mkdir()  # another machine's process: its pid means nothing here

    proc = _load_in_child(f"gguf:{tiny_gguf}", cache)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    for folder in stale:
        assert not folder.exists(), folder
    assert live.is_dir() and other_host.is_dir()
    os.utime(other_host, (time.time() - 2 * 86400,) * 2)  # ... until it is two days old
    sweep_stale(models, [".*.tmp"])
    assert not other_host.exists() and live.is_dir()


def test_gemma_partial_and_lora_trainer_folders_of_dead_processes_are_swept(tmp_path,
                                                                           monkeypatch):
    """The real entry points sweep: Gemma's `.partial` files on its next lookup, and a LoRA
    output folder's `.trainer-*` / `.adapter-*` (the patterns `run_lora` sweeps)."""
    from tdreward.backends import embedded

    assert embedded.is_installed("gemma3-270m"), "setup.sh installs Gemma's part packages"
    dead, host = _dead_pid(), host_id()
    real = embedded.gguf_path("gemma3-270m")  # assembled once in the real cache
    cache = tmp_path / "cache"
    emb = cache / "embedded"
    emb.mkdir(parents=True)
    (emb / real.name).symlink_to(real)  # complete: no 250 MB assembly in this test
    abandoned = emb / f".{real.name}.pid{dead}-{host}.x1y2.partial"
    abandoned.write_bytes(b"\0" * 1024)
    running = emb / f".{real.name}.pid{os.getpid()}-{host}.z9w8.partial"
    running.write_bytes(b"\0" * 1024)
    monkeypatch.setenv("TDREWARD_CACHE", str(cache))
    assert embedded.gguf_path("gemma3-270m") == emb / real.name
    assert not abandoned.exists() and running.exists()

    out = tmp_path / "lora"
    trainer = out / f".trainer-pid{dead}-{host}.abc123"
    (trainer / "checkpoint-1").mkdir(parents=True)
    legacy_old = out / ".trainer-q8w7e6r5"  # no owner in the name: only its age counts
    legacy_new = out / ".trainer-t5y6u7i8"
    legacy_old.mkdir()
    legacy_new.mkdir()
    os.utime(legacy_old, (time.time() - 2 * 86400,) * 2)
    removed = sweep_stale(out, [".trainer-*", ".adapter-*"])
    assert sorted(removed) == sorted([trainer, legacy_old])
    assert legacy_new.is_dir()


# --------------------------------------------------------------------------- (c) damaged cache
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def tdreward_log():
    handler, log = _Records(), logging.getLogger("tdreward")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler.messages
    log.removeHandler(handler)
    log.setLevel(level)


def _cached_folder(cache: Path) -> Path:
    (folder,) = [p for p in (cache / "models").iterdir() if p.is_dir()]
    return folder


def test_truncated_or_corrupt_cached_model_is_rebuilt_with_a_warning(tiny_gguf, tmp_path,
                                                                    monkeypatch, tdreward_log):
    from tdreward.backends.hf import load_model

    monkeypatch.setenv("TDREWARD_CACHE", str(tmp_path / "cache"))
    ref, _ = load_model(f"gguf:{tiny_gguf}")
    # A copy: the loaded tensors may map the cached file, which this test damages in place.
    ref = {k: v.clone() for k, v in ref.state_dict().items()}
    folder = _cached_folder(tmp_path / "cache")
    weights = folder / "model.safetensors"
    size = weights.stat().st_size

    # Truncated (a full disk, a copy cut short): caught by the sizes recorded at write time.
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    tdreward_log.clear()
    model, _ = load_model(f"gguf:{tiny_gguf}")
    warned = [m for m in tdreward_log if "cached model" in m]
    assert warned and str(folder) in warned[0] and "model.safetensors" in warned[0], tdreward_log
    assert weights.stat().st_size == size
    state = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(v, state[k]), k
    del model, state

    # Same size, garbage header: only the load itself can tell.
    with weights.open("r+b") as f:
        f.write(b"\xff" * 16)
    tdreward_log.clear()
    model, _ = load_model(f"gguf:{tiny_gguf}")
    warned = [m for m in tdreward_log if "cached model" in m]
    assert warned and str(folder) in warned[0] and "rebuilding" in warned[0], tdreward_log
    assert load_file(str(weights))  # rebuilt: readable again
    assert _leftovers(tmp_path / "cache") == []


def test_damaged_index_entries_are_recomputed(tiny_gguf, tmp_path, monkeypatch):
    from tdreward.backends import hf

    monkeypatch.setenv("TDREWARD_CACHE", str(tmp_path / "cache"))
    digest = hf._file_sha256(tiny_gguf)
    index = tmp_path / "cache" / "models" / "hashes.json"
    index.write_text(json.dumps({k: "not a hash" for k in json.loads(index.read_text())}))
    assert hf._file_sha256(tiny_gguf) == digest
    index.write_text("[1, 2")  # truncated JSON
    assert hf._file_sha256(tiny_gguf) == digest
    assert json.loads(index.read_text())  # rewritten whole


# --------------------------------------------------------------------------- (d) critic files
@pytest.fixture
def critic_dir(tmp_path) -> tuple[Path, TDRewardModel]:
    lm = make_tiny_lm(300, seed=1)
    rm = TDRewardModel.from_lm(lm, None, "tiny", RewardConfig(gamma=0.9))
    rm.save_pretrained(tmp_path / "critic")
    return tmp_path / "critic", rm


def _one_line_error(path: Path, lm) -> str:
    with pytest.raises(TDRewardError) as e:
        TDRewardModel.from_pretrained(path, lm=lm)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_truncated_critic_weights_are_a_one_line_error_naming_the_file(critic_dir):
    path, rm = critic_dir
    weights = path / WEIGHTS_NAME
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    msg = _one_line_error(path, rm.lm)
    assert str(weights) in msg and "truncated or corrupt" in msg


def test_critic_weights_missing_a_tensor_are_a_one_line_error(critic_dir):
    path, rm = critic_dir
    weights = path / WEIGHTS_NAME
    state = load_file(str(weights))
    state.pop("value_scale")
    save_file(state, str(weights))  # no config in its header: config.json is the only one
    msg = _one_line_error(path, rm.lm)
    assert str(weights) in msg and "value_scale" in msg


def test_unreadable_config_is_a_one_line_error_naming_it(critic_dir):
    path, rm = critic_dir
    save_file(load_file(str(path / WEIGHTS_NAME)), str(path / WEIGHTS_NAME))  # an old critic
    (path / CONFIG_NAME).write_text('{"format": "tdreward-critic", "hidden_')
    msg = _one_line_error(path, rm.lm)
    assert str(path / CONFIG_NAME) in msg and "not valid JSON" in msg


def test_config_left_behind_by_an_interrupted_save_is_repaired(critic_dir, tdreward_log):
    """A save killed between its two renames leaves new weights beside the old config.json:
    loading uses the config stored in the weights (gamma 0.5, not 0.9) and rewrites the file."""
    path, rm = critic_dir
    old_config = (path / CONFIG_NAME).read_text()
    rm.critic.config.gamma = 0.5
    rm.save_pretrained(path)
    (path / CONFIG_NAME).write_text(old_config)
    loaded = TDRewardModel.from_pretrained(path, lm=rm.lm)
    assert loaded.config.gamma == 0.5
    assert json.loads((path / CONFIG_NAME).read_text())["reward_config"]["gamma"] == 0.5
    assert any("does not describe" in m for m in tdreward_log), tdreward_log
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # no temporaries


# --------------------------------------------------------------------------- (e) feature cache
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tdreward.cli", *args], capture_output=True,
                          text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})


def test_train_critic_recomputes_features_when_the_corpus_changes(tokenizer, wikitext_text,
                                                                  tmp_path):
    model = tmp_path / "tiny"
    lm = make_tiny_lm(len(tokenizer), seed=5)
    lm.config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(model)
    tokenizer.save_pretrained(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(wikitext_text[:3000], encoding="utf-8")
    out = tmp_path / "critic"
    args = ["train-critic", "--base_model", str(model), "--epochs", "2", "--window", "32",
            "--batch_size", "4", "--output_dir", str(out), "--verbose"]

    first = _cli(*args, "--dataset", str(corpus))
    assert first.returncode == 0, first.stderr
    key = json.loads((out / "cache" / "meta.json").read_text())["key"]
    ids = load_file(str(out / "cache" / "features.safetensors"))["input_ids"]

    corpus.write_text(wikitext_text[5000:8000], encoding="utf-8")  # same path, new text
    second = _cli(*args, "--dataset", str(corpus))
    assert second.returncode == 0, second.stderr
    assert "reusing the LM feature cache" not in second.stderr
    assert "resuming after" not in second.stderr  # nor the first corpus's checkpoint
    assert json.loads((out / "cache" / "meta.json").read_text())["key"] != key
    new_ids = load_file(str(out / "cache" / "features.safetensors"))["input_ids"]
    assert new_ids.shape != ids.shape or not torch.equal(new_ids, ids)

    moved = tmp_path / "moved.txt"  # the same text under another name: reused
    corpus.rename(moved)
    third = _cli(*args, "--dataset", str(moved))
    assert third.returncode == 0, third.stderr
    assert "reusing the LM feature cache" in third.stderr


# --------------------------------------------------------------------------- (f) library hygiene
def test_load_model_leaves_transformers_logging_as_it_was(tiny_gguf, tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging

    from tdreward.backends.hf import load_model

    monkeypatch.setenv("TDREWARD_CACHE", str(tmp_path / "cache"))
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.set_verbosity_info()  # what a user's own training script might set
        hf_logging.enable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            filters = list(warnings.filters)
            load_model(f"gguf:{tiny_gguf}")  # cold: dequantises
            load_model(f"gguf:{tiny_gguf}")  # warm
            assert warnings.filters == filters
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def test_peft_import_keeps_the_bitsandbytes_4bit_notice_out():
    """peft imports bitsandbytes, which may log a 4-bit CPU kernel notice: shown only where
    4-bit is asked for (`import_peft(quiet_bitsandbytes=False)`)."""
    code = ("import logging; from tdreward.backends.adapters import import_peft; "
            "import_peft({}); assert logging.getLogger('bitsandbytes').level == 0")
    loud = subprocess.run([sys.executable, "-c", code.format("False")], capture_output=True,
                          text=True, timeout=300)
    assert loud.returncode == 0, loud.stderr
    # The bitsandbytes this project pins (CPU build, no `kernels` package) logs the notice;
    # without it this test could not tell a silenced import from a quiet one.
    assert "gemm_4bit" in loud.stderr, loud.stderr
    quiet = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True,
                           text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "gemm_4bit" not in quiet.stderr
