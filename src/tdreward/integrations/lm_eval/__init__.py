"""The TD reward inside lm-evaluation-harness (lm-eval 0.4.x): a `tdreward` model and a task.

    python -m tdreward.integrations.lm_eval --model tdreward \
        --model_args pretrained=SPEC,reward_model_path=D --tasks tdreward_text \
        --include_path TASK_DIR

Two pieces, because lm-eval's model contract carries one number per text:
- `TDRewardLM` (registered as `tdreward` when this module is imported) answers
  `loglikelihood_rolling` through `TDRewardModel.score`: each text is read after the prefix
  token, as lm-eval's own HF model reads it, and its log-likelihood is the sum of log p. The
  number it returns is a `TDLogLikelihood`, a float that also carries the text's TD summary,
  so every stock perplexity task (wikitext, ...) runs unchanged on it.
- The task `write_text_task` writes (a local JSONL file, no download) uses `process_results`
  below, which reports lm-eval's three perplexities plus `td_reward` (the mean TD error of a
  text, averaged over the texts) in lm-eval's own results table and samples.

lm-eval 0.4.13 finds models only in its own registry (no entry points), and its console
script imports nothing of ours: `python -m tdreward.integrations.lm_eval` imports this module
(which registers the model), then runs lm-eval's command line unchanged (`__main__.py`). From
Python, import this module before `lm_eval.simple_evaluate(model="tdreward", ...)`, or pass a
`TDRewardLM` itself. docs/lm_eval.md has the why and a worked run.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

try:
    import lm_eval.models  # noqa: F401  (see below)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # an optional dependency: one line saying how to get it
    raise ImportError("the lm-evaluation-harness bridge needs lm_eval: "
                      "pip install 'tdreward[lmeval]'") from e

from tdreward.errors import TDRewardError
from tdreward.hardware import HardwareSettings
from tdreward.reward_model import TDRewardModel, load_reward_model
from tdreward.reward_settings import RewardSettings

log = logging.getLogger("tdreward")

TASK_NAME = "tdreward_text"


class TDLogLikelihood(float):
    """A text's total log-likelihood (what lm-eval expects) carrying its TD summary.

    A float subclass, so lm-eval's stock metrics, filters and JSON output treat it as the
    number it is; `process_results` below reads `summary` for the `td_reward` metric."""

    summary: dict[str, float]

    def __new__(cls, value: float, summary: dict[str, float]) -> TDLogLikelihood:
        obj = super().__new__(cls, value)
        obj.summary = summary
        return obj

    def __reduce__(self) -> tuple:  # lm-eval's request cache pickles responses
        return (TDLogLikelihood, (float(self), self.summary))


def _as_int(value: Any, default: int) -> int:
    """lm-eval hands batch sizes as ints or strings ("auto", "auto:4", "16")."""
    if value is None:
        return default
    text = str(value)
    return int(text) if text.isdigit() else default


def _device(device: str | None) -> str:
    """The device to load on. lm-eval's command line passes cuda:0 when --device is not
    given, and its own hf model then falls back to the CPU on a machine without CUDA; this
    model does the same (through tdreward's `auto`: CUDA, else MPS, else the CPU)."""
    if device is None:
        return "auto"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            log.warning("device %s: CUDA is not available here; using auto instead", device)
            return "auto"
    return device


# lm-eval fills its registry with its own models (lazily) only when the registry is empty:
# `import lm_eval.models` above does it first, so registering ours keeps `hf` & co. reachable.
@register_model("tdreward")
class TDRewardLM(LM):
    """A tdreward reference LM + critic as an lm-eval model.

    model_args: pretrained (the reference model spec, e.g. `embedded:smollm2-135m-instruct`;
    optional with reward_model_path, whose own reference is the default), reward_model_path,
    alpha, beta, gamma, state, max_length, stride, dtype. lm-eval's --device and --batch_size
    are honoured ("auto" batch sizes become 8: texts are batched by length anyway). From
    Python, `model=` hands in an already loaded TDRewardModel instead."""

    def __init__(self, pretrained: str | None = None, reward_model_path: str | None = None,
                 alpha: float | None = None, beta: float | None = None,
                 gamma: float | None = None, state: str | None = None,
                 batch_size: int | str | None = 8, max_batch_size: int | str | None = None,
                 max_length: int | None = None, stride: int | None = None,
                 device: str | None = None, dtype: str = "auto",
                 model: TDRewardModel | None = None) -> None:
        super().__init__()
        del max_batch_size  # lm-eval always passes it; scoring batches by length instead
        self.batch_size = _as_int(batch_size, 8)
        self.max_length = max_length
        self.stride = stride
        if model is None:
            settings = RewardSettings(reward_model_path=reward_model_path, alpha=alpha,
                                      beta=beta, gamma=gamma)
            spec = pretrained
            if spec is None:
                meta = settings.check_fits(None)
                if meta is None:
                    raise TDRewardError("model_args needs pretrained=SPEC (or "
                                        "reward_model_path=D, whose reference model is used)")
                spec = meta["base_model"]
            settings.check_fits(spec, "pretrained")
            hardware = HardwareSettings(device=_device(device), dtype=dtype)
            model = load_reward_model(spec, settings, state=state, hardware=hardware,
                                      model_flag="pretrained")
        self.model = model
        self.reward_model_path = reward_model_path
        # Every text's TD summary, in the order scored: for callers of simple_evaluate that
        # run stock tasks, whose tables have no td_reward column.
        self.td_summaries: list[dict[str, float]] = []

    # ------------------------------------------------------------------ lm-eval's contract
    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False
                              ) -> list[TDLogLikelihood]:
        """The total log-likelihood of each whole text, read after the prefix token (the
        model's context as the window, sliding windows beyond it), as `tdreward score`."""
        rows = self.model.encode([req.args[0] for req in requests])  # prefix token first
        # `score` needs 2 tokens with the prefix: an empty text has log-likelihood 0 (lm-eval's
        # own models give 0 too) and no TD reward.
        scored = [i for i, r in enumerate(rows) if len(r) >= 2]
        scores = self.model.score([rows[i] for i in scored], batch_size=self.batch_size,
                                  max_length=self.max_length, stride=self.stride,
                                  progress=not disable_tqdm) if scored else []
        out = [TDLogLikelihood(0.0, {"td_reward": math.nan, "n_tokens": 0}) for _ in rows]
        for i, s in zip(scored, scores):
            out[i] = TDLogLikelihood(math.fsum(s.logp), dict(s.summary))
            self.td_summaries.append(dict(s.summary))
        rewards = [s.summary["td_reward"] for s in scores]
        if rewards:
            log.info("TD reward over %d texts: mean %.4f", len(rewards),
                     sum(rewards) / len(rewards))
        for req, ll in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return out

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        raise NotImplementedError(
            "the tdreward model answers loglikelihood_rolling (perplexity tasks) only: "
            "use lm-eval's hf model for multiple-choice tasks")

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "the tdreward model scores text and does not generate: use lm-eval's hf model "
            "for generation tasks")

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results["config"]."""
        return {"tdreward_base_model": self.model.base_model,
                "tdreward_reward_model_path": self.reward_model_path,
                "tdreward_trained_critic": self.model.trained}

    @property
    def tokenizer_name(self) -> str:  # part of lm-eval's request-cache key
        return re.sub(r"[^\w.-]", "__", self.model.base_model)


# --------------------------------------------------------------------------- the task
def process_results(doc: dict, results: list) -> dict[str, Any]:
    """lm-eval's rolling-log-likelihood metrics for one document, plus its TD reward.

    The same (log-likelihood, words/bytes) pairs lm-eval's default computes, so its
    weighted_perplexity / bits_per_byte aggregations apply unchanged."""
    (loglikelihood,) = results
    text = doc["text"]
    n_words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    summary = getattr(loglikelihood, "summary", None)
    if summary is None:
        raise TDRewardError(f"the {TASK_NAME} task's td_reward needs lm-eval's --model tdreward "
                            "(this model returned plain log-likelihoods)")
    return {"word_perplexity": (float(loglikelihood), n_words),
            "byte_perplexity": (float(loglikelihood), n_bytes),
            "bits_per_byte": (float(loglikelihood), n_bytes),
            "td_reward": summary["td_reward"]}


def write_text_task(directory: str | Path, data_file: str | Path, name: str = TASK_NAME
                    ) -> Path:
    """Write an lm-eval task YAML (for `--include_path directory`) that reads a local JSONL
    file, one document per line as {"text": ...}: no download, so it runs offline. Returns
    the YAML's path. Its metrics: word/byte perplexity, bits per byte and td_reward."""
    data = Path(data_file).resolve()
    if not data.is_file():
        raise TDRewardError(f"{data}: no such file (the task needs a local JSONL file)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # JSON is YAML: quoting every string through json.dumps keeps odd paths literal.
    q = json.dumps
    lines = [
        f"task: {q(name)}",
        "dataset_path: json",
        "dataset_kwargs:",
        f"  data_files: {{test: {q(str(data))}}}",
        "output_type: loglikelihood_rolling",
        "test_split: test",
        'doc_to_text: ""',
        "doc_to_target: text",  # the field itself, not a template: the text as written
        "process_results: !function tdreward.integrations.lm_eval.process_results",
        "metric_list:",
        # lm-eval's own aggregations for its perplexities, named so that it need not warn.
        "  - metric: word_perplexity",
        "    aggregation: weighted_perplexity",
        "    higher_is_better: false",
        "  - metric: byte_perplexity",
        "    aggregation: weighted_perplexity",
        "    higher_is_better: false",
        "  - metric: bits_per_byte",
        "    aggregation: bits_per_byte",
        "    higher_is_better: false",
        "  - metric: td_reward",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
    ]
    path = directory / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
