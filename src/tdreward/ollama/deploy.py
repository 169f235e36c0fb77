"""`tdreward ollama`: create, run, evaluate and delete a model in Ollama.

create   the model as a GGUF file (exported from transformers when it is not one already),
         a Modelfile next to it (FROM, TEMPLATE from its chat template, stop PARAMETERs,
         SYSTEM), then the Ollama API, as `ollama create -f Modelfile` does it: the GGUF is
         uploaded as a blob (`HEAD /api/blobs/sha256:<digest>`, `POST` only when the server
         lacks it; the server checks the digest) and `POST /api/create` names it in `files`,
         with the Modelfile's template, system prompt and parameters. `via="cli"` runs
         `ollama create` instead when the CLI is installed.
run      one generation (`/api/generate`, the model's template applied by Ollama).
evaluate generations scored by the TD reward model (the `compare` pipeline on `ollama:NAME`).
delete   `DELETE /api/delete`.

The host is --ollama_host, else $OLLAMA_HOST, else http://127.0.0.1:11434. A server that
cannot be reached fails with one line; the GGUF and Modelfile of `create` are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from tdreward.errors import TDRewardError
from tdreward.io import write_text
from tdreward.ollama.modelfile import create_fields, modelfile_for
from tdreward.ollama.ollama_config import ACTIONS, OllamaConfig
from tdreward.specs import DEFAULT_MODEL

log = logging.getLogger("tdreward")

_CHUNK = 1 << 20


def safe_name(name: str) -> str:
    """A file-system friendly form of an Ollama model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def check_model_name(name: str | None) -> str:
    if not name:
        raise TDRewardError("--model_name is required (the Ollama model, e.g. td-smollm2)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9._-]+)?", name):
        raise TDRewardError(f"invalid Ollama model name {name!r} (letters, digits, . _ - / "
                            "and an optional :tag)")
    return name


# --------------------------------------------------------------------------- the API
class OllamaAPI:
    """The Ollama server: blobs over httpx (HEAD before POST), the rest through the official
    `ollama` client. Every failure becomes a one-line TDRewardError naming the host."""

    def __init__(self, host: str | None = None, timeout: float = 600.0) -> None:
        import httpx
        import ollama

        from tdreward.backends.ollama import ollama_host

        self.host = ollama_host(host)
        self.timeout = timeout
        self._ollama = ollama
        self.client = ollama.Client(host=self.host, timeout=timeout)
        self.http = httpx.Client(base_url=self.host, timeout=timeout)

    def _call(self, what: str, fn, *args, **kw):
        """`fn(*args, **kw)`; a failure becomes one line saying what could not be done."""
        import httpx

        from tdreward.backends.ollama import ollama_error

        try:
            return fn(*args, **kw)
        except (ConnectionError, httpx.HTTPError, self._ollama.ResponseError) as e:
            raise ollama_error(e, self.host, what, self.timeout) from e

    def reachable(self) -> bool:
        import httpx

        try:
            self.http.get("/api/version", timeout=5.0)
        except httpx.HTTPError:
            return False
        return True

    def push_blob(self, path: Path) -> str:
        """Upload `path` unless the server has it; returns "sha256:<hex>"."""
        from tqdm.auto import tqdm

        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                h.update(block)
        digest = f"sha256:{h.hexdigest()}"
        head = self._call("look up a blob", self.http.head, f"/api/blobs/{digest}")
        if head.status_code == 200:
            log.info("the server already has %s", digest[:19])
            return digest
        size = path.stat().st_size

        def body():
            with path.open("rb") as f, tqdm(total=size, unit="B", unit_scale=True,
                                            desc=f"upload {path.name}") as bar:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    bar.update(len(block))
                    yield block

        res = self._call("upload a blob", self.http.post, f"/api/blobs/{digest}",
                         content=body())
        if res.status_code not in (200, 201):
            raise TDRewardError(f"Ollama at {self.host} refused the blob {digest[:19]}: "
                                f"{res.status_code} {res.text.strip()[:200]}")
        return digest

    def create(self, name: str, modelfile: Path) -> str:
        """`ollama create NAME -f MODELFILE` over the API; returns the final status."""
        fields = create_fields(modelfile.read_text(encoding="utf-8"), modelfile.parent)
        files = None
        if fields.from_path is not None:
            digest = self.push_blob(fields.from_path)
            fname = fields.from_path.name
            files = {fname if fname.endswith(".gguf") else "model.gguf": digest}
        status = ""
        stream = self._call(f"create {name!r}", self.client.create, name,
                            from_=fields.from_model,
                            files=files, template=fields.template, system=fields.system,
                            parameters=fields.parameters or None,
                            license=fields.license or None, stream=True)
        for part in self._iter(f"create {name!r}", stream):
            status = part.status or status
            log.info("ollama create: %s", status)
        if status != "success":
            raise TDRewardError(f"Ollama at {self.host}: create {name!r} ended with {status!r}")
        return status

    def _iter(self, what: str, stream):
        it = iter(stream)
        while True:
            try:
                part = self._call(what, next, it)
            except StopIteration:
                return
            yield part

    def generate(self, name: str, prompt: str, max_new_tokens: int, temperature: float,
                 seed: int = 0):
        options = {"num_predict": max_new_tokens, "temperature": temperature, "seed": seed}
        what = f"generate with {name!r}"
        stream = self._call(what, self.client.generate, model=name, prompt=prompt,
                            options=options, stream=True)
        yield from (p.response or "" for p in self._iter(what, stream))

    def delete(self, name: str) -> None:
        self._call(f"delete {name!r}", self.client.delete, name)

    def show(self, name: str):
        return self._call(f"show {name!r}", self.client.show, name)

    def close(self) -> None:
        self.http.close()


# --------------------------------------------------------------------------- create
def _as_gguf(model_path: str) -> Path | None:
    """The GGUF file a --model_path names directly (no export needed), else None."""
    from tdreward.backends.hf import resolve_gguf
    from tdreward.specs import parse_spec

    spec = parse_spec(model_path)
    path = resolve_gguf(spec)
    if path is not None:
        return path
    p = Path(spec.target).expanduser()
    if spec.kind == "hf" and p.is_file():
        with p.open("rb") as f:
            if f.read(4) == b"GGUF":
                return p
        raise TDRewardError(f"{p} is a file but not a GGUF file")
    if spec.kind not in ("hf",):
        raise TDRewardError(f"{model_path!r} cannot be deployed to Ollama: give a directory, "
                            "hub id, .gguf file, gguf:PATH or embedded:NAME")
    return None


def write_modelfile(gguf: Path, out_dir: Path, system: str | None = None,
                    template_file: str | None = None) -> Path:
    """Modelfile for `gguf` in `out_dir` (TEMPLATE/stops/SYSTEM from its chat template)."""
    from tdreward.export.tokenizer import chat_template_of

    template = None
    if template_file:
        tf = Path(template_file).expanduser()
        if not tf.is_file():
            raise TDRewardError(f"--template file not found: {tf}")
        template = tf.read_text(encoding="utf-8")
    mf = modelfile_for(gguf, chat_template_of(gguf), system=system, template=template)
    path = out_dir / "Modelfile"
    write_text(path, mf.render())
    return path


def prepare(cfg: OllamaConfig) -> tuple[Path, Path]:
    """(GGUF, Modelfile) for `create`: exports the model unless it is a GGUF already."""
    from tdreward.export.export_config import ExportConfig
    from tdreward.export.gguf_writer import export

    if not cfg.model_path:
        raise TDRewardError("--model_path is required for --action create (a directory, hub "
                            "id, .gguf file, gguf:PATH or embedded:NAME)")
    name = check_model_name(cfg.model_name)
    out_dir = Path(cfg.output_dir or f"ollama_{safe_name(name)}").expanduser()
    gguf = _as_gguf(cfg.model_path)
    if gguf is None:
        gguf = out_dir / f"{safe_name(name)}.{cfg.outtype}.gguf"
        log.warning("exporting %s to %s", cfg.model_path, gguf)
        export(ExportConfig(model_path=cfg.model_path, outfile=str(gguf), outtype=cfg.outtype,
                            name=name))
    out_dir.mkdir(parents=True, exist_ok=True)
    return gguf, write_modelfile(gguf, out_dir, cfg.system, cfg.template)


def create_in_ollama(name: str, modelfile: Path, host: str | None, via: str = "api") -> None:
    """Create `name` from `modelfile` through the API or the `ollama` CLI."""
    if via not in ("api", "cli"):
        raise TDRewardError(f"--via must be api or cli, not {via!r}")
    if via == "cli":
        exe = shutil.which("ollama")
        if exe is None:
            raise TDRewardError("--via cli: the `ollama` command is not installed; use --via api")
        from tdreward.backends.ollama import ollama_host

        env = dict(os.environ, OLLAMA_HOST=ollama_host(host))
        res = subprocess.run([exe, "create", name, "-f", str(modelfile)], env=env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            msg = (res.stderr.strip().splitlines() or ["failed"])[-1]
            raise TDRewardError(f"`ollama create {name}` failed: {msg}")
        return
    api = OllamaAPI(host)
    try:
        api.create(name, modelfile)
    finally:
        api.close()


def run_create(cfg: OllamaConfig) -> dict:
    gguf, modelfile = prepare(cfg)
    print(f"GGUF: {gguf}\nModelfile: {modelfile}")
    try:
        create_in_ollama(cfg.model_name, modelfile, cfg.ollama_host, cfg.via)
    except TDRewardError as e:
        raise TDRewardError(f"{e} -- the GGUF and Modelfile are ready in {modelfile.parent}; "
                            f"later: ollama create {cfg.model_name} -f {modelfile}") from e
    print(f"created Ollama model {cfg.model_name}")
    return {"gguf": str(gguf), "modelfile": str(modelfile), "model": cfg.model_name}


# --------------------------------------------------------------------------- the others
def run_generate(cfg: OllamaConfig) -> dict:
    import sys

    name = check_model_name(cfg.model_name)
    if not cfg.prompt:
        raise TDRewardError("--prompt is required for --action run")
    api = OllamaAPI(cfg.ollama_host)
    outputs = []
    try:
        for prompt in cfg.prompt:
            parts = []
            for piece in api.generate(name, prompt, cfg.max_new_tokens, cfg.temperature,
                                      cfg.seed):
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            outputs.append({"prompt": prompt, "response": "".join(parts)})
    finally:
        api.close()
    return {"model": name, "generations": outputs}


def reward_reference(cfg: OllamaConfig) -> str:
    """The reward model's reference LM: --base_model, else the critic's own, else SmolLM2."""
    if cfg.base_model:
        return cfg.base_model
    if cfg.reward.reward_model_path:
        from tdreward.critic_files import read_critic_config

        return read_critic_config(Path(cfg.reward.reward_model_path))["base_model"]
    return DEFAULT_MODEL


def run_evaluate(cfg: OllamaConfig) -> dict:
    """Generate with the Ollama model and score the responses with the TD reward model."""
    from tdreward.evaluation.compare import CompareConfig, compare_models, load_prompt_texts
    from tdreward.io import write_json

    name = check_model_name(cfg.model_name)
    prompts = list(cfg.prompt) or load_prompt_texts(cfg.prompts)[0]
    ccfg = CompareConfig(
        models=[f"ollama:{name}"], num_samples=cfg.num_samples or len(prompts),
        base_model=reward_reference(cfg), reward=cfg.reward, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, seed=cfg.seed, ollama_host=cfg.ollama_host,
        concurrency=1, no_cache=True, verbose=cfg.verbose, command="ollama-evaluate")
    models, _traces, rm = compare_models(ccfg, prompts)
    summary = models[f"ollama:{name}"]
    result = {"model": name, "reward_model": {"base_model": ccfg.base_model,
                                              "path": cfg.reward.reward_model_path,
                                              "trained": rm.trained},
              "td_reward": summary["td_reward"], "samples": summary["samples"]}
    print_evaluation(result)
    if cfg.output:
        write_json(cfg.output, result)
        print(f"JSON: {cfg.output}")
    return result


def print_evaluation(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from tdreward.display import fmt_num, print_table

    table = Table(title=f"TD reward of {result['model']}'s responses")
    for col in ("#", "prompt", "response", "td_reward", "tokens"):
        table.add_column(col, justify="right" if col in ("#", "td_reward", "tokens") else "left",
                         overflow="fold")
    for s in result["samples"]:
        td = s.get("td_reward")
        table.add_row(str(s["index"] + 1), s["prompt"][:60], s["response"][:120],
                      fmt_num(td, ".4f", "-"), str(s.get("reward_tokens", 0)))
    print_table(table, Console())
    d = result["td_reward"]
    if d.get("mean") is not None:
        lo, hi = d["ci95"]
        ci = f", 95% CI {fmt_num(lo, '.4f')} .. {fmt_num(hi, '.4f')}" if lo is not None else ""
        print(f"mean TD reward {fmt_num(d['mean'], '.4f')} (n={d['n']}{ci})")


def run_delete(cfg: OllamaConfig) -> dict:
    name = check_model_name(cfg.model_name)
    api = OllamaAPI(cfg.ollama_host)
    try:
        api.delete(name)
    finally:
        api.close()
    print(f"deleted Ollama model {name}")
    return {"deleted": name}


def run_ollama(cfg: OllamaConfig) -> dict:
    if cfg.action not in ACTIONS:
        raise TDRewardError(f"--action must be one of {', '.join(ACTIONS)}, not {cfg.action!r}")
    return {"create": run_create, "run": run_generate, "evaluate": run_evaluate,
            "delete": run_delete}[cfg.action](cfg)


__all__ = ["ACTIONS", "OllamaAPI", "OllamaConfig", "create_in_ollama", "prepare",
           "run_ollama", "safe_name", "write_modelfile"]
