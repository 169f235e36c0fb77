"""A resumable on-disk cache of generations, one JSON file per sample, written atomically.

The key holds everything a sample depends on: the model spec, the identity of its weights (a
GGUF file's path, size and mtime; a directory's config; a server's address), the backend, the
prompt, the prompt format and the sampling settings, the sample's seed. A run that stops half
way leaves only complete files, so the next run regenerates just the samples without one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tdreward.backends.embedded import cache_dir
from tdreward.backends.registry import Generation
from tdreward.hardware import CPU_FLOAT32, HardwareSettings, LlamaCppSettings
from tdreward.io import write_json
from tdreward.specs import ModelSpec

FORMAT = 1


def default_cache_dir() -> Path:
    return cache_dir() / "generations"


def _stat(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path}|missing"
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def placement_key(backend: str, hardware: HardwareSettings, llamacpp: LlamaCppSettings) -> dict:
    """Where a sample was computed, for its key: another dtype or device gives other numbers
    (greedy text too, where two tokens were nearly tied). Empty for the CPU in float32 (or
    llama.cpp on the CPU), so the caches of earlier versions stay valid."""
    if backend == "transformers":
        place = hardware.resolve()
        return {} if place == CPU_FLOAT32 else {"placement": place.to_dict()}
    if backend == "llamacpp":
        from tdreward.backends.llamacpp import resolve_gpu_layers

        layers = resolve_gpu_layers(llamacpp.gpu_layers(hardware.device))
        return {} if layers == 0 else {"n_gpu_layers": layers}
    return {}


def model_fingerprint(spec: ModelSpec, backend: str, ollama_host: str | None = None) -> str:
    """What identifies the weights behind `spec`, without loading them."""
    if spec.kind in ("gguf", "embedded", "llamacpp"):
        from tdreward.backends.hf import resolve_gguf

        return _stat(resolve_gguf(spec))
    if spec.kind == "hf":
        path = Path(spec.target).expanduser()
        if path.is_dir():
            weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
            return "|".join(_stat(p) for p in [path / "config.json", *weights])
        return f"hub:{spec.target}"
    if spec.kind == "ollama":
        from tdreward.backends.ollama import ollama_host as host_of

        return f"ollama:{host_of(ollama_host)}/{spec.target}"
    return f"openai:{spec.target}#{spec.model}"


class GenerationCache:
    """get/put Generation records by key; `root=None` disables caching."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None

    @staticmethod
    def key(fields: dict) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def _path(self, digest: str) -> Path:
        assert self.root is not None
        return self.root / digest[:2] / f"{digest}.json"

    def get(self, fields: dict) -> Generation | None:
        if self.root is None:
            return None
        path = self._path(self.key(fields))
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        # The full key is stored too: a hash collision (or a hand-edited file) is a miss.
        if record.get("format") != FORMAT or record.get("key") != json.loads(json.dumps(fields)):
            return None
        return Generation.from_dict(record["generation"])

    def put(self, fields: dict, gen: Generation) -> None:
        if self.root is None:
            return
        write_json(self._path(self.key(fields)),
                   {"format": FORMAT, "key": fields, "generation": gen.to_dict()})


__all__ = ["GenerationCache", "default_cache_dir", "model_fingerprint"]
