"""`tdreward export`: a transformers model (a LoRA adapter merged) as a GGUF file for llama.cpp
and Ollama (docs/deploy.md)."""

from __future__ import annotations

import argparse

from tdreward.commands import add_command
from tdreward.export.export_config import ExportConfig
from tdreward.flags import from_args

ORDER = 60


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "export", ExportConfig, run,
        help="export a model (+ LoRA adapter) to GGUF",
        description="Write a GGUF file with the gguf library: Llama (SmolLM2), Gemma 3 and "
        "GPT-2 architectures. The tokenizer and chat template are copied from the model's "
        "source GGUF when it came from one, else built from the HF tokenizer (byte-level BPE). "
        "Checked against llama.cpp: per-token log-probs agree with the torch model.", config_file=False)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(ExportConfig, args)  # checked before torch loads
    from tdreward.export.gguf_writer import export

    info = export(cfg)
    print(f"wrote {info['outfile']} ({info['architecture']}, {info['outtype']}, "
          f"{info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB; tokenizer "
          f"{info['tokenizer']})")
    return 0
