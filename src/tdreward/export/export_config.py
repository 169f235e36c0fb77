"""`tdreward export`'s settings: each field is a flag (tdreward.flags). No heavy imports, so
`tdreward --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass

from tdreward.flags import setting
from tdreward.validation import check_choice, check_output_file

OUTTYPES = ("f32", "f16", "q8_0")
TOKENIZER_SOURCES = ("auto", "gguf", "hf")


@dataclass
class ExportConfig:
    """Everything `tdreward export` takes."""

    model_path: str = setting(help="model spec: directory, hub id, gguf:PATH or embedded:NAME")
    outfile: str = setting(help="the GGUF file to write")
    adapter: str | None = setting(None, help="a PEFT LoRA adapter directory, merged before "
                                  "export")
    outtype: str = setting("f16", choices=OUTTYPES, help="tensor type (1-D tensors stay f32)")
    tokenizer: str = setting(
        "auto", choices=TOKENIZER_SOURCES,
        help="tokenizer metadata: auto (the source GGUF's, else built from the HF tokenizer), "
        "gguf (require a source GGUF), hf (always build)")
    name: str | None = setting(None, help="general.name written into the GGUF",
                               default_help="the model's")

    def __post_init__(self) -> None:
        check_choice("--outtype", self.outtype, OUTTYPES)
        check_choice("--tokenizer", self.tokenizer, TOKENIZER_SOURCES)
        check_output_file(self.outfile, "--outfile")


__all__ = ["OUTTYPES", "TOKENIZER_SOURCES", "ExportConfig"]
