"""`tdreward export`: a transformers model (a LoRA adapter merged) as a GGUF file for llama.cpp
and Ollama (docs/deploy.md)."""

from __future__ import annotations

import argparse

from tdreward.commands import flag

ORDER = 60


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export", parents=[common], help="export a model (+ LoRA adapter) to GGUF",
        description="Write a GGUF file with the gguf library: Llama (SmolLM2), Gemma 3 and "
        "GPT-2 architectures. The tokenizer and chat template are copied from the model's "
        "source GGUF when it came from one, else built from the HF tokenizer (byte-level BPE). "
        "Checked against llama.cpp: per-token log-probs agree with the torch model.")
    flag(p, "--model_path", required=True,
         help="model spec: directory, hub id, gguf:PATH or embedded:NAME")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory, merged before export")
    p.add_argument("--outfile", required=True, help="the GGUF file to write")
    p.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f16",
                   help="tensor type (default f16; 1-D tensors stay f32)")
    p.add_argument("--tokenizer", choices=("auto", "gguf", "hf"), default="auto",
                   help="tokenizer metadata: auto (the source GGUF's, else built from the HF "
                   "tokenizer), gguf (require a source GGUF), hf (always build)")
    p.add_argument("--name", help="general.name written into the GGUF")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tdreward.export.gguf_writer import ExportOptions, export

    info = export(ExportOptions(model_path=args.model_path, outfile=args.outfile,
                                outtype=args.outtype, adapter=args.adapter,
                                tokenizer=args.tokenizer, name=args.name))
    print(f"wrote {info['outfile']} ({info['architecture']}, {info['outtype']}, "
          f"{info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB; tokenizer "
          f"{info['tokenizer']})")
    return 0
