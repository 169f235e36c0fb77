"""Export a transformers causal LM (optionally with a LoRA adapter merged) to a GGUF file.

No HF -> GGUF converter ships on PyPI (llama.cpp's `convert_hf_to_gguf.py` is a script in its
repository), so this is ours, written on the `gguf` library's `GGUFWriter`:

* tensor names through gguf's own name map (`gguf.get_tensor_name_map`), per architecture;
* the layout changes llama.cpp expects, each the inverse of what transformers' GGUF loader
  undoes on load: the rotary Q/K row permutation for Llama, `norm + 1` for Gemma 3 (HF Gemma
  computes `x * (1 + w)`, llama.cpp `x * w`), and the Conv1D transpose for GPT-2;
* hyperparameters under the architecture's GGUF keys;
* tokenizer + chat template (see `tdreward.export.tokenizer`);
* outtype f32, f16 (1-D tensors stay f32) or q8_0 (`gguf.quants`; rows not divisible by 32
  fall back to f16), as llama.cpp's converter does.

Supported architectures: Llama (e.g. SmolLM2), Gemma 3 (text) and GPT-2.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from tdreward.errors import TDRewardError, first_line
from tdreward.export import tokenizer as gguf_tokenizer
from tdreward.export.architectures import ARCHS, SUPPORTED, arch_for, permute_qk
from tdreward.export.export_config import OUTTYPES, ExportConfig
from tdreward.io import atomic_path

log = logging.getLogger("tdreward")


# --------------------------------------------------------------------------- tensors
def _target_type(gguf_name: str, x: np.ndarray, outtype: str):
    """The GGML type of one tensor, following llama.cpp's converter."""
    from gguf import GGMLQuantizationType as Q

    if outtype == "f32" or x.ndim <= 1 or gguf_name.endswith("norm.weight") \
            or gguf_name.startswith("position_embd"):
        return Q.F32
    if outtype == "q8_0" and x.shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16


def _convert(x: np.ndarray, qtype):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == Q.F32:
        return x.astype(np.float32), None
    if qtype == Q.F16:
        return x.astype(np.float16), None
    return quants.quantize(x.astype(np.float32), qtype), qtype


def named_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every weight, the tied output head left out (llama.cpp reuses the
    embedding when output.weight is absent)."""
    state = model.state_dict()
    emb = model.get_input_embeddings().weight
    out = []
    for name, t in state.items():
        if name.endswith("lm_head.weight") and t.data_ptr() == emb.data_ptr():
            continue
        out.append((name, t))
    return out


def _file_type(outtype: str) -> int:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0}[outtype]


def write_gguf(model, tokenizer, outfile: str | Path, outtype: str = "f16",
               source_gguf: Path | None = None, tokenizer_mode: str = "auto",
               name: str | None = None) -> dict:
    """Write `model` (+ tokenizer metadata) as a GGUF file; returns a summary dict."""
    import gguf
    from tqdm.auto import tqdm

    if outtype not in OUTTYPES:
        raise TDRewardError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    cfg = model.config
    arch = arch_for(cfg)
    model_arch = getattr(gguf.MODEL_ARCH, arch.gguf_arch)
    arch_name = gguf.MODEL_ARCH_NAMES[model_arch]
    n_blocks = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    name_map = gguf.get_tensor_name_map(model_arch, n_blocks)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tok_src = gguf_tokenizer.tokenizer_source(source_gguf, tokenizer, n_vocab, tokenizer_mode)

    tensors = []
    for hf_name, t in named_tensors(model):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TDRewardError(f"no GGUF tensor name for {hf_name!r} ({arch_name}); "
                                "the model has weights llama.cpp's architecture does not know")
        tensors.append((gguf_name, hf_name, t))

    outfile = Path(outfile).expanduser()
    start = time.perf_counter()
    with atomic_path(outfile) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch_name)
        writer.add_name(name or outfile.name.split(".")[0])
        writer.add_type(gguf.GGUFType.MODEL)
        arch.hparams(writer, cfg)
        writer.add_file_type(_file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tok_note = gguf_tokenizer.write_tokenizer(writer, tokenizer, n_vocab, tok_src)
        for gguf_name, _hf_name, t in tqdm(tensors, desc=f"GGUF {outtype}", unit="tensor",
                                           disable=len(tensors) < 50):
            x = t.detach().to(torch.float32).cpu().numpy()
            x = arch.transform(gguf_name, x, cfg)
            data, raw = _convert(np.ascontiguousarray(x), _target_type(gguf_name, x, outtype))
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    size = outfile.stat().st_size
    log.info("wrote %s (%s, %.1f MB, tokenizer %s) in %.1f s", outfile, outtype, size / 1e6,
             tok_note, time.perf_counter() - start)
    return {"outfile": str(outfile), "outtype": outtype, "architecture": arch_name,
            "tensors": len(tensors), "bytes": size, "tokenizer": tok_note}


# --------------------------------------------------------------------------- loading
def source_gguf_of(model_path: str) -> Path | None:
    """The GGUF file a model spec came from: gguf:/embedded: specs, a tdreward cache
    directory (tdreward_source.json) or a merged LoRA whose base came from one
    (tdreward_merged.json)."""
    from tdreward.backends.hf import resolve_gguf
    from tdreward.specs import parse_spec

    spec = parse_spec(model_path)
    path = resolve_gguf(spec)
    if path is not None:
        return path
    if spec.kind != "hf":
        return None
    folder = Path(spec.target).expanduser()
    from tdreward.backends.adapters import adapter_base_model, is_adapter_dir

    if folder.is_dir() and is_adapter_dir(folder):  # an adapter: the GGUF of its base, if any
        base = adapter_base_model(folder)
        return source_gguf_of(base) if base else None
    record = folder / "tdreward_source.json"  # a dequantised GGUF in the tdreward cache
    if record.is_file():
        try:
            src = Path(json.loads(record.read_text())["gguf"])
        except (ValueError, KeyError, TypeError):
            return None
        return src if src.is_file() else None
    merged = folder / "tdreward_merged.json"  # `tdreward lora --merge`: its base model's
    if merged.is_file():
        try:
            base = json.loads(merged.read_text())["base_model"]
        except (ValueError, KeyError, TypeError):
            return None
        if isinstance(base, str) and base and Path(base).expanduser().resolve() != \
                folder.resolve():
            try:
                return source_gguf_of(base)
            except TDRewardError:
                return None
    return None


def merge_adapter(model, adapter: str | Path):
    """Merge a PEFT LoRA adapter into `model` (returns the plain merged model)."""
    from tdreward.backends.adapters import import_peft

    import_peft()  # first: keeps bitsandbytes' 4-bit kernel notice out of the output
    from peft import PeftModel

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise TDRewardError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        peft_model = PeftModel.from_pretrained(model, str(path))
    except (ValueError, RuntimeError, KeyError) as e:
        first = first_line(e)
        raise TDRewardError(f"cannot apply adapter {path} to this model: {first}") from e
    return peft_model.merge_and_unload()


def load_for_export(model_path: str, adapter: str | None = None):
    """(model, tokenizer, source GGUF or None) for a spec, the adapter merged when given."""
    from tdreward.backends.hf import load_model

    model, tok = load_model(model_path)
    if adapter:
        model = merge_adapter(model, adapter)
    return model.eval(), tok, source_gguf_of(model_path)


def export(opts: ExportConfig) -> dict:
    """`tdreward export`: load (and merge), then write the GGUF file."""
    if opts.outtype not in OUTTYPES:
        raise TDRewardError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {opts.outtype!r}")
    if Path(opts.outfile).expanduser().is_dir():
        raise TDRewardError(f"--outfile {opts.outfile} is a directory; give a file name")
    model, tok, source = load_for_export(opts.model_path, opts.adapter)
    arch_for(model.config)  # fail before any work on an unsupported architecture
    with torch.no_grad():
        return write_gguf(model, tok, opts.outfile, opts.outtype, source, opts.tokenizer,
                          opts.name)


def cached_gguf(model_path: str, outtype: str = "f16") -> Path:
    """A GGUF file for a model spec: the file itself for gguf:/embedded:/.gguf specs, else an
    export kept under $TDREWARD_CACHE/gguf/, keyed by the model directory's files (name, size,
    mtime) or hub id and the outtype, so a second `tdreward serve` starts at once."""
    import hashlib

    from tdreward.backends.embedded import cache_dir
    from tdreward.backends.hf import resolve_gguf
    from tdreward.specs import parse_spec

    spec = parse_spec(model_path)
    path = resolve_gguf(spec)
    if path is not None:
        return path
    if spec.kind != "hf":
        raise TDRewardError(f"{model_path!r} is not a model file or directory: give a .gguf "
                            "file, gguf:PATH, embedded:NAME, a directory or a hub id")
    target = Path(spec.target).expanduser()
    if target.is_file():
        return target
    if not target.exists() and (spec.target.startswith((".", "/", "~"))
                                or spec.target.endswith(".gguf")):
        raise TDRewardError(f"model not found: {target}")
    if target.is_dir():
        files = sorted((str(f.relative_to(target)), f.stat().st_size, f.stat().st_mtime_ns)
                       for f in target.rglob("*") if f.is_file())
        key = json.dumps([str(target.resolve()), files, outtype])
    else:
        key = json.dumps([spec.target, outtype])
    out = cache_dir() / "gguf" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.{outtype}.gguf"
    if not out.is_file():
        model, tok, source = load_for_export(model_path)
        arch_for(model.config)
        log.warning("exporting %s to GGUF (%s) once: %s", model_path, outtype, out)
        with torch.no_grad():
            write_gguf(model, tok, out, outtype, source)
    return out


__all__ = ["ARCHS", "ExportConfig", "OUTTYPES", "SUPPORTED", "arch_for", "cached_gguf", "export",
           "load_for_export", "merge_adapter", "permute_qk", "write_gguf"]
