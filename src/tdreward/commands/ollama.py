"""`tdreward ollama` and `tdreward ollama-finetune`: deploy, run, evaluate and fine-tune
models in Ollama (docs/deploy.md)."""

from __future__ import annotations

import argparse

from tdreward.commands import add_command
from tdreward.flags import from_args
from tdreward.ollama.ollama_config import OllamaConfig
from tdreward.recipes.ollama_finetune_config import FinetuneConfig

ORDER = 62


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "ollama", OllamaConfig, run,
        help="create / run / evaluate / delete an Ollama model",
        description="create: export the model to GGUF when needed, write a Modelfile (FROM, "
        "TEMPLATE from the chat template, stop parameters, SYSTEM) and create the model "
        "through the Ollama API (blob upload + /api/create). run: generate. evaluate: score "
        "generations with the TD reward model. delete: remove the model.")

    add_command(
        sub, common, "ollama-finetune", FinetuneConfig, run_finetune, aliases=["ollama_finetune"],
        help="LoRA fine-tune an Ollama model with the TD reward and create the result",
        description="Find the base model's GGUF through the Ollama server (/api/show), load it "
        "in transformers, LoRA-fine-tune it with the TD-weighted loss, merge, export GGUF, "
        "create the new Ollama model and print the TD reward of its responses before and "
        "after. --base_model also takes gguf:PATH / embedded:NAME (no server needed); with no "
        "server reachable the GGUF and Modelfile are still written.")


def run(args: argparse.Namespace) -> int:
    cfg = from_args(OllamaConfig, args, verbose=args.verbose)
    from tdreward.ollama.deploy import run_ollama

    run_ollama(cfg)
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    cfg = from_args(FinetuneConfig, args, verbose=args.verbose)
    from tdreward.recipes.ollama_finetune import run_finetune as go

    go(cfg)
    return 0
