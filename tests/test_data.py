"""Tests for the data layer: corpora, token windows and prompt sets."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdreward.data import (
    PromptExample,
    chunk_documents,
    chunk_token_windows,
    load_corpus,
    load_prompts,
    split_wikitext_articles,
)
from tdreward.data import corpus as corpus_module
from tdreward.errors import TDRewardError

REPO = Path(__file__).resolve().parents[1]
WIKITEXT_DEV = REPO / "data" / "wikitext-2" / "wiki.test.small.raw"


def _words(text: str) -> list[str]:
    return text.split()


# --- WikiText ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wikitext_docs() -> list[str]:
    return load_corpus(str(WIKITEXT_DEV))


def test_wikitext_dev_splits_at_title_lines(wikitext_docs: list[str]) -> None:
    # The shipped file holds the first 12 articles of the test split.
    assert len(wikitext_docs) == 12
    assert all(doc.startswith(" = ") and not doc.startswith(" = = ") for doc in wikitext_docs)
    assert wikitext_docs[0].split("\n", 1)[0] == " = Robert Boulter = "
    assert wikitext_docs[1].split("\n", 1)[0] == " = Du Fu = "
    assert wikitext_docs[-1].split("\n", 1)[0] == " = Temnospondyli = "
    # Section headings stay inside their article.
    assert "\n = = Filmography = = \n" in wikitext_docs[0]


def test_wikitext_dev_keeps_every_word(wikitext_docs: list[str]) -> None:
    text = WIKITEXT_DEV.read_text(encoding="utf-8")
    assert [w for doc in wikitext_docs for w in _words(doc)] == _words(text)


def test_max_documents(wikitext_docs: list[str]) -> None:
    docs = load_corpus(str(WIKITEXT_DEV), max_documents=3)
    assert docs == wikitext_docs[:3]
    with pytest.raises(TDRewardError, match="max_documents"):
        load_corpus(str(WIKITEXT_DEV), max_documents=0)


def test_split_wikitext_original_layout() -> None:
    # The published files pad every line with " " lines.
    text = (
        " \n = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n It is old . \n"
        " \n = Beta = \n \n Beta follows alpha . \n \n"
    )
    articles = split_wikitext_articles(text)
    assert articles == [
        " = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n It is old .",
        " = Beta = \n \n Beta follows alpha .",
    ]


def test_split_wikitext_keeps_preamble_and_plain_text() -> None:
    assert split_wikitext_articles("intro line\n = Title = \n body\n") == [
        "intro line",
        " = Title = \n body",
    ]
    assert split_wikitext_articles("just a note.\nsecond line.\n") == ["just a note.\nsecond line."]
    assert split_wikitext_articles(" \n\n  \n") == []
    # '=Title=' without the spaces, or ' = = x = = ', is not an article title.
    assert len(split_wikitext_articles("a\n=Title=\nb\n = = Sec = = \nc")) == 1


def test_plain_txt_is_one_document_and_crlf_normalised(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_bytes(b"first line\r\nsecond line\r\n")
    assert load_corpus(str(f)) == ["first line\nsecond line"]


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhello")
    assert load_corpus(str(f)) == ["hello"]


# --- JSONL, Parquet, folders ------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_fields_and_fallbacks(tmp_path: Path) -> None:
    f = _write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"text": "plain text"},
            {"prompt": "Q?", "completion": "A."},
            {"prompt": "Ask ", "response": "reply"},
            {"id": 3, "body": "first string field"},
            {"text": "   "},
            {"text": None},
        ],
    )
    assert load_corpus(str(f)) == [
        "plain text",
        "Q?\nA.",
        "Ask reply",
        "first string field",
    ]


def test_jsonl_custom_text_field_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text('{"body": "one", "text": "x"}\n\n   \n{"body": "two"}\n', encoding="utf-8")
    assert load_corpus(str(f), text_field="body") == ["one", "two"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(TDRewardError, match=r"bad\.jsonl, line 3: invalid JSON"):
        load_corpus(str(f))


def test_jsonl_errors_for_non_objects_and_missing_text(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, ["a", "list"]])
    with pytest.raises(TDRewardError, match="line 2: expected a JSON object"):
        load_corpus(str(f))
    g = _write_jsonl(tmp_path / "b.jsonl", [{"n": 1}])
    with pytest.raises(TDRewardError, match="line 1: no text found"):
        load_corpus(str(g))
    h = _write_jsonl(tmp_path / "c.jsonl", [{"text": 5}])
    with pytest.raises(TDRewardError, match="line 1: field 'text' is not a string"):
        load_corpus(str(h))


def test_parquet_text_column(tmp_path: Path) -> None:
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["doc one", "", None, "doc two"], "n": [1, 2, 3, 4]}), f)
    assert load_corpus(str(f)) == ["doc one", "doc two"]


def test_parquet_custom_field_fallback_and_missing_column(tmp_path: Path) -> None:
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["a", "b"], "prompt": ["p", "q"]}), f)
    assert load_corpus(str(f), text_field="body") == ["a", "b"]
    g = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"prompt": ["Q?"], "completion": ["A."]}), g)
    assert load_corpus(str(g)) == ["Q?\nA."]
    h = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), h)
    with pytest.raises(TDRewardError, match=r"no text column 'text' \(columns: x\)"):
        load_corpus(str(h))


def test_parquet_wikitext_rows_are_joined_into_articles(tmp_path: Path) -> None:
    # The hub's wikitext parquet files hold one line per row.
    rows = ["", " = A = \n", "", " a text . \n", " = = S = = \n", " = B = \n", " b text . \n"]
    f = tmp_path / "wiki.parquet"
    pq.write_table(pa.table({"text": rows}), f)
    assert load_corpus(str(f)) == [
        " = A = \n\n a text . \n = = S = =",
        " = B = \n b text .",
    ]


def test_corrupt_parquet(tmp_path: Path) -> None:
    f = tmp_path / "bad.parquet"
    f.write_bytes(b"not parquet at all")
    with pytest.raises(TDRewardError, match="bad.parquet"):
        load_corpus(str(f))


def test_folder_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z", encoding="utf-8")
    (tmp_path / "a.txt").write_text("from a", encoding="utf-8")
    _write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "from b/c 1"}, {"text": "from b/c 2"}])
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "p.parquet")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("ignored too", encoding="utf-8")
    assert load_corpus(str(tmp_path)) == [
        "from a",
        "from b/c 1",
        "from b/c 2",
        "from b/z",
        "from parquet",
    ]


def test_folder_without_supported_files(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("x", encoding="utf-8")
    with pytest.raises(TDRewardError, match="has no .txt"):
        load_corpus(str(tmp_path))


# --- bad input --------------------------------------------------------------------------------


def test_non_utf8_reports_byte_offset(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"hello \xff world")
    with pytest.raises(TDRewardError, match=r"latin1\.txt is not valid UTF-8 \(byte offset 6"):
        load_corpus(str(f))
    # The offset counts from the start of the file, BOM included.
    g = tmp_path / "bom.txt"
    g.write_bytes(b"\xef\xbb\xbfab\xe9")
    with pytest.raises(TDRewardError, match="byte offset 5"):
        load_corpus(str(g))


def test_non_utf8_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(TDRewardError, match="byte offset 13"):
        load_corpus(str(f))


@pytest.mark.parametrize("content", [b"", b"   \n\n \t \n"])
def test_empty_corpus(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    with pytest.raises(TDRewardError, match=r"corpus .*empty\.txt is empty"):
        load_corpus(str(f))


def test_empty_jsonl_corpus(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(TDRewardError, match="is empty"):
        load_corpus(str(f))


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    f = tmp_path / "table.csv"
    f.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(
        TDRewardError, match=r"unsupported file type '\.csv'.*\.txt.*\.jsonl.*\.parquet"
    ):
        load_corpus(str(f))


@pytest.mark.parametrize("name", ["missing.txt", "some/dir/missing.jsonl", "./nope", "a/b/c"])
def test_missing_file_is_not_taken_for_a_dataset(tmp_path: Path, name: str) -> None:
    start = time.monotonic()
    with pytest.raises(TDRewardError, match="file not found"):
        load_corpus(str(tmp_path / name) if name.startswith("missing") else name)
    assert time.monotonic() - start < 1.0  # no hub lookup


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text("{\n", encoding="utf-8")
    with pytest.raises(TDRewardError) as info:
        load_corpus(str(f))
    assert "\n" not in str(info.value)


# --- Hugging Face datasets offline ------------------------------------------------------------


def _restore_offline_state():
    import datasets.config
    import huggingface_hub.constants

    return (
        datasets.config.HF_HUB_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
        os.environ.get("HF_DATASETS_OFFLINE"),
    )


def test_uncached_dataset_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    before = _restore_offline_state()
    start = time.monotonic()
    with pytest.raises(TDRewardError) as info:
        load_corpus("no-such-org/no-such-dataset", "default")
    assert time.monotonic() - start < 10
    assert str(info.value) == (
        "dataset 'no-such-org/no-such-dataset' is not cached and the Hugging Face hub cannot "
        "be reached; pass a local .txt/.jsonl/.parquet file or folder instead"
    )
    # Offline mode is switched on for the call only.
    assert _restore_offline_state() == before


def test_unreachable_hub_counts_as_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(corpus_module, "hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(TDRewardError, match="'wikitext' is not cached"):
        load_corpus("wikitext", "wikitext-2-raw-v1")
    assert time.monotonic() - start < 10


def test_hub_reachable_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) on localhost is closed: the probe must say no, quickly.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    assert corpus_module.hub_reachable(timeout=1.0) is False
    assert time.monotonic() - start < 2.0


# --- token windows ----------------------------------------------------------------------------


def test_chunk_token_windows_examples() -> None:
    assert chunk_token_windows(0, 8, 4) == []
    assert chunk_token_windows(5, 8, 4) == [(0, 5, 5)]
    assert chunk_token_windows(10, 8, 4) == [(0, 8, 8), (2, 10, 2)]
    assert chunk_token_windows(12, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 12, 4)]
    assert chunk_token_windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]


def _check_windows(n_tokens: int, window: int, stride: int) -> None:
    windows = chunk_token_windows(n_tokens, window, stride)
    scored = [0] * n_tokens
    for i, (begin, end, n_new) in enumerate(windows):
        assert 0 <= begin < end <= n_tokens
        assert end - begin <= window
        # Every window gets as much left context as the window allows.
        assert end - begin == min(window, end)
        assert 1 <= n_new <= end - begin
        assert n_new <= (window if i == 0 else stride)
        if i == 0:
            assert (begin, n_new) == (0, end)
        for t in range(end - n_new, end):
            scored[t] += 1
    assert scored == [1] * n_tokens
    assert len(windows) == (0 if n_tokens == 0 else 1 + -(-max(0, n_tokens - window) // stride))


@settings(max_examples=300, deadline=None)
@given(
    n_tokens=st.integers(0, 300),
    window=st.integers(1, 64),
    data=st.data(),
)
def test_chunk_token_windows_cover_every_token_once(
    n_tokens: int, window: int, data: st.DataObject
) -> None:
    stride = data.draw(st.integers(1, window))
    _check_windows(n_tokens, window, stride)


@pytest.mark.parametrize(
    ("n_tokens", "window", "stride"),
    [(-1, 4, 2), (10, 0, 1), (10, 4, 0), (10, 4, 5), (10, 4.0, 2), (True, 4, 2)],
)
def test_chunk_token_windows_validation(n_tokens: object, window: object, stride: object) -> None:
    with pytest.raises(TDRewardError):
        chunk_token_windows(n_tokens, window, stride)  # type: ignore[arg-type]


def test_chunk_documents_overlap() -> None:
    doc = list(range(10))
    assert chunk_documents([doc], 4, 1) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert chunk_documents([doc], 4, 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_documents([[1, 2], [], doc[:4]], 4, 2) == [[1, 2], [0, 1, 2, 3]]
    with pytest.raises(TDRewardError, match="overlap"):
        chunk_documents([doc], 4, 4)
    with pytest.raises(TDRewardError, match="window"):
        chunk_documents([doc], 0, 0)


@settings(max_examples=200, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(0, 1000), max_size=80), max_size=5),
    window=st.integers(1, 32),
    data=st.data(),
)
def test_chunk_documents_properties(
    docs: list[list[int]], window: int, data: st.DataObject
) -> None:
    overlap = data.draw(st.integers(0, window - 1))
    chunks = chunk_documents(docs, window, overlap)
    assert all(1 <= len(c) <= window for c in chunks)
    # Rebuild each document from its chunks: consecutive chunks share exactly `overlap` tokens.
    it = iter(chunks)
    for doc in docs:
        if not doc:
            continue
        rebuilt = list(next(it))
        while len(rebuilt) < len(doc):
            nxt = next(it)
            assert rebuilt[len(rebuilt) - overlap :] == nxt[:overlap]
            rebuilt.extend(nxt[overlap:])
        assert rebuilt == doc
    assert next(it, None) is None


# --- prompts ----------------------------------------------------------------------------------


def test_load_prompts_jsonl(tmp_path: Path) -> None:
    f = _write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "A?", "completion": "a"}, {"prompt": "B?", "response": "b"}, {"prompt": "C?"}],
    )
    assert load_prompts(str(f)) == [
        PromptExample("A?", "a"),
        PromptExample("B?", "b"),
        PromptExample("C?", None),
    ]


def test_load_prompts_txt(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("First prompt\n\n  Second prompt  \r\n\n", encoding="utf-8")
    assert load_prompts(str(f)) == [PromptExample("First prompt"), PromptExample("Second prompt")]


def test_load_prompts_errors(tmp_path: Path) -> None:
    with pytest.raises(TDRewardError, match="prompt file not found"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(TDRewardError, match=r"bad\.jsonl, line 2: invalid JSON"):
        load_prompts(str(bad))
    nokey = _write_jsonl(tmp_path / "nokey.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(TDRewardError, match=r"line 2: missing 'prompt' key"):
        load_prompts(str(nokey))
    blank = _write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "  "}])
    with pytest.raises(TDRewardError, match="line 1: 'prompt' must be a non-empty string"):
        load_prompts(str(blank))
    wrong = _write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "x", "completion": 3}])
    with pytest.raises(TDRewardError, match="line 1: 'completion' must be a string"):
        load_prompts(str(wrong))
    for name in ("empty.jsonl", "empty.txt"):
        (tmp_path / name).write_text("\n \n", encoding="utf-8")
        with pytest.raises(TDRewardError, match="is empty"):
            load_prompts(str(tmp_path / name))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\nna\xefve\n")
    with pytest.raises(TDRewardError, match="byte offset 5"):
        load_prompts(str(latin))
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\nx\n", encoding="utf-8")
    with pytest.raises(TDRewardError, match=r"supported: \.jsonl, \.txt"):
        load_prompts(str(csv))
    with pytest.raises(TDRewardError, match="is a folder"):
        load_prompts(str(tmp_path))


# --- shipped data -----------------------------------------------------------------------------


def test_shipped_training_data() -> None:
    examples = load_prompts(str(REPO / "data/sample_training_data.jsonl"))
    assert len(examples) >= 50
    assert all(e.prompt.strip() and e.completion and e.completion.strip() for e in examples)
    assert len({e.prompt for e in examples}) == len(examples)
    for e in examples:  # completions are one to four sentences
        sentences = re.findall(r"[.!?](?:\s|$)", e.completion or "")
        assert 1 <= len(sentences) <= 4, e.completion
    docs = load_corpus(str(REPO / "data/sample_training_data.jsonl"))
    assert len(docs) == len(examples)


def test_shipped_eval_prompts() -> None:
    prompts = load_prompts(str(REPO / "data/eval_prompts.jsonl"))
    assert len(prompts) >= 30
    assert all(p.prompt.strip() and p.completion is None for p in prompts)
    training = {e.prompt for e in load_prompts(str(REPO / "data/sample_training_data.jsonl"))}
    assert not training & {p.prompt for p in prompts}
