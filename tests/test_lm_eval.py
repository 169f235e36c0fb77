"""The lm-evaluation-harness bridge (tdreward.integrations.lm_eval), run through lm-eval itself.

Three short WikiText pieces go to a local JSONL file and a task written by `write_text_task`
(no download). lm-eval's evaluator calls the `tdreward` model's `loglikelihood_rolling`; its
per-document log-likelihoods must be `TDRewardModel.score`'s sums of log p, and lm-eval's own
HF model, reading the same LM, must agree with them; the TD reward must be in the results.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EMBEDDED, WIKITEXT

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install "
                              "'tdreward[lmeval]'")

from tdreward.data.corpus import split_wikitext_articles  # noqa: E402
from tdreward.integrations.lm_eval import (  # noqa: E402
    TASK_NAME,
    TDLogLikelihood,
    TDRewardLM,
    write_text_task,
)

pytestmark = pytest.mark.integration

# Same model, same token rows, same reading: only float32 summation order differs (a batch of
# texts vs one at a time), so the totals agree far inside this.
SAME_READING_NATS = 1e-3
# lm-eval's HF model runs the LM's forward on its own (its padding, its log-softmax): the
# README's "within 0.02 nat per text".
HF_READING_NATS = 0.02


def short_texts(n: int = 3, chars: int = 700) -> list[str]:
    """The start (about `chars` characters, cut after a whole word) of `n` WikiText articles:
    short, so that the test stays fast on a busy CPU."""
    articles = split_wikitext_articles(WIKITEXT.read_text(encoding="utf-8"))[:n]
    return [a if len(a) <= chars else a[: a.rindex(" ", 0, chars)] for a in articles]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread: on a CPU shared with other jobs, torch's spinning threads made these tests
    ten times slower (33 s against 2.7 s for the same three texts). The numbers compared are
    within float32 summation order of any thread count; the command-line test's subprocess
    inherits OMP_NUM_THREADS."""
    import os

    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


def write_task(tmp_path: Path, texts: list[str]) -> Path:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tasks = tmp_path / "tasks"
    write_text_task(tasks, data)
    return tasks


@pytest.fixture(scope="module")
def td_lm() -> TDRewardLM:
    return TDRewardLM(pretrained=EMBEDDED, batch_size=8)


def test_rolling_loglikelihood_is_score_and_td_reward_is_reported(td_lm, tmp_path):
    from lm_eval.tasks import TaskManager

    texts = short_texts()
    tasks = write_task(tmp_path, texts)
    # include_defaults=False: indexing lm-eval's thousands of built-in tasks is not under test.
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(model=td_lm, tasks=[TASK_NAME], task_manager=manager,
                                  log_samples=True)
    samples = sorted(out["samples"][TASK_NAME], key=lambda s: s["doc_id"])
    assert [s["target"] for s in samples] == texts  # lm-eval read the texts as written

    expected = td_lm.model.score(texts, batch_size=1)
    for sample, want in zip(samples, expected, strict=True):
        (ll,) = sample["resps"][0]
        assert isinstance(ll, TDLogLikelihood)
        assert abs(ll - math.fsum(want.logp)) <= SAME_READING_NATS
        assert sample["td_reward"] == pytest.approx(want.summary["td_reward"], abs=1e-5)

    res = out["results"][TASK_NAME]
    rewards = [s.summary["td_reward"] for s in expected]
    assert res["td_reward,none"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
    # lm-eval's word perplexity is exp(-total log p / total words) over the documents.
    words = sum(len(re.split(r"\s+", t)) for t in texts)  # lm-eval's count_words
    total = math.fsum(math.fsum(s.logp) for s in expected)
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-3)
    assert math.isfinite(res["bits_per_byte,none"])
    assert "td_reward" in lm_eval.utils.make_table(out)  # the printed table has the column
    assert out["config"]["tdreward_base_model"] == EMBEDDED


def test_lm_evals_own_hf_model_reads_the_same(td_lm):
    """lm-eval's `hf` model, on the very LM the tdreward model holds, gives the same rolling
    log-likelihoods: both read each text after the prefix token (BOS, else EOS)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    texts = short_texts()
    hf = HFLM(pretrained=td_lm.model.lm, tokenizer=td_lm.model.tokenizer, batch_size=1)
    assert hf.prefix_token_id == td_lm.model.prefix_token_id
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    theirs = hf.loglikelihood_rolling(requests, disable_tqdm=True)
    ours = td_lm.loglikelihood_rolling(requests, disable_tqdm=True)
    for a, b in zip(theirs, ours, strict=True):
        assert abs(a - b) <= HF_READING_NATS, (a, b)


def test_the_task_refuses_a_model_without_td_summaries(td_lm, tmp_path):
    """lm-eval's `hf` model returns plain floats: the task says that td_reward needs
    --model tdreward instead of reporting a made-up number."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tdreward.errors import TDRewardError

    tasks = write_task(tmp_path, short_texts(n=1, chars=200))
    hf = HFLM(pretrained=td_lm.model.lm, tokenizer=td_lm.model.tokenizer, batch_size=1)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    with pytest.raises(TDRewardError, match="--model tdreward"):
        lm_eval.simple_evaluate(model=hf, tasks=[TASK_NAME], task_manager=manager)


def test_command_line_reports_td_reward(td_lm, tmp_path):
    """`python -m tdreward.integrations.lm_eval` is lm-eval's command line with the model
    registered: the same flags, the TD reward in its table and its results file. The critic
    is a saved one, named alone: its own reference model is the default `pretrained`. No
    --device: lm-eval's default cuda:0 falls back as its hf model does (on a CPU machine)."""
    critic = tmp_path / "critic"
    td_lm.model.save_pretrained(critic)
    tasks = write_task(tmp_path, short_texts(n=1, chars=300))
    out_dir = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "tdreward.integrations.lm_eval", "--model", "tdreward",
         "--model_args", f"reward_model_path={critic},dtype=float32",  # lm-eval's cuda:0
         "--tasks", TASK_NAME, "--include_path", str(tasks), "--output_path", str(out_dir)],
        capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "td_reward" in p.stdout, p.stdout
    written = list(out_dir.rglob("results_*.json"))
    assert len(written) == 1, written
    out = json.loads(written[0].read_text(encoding="utf-8"))
    assert math.isfinite(out["results"][TASK_NAME]["td_reward,none"])
    assert out["config"]["tdreward_reward_model_path"] == str(critic)
    assert out["config"]["tdreward_base_model"] == EMBEDDED


def test_empty_text_and_cached_answers(td_lm):
    """An empty text has log-likelihood 0 (as lm-eval's own models give) and a NaN TD reward;
    an answer survives lm-eval's request cache (pickled) with its TD summary."""
    import pickle

    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(["", "Hi"])]
    empty, hi = td_lm.loglikelihood_rolling(requests, disable_tqdm=True)
    assert empty == 0.0 and math.isnan(empty.summary["td_reward"])
    assert hi < 0 and hi.summary["n_tokens"] == len(td_lm.model.encode(["Hi"])[0]) - 1
    back = pickle.loads(pickle.dumps(hi))
    assert type(back) is TDLogLikelihood and back == hi and back.summary == hi.summary


def test_other_request_types_say_what_to_use_instead(td_lm):
    with pytest.raises(NotImplementedError, match="hf model"):
        td_lm.generate_until([])
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        td_lm.loglikelihood([])
