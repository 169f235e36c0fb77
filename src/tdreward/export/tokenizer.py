"""Tokenizer and chat-template metadata for an exported GGUF file.

Two sources, tried in this order by `tokenizer_source`:

1. **A source GGUF** (the model came from one: a `gguf:`/`embedded:` spec, a tdreward cache
   directory that records its GGUF, or any embedded model whose vocabulary is identical to the
   HF tokenizer's). Every `tokenizer.*` key is copied byte for byte, so llama.cpp tokenises the
   export exactly as it tokenised the original file. Works for every tokenizer llama.cpp knows
   (SentencePiece-style "llama" vocabularies such as Gemma's included).
2. **The HF tokenizer** (`tokenizer.json`), built the way llama.cpp's own converter does it.
   Supported: byte-level BPE ("gpt2" in GGUF) with one of the pre-tokenizers
   GPT-2 (`ByteLevel` with its regex), SmolLM (`Digits` + `ByteLevel`) or Llama 3
   (`Split` with the Llama-3 regex + `ByteLevel`). SentencePiece / Unigram / WordPiece
   tokenizers are not built from HF; export such a model from its GGUF instead.
"""

from __future__ import annotations

import json
import logging
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tdreward.errors import TDRewardError

log = logging.getLogger("tdreward")

# llama.cpp's Llama-3 pre-tokenizer regex, as written in Meta's tokenizer.json.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_HF_TOKENIZERS = (
    "byte-level BPE with the GPT-2, SmolLM (Digits + ByteLevel) or Llama-3 pre-tokenizer"
)


# --------------------------------------------------------------------------- source GGUF
# gguf.GGUFReader builds numpy views for every element of every metadata array: reading a
# 262k-token vocabulary (Gemma 3) took 40 s on a busy 2-CPU machine. The metadata block is a
# simple sequence of (key, type, value) records (GGUF spec v2/v3), so it is read here with
# `struct` in well under a second; tests check the result against GGUFReader.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
_META_CACHE: dict[str, dict] = {}


@dataclass
class MetaValue:
    """One GGUF metadata value: `vtype`/`sub_type` are gguf.GGUFValueType codes; strings are
    kept as raw bytes so that a copy is byte-exact."""

    vtype: int
    value: Any
    sub_type: int | None = None


def read_metadata(path: Path) -> dict[str, MetaValue]:
    """All metadata key/values of a little-endian GGUF file (memoised by path, size, mtime)."""
    import mmap

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _META_CACHE:
        return _META_CACHE[key]
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise TDRewardError(f"{path} is not a GGUF file")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise TDRewardError(f"{path}: unsupported GGUF version {version} (or big-endian)")
        pos = 24

        def string(pos: int) -> tuple[bytes, int]:
            (n,) = struct.unpack_from("<Q", buf, pos)
            return bytes(buf[pos + 8 : pos + 8 + n]), pos + 8 + n

        out: dict[str, MetaValue] = {}
        for _ in range(n_kv):
            name, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if vtype in _SCALARS:
                fmt = "<" + _SCALARS[vtype]
                (value,) = struct.unpack_from(fmt, buf, pos)
                pos += struct.calcsize(fmt)
                out[name.decode()] = MetaValue(vtype, value)
            elif vtype == _STRING:
                value, pos = string(pos)
                out[name.decode()] = MetaValue(vtype, value)
            elif vtype == _ARRAY:
                sub, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if sub == _STRING:
                    items = []
                    for _ in range(count):
                        item, pos = string(pos)
                        items.append(item)
                elif sub in _SCALARS:
                    fmt = "<" + _SCALARS[sub]
                    size = struct.calcsize(fmt)
                    items = np.frombuffer(buf, dtype=np.dtype(fmt), count=count,
                                          offset=pos).tolist()
                    pos += size * count
                else:
                    raise TDRewardError(f"{path}: nested metadata arrays are not supported")
                out[name.decode()] = MetaValue(vtype, items, sub)
            else:
                raise TDRewardError(f"{path}: unknown GGUF metadata type {vtype}")
    _META_CACHE[key] = out
    return out


def gguf_vocab_size(path: Path) -> int:
    """Number of tokens in a GGUF file's vocabulary (0 when it has none)."""
    tokens = read_metadata(path).get("tokenizer.ggml.tokens")
    return len(tokens.value) if tokens is not None else 0


def vocab_matches(path: Path, tokenizer) -> bool:
    """Whether a GGUF file's token list is exactly the HF tokenizer's id -> token table."""
    tokens = read_metadata(path).get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.value) != len(tokenizer):
        return False
    hf = tokenizer.convert_ids_to_tokens(list(range(len(tokens.value))))
    # llama.cpp stores user-defined SentencePiece tokens with "▁" already turned into spaces.
    return all(t.decode("utf-8", errors="replace").replace("▁", " ") == h.replace("▁", " ")
               for t, h in zip(tokens.value, hf))


def find_matching_embedded(tokenizer) -> Path | None:
    """An installed embedded model whose GGUF vocabulary is the tokenizer's, if any.

    A model fine-tuned from an embedded model and saved as a transformers directory no longer
    says where it came from; an identical vocabulary is the evidence that its GGUF tokenizer
    metadata (scores, token types, pre-tokenizer) still applies.
    """
    from tdreward.backends.embedded import EMBEDDED, gguf_path, is_installed

    for name in EMBEDDED:
        if not is_installed(name):
            continue
        try:
            path = gguf_path(name)
            if vocab_matches(path, tokenizer):
                return path
        except TDRewardError:
            continue
    return None


def copy_from_gguf(writer, source: Path, chat_template: str | None) -> bool:
    """Copy every `tokenizer.*` key of `source` into `writer`; returns whether the source had a
    chat template (`chat_template` from the HF tokenizer is added when it had none)."""
    from gguf import GGUFValueType

    had_template = False
    for key, meta in read_metadata(source).items():
        if not key.startswith("tokenizer.") or (meta.vtype == _ARRAY and not meta.value):
            continue
        sub = GGUFValueType(meta.sub_type) if meta.sub_type is not None else None
        writer.add_key_value(key, meta.value, GGUFValueType(meta.vtype), sub_type=sub)
        had_template |= key == "tokenizer.chat_template"
    if not had_template and chat_template:
        writer.add_chat_template(chat_template)
    return had_template


def chat_template_of(path: Path) -> str | None:
    """The chat template stored in a GGUF file, if any."""
    meta = read_metadata(path).get("tokenizer.chat_template")
    return meta.value.decode("utf-8") if meta is not None else None


# --------------------------------------------------------------------------- HF tokenizer
def _pre_tokenizer_name(tok_json: dict) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json."""
    pre = tok_json.get("pre_tokenizer") or {}
    if tok_json.get("normalizer"):
        raise TDRewardError(
            f"the HF tokenizer has a normalizer ({tok_json['normalizer'].get('type')}); "
            f"building GGUF tokenizer metadata supports only {SUPPORTED_HF_TOKENIZERS}"
        )
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {})
        if pattern.get("Regex") == LLAMA3_REGEX:
            return "llama-bpe"
    raise TDRewardError(
        f"unsupported HF pre-tokenizer {kinds}; building GGUF tokenizer metadata supports "
        f"only {SUPPORTED_HF_TOKENIZERS} (export the model from its GGUF file instead)"
    )


def build_from_hf(writer, tokenizer, n_vocab: int) -> None:
    """Write a llama.cpp "gpt2" (byte-level BPE) vocabulary built from the HF tokenizer."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TDRewardError(
            "the HF tokenizer has no tokenizer.json (a slow tokenizer); building GGUF tokenizer "
            f"metadata supports only {SUPPORTED_HF_TOKENIZERS}"
        )
    tok_json = json.loads(backend.to_str())
    model = tok_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type", "?") + (" with byte fallback" if model.get("byte_fallback") else "")
        raise TDRewardError(
            f"HF tokenizer model {kind} cannot be built into GGUF metadata here; supported: "
            f"{SUPPORTED_HF_TOKENIZERS} (export the model from its GGUF file instead)"
        )
    pre = _pre_tokenizer_name(tok_json)

    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in reverse:  # an embedding row beyond the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    # Merges and special-token ids the way llama.cpp's converter reads them (gguf.SpecialVocab).
    with tempfile.TemporaryDirectory(prefix="tdreward-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise TDRewardError("the HF tokenizer.json has no BPE merges: cannot build a GGUF vocab")
    for typ in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{typ}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            special.special_token_ids[typ] = tid
    # What the HF tokenizer really does, not what its config claims.
    probe = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    special.add_special_token = {
        "bos": bool(bos is not None and len(probe) > len(bare) and probe[0] == bos),
        "eos": bool(len(probe) > len(bare) and probe[-1] == tokenizer.eos_token_id),
    }
    special.chat_template = tokenizer.chat_template or None
    special.add_to_gguf(writer, quiet=True)


# --------------------------------------------------------------------------- choice
def tokenizer_source(source_gguf: Path | None, tokenizer, n_vocab: int,
                     mode: str = "auto") -> Path | None:
    """The GGUF to copy tokenizer metadata from, or None to build it from the HF tokenizer.

    mode: "auto" (source GGUF, else an embedded GGUF with the same vocabulary, else HF),
    "gguf" (a GGUF is required), "hf" (always build from the HF tokenizer).
    """
    if mode not in ("auto", "gguf", "hf"):
        raise TDRewardError(f"tokenizer source must be auto, gguf or hf, not {mode!r}")
    if mode == "hf":
        return None
    if source_gguf is not None:
        size = gguf_vocab_size(source_gguf)
        if size != n_vocab or size != len(tokenizer):
            if mode == "gguf":
                raise TDRewardError(
                    f"the model has {n_vocab} embedding rows and its tokenizer {len(tokenizer)} "
                    f"tokens, but {source_gguf.name} has {size}: its tokenizer does not apply"
                )
            log.warning("the tokenizer differs from %s; building GGUF tokenizer metadata from "
                        "the HF tokenizer", source_gguf.name)
            return None
        return source_gguf
    match = find_matching_embedded(tokenizer) if len(tokenizer) == n_vocab else None
    if match is None and mode == "gguf":
        raise TDRewardError("no source GGUF with the same vocabulary was found")
    return match


def write_tokenizer(writer, tokenizer, n_vocab: int, source: Path | None) -> str:
    """Tokenizer + chat template metadata into `writer`; returns a note of where it came from."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if source is not None:
        copy_from_gguf(writer, source, template)
        return f"copied from {source.name}"
    build_from_hf(writer, tokenizer, n_vocab)
    return "built from the HF tokenizer"


__all__ = [
    "SUPPORTED_HF_TOKENIZERS",
    "build_from_hf",
    "copy_from_gguf",
    "find_matching_embedded",
    "tokenizer_source",
    "write_tokenizer",
]
