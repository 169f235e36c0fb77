"""`tdreward ollama-finetune`: fine-tune an Ollama model with the TD reward, and deploy it.

1. Find the base model's weights: `--base_model` names an Ollama model whose GGUF the server
   reports in `/api/show` (the Modelfile's FROM: a blob path, readable when the server runs on
   this machine), or directly a `gguf:PATH` / `embedded:NAME` / `.gguf` file / transformers
   directory, which needs no server.
2. LoRA-fine-tune it in transformers with the TD-weighted loss (`tdreward.training.lora_trainer`:
   `TDRewardTrainer`, then the adapter merged into the base).
3. Export the merged model to GGUF (tokenizer and chat template copied from the base GGUF) and
   write a Modelfile next to it.
4. Create the new model in Ollama; with no server reachable, say so and stop there (the GGUF
   and Modelfile are the product: `ollama create NAME -f Modelfile` later).
5. Before/after: both GGUFs answer the same held-out prompts (greedy, llama.cpp) and the TD
   reward model scores the responses; the table shows both means and the difference.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tdreward.errors import TDRewardError
from tdreward.io import write_json
from tdreward.ollama.deploy import OllamaAPI, create_in_ollama, safe_name, write_modelfile
from tdreward.recipes.ollama_finetune_config import FinetuneConfig

log = logging.getLogger("tdreward")


@dataclass
class BaseModel:
    """Where the base model's weights are."""

    train_spec: str  # what transformers loads (gguf:PATH, embedded:NAME or a directory)
    gguf: Path | None  # its GGUF file (tokenizer source, before/after generation), if any
    source: str  # how it was found, for the report


_FROM = re.compile(r"^FROM\s+(.+?)\s*$", flags=re.M)


def gguf_from_ollama(name: str, host: str | None) -> Path:
    """The GGUF blob of an Ollama model, from the FROM line of `/api/show`'s modelfile."""
    api = OllamaAPI(host, timeout=60.0)
    try:
        info = api.show(name)
    except TDRewardError as e:
        raise TDRewardError(f"{e} -- needed to find the base model {name!r}; pass "
                            "--base_model gguf:PATH or embedded:NAME to work without a server"
                            ) from e
    finally:
        api.close()
    froms = _FROM.findall(info.modelfile or "")
    if not froms:
        raise TDRewardError(f"the Ollama server's modelfile for {name!r} has no FROM line")
    path = Path(froms[0].strip().strip('"')).expanduser()
    if not path.is_file():
        raise TDRewardError(
            f"Ollama keeps {name!r} at {path}, which this machine cannot read (a remote "
            "server?); copy that file here and pass --base_model gguf:PATH")
    return path


def resolve_base(spec: str, host: str | None) -> BaseModel:
    """gguf:/embedded:/llamacpp: specs, .gguf files and directories are used as they are;
    `hf:ID` is a hub id; anything else (`llama2:7b`, `ollama:NAME`) is an Ollama model."""
    from tdreward.backends.hf import resolve_gguf
    from tdreward.export.gguf_writer import source_gguf_of
    from tdreward.specs import parse_spec

    spec = spec.strip()
    if re.match(r"^(gguf|embedded|llamacpp|hf|hub):", spec, flags=re.I):
        s = parse_spec(spec)
        if s.kind == "hf":
            return BaseModel(s.target, None, "hub")
        path = resolve_gguf(s)
        return BaseModel(spec if s.kind != "llamacpp" else f"gguf:{path}", path, "file")
    p = Path(spec).expanduser()
    if p.is_file():
        return BaseModel(f"gguf:{p}", p, "file")
    if p.is_dir():
        return BaseModel(str(p), source_gguf_of(str(p)), "directory")
    name = spec.removeprefix("ollama:")
    if not name:
        raise TDRewardError("--base_model is empty")
    path = gguf_from_ollama(name, host)
    log.warning("base model %s: GGUF %s (from the Ollama server)", name, path)
    return BaseModel(f"gguf:{path}", path, "ollama")


def _check_architecture(base: BaseModel) -> None:
    """Fail before training when the result could not be exported."""
    from tdreward.export.gguf_writer import SUPPORTED
    from tdreward.export.tokenizer import read_metadata

    if base.gguf is None:
        return
    arch = read_metadata(base.gguf).get("general.architecture")
    name = arch.value.decode() if arch is not None else "?"
    if name not in ("llama", "gemma3", "gpt2"):
        raise TDRewardError(f"the base model's architecture {name!r} cannot be exported back "
                            f"to GGUF; supported: {SUPPORTED}")


def _compare(cfg: FinetuneConfig, before: str, after: str, reward_base: str) -> dict:
    """TD reward of both models' responses to the bundled held-out prompts."""
    from tdreward.evaluation.compare import CompareConfig, compare_models, load_prompt_texts
    from tdreward.evaluation.model_differences import comparisons

    prompts, source = load_prompt_texts(None)
    ccfg = CompareConfig(
        models=[before, after], num_samples=cfg.eval_samples, base_model=reward_base,
        reward=cfg.reward, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        seed=cfg.seed, no_cache=True, verbose=cfg.verbose, command="ollama-finetune")
    models, _traces, rm = compare_models(ccfg, prompts)
    diff = comparisons(models)[0]["td_reward"]
    return {"prompts": source, "samples": cfg.eval_samples, "trained_critic": rm.trained,
            "reward_base_model": reward_base,
            "before": models[before]["td_reward"], "after": models[after]["td_reward"],
            "difference": diff,
            "responses": [{"prompt": a["prompt"], "before": a["response"],
                           "after": b["response"], "td_before": a.get("td_reward"),
                           "td_after": b.get("td_reward")}
                          for a, b in zip(models[before]["samples"], models[after]["samples"])]}


def print_comparison(c: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from tdreward.display import fmt_num, print_table
    from tdreward.evaluation.report import pairing

    table = Table(title=f"TD reward of the responses to {c['samples']} held-out prompts")
    for col in ("model", "mean TD reward", "95% CI", "n"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label in ("before", "after"):
        d = c[label]
        lo, hi = d["ci95"]
        table.add_row(label, fmt_num(d["mean"], ".4f", "-"),
                      "-" if lo is None else f"{fmt_num(lo, '.4f')} .. {fmt_num(hi, '.4f')}",
                      str(d["n"]))
    print_table(table, Console())
    d = c["difference"]
    if d["diff"] is not None:
        lo, hi = d["ci95"]
        print(f"after - before: {fmt_num(d['diff'], '+.4f')} (95% CI {fmt_num(lo, '+.4f')} .. "
              f"{fmt_num(hi, '+.4f')}; {pairing(d)})")


def _stage(i: int, what: str) -> None:
    """One line per phase on stderr: the whole run takes minutes."""
    print(f"tdreward: [{i}/5] {what}", file=sys.stderr, flush=True)


def run_finetune(cfg: FinetuneConfig) -> dict:
    from tdreward.backends.hf import load_model
    from tdreward.export.gguf_writer import write_gguf
    from tdreward.export.tokenizer import chat_template_of
    from tdreward.ollama.deploy import check_model_name
    from tdreward.training.lora_trainer import LoraTrainingConfig, run_lora

    name = check_model_name(cfg.output_model)
    start = time.perf_counter()
    _stage(1, f"finding the base model {cfg.base_model}")
    base = resolve_base(cfg.base_model, cfg.ollama_host)
    _check_architecture(base)
    out = Path(cfg.output_dir or f"ollama_finetune_{safe_name(name)}").expanduser()

    # 2. LoRA with the TD-weighted loss, merged into the base.
    _stage(2, f"LoRA fine-tuning {base.train_spec} with the TD-weighted loss, then merging")
    lcfg = LoraTrainingConfig(
        base_model=base.train_spec, dataset=cfg.dataset, dataset_config=cfg.dataset_config,
        output_dir=str(out / "adapter"), max_length=cfg.max_length,
        chat_template=bool(base.gguf and chat_template_of(base.gguf)),
        max_examples=cfg.max_examples, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, batch_size=cfg.batch_size, epochs=cfg.epochs,
        max_steps=cfg.max_steps, lr=cfg.lr, seed=cfg.seed, reward=cfg.reward, merge=True)
    metrics = run_lora(lcfg)
    merged = Path(metrics["merged_dir"])

    # 3. GGUF + Modelfile.
    _stage(3, f"writing the merged model as a {cfg.outtype} GGUF and its Modelfile")
    model, tok = load_model(str(merged))
    gguf = out / f"{safe_name(name)}.{cfg.outtype}.gguf"
    info = write_gguf(model, tok, gguf, cfg.outtype, source_gguf=base.gguf, name=name)
    del model
    modelfile = write_modelfile(gguf, out)
    print(f"GGUF: {gguf}\nModelfile: {modelfile}")

    # 4. Ollama.
    _stage(4, "creating the model in Ollama")
    api = OllamaAPI(cfg.ollama_host, timeout=600.0)
    host, reachable = api.host, api.reachable()
    api.close()
    if reachable:
        create_in_ollama(name, modelfile, cfg.ollama_host)
        print(f"created Ollama model {name} at {host}")
        created = True
    else:
        log.warning("could not reach an Ollama server at %s: the model was not created; "
                    "later: ollama create %s -f %s", host, name, modelfile)
        created = False

    # 5. Before / after.
    comparison = None
    if cfg.eval_samples > 0:
        before = f"llamacpp:{base.gguf}" if base.gguf else base.train_spec
        reward_base = cfg.reward_base_model or _critic_base(cfg) or base.train_spec
        _stage(5, f"before / after: {cfg.eval_samples} responses of each model, scored by "
               f"{reward_base}")
        comparison = _compare(cfg, before, f"llamacpp:{gguf}", reward_base)
        print_comparison(comparison)
    result = {"config": asdict(cfg), "base": {"spec": base.train_spec, "gguf": str(base.gguf),
                                              "found_via": base.source},
              "lora": {k: metrics[k] for k in ("global_steps", "train_wall_s", "before", "after",
                                               "data", "trainable_parameters")},
              "gguf": info, "modelfile": str(modelfile),
              "ollama": {"host": host, "reachable": reachable, "created": created},
              "comparison": comparison, "wall_s": round(time.perf_counter() - start, 1)}
    write_json(out / "ollama_finetune.json", result)
    return result


def _critic_base(cfg: FinetuneConfig) -> str | None:
    if not cfg.reward.reward_model_path:
        return None
    from tdreward.critic_files import read_critic_config

    return read_critic_config(Path(cfg.reward.reward_model_path)).get("base_model")


__all__ = ["FinetuneConfig", "gguf_from_ollama", "resolve_base", "run_finetune"]
