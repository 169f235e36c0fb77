"""Where and in what precision a command runs its models (docs/hardware.md).

`HardwareSettings` (--device, --dtype, --load_in_4bit, --load_in_8bit, --device_map) is nested
in every config whose command loads a transformers LM; `LlamaCppSettings` (--n_gpu_layers) in
those that run llama.cpp. `HardwareSettings.resolve()` turns the flags into a `Placement`, what
`tdreward.backends.hf.load_model` takes.

A light module: torch is imported only to check a device other than auto/cpu, a quantisation
flag, or to resolve `auto`, never at import, so configs import it and `tdreward --help` stays
fast.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from tdreward.errors import TDRewardError
from tdreward.flags import setting
from tdreward.validation import check_choice, validate

HARDWARE = "device and precision"  # the help section of these flags
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto",)
_DEVICE = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class Placement:
    """Where and how one model loads, resolved: no `auto` left but `device_map`. Plain
    strings, so that this module needs no torch."""

    device: str = "cpu"  # cpu, cuda:N or mps; with a device_map, where the inputs go
    dtype: str = "float32"  # float32, bfloat16 or float16
    bits: int | None = None  # 4 or 8: bitsandbytes quantisation
    device_map: str | None = None  # "auto": accelerate places the layers

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def quantization_config(self) -> Any:
        """The one BitsAndBytesConfig (QLoRA's NF4 with double quantisation for 4 bits,
        LLM.int8 for 8), computing in `dtype`; `lora` and every scoring load use it."""
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise TDRewardError(f"--load_in_{self.bits}bit needs bitsandbytes: pip install "
                                "'tdreward[quant]'") from e
        return BitsAndBytesConfig(load_in_4bit=self.bits == 4, load_in_8bit=self.bits == 8,
                                  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=self.torch_dtype)

    def to_dict(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "bits": self.bits,
                "device_map": self.device_map}


# What every load did before these settings existed, and what a library call that names no
# settings still gets: reproducible float32 on the CPU whatever the machine has.
CPU_FLOAT32 = Placement()


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def check_device(device: str, flag: str = "--device") -> None:
    """`device` (cuda, cuda:N or mps) exists on this machine; one line saying why not."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
            raise TDRewardError(f"{flag} {device}: CUDA is not available on this machine "
                                f"(torch {torch.__version__}, {why}); use --device cpu or auto")
        n = torch.cuda.device_count()
        index = int(device.partition(":")[2] or 0)
        if index >= n:
            raise TDRewardError(f"{flag} {device}: this machine has {n} CUDA device(s), "
                                f"cuda:0 to cuda:{n - 1}")
    elif device == "mps" and not mps_available():
        raise TDRewardError(f"{flag} mps: Apple's MPS is not available on this machine; use "
                            "--device cpu or auto")


@dataclass
class HardwareSettings:
    """Where a command's transformers LM runs and in what precision. Nested in every config
    whose command loads one; the defaults pick the fastest device there is."""

    device: str = setting("auto", group=HARDWARE, help=(
        f"where the model runs: {DEVICE_HELP}; auto is CUDA, else MPS, else the CPU"))
    dtype: str = setting("auto", group=HARDWARE, choices=DTYPES, help=(
        "the model's weights and activations; auto is bfloat16 on CUDA (float16 on GPUs "
        "without bfloat16) and MPS, float32 on the CPU. log p, entropy and the TD quantities "
        "are accumulated in float32 whatever this is"))
    load_in_4bit: bool = setting(False, group=HARDWARE, aliases=["--use_4bit"], help=(
        "4-bit NF4 weights with double quantisation, through bitsandbytes (needs CUDA)"))
    load_in_8bit: bool = setting(False, group=HARDWARE, aliases=["--use_8bit"], help=(
        "8-bit weights (LLM.int8), through bitsandbytes (needs CUDA)"))
    device_map: str | None = setting(None, group=HARDWARE, choices=DEVICE_MAPS, help=(
        "auto: accelerate spreads a model too large for one device over the GPUs, then the "
        "CPU"), default_help="the whole model on --device")

    # Scoring commands refuse bitsandbytes without CUDA: its CPU kernels are not what these
    # flags are for, and no scoring test runs them. `lora` allows them (its QLoRA test trains
    # on the CPU), through TrainingHardwareSettings.
    quantise_on_cpu: ClassVar[bool] = False

    def __post_init__(self) -> None:
        m = _DEVICE.fullmatch(str(self.device))
        if not m or (m.group(2) is not None and m.group(1) != "cuda"):
            raise TDRewardError(f"--device must be {DEVICE_HELP}, got {self.device!r}")
        check_choice("--dtype", self.dtype, DTYPES)
        check_choice("--device_map", self.device_map, (None, *DEVICE_MAPS))
        if self.load_in_4bit and self.load_in_8bit:
            raise TDRewardError("choose one of --load_in_4bit (--use_4bit) and --load_in_8bit "
                                "(--use_8bit)")
        if self.bits and self.dtype == "float32":
            raise TDRewardError(f"{self.quant_flag} with --dtype float32: quantised weights "
                                "compute in bfloat16 or float16; drop --dtype (auto) or give "
                                "one of those")
        if self.device_map and self.device != "auto":
            raise TDRewardError(f"--device_map {self.device_map} places the model itself: "
                                f"drop --device {self.device}")
        if self.device not in ("auto", "cpu"):
            check_device(self.device)
        if self.bits:
            self._check_quantisation()

    @property
    def bits(self) -> int | None:
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    @property
    def quant_flag(self) -> str:
        return f"--load_in_{self.bits}bit"

    def _check_quantisation(self) -> None:
        if not self.quantise_on_cpu:
            if self.device in ("cpu", "mps"):
                raise TDRewardError(f"{self.quant_flag} needs CUDA (bitsandbytes), not "
                                    f"--device {self.device}")
            import torch

            if not torch.cuda.is_available():
                raise TDRewardError(f"{self.quant_flag} needs a CUDA GPU (bitsandbytes) and this "
                                    "machine has none; drop it (--dtype bfloat16 halves the "
                                    "memory instead)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TDRewardError(f"{self.quant_flag} needs bitsandbytes: pip install "
                                "'tdreward[quant]'")

    def resolve(self) -> Placement:
        """The placement these settings name on this machine (`auto` decided here)."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
        if device == "cuda":
            # Under a launcher (accelerate launch, torchrun) each process takes its own GPU.
            local = os.environ.get("LOCAL_RANK", "")
            index = (int(local) % torch.cuda.device_count() if local.isdigit()
                     else torch.cuda.current_device())
            device = f"cuda:{index}"
        dtype = self.dtype
        if dtype == "auto":
            if device.startswith("cuda"):
                dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            else:
                dtype = "bfloat16" if device == "mps" else "float32"
        return Placement(device, dtype, self.bits, self.device_map)


def _rehelp(name: str, help: str) -> Any:  # noqa: A002 (argparse's word)
    """Field `name` of HardwareSettings again, with another help text."""
    f = HardwareSettings.__dataclass_fields__[name]
    return dataclasses.field(default=f.default, metadata={**f.metadata, "help": help})


@dataclass
class TrainingHardwareSettings(HardwareSettings):
    """`lora`'s: bitsandbytes may also run on the CPU (QLoRA there is slow but tested)."""

    load_in_4bit: bool = _rehelp("load_in_4bit", "4-bit NF4 base with double quantisation, "
                                 "through bitsandbytes: QLoRA (CUDA, or slowly the CPU)")
    load_in_8bit: bool = _rehelp("load_in_8bit", "8-bit base (LLM.int8), through bitsandbytes")
    quantise_on_cpu: ClassVar[bool] = True


def as_placement(hardware: HardwareSettings | Placement | None) -> Placement:
    """A Placement from settings (resolved now), a Placement, or None (CPU_FLOAT32)."""
    if hardware is None:
        return CPU_FLOAT32
    return hardware.resolve() if isinstance(hardware, HardwareSettings) else hardware


@dataclass
class LlamaCppSettings:
    """llama.cpp's GPU offload (generation on the llamacpp backend, `serve`)."""

    n_gpu_layers: int | None = setting(None, group=HARDWARE, help=(
        "layers llama.cpp puts on the GPU: -1 all, 0 none"), default_help=(
        "all when llama-cpp-python was built with GPU offload and --device is not cpu, else 0"))

    def __post_init__(self) -> None:
        validate(self, {"n_gpu_layers": ">=-1"})

    def gpu_layers(self, device: str = "auto") -> int | None:
        """The layers to offload: the flag, 0 with --device cpu, else None (llama.cpp's
        build decides: tdreward.backends.llamacpp.resolve_gpu_layers)."""
        if self.n_gpu_layers is not None:
            return self.n_gpu_layers
        return 0 if device == "cpu" else None


__all__ = ["CPU_FLOAT32", "DTYPES", "HardwareSettings", "LlamaCppSettings", "Placement",
           "TrainingHardwareSettings", "as_placement", "check_device", "mps_available"]
