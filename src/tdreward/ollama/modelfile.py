"""Ollama Modelfiles: written from a GGUF's chat template, and parsed the way Ollama parses them.

Chat template -> Ollama TEMPLATE (a Go template). Ollama converts a few known Jinja templates
itself; here the Jinja template is *rendered* on probe conversations and recognised by its
markers, then mapped to the equivalent Go template in the `.System` / `.Prompt` /
`.Response` form that every Ollama version accepts:

* ChatML (`<|im_start|>role ... <|im_end|>`: SmolLM2, Qwen, ...): stops `<|im_start|>`,
  `<|im_end|>`; a default system prompt the Jinja template inserts (SmolLM2's "You are a
  helpful AI assistant named SmolLM...") becomes the Modelfile's SYSTEM;
* Gemma (`<start_of_turn>user ... <end_of_turn>`): the system prompt goes at the top of the
  user turn, as Gemma 3's template does; stop `<end_of_turn>`;
* no chat template (a base model such as Gemma 3 270M or GPT-2): `{{ .Prompt }}`, a plain
  completion.

Any other chat template is refused with a clear error; pass your own Go template instead.

`parse_modelfile` is a line-for-line port of Ollama's `parser.ParseFile` state machine
(github.com/ollama/ollama, parser/parser.go), so a test can check that what we write reads back
as Ollama reads it: triple-quoted multi-line values, `"..."` values, comments, case-insensitive
commands. `create_request` then turns the commands into the body of `POST /api/create` as
Ollama's CLI does (`Modelfile.CreateRequest`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tdreward.errors import TDRewardError

CHATML_TEMPLATE = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)
GEMMA_TEMPLATE = (
    "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
    "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n"
)
RAW_TEMPLATE = "{{ .Prompt }}"
SUPPORTED_TEMPLATES = "ChatML (<|im_start|>), Gemma (<start_of_turn>), or no chat template"


@dataclass
class ChatFormat:
    """The Ollama side of a model's chat template."""

    kind: str  # chatml | gemma | raw
    template: str
    stops: list[str] = field(default_factory=list)
    default_system: str | None = None


def _render(jinja: str, messages: list[dict]) -> str:
    """Render a chat template as transformers does (sandboxed Jinja, trim/lstrip blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(jinja).render(messages=messages, add_generation_prompt=True,
                                         bos_token="", eos_token="")


def chat_format(jinja: str | None) -> ChatFormat:
    """Map a Jinja chat template (None: the model has none) to its Ollama equivalent."""
    from jinja2.exceptions import TemplateError

    if not jinja:
        return ChatFormat("raw", RAW_TEMPLATE)
    user = {"role": "user", "content": "USER_PROBE"}
    try:
        plain = _render(jinja, [user])
    except TemplateError as e:
        raise TDRewardError(f"the model's chat template does not render: {e}") from e
    if "<|im_start|>" in plain:
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", plain, flags=re.S)
        return ChatFormat("chatml", CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"],
                          m.group(1) if m else None)
    if "<start_of_turn>" in plain:
        return ChatFormat("gemma", GEMMA_TEMPLATE, ["<end_of_turn>"])
    raise TDRewardError(
        f"cannot convert this chat template to an Ollama template (supported: "
        f"{SUPPORTED_TEMPLATES}); pass --template FILE with a Go template"
    )


# --------------------------------------------------------------------------- writing
def _check_value(what: str, value: str) -> None:
    if '"""' in value:
        raise TDRewardError(f'the {what} contains """, which a Modelfile cannot quote')
    bad = [c for c in value if not (c.isprintable() or c in "\n\t\r")]
    if bad:  # Ollama's parser silently drops non-printable characters
        raise TDRewardError(f"the {what} contains a control character {bad[0]!r}")


def quote(what: str, value: str) -> str:
    """A value as Ollama reads it back: triple quotes for anything multi-line, spaced or
    quoted (the same rule as Ollama's own `quote`, but always safe)."""
    _check_value(what, value)
    if not value or any(c in value for c in ' \t\n\r"#'):
        return f'"""{value}"""'
    return value


@dataclass
class Modelfile:
    """FROM + TEMPLATE + SYSTEM + PARAMETERs; `render()` gives the file's text."""

    from_: str
    template: str | None = None
    system: str | None = None
    parameters: list[tuple[str, str]] = field(default_factory=list)
    license: str | None = None

    def render(self) -> str:
        lines = ["# Modelfile written by tdreward (`ollama create NAME -f Modelfile`)",
                 f"FROM {quote('FROM path', self.from_)}"]
        if self.template is not None:
            lines.append(f"TEMPLATE {quote('template', self.template)}")
        if self.system:
            lines.append(f"SYSTEM {quote('system prompt', self.system)}")
        for name, value in self.parameters:
            if not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise TDRewardError(f"invalid Modelfile parameter name {name!r}")
            lines.append(f"PARAMETER {name} {quote(f'{name} parameter', value)}")
        if self.license:
            lines.append(f"LICENSE {quote('license', self.license)}")
        return "\n".join(lines) + "\n"


def modelfile_for(gguf: Path, chat_template: str | None, system: str | None = None,
                  template: str | None = None, parameters: dict | None = None) -> Modelfile:
    """The Modelfile of a GGUF file: TEMPLATE and stops from its chat template (or the given Go
    `template`), SYSTEM from `system` or the template's default system prompt."""
    fmt = chat_format(chat_template) if template is None else ChatFormat("custom", template)
    params = [("stop", s) for s in fmt.stops]
    for k, v in (parameters or {}).items():
        for item in v if isinstance(v, list | tuple) else [v]:
            params.append((k, str(item)))
    return Modelfile(str(Path(gguf).resolve()), fmt.template, system or fmt.default_system,
                     params)


# --------------------------------------------------------------------------- parsing
_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)
_COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
             "parameter", "message", "requires")


class ModelfileError(TDRewardError):
    """A Modelfile Ollama would reject."""


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        if len(s) >= 6 and s.endswith('"""'):
            return s[3:-3], True
        return "", False
    if s.startswith('"'):
        if len(s) >= 2 and s.endswith('"'):
            return s[1:-1], True
        return "", False
    return s, True


def _step(r: str, state: int) -> tuple[int, str | None]:
    space, newline = r in " \t", r in "\r\n"
    if state == _NIL:
        if r == "#":
            return _COMMENT, None
        return (_NIL, None) if space or newline else (_NAME, r)
    if state == _NAME:
        if r.isascii() and r.isalpha():
            return _NAME, r
        if space:
            return _VALUE, None
        raise ModelfileError('command must be one of "from", "license", "template", "system", '
                             '"adapter", "parameter", "message", ...')
    if state == _VALUE:
        return (_NIL, r) if space or newline else (_VALUE, r)
    if state in (_PARAMETER, _MESSAGE):
        ok = r.isascii() and (r.isalpha() or (state == _PARAMETER and (r.isdigit() or r == "_")))
        if ok:
            return state, r
        if space:
            return _VALUE, None
        raise ModelfileError("unexpected EOF")
    return (_NIL, None) if newline else (_COMMENT, None)  # _COMMENT


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, args) pairs as Ollama's parser reads them ("from" is named "model", a
    PARAMETER is named by its key, MESSAGE args are "role: content")."""
    commands: list[tuple[str, str]] = []
    state, buf, line, name, role = _NIL, "", 1, "", ""
    for ch in text.lstrip("\ufeff"):
        if ch in "\r\n":
            line += 1
        try:
            nxt, r = _step(ch, state)
        except ModelfileError as e:
            raise ModelfileError(f"Modelfile line {line}: {e}") from None
        if nxt != state:
            if state == _NAME:
                word = buf.lower()
                if word not in _COMMANDS:
                    raise ModelfileError(f"Modelfile line {line}: unknown command {buf!r}")
                if word == "from":
                    name = "model"
                elif word == "parameter":
                    nxt = _PARAMETER
                elif word == "message":
                    nxt, name = _MESSAGE, word
                else:
                    name = word
            elif state == _PARAMETER:
                name = buf
            elif state == _MESSAGE:
                if buf not in ("system", "user", "assistant"):
                    raise ModelfileError(f"Modelfile line {line}: message role must be one of "
                                         '"system", "user", or "assistant"')
                role = buf
            elif state == _VALUE:
                value, ok = _unquote(buf.strip())
                if not ok or (r is not None and r in " \t"):
                    buf += r or ""  # an open quote, or a space inside the value: keep going
                    continue
                if role:
                    value, role = f"{role}: {value}", ""
                commands.append((name, value))
            buf, state = "", nxt
        if r is not None and r.isprintable():
            buf += r
    if state == _VALUE:
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ModelfileError("Modelfile ends inside a quoted value (unexpected EOF)")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in (_NIL, _COMMENT):
        raise ModelfileError("Modelfile ends in the middle of a command (unexpected EOF)")
    if not any(c == "model" for c, _ in commands):
        raise ModelfileError("the Modelfile has no FROM line")
    return commands


# Ollama's option types (api.Options), for the parameters tdreward writes or users commonly set.
_INT_PARAMS = {"num_ctx", "num_predict", "top_k", "seed", "repeat_last_n", "num_keep",
               "num_batch", "num_gpu", "num_thread"}
_FLOAT_PARAMS = {"temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                 "presence_penalty", "frequency_penalty"}


def _typed(name: str, value: str):
    try:
        if name in _INT_PARAMS:
            return int(value)
        if name in _FLOAT_PARAMS:
            return float(value)
    except ValueError as e:
        raise ModelfileError(f"PARAMETER {name} {value!r}: not a number") from e
    if name == "stop":
        return value
    raise ModelfileError(f"unknown Modelfile parameter {name!r}")


@dataclass
class CreateFields:
    """What `POST /api/create` takes, read from a Modelfile (paths resolved)."""

    from_path: Path | None  # a local GGUF file to upload
    from_model: str | None  # or an existing model name
    template: str | None = None
    system: str | None = None
    parameters: dict = field(default_factory=dict)
    license: list[str] = field(default_factory=list)


def create_fields(text: str, relative_dir: Path) -> CreateFields:
    """Parse a Modelfile into create-request fields, as Ollama's `CreateRequest` does: a FROM
    that is an existing file is uploaded, anything else names a model."""
    fields = CreateFields(None, None)
    for name, args in parse_modelfile(text):
        if name == "model":
            path = Path(args).expanduser()
            path = path if path.is_absolute() else relative_dir / path
            if path.is_file():
                fields.from_path = path.resolve()
            else:
                fields.from_model = args
        elif name == "template":
            fields.template = args
        elif name == "system":
            fields.system = args
        elif name == "license":
            fields.license.append(args)
        elif name in ("adapter", "draft", "renderer", "parser", "requires", "message"):
            raise ModelfileError(f"Modelfile command {name.upper()} is not supported by "
                                 "`tdreward ollama`; use `ollama create -f` for it")
        elif name == "stop":
            fields.parameters.setdefault("stop", []).append(args)
        else:
            fields.parameters[name] = _typed(name, args)
    return fields


__all__ = ["ChatFormat", "CreateFields", "Modelfile", "ModelfileError", "chat_format",
           "create_fields", "modelfile_for", "parse_modelfile", "quote"]
