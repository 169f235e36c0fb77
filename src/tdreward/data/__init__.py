"""Data layer: corpora and prompt sets (imports nothing from tdreward but errors)."""

from tdreward.data.corpus import (
    SUPPORTED_SUFFIXES,
    WIKITEXT_HEADING,
    chunk_documents,
    chunk_token_windows,
    hub_reachable,
    load_corpus,
    split_wikitext_articles,
)
from tdreward.data.prompts import PROMPT_FORMATS, PromptExample, format_prompt, load_prompts

__all__ = [
    "PROMPT_FORMATS",
    "SUPPORTED_SUFFIXES",
    "WIKITEXT_HEADING",
    "PromptExample",
    "chunk_documents",
    "chunk_token_windows",
    "format_prompt",
    "hub_reachable",
    "load_corpus",
    "load_prompts",
    "split_wikitext_articles",
]
