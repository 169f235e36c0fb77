"""`tdreward ollama` and `tdreward ollama-finetune`: deploy, run, evaluate and fine-tune
models in Ollama (docs/deploy.md)."""

from __future__ import annotations

import argparse

from tdreward.commands import DEFAULT_MODEL, flag, reward_flags

ORDER = 62


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "ollama", parents=[common], help="create / run / evaluate / delete an Ollama model",
        description="create: export the model to GGUF when needed, write a Modelfile (FROM, "
        "TEMPLATE from the chat template, stop parameters, SYSTEM) and create the model "
        "through the Ollama API (blob upload + /api/create). run: generate. evaluate: score "
        "generations with the TD reward model. delete: remove the model.")
    p.add_argument("--action", choices=("create", "run", "evaluate", "delete"), required=True)
    flag(p, "--model_name", required=True, help="the Ollama model name, e.g. td-smollm2")
    flag(p, "--model_path", help="create: directory, hub id, .gguf file, gguf:PATH or "
         "embedded:NAME")
    p.add_argument("--prompt", action="append", default=[],
                   help="run/evaluate: a prompt (repeatable)")
    p.add_argument("--prompts", help="evaluate: a .jsonl/.txt prompt file (default: the bundled "
                   "eval_prompts.jsonl) when no --prompt is given")
    flag(p, "--base_model", help="evaluate: the reward model's reference LM (default: the "
         f"critic's own, else {DEFAULT_MODEL})")
    reward_flags(p)
    flag(p, "--ollama_host", help="Ollama server (default $OLLAMA_HOST or 127.0.0.1:11434)")
    flag(p, "--output_dir", help="create: where the GGUF and Modelfile go "
         "(default ./ollama_MODEL_NAME)")
    p.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f16",
                   help="create: GGUF type when the model is exported (f16)")
    p.add_argument("--system", help="create: SYSTEM prompt (default: the chat template's own)")
    p.add_argument("--template", help="create: a file with an Ollama Go template to use "
                   "instead of the one derived from the chat template")
    p.add_argument("--via", choices=("api", "cli"), default="api",
                   help="create through the HTTP API (default) or the `ollama` CLI")
    flag(p, "--num_samples", type=int, default=4, help="evaluate: generations (4)")
    flag(p, "--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="evaluate: write the results as JSON")
    p.set_defaults(func=run)

    f = sub.add_parser(
        "ollama-finetune", aliases=["ollama_finetune"], parents=[common],
        help="LoRA fine-tune an Ollama model with the TD reward and create the result",
        description="Find the base model's GGUF through the Ollama server (/api/show), load it "
        "in transformers, LoRA-fine-tune it with the TD-weighted loss, merge, export GGUF, "
        "create the new Ollama model and print the TD reward of its responses before and "
        "after. --base_model also takes gguf:PATH / embedded:NAME (no server needed); with no "
        "server reachable the GGUF and Modelfile are still written.")
    flag(f, "--base_model", required=True,
         help="Ollama model (llama3.2:1b), gguf:PATH, embedded:NAME, a .gguf file or a "
         "transformers directory")
    flag(f, "--output_model", required=True, help="name of the new Ollama model")
    f.add_argument("--dataset", required=True,
                   help="a .jsonl of {prompt, completion} pairs, a text file/folder or an HF "
                   "dataset")
    flag(f, "--dataset_config", help="HF dataset config")
    f.add_argument("--epochs", type=float, default=3, help="epochs (3)")
    reward_flags(f)
    flag(f, "--reward_base_model", help="the reward model's reference LM (default: the "
         "critic's own, else the base model)")
    flag(f, "--ollama_host", help="Ollama server (default $OLLAMA_HOST or 127.0.0.1:11434)")
    flag(f, "--output_dir", help="where the adapter, merged model, GGUF and Modelfile go "
         "(default ./ollama_finetune_OUTPUT_MODEL)")
    p_lora = f.add_argument_group("LoRA")
    flag(p_lora, "--lora_r", type=int, default=8)
    flag(p_lora, "--lora_alpha", type=int, default=16)
    flag(p_lora, "--lora_dropout", type=float, default=0.05)
    flag(p_lora, "--batch_size", type=int, default=4)
    f.add_argument("--lr", type=float, default=2e-4)
    flag(p_lora, "--max_length", type=int, default=256)
    flag(p_lora, "--max_steps", type=int, help="stop after this many optimizer steps")
    flag(p_lora, "--max_examples", type=int, help="train on at most this many examples")
    f.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f16",
                   help="GGUF type of the result (f16)")
    flag(f, "--eval_samples", type=int, default=8,
         help="prompts generated with before/after for the TD-reward comparison (8; 0 skips)")
    flag(f, "--max_new_tokens", type=int, default=64)
    f.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the comparison (0 = greedy)")
    f.add_argument("--seed", type=int, default=42)
    f.set_defaults(func=run_finetune)


def run(args: argparse.Namespace) -> int:
    from tdreward.ollama.deploy import OllamaConfig, run_ollama

    run_ollama(OllamaConfig(
        action=args.action, model_name=args.model_name, model_path=args.model_path,
        prompt=args.prompt, prompts=args.prompts, base_model=args.base_model,
        reward_model_path=args.reward_model_path, alpha=args.alpha, beta=args.beta,
        gamma=args.gamma, ollama_host=args.ollama_host, output_dir=args.output_dir,
        outtype=args.outtype, system=args.system, template=args.template, via=args.via,
        num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed, output=args.output,
        verbose=args.verbose))
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from tdreward.recipes.ollama_finetune import FinetuneConfig
    from tdreward.recipes.ollama_finetune import run_finetune as go

    go(FinetuneConfig(
        base_model=args.base_model, output_model=args.output_model, dataset=args.dataset,
        dataset_config=args.dataset_config, epochs=args.epochs, alpha=args.alpha,
        beta=args.beta, gamma=args.gamma, reward_model_path=args.reward_model_path,
        reward_base_model=args.reward_base_model, ollama_host=args.ollama_host,
        output_dir=args.output_dir, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, batch_size=args.batch_size, lr=args.lr,
        max_length=args.max_length, max_steps=args.max_steps, max_examples=args.max_examples,
        outtype=args.outtype, eval_samples=args.eval_samples,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        verbose=args.verbose))
    return 0
