"""The llama.cpp backend agrees with transformers on the same GGUF model and token ids."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tdreward.backends.hf import load_model, resolve_gguf
from tdreward.errors import TDRewardError
from tdreward.specs import parse_spec

pytest.importorskip("llama_cpp")
from tdreward.backends.llamacpp import LlamaCppModel  # noqa: E402

pytestmark = pytest.mark.integration

SPEC = "embedded:smollm2-135m-instruct"
WIKITEXT_DEV = Path(__file__).resolve().parents[1] / "data/wikitext-2/wiki.test.small.raw"
N_TOKENS = 320


def _article_bodies(raw: str) -> list[str]:
    """WikiText articles start at a ` = Title = ` line (sections use ` = = ... = = `)."""
    heading = re.compile(r"^ = [^=].* = $")
    bodies: list[list[str]] = []
    for line in raw.splitlines():
        if heading.match(line):
            bodies.append([])
        elif bodies and line.strip():
            bodies[-1].append(line.strip())
    return [" ".join(b) for b in bodies if b]


@pytest.fixture(scope="module")
def llm() -> Iterator[LlamaCppModel]:
    model = LlamaCppModel(SPEC, n_ctx=1024)
    yield model
    model.close()


@pytest.fixture(scope="module")
def hf_model():
    return load_model(SPEC)


@pytest.fixture(scope="module")
def wiki_ids(hf_model) -> list[int]:
    """A few hundred token ids from the middle of a long real WikiText article."""
    _, tok = hf_model
    bodies = [
        b
        for b in _article_bodies(WIKITEXT_DEV.read_text(encoding="utf-8"))
        if len(b) > 8 * N_TOKENS
    ]
    body = bodies[len(bodies) // 2]
    ids = tok(body, add_special_tokens=False)["input_ids"]  # tokenised once, shared by both
    mid = len(ids) // 2
    return ids[mid - N_TOKENS // 2 : mid + N_TOKENS // 2]


def test_logprobs_match_transformers(llm: LlamaCppModel, hf_model, wiki_ids: list[int]) -> None:
    model, _ = hf_model
    # One torch thread: on a small, busy machine torch's spinning thread pool made this
    # forward 6x slower than a single thread (measured on 2 CPUs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([wiki_ids])).logits[0, :-1].double()
    finally:
        torch.set_num_threads(threads)
    hf_lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(wiki_ids[1:])[:, None])
    hf_lp = hf_lp[:, 0].numpy()
    cpp_lp = llm.token_logprobs(wiki_ids)

    assert cpp_lp.shape == (len(wiki_ids) - 1,)
    assert cpp_lp.dtype == np.float64
    assert np.all(cpp_lp <= 0) and np.all(np.isfinite(cpp_lp))
    corr = float(np.corrcoef(hf_lp, cpp_lp)[0, 1])
    mad = float(np.abs(hf_lp - cpp_lp).mean())
    print(
        f"\nllama.cpp vs transformers on {len(wiki_ids)} WikiText tokens: "
        f"pearson={corr:.5f} mean|diff|={mad:.4f} nat"
    )
    assert corr >= 0.999
    assert mad <= 0.1


def test_text_logprobs_and_context_limit(llm: LlamaCppModel) -> None:
    tokens, lp = llm.text_logprobs("The capital of France is Paris.")
    assert len(lp) == len(tokens) - 1 > 0
    np.testing.assert_allclose(llm.token_logprobs(tokens), lp)  # the reset makes it repeatable
    with pytest.raises(TDRewardError, match="context"):
        llm.token_logprobs([tokens[0]] * (llm.n_ctx + 1))


def test_greedy_generation_is_deterministic(llm: LlamaCppModel) -> None:
    prompts = ["The capital of France is", "Once upon a time"]
    first = llm.generate(prompts, max_new_tokens=16)
    second = llm.generate(prompts, max_new_tokens=16)
    assert [r["tokens"] for r in first] == [r["tokens"] for r in second]
    for r, prompt in zip(first, prompts, strict=True):
        assert r["prompt"] == prompt
        assert r["text"].strip()
        assert 0 < len(r["tokens"]) <= 16
        assert len(r["logprobs"]) == len(r["tokens"])
        assert np.all(r["logprobs"] <= 0)
    # The log-probs are the model's: re-scoring prompt + completion gives nearly the same
    # numbers (not exactly: llama.cpp's batched and one-token kernels round differently).
    ptoks = llm.tokenize(prompts[1])
    rescored = llm.token_logprobs(ptoks + first[1]["tokens"])[len(ptoks) - 1 :]
    diff = np.abs(rescored - first[1]["logprobs"])
    assert diff.mean() < 0.05 and diff.max() < 0.25


def test_sampled_generation_repeats_with_seed(llm: LlamaCppModel) -> None:
    kwargs = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95}
    a = llm.generate(["In the beginning"], seed=7, **kwargs)
    b = llm.generate(["In the beginning"], seed=7, **kwargs)
    assert a[0]["tokens"] == b[0]["tokens"]
    assert a[0]["text"] == b[0]["text"]


def test_truncated_gguf_raises(tmp_path: Path) -> None:
    real = resolve_gguf(parse_spec(SPEC))
    bad = tmp_path / "truncated.gguf"
    with real.open("rb") as f:
        bad.write_bytes(f.read(1 << 20))
    # Would abort the whole test process if the file reached llama.cpp unchecked.
    with pytest.raises(TDRewardError, match="truncated or corrupt"):
        LlamaCppModel(f"llamacpp:{bad}")


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(TDRewardError, match="not found"):
        LlamaCppModel(tmp_path / "missing.gguf")
    with pytest.raises(TDRewardError, match="not found"):
        LlamaCppModel(f"llamacpp:{tmp_path / 'missing.gguf'}")


def test_bad_sampling_arguments_raise(llm: LlamaCppModel) -> None:
    with pytest.raises(TDRewardError, match="temperature"):
        llm.generate(["Hi"], temperature=-1.0)
    with pytest.raises(TDRewardError, match="top_p"):
        llm.generate(["Hi"], temperature=1.0, top_p=0.0)


def test_context_manager_closes() -> None:
    with LlamaCppModel(resolve_gguf(parse_spec(SPEC)), n_ctx=64) as model:
        assert len(model.token_logprobs(model.tokenize("Hello there, world"))) > 0
    with pytest.raises(TDRewardError, match="closed"):
        model.tokenize("Hello")


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}])
def test_batched_generation_matches_one_at_a_time(llm: LlamaCppModel, kwargs: dict) -> None:
    """Six prompts through two slots (finished sequences are replaced mid-batch) give each
    prompt what it gets alone: seeds are per prompt, not per batch."""
    prompts = ["The capital of France is", "Once upon a time", "In 1905, Einstein",
               "The recipe calls for", "Rivers flow into", "My favourite colour is"]
    batched = LlamaCppModel(llm.path, n_parallel=2)
    try:
        together = batched.generate(prompts, max_new_tokens=12, **kwargs)
    finally:
        batched.close()
    alone = [llm.generate([p], max_new_tokens=12, seeds=[s], **kwargs)[0]
             for p, s in zip(prompts, [(kwargs.get("seed", 0) + i) for i in range(6)])]
    assert [r["prompt"] for r in together] == prompts
    for a, b in zip(alone, together, strict=True):
        assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-3)
    with pytest.raises(TDRewardError, match="seeds"):
        llm.generate(prompts, seeds=[1])
    with pytest.raises(TDRewardError, match="n_parallel"):
        LlamaCppModel(llm.path, n_parallel=0)
