"""What a `tdreward lora` run sets up before training: the data and the model.

Data: prompt/completion pairs or plain text, tokenised.

* A .jsonl file whose records carry `prompt` and `completion` (or `response`) keys becomes
  prompt/completion pairs: the loss covers the completion tokens (and the EOS appended to
  each completion, so the model learns to stop), never the prompt.
* Anything else `tdreward.data.load_corpus` reads (a Hugging Face dataset by name, a local
  .txt/.jsonl/.parquet file or a folder) is plain text: documents cut into windows of
  `max_length` tokens, every token a target.

Each example is a dict of python lists (`input_ids`, `labels`, with -100 where no loss) plus an
`example_id`, so the trainer can remember the frozen reference's TD errors per example.

Model: the base in fp32, or 8/4-bit through bitsandbytes (embedded and GGUF specs load from the
dequantised safetensors cache), and the LoRA target modules per architecture. Then the reward
model around it and the Trainer's arguments.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tdreward.data.corpus import chunk_documents, load_corpus
from tdreward.data.prompts import PromptExample, load_prompts
from tdreward.data.prompts import format_prompt as format_turn
from tdreward.errors import TDRewardError, first_line
from tdreward.reward_model import TDRewardModel, load_reward_model
from tdreward.specs import parse_spec
from tdreward.training.lora_config import LoraTrainingConfig

log = logging.getLogger("tdreward")
IGNORE = -100  # label of a position without loss (the transformers convention)
LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Architectures whose layer names we know; any other model gets its own linear layers.
ARCH_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{arch: LLAMA_PROJ for arch in ("llama", "gemma", "gemma2", "gemma3", "gemma3_text")},
}


def is_pair_file(dataset: str) -> bool:
    """Whether `dataset` is a local .jsonl file of prompt/completion records."""
    path = Path(dataset).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".jsonl"):
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return False  # load_corpus reports the bad line
                return isinstance(first, dict) and "prompt" in first and (
                    "completion" in first or "response" in first)
    return False


def format_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    """The prompt as the model reads it: raw text ending in a newline, or the chat template's
    user turn followed by the assistant header."""
    # LoRA's policy, kept: --chat_template is mode "chat" (an error without a template), its
    # absence "raw" (not "auto"), and a raw prompt ends in a newline so the completion starts
    # a line of its own. encode_pair tokenises either with special tokens.
    if chat_template:
        return format_turn(tokenizer, prompt, "chat", fix="train without --chat_template")
    return prompt if prompt[-1:].isspace() else prompt + "\n"


def encode_pair(tokenizer, prompt: str, completion: str, max_length: int,
                chat_template: bool = False) -> dict | None:
    """input_ids + labels for one pair; None when no completion token fits in `max_length`.

    Prompt and completion are tokenised apart and joined, so the boundary is exact (a merged
    token would otherwise blur which positions belong to the completion).
    """
    p = tokenizer(format_prompt(tokenizer, prompt, chat_template),
                  add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    ids = (p + c)[:max_length]
    if len(ids) <= len(p):
        return None
    return {"input_ids": ids, "labels": [IGNORE] * len(p) + ids[len(p):]}


@dataclass
class LoraData:
    examples: list[dict]
    kind: str  # "pairs" or "text"
    n_documents: int
    n_target_tokens: int


# How a count of each kind of example reads: "67 prompt/completion pairs", "67 text examples".
EXAMPLE_KINDS = {"pairs": "prompt/completion pairs", "text": "text examples"}


def describe_examples(n: int, kind: str) -> str:
    """`n` training examples of `kind` in words, e.g. "67 prompt/completion pairs"."""
    return f"{n} {EXAMPLE_KINDS.get(kind, f'{kind} examples')}"


def load_training_data(tokenizer, dataset: str, dataset_config: str | None = None,
                       split: str = "train", max_length: int = 256,
                       chat_template: bool = False, max_examples: int | None = None) -> LoraData:
    """Tokenised training examples for `dataset` (see the module docstring)."""
    if max_length < 2:
        raise TDRewardError(f"--max_length must be at least 2, got {max_length}")
    if is_pair_file(dataset):
        pairs = [e for e in load_prompts(dataset) if e.completion]
        if not pairs:
            raise TDRewardError(f"{dataset} has no record with a non-empty 'completion'")
        examples = encode_pairs(tokenizer, pairs, max_length, chat_template)
        kind, n_docs = "pairs", len(pairs)
    else:
        docs = load_corpus(dataset, dataset_config, split=split)
        rows = [tokenizer(d, add_special_tokens=True)["input_ids"] for d in docs]
        chunks = [c for c in chunk_documents(rows, max_length, 0) if len(c) >= 2]
        examples = [{"input_ids": c, "labels": list(c)} for c in chunks]
        kind, n_docs = "text", len(docs)
    if max_examples is not None:
        examples = examples[:max_examples]
    if not examples:
        raise TDRewardError(f"{dataset}: no training example has a token to learn from")
    for i, e in enumerate(examples):
        e["example_id"] = i
    n_target = sum(sum(1 for t in e["labels"][1:] if t != IGNORE) for e in examples)
    return LoraData(examples, kind, n_docs, n_target)


def encode_pairs(tokenizer, pairs: list[PromptExample], max_length: int,
                 chat_template: bool = False) -> list[dict]:
    out, dropped = [], 0
    for e in pairs:
        enc = encode_pair(tokenizer, e.prompt, e.completion or "", max_length, chat_template)
        if enc is None:
            dropped += 1
        else:
            out.append(enc)
    if dropped:
        log.warning("%d pair(s) dropped: the prompt alone fills --max_length %d", dropped,
                    max_length)
    return out


class PadCollator:
    """Right-pads a list of examples into tensors: input_ids, attention_mask, labels
    (-100 on padding) and example_id."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(f["input_ids"]) for f in features)
        B = len(features)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if all("example_id" in f for f in features):
            batch["example_id"] = torch.tensor([f["example_id"] for f in features])
        return batch


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


# --------------------------------------------------------------------------- the model
def resolve_model_dir(spec: str) -> str:
    """A directory or hub id that `from_pretrained` loads for `spec`. Embedded and gguf: specs
    are dequantised once into the tdreward cache (safetensors) and that directory is returned."""
    from tdreward.backends import hf

    s = parse_spec(spec)
    if s.kind == "hf":
        return s.target
    if s.kind not in ("embedded", "gguf"):
        raise TDRewardError(f"{spec!r} cannot be fine-tuned: use a hub id, a directory, "
                            "gguf:PATH or embedded:NAME")
    return str(hf.cached_model_dir(hf.resolve_gguf(s)))  # dequantised once, then reused


def load_base_model(cfg: LoraTrainingConfig):
    """(model, tokenizer) in --dtype on --device (float32 on the CPU), or 8/4-bit through
    bitsandbytes (computing in that dtype), ready for LoRA."""
    from tdreward.backends.adapters import import_peft
    from tdreward.backends.hf import load_model, placement_kwargs, quiet_loading, set_pad

    place = cfg.hardware.resolve()
    if not place.bits:
        return load_model(cfg.base_model, hardware=place)
    import_peft(quiet_bitsandbytes=place.bits != 4)  # the 4-bit kernel notice only for 4-bit
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tdreward.data.corpus import env_offline, hub_reachable

    bits = place.bits
    where = resolve_model_dir(cfg.base_model)
    local = Path(where).is_dir() or env_offline() or not hub_reachable()
    try:
        with quiet_loading():
            tok = AutoTokenizer.from_pretrained(where, local_files_only=local)
            # The one quantisation config (tdreward.hardware.Placement.quantization_config).
            model = AutoModelForCausalLM.from_pretrained(where, local_files_only=local,
                                                         **placement_kwargs(place))
    except OSError as e:  # the files themselves: not cached offline, or not a model
        if local and not Path(where).is_dir():
            raise TDRewardError(
                f"model {where!r} is not in the local Hugging Face cache and the hub cannot be "
                "reached (offline); use an embedded model (embedded:smollm2-135m-instruct), "
                "gguf:PATH or a local directory") from e
        first = first_line(e)
        raise TDRewardError(f"cannot load {where!r}: {first}") from e
    except Exception as e:  # bitsandbytes / transformers raise many kinds on unsupported setups
        first = first_line(e)
        raise TDRewardError(f"{bits}-bit quantisation cannot run here ({first}); "
                            "train without --load_in_4bit/--load_in_8bit") from e
    set_pad(tok, model)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tok


def linear_module_names(model) -> list[str]:
    """Names (last component) of the model's linear layers, the output head excluded."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for full, mod in model.named_modules():
        if mod is head or full.split(".")[-1] in ("lm_head", "embed_out"):
            continue
        if isinstance(mod, torch.nn.Linear | Conv1D):  # bnb Linear4bit/8bitLt subclass Linear
            name = full.split(".")[-1]
            if name not in names:
                names.append(name)
    return names


def default_target_modules(model) -> list[str]:
    """LoRA targets per architecture: GPT-2 c_attn/c_proj/c_fc; Llama and Gemma the seven
    projections; any other model its linear layers (the output head excluded)."""
    arch = getattr(model.config, "model_type", "")
    present = set(linear_module_names(model))
    known = [n for n in ARCH_TARGETS.get(arch, []) if n in present]
    return known or linear_module_names(model)


def resolve_target_modules(model, requested: list[str] | None) -> list[str]:
    if not requested:
        targets = default_target_modules(model)
        if not targets:
            raise TDRewardError("the model has no linear layer to put LoRA on")
        return targets
    present = linear_module_names(model)
    missing = [n for n in requested if n not in present]
    if missing:
        raise TDRewardError(f"--target_modules {', '.join(missing)} not in the model; its linear "
                            f"layers: {', '.join(present)}")
    return list(requested)


# --------------------------------------------------------------------------- reward + trainer
def build_reward_model(cfg: LoraTrainingConfig, lm, tokenizer) -> TDRewardModel:
    """The TD reward model around the model being trained (the critic loaded once); untrained
    heads are warned about only when the reward weighs in (reward_scale > 0)."""
    return load_reward_model(cfg.base_model, cfg.reward, lm=lm, tokenizer=tokenizer,
                             warn_untrained=cfg.reward_scale > 0)


def training_args(cfg: LoraTrainingConfig, trainer_dir: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=trainer_dir, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler, max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps, save_strategy="no", seed=cfg.seed,
        # TensorBoard gets its own callback (tracking.lora_callbacks): the trainer's folder is
        # temporary. wandb goes through transformers.
        report_to="wandb" if cfg.report_to == "wandb" else "none",
        remove_unused_columns=False, label_names=["labels"],
        use_cpu=cfg.hardware.device == "cpu",
        dataloader_pin_memory=False,
        # A progress bar whatever transformers' log level (it hides the bar above WARNING).
        disable_tqdm=not cfg.progress,
    )
