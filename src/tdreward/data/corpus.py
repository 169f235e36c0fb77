"""Corpora: local text/JSONL/Parquet files and folders, or Hugging Face datasets by name."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tdreward.errors import TDRewardError, first_line

# WikiText marks an article title as " = Title = "; sections are " = = Section = = ".
WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")

TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
# Names ending like this are files the user meant, never Hugging Face dataset ids.
_FILE_LIKE_SUFFIXES = (*SUPPORTED_SUFFIXES, ".json", ".csv", ".tsv", ".md", ".gz", ".zip", ".arrow")
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}
_HUB_CHECK_TIMEOUT_S = 3.0


def read_text_file(path: Path) -> str:
    """Read a UTF-8 file strictly (a BOM is allowed); newlines normalised to '\\n'."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TDRewardError(f"file not found: {path}; check the path") from None
    except IsADirectoryError:
        raise TDRewardError(f"{path} is a folder, expected a file") from None
    except OSError as exc:
        raise TDRewardError(f"cannot read {path}: {first_line(exc)}") from None
    bom = b"\xef\xbb\xbf"
    skip = len(bom) if data.startswith(bom) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TDRewardError(
            f"{path} is not valid UTF-8 (byte offset {exc.start + skip}: {exc.reason}); "
            "re-encode it as UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSON Lines file."""
    # Split on '\n' only: str.splitlines would also break on U+2028 etc. inside JSON strings.
    for number, line in enumerate(read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TDRewardError(
                f"{path}, line {number}: invalid JSON ({exc.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise TDRewardError(
                f"{path}, line {number}: expected a JSON object, got {type(obj).__name__}"
            )
        yield number, obj


def _join(prompt: str, completion: str) -> str:
    if not prompt or not completion:
        return prompt + completion
    if prompt[-1].isspace() or completion[0].isspace():
        return prompt + completion
    return f"{prompt}\n{completion}"


def _record_text(record: dict[str, Any], text_field: str) -> str | None:
    """Text of one record: `text_field`, else prompt + completion/response, else first string."""
    if text_field in record:
        value = record[text_field]
        return value if isinstance(value, str) or value is None else None
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        completion = record.get("completion", record.get("response"))
        return _join(prompt, completion if isinstance(completion, str) else "")
    for value in record.values():
        if isinstance(value, str):
            return value
    return None


def split_wikitext_articles(text: str) -> list[str]:
    """Split WikiText-style raw text into articles at top-level ' = Title = ' lines.

    Text before the first heading is kept as its own document; text without any
    heading is returned as one document. Whitespace-only pieces are dropped.
    """
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if WIKITEXT_HEADING.match(line)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    articles = []
    for begin, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        piece = "\n".join(lines[begin:end])
        # WikiText pads paragraphs with " " lines; trim them at the edges only.
        piece = re.sub(r"\A(?:[ \t]*\n)+", "", piece).rstrip()
        if piece.strip():
            articles.append(piece)
    return articles


def _rows_to_documents(rows: list[str | None]) -> list[str]:
    """One document per row, unless the rows are WikiText lines: then join and split articles."""
    texts = [row for row in rows if row is not None]
    line_per_row = all("\n" not in row.rstrip("\n") for row in texts)
    if line_per_row and any(WIKITEXT_HEADING.match(row.rstrip("\n")) for row in texts):
        return split_wikitext_articles("\n".join(row.rstrip("\n") for row in texts))
    return [row for row in texts if row.strip()]


def _load_jsonl(path: Path, text_field: str) -> list[str]:
    rows: list[str | None] = []
    for number, record in iter_jsonl(path):
        text = _record_text(record, text_field)
        if text is None and record.get(text_field) is not None:
            raise TDRewardError(f"{path}, line {number}: field {text_field!r} is not a string")
        # A null text_field is an empty row; a record with no string at all is a mistake.
        if text is None and text_field not in record:
            raise TDRewardError(
                f"{path}, line {number}: no text found; add a {text_field!r} field "
                "(or 'prompt' and 'completion')"
            )
        rows.append(text)
    return _rows_to_documents(rows)


def _load_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq  # installed with datasets; imported late to keep startup fast

    try:
        table = pq.read_table(path)
    except OSError as exc:
        raise TDRewardError(f"cannot read Parquet file {path}: {first_line(exc)}") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid (a ValueError) for corrupt files
        raise TDRewardError(f"{path} is not a valid Parquet file: {first_line(exc)}") from None
    columns = table.column_names
    if text_field in columns:
        values = table.column(text_field).to_pylist()
        if any(v is not None and not isinstance(v, str) for v in values):
            raise TDRewardError(f"{path}: column {text_field!r} is not a string column")
        return _rows_to_documents(values)
    records = table.to_pylist()
    rows = [_record_text(record, text_field) for record in records]
    if records and all(row is None for row in rows):
        raise TDRewardError(
            f"{path}: no text column {text_field!r} (columns: {', '.join(columns)}); "
            "pass --text_field with the right column"
        )
    return _rows_to_documents(rows)


def _load_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return split_wikitext_articles(read_text_file(path))
    if suffix == ".jsonl":
        return _load_jsonl(path, text_field)
    if suffix == ".parquet":
        return _load_parquet(path, text_field)
    raise TDRewardError(
        f"unsupported file type {suffix or '(no extension)'!r} for {path}; "
        f"supported: {', '.join(SUPPORTED_SUFFIXES)} or a folder of them"
    )


def _load_folder(folder: Path, text_field: str) -> list[str]:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        # Skip .git, .cache and other hidden entries inside the folder.
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise TDRewardError(
            f"folder {folder} has no {', '.join(SUPPORTED_SUFFIXES)} files; add some or pass a file"
        )
    documents: list[str] = []
    for file in files:
        documents.extend(_load_file(file, text_field))
    return documents


def _looks_like_dataset_name(name: str) -> bool:
    return bool(_DATASET_ID.match(name)) and not name.lower().endswith(_FILE_LIKE_SUFFIXES)


def env_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in _TRUE
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable(timeout: float = _HUB_CHECK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face hub opens within `timeout` seconds."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # DNS resolution ignores the socket timeout, so run it in a thread we can abandon.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """Make datasets/huggingface_hub look only at the local cache, then restore."""
    import datasets.config
    import huggingface_hub.constants

    saved_env = {var: os.environ.get(var) for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    # Both libraries read the variables at import time, so patch their constants too.
    saved_consts = (
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
    )
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        (
            datasets.config.HF_HUB_OFFLINE,
            datasets.config.HF_DATASETS_OFFLINE,
            huggingface_hub.constants.HF_HUB_OFFLINE,
        ) = saved_consts


def _load_hf_dataset(name: str, config: str | None, split: str, text_field: str) -> list[str]:
    offline = env_offline() or not hub_reachable()
    import datasets

    where = f"dataset {name!r} (config {config!r}, split {split!r})"
    context = _offline_mode() if offline else contextlib.nullcontext()
    try:
        with context:
            dataset = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, FileNotFoundError) as exc:
        if offline:
            raise TDRewardError(
                f"dataset {name!r} is not cached and the Hugging Face hub cannot be reached; "
                "pass a local .txt/.jsonl/.parquet file or folder instead"
            ) from None
        raise TDRewardError(
            f"could not load {where}: {first_line(exc)}; check the name or pass a local file"
        ) from None
    except Exception as exc:  # datasets raises many types (ValueError for a bad split, ...)
        raise TDRewardError(
            f"could not load {where}: {first_line(exc)}; check the name, --dataset_config and split"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):  # only when split=None; be defensive
        raise TDRewardError(f"{where}: choose a split, one of {', '.join(dataset)}")
    columns = list(dataset.column_names)
    if text_field in columns:
        return _rows_to_documents(dataset[text_field])
    rows = [_record_text(record, text_field) for record in dataset]
    if not any(row is not None for row in rows):
        raise TDRewardError(
            f"{where} has no text column {text_field!r} (columns: {', '.join(columns)}); "
            "pass --text_field with the right column"
        )
    return _rows_to_documents(rows)


def load_corpus(
    name_or_path: str,
    config: str | None = None,
    split: str = "test",
    text_field: str = "text",
    max_documents: int | None = None,
) -> list[str]:
    """Load a corpus as a list of non-empty documents.

    `name_or_path` is a local .txt/.raw/.tokens/.jsonl/.parquet file, a folder of
    them, or a Hugging Face dataset id (`config` and `split` apply to datasets only).
    """
    if max_documents is not None and max_documents < 1:
        raise TDRewardError(f"max_documents must be at least 1, got {max_documents}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        documents = _load_folder(path, text_field)
    elif path.exists():
        documents = _load_file(path, text_field)
    elif _looks_like_dataset_name(name_or_path):
        documents = _load_hf_dataset(name_or_path, config, split, text_field)
    else:
        raise TDRewardError(
            f"file not found: {name_or_path}; pass an existing file or folder, "
            "or a Hugging Face dataset name such as 'wikitext'"
        )
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise TDRewardError(
            f"corpus {name_or_path} is empty (no non-whitespace text); "
            "pass a file, folder or dataset that contains text"
        )
    return documents[:max_documents] if max_documents is not None else documents


def chunk_token_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows that score every token exactly once, as in the HF perplexity recipe.

    Returns (begin, end, n_new): the window covers tokens [begin, end) and its last
    n_new tokens are newly scored; the first window scores all of its tokens. Unlike
    the recipe, later windows start at max(0, end - window), so each gets the most
    left context the window allows (the last window is never needlessly short).
    """
    for label, value in (("n_tokens", n_tokens), ("window", window), ("stride", stride)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TDRewardError(f"{label} must be an integer, got {value!r}")
    if n_tokens < 0:
        raise TDRewardError(f"n_tokens must be >= 0, got {n_tokens}")
    if window < 1:
        raise TDRewardError(f"window must be >= 1, got {window}")
    if not 1 <= stride <= window:
        raise TDRewardError(f"stride must be between 1 and window ({window}), got {stride}")
    windows: list[tuple[int, int, int]] = []
    scored = 0
    while scored < n_tokens:
        end = min(window if not windows else scored + stride, n_tokens)
        begin = max(0, end - window)
        windows.append((begin, end, end - scored))
        scored = end
    return windows


def chunk_documents(docs_token_ids: list[list[int]], window: int, overlap: int) -> list[list[int]]:
    """Split token sequences into chunks of at most `window` tokens; neighbours share `overlap`.

    Documents that fit are kept whole; empty ones are dropped.
    """
    if not isinstance(window, int) or window < 1:
        raise TDRewardError(f"window must be a positive integer, got {window!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < window:
        raise TDRewardError(
            f"overlap must be between 0 and window - 1 ({window - 1}), got {overlap!r}"
        )
    step = window - overlap
    chunks: list[list[int]] = []
    for ids in docs_token_ids:
        ids = list(ids)
        start = 0
        while start < len(ids):
            end = min(start + window, len(ids))
            chunks.append(ids[start:end])
            if end == len(ids):
                break
            start += step
    return chunks
