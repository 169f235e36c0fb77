"""Device, dtype and quantisation settings (tdreward.hardware, docs/hardware.md).

What runs here is what a CPU machine can check: bfloat16 on the CPU against float32 on the real
embedded SmolLM2 (library and CLI), the float32 accumulation of every reward quantity, one-line
errors for every bad setting, the flags of every command that loads an LM, and llama.cpp's
n_gpu_layers reaching llama.cpp. CUDA, bitsandbytes, device_map and GPU offload itself need a
GPU and are not run (docs/hardware.md says so).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import EMBEDDED, WIKITEXT, assert_one_line_error, run_cli
from tdreward import cli
from tdreward.errors import TDRewardError
from tdreward.hardware import (
    CPU_FLOAT32,
    HardwareSettings,
    LlamaCppSettings,
    Placement,
    TrainingHardwareSettings,
)

# A few hundred tokens of the shipped corpus (384 SmolLM2 tokens): each pass takes seconds;
# a shorter one (156 tokens) read in windows of 64 (bfloat16 matmuls are slow on most CPUs).
TEXT = WIKITEXT.read_text(encoding="utf-8")[:1500]
SHORT, WINDOW = TEXT[:600], 64
BF16 = HardwareSettings(device="cpu", dtype="bfloat16")
# Bounds of bfloat16 against float32, per token. bfloat16 keeps 8 significant bits, so each
# activation is off by up to 2^-9 relative; through 30 layers log p moves by a few hundredths of
# a nat (measured 0.032 mean on this text). The brief's bound for log p is 0.05 nat. delta
# holds two such terms (r and rbar, and the next state's rbar) and their errors do not cancel:
# measured 0.051, bound 0.1 (twice log p's). Means over the text cancel most of the per-token
# error: measured |mean log p| 0.0015, bound 0.01.
LOGP_MEAN_ABS, DELTA_MEAN_ABS, MEAN_SHIFT = 0.05, 0.1, 0.01


def _diffs(a: list[float], b: list[float]) -> tuple[float, float]:
    assert len(a) == len(b) and a
    d = [abs(x - y) for x, y in zip(a, b)]
    return sum(d) / len(d), max(d)


def _assert_agrees(s32, s16) -> dict:
    """bfloat16 scores `s16` within the bounds of float32 `s32`; returns the measured gaps."""
    assert s16.token_ids == s32.token_ids
    logp = _diffs(s32.logp, s16.logp)
    delta = _diffs(s32.delta, s16.delta)
    assert logp[0] <= LOGP_MEAN_ABS, logp
    assert delta[0] <= DELTA_MEAN_ABS, delta
    shift = abs(sum(s32.logp) - sum(s16.logp)) / len(s32.logp)
    assert shift <= MEAN_SHIFT, shift
    # The dtype really changed: a run that silently stayed in float32 fails here.
    assert logp[1] > 0 and delta[1] > 0
    for name in ("logp", "c", "H", "r", "rbar", "V", "delta"):
        assert all(math.isfinite(x) for x in getattr(s16, name)), name
    return {"logp": logp, "delta": delta, "mean_logp_shift": shift}


@pytest.fixture(scope="module")
def fp32_scores(smollm2):
    from tdreward.reward_model import TDRewardModel

    rm = TDRewardModel.from_lm(*smollm2, EMBEDDED)
    return rm.score([TEXT])[0], rm.score([SHORT], max_length=WINDOW)[0]


# --------------------------------------------------------------------------- (a) library
@pytest.mark.integration
def test_bfloat16_on_cpu_agrees_with_float32_and_accumulates_in_float32(fp32_scores):
    from tdreward.reward_model import TDRewardModel

    rm = TDRewardModel.from_base(EMBEDDED, hardware=BF16)
    assert rm.lm.dtype == torch.bfloat16 and rm.placement == Placement("cpu", "bfloat16")
    assert all(p.dtype == torch.float32 for p in rm.critic.parameters())
    whole, windowed = rm.score([TEXT])[0], rm.score([SHORT], max_length=WINDOW)[0]
    gaps = _assert_agrees(fp32_scores[0], whole)
    _assert_agrees(fp32_scores[1], windowed)  # sliding windows: the other code path
    print("bf16 vs fp32:", json.dumps(gaps))
    # Every tensor a user gets back is float32 (and its features' hidden states too).
    ids, mask = rm.pad(rm.encode([SHORT[:300], SHORT[:200]]))
    out = rm.score_batch(ids, mask)
    tensors = {k: v for k, v in out.items()
               if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert {"logp", "H", "c", "r", "rbar", "values", "delta", "centre"} <= set(tensors)
    for k, v in tensors.items():
        assert v.dtype == torch.float32, k
        assert torch.isfinite(v).all(), k
    assert out["feats"].hidden.dtype == torch.float32
    assert out["feats"].expected_c.dtype == torch.float32


# --------------------------------------------------------------------------- (b) the CLI
@pytest.mark.integration
def test_cli_score_bfloat16_runs_and_agrees_with_float32(fp32_scores, tmp_path):
    out = tmp_path / "out.json"
    p = run_cli("score", "--device", "cpu", "--dtype", "bfloat16", "--json", str(out), TEXT)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())["texts"][0]
    s32 = fp32_scores[0]
    assert doc["summary"]["n_tokens"] == len(s32.logp)
    logp = [t["logp"] for t in doc["tokens"]]
    delta = [t["delta"] for t in doc["tokens"]]
    assert _diffs(s32.logp, logp)[0] <= LOGP_MEAN_ABS
    assert _diffs(s32.delta, delta)[0] <= DELTA_MEAN_ABS
    assert _diffs(s32.logp, logp)[1] > 0  # not float32 after all
    assert abs(doc["summary"]["td_reward"] - s32.summary["td_reward"]) <= MEAN_SHIFT


# --------------------------------------------------------------------------- (c) bad input
@pytest.fixture()
def no_model_loads(monkeypatch):
    """A bad setting must fail before any model loads."""
    import tdreward.backends.hf as hf

    def boom(*args, **kwargs):
        raise AssertionError(f"a model was loaded for a bad input: {args}")

    monkeypatch.setattr(hf, "load_model", boom)


WIKI = str(WIKITEXT)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
BAD = [
    (["score", "--device", "foo", "hi"], ["--device", "cuda:N", "'foo'"]),
    (["score", "--device", "cuda:x", "hi"], ["--device"]),
    (["score", "--device", "cpu:1", "hi"], ["--device"]),
    (["score", "--dtype", "int8", "hi"], ["--dtype", "int8"]),
    (["score", "--load_in_4bit", "--load_in_8bit", "hi"], ["--load_in_4bit", "--load_in_8bit"]),
    (["score", "--use_4bit", "--use_8bit", "hi"], ["--load_in_4bit", "--use_8bit"]),
    (["score", "--load_in_4bit", "--dtype", "float32", "hi"], ["--load_in_4bit", "float32"]),
    (["score", "--device_map", "auto", "--device", "cpu", "hi"], ["--device_map", "--device"]),
    (["score", "--device_map", "sequential", "hi"], ["--device_map"]),
    (["train-critic", "--dataset", WIKI, "--device", "foo", "--output_dir", "{TMP}/o"],
     ["--device"]),
    (["compare", "--dtype", "int8", "--output_dir", "{TMP}/o"], ["--dtype"]),
    (["compare", "--n_gpu_layers", "-2", "--output_dir", "{TMP}/o"], ["--n_gpu_layers"]),
    (["experiment", "--load_in_8bit", "--dtype", "float32", "--output_dir", "{TMP}/o"],
     ["--load_in_8bit"]),
    (["evaluate", "--fine_tuned_model", EMBEDDED, "--dataset", WIKI, "--device", "gpu",
      "--output_dir", "{TMP}/o"], ["--device"]),
    (["train", "--prompts", WIKI, "--load_in_4bit", "--output_dir", "{TMP}/o"],
     ["--load_in_4bit"]),
    (["lora", "--dataset", WIKI, "--load_in_4bit", "--load_in_8bit", "--output_dir", "{TMP}/o"],
     ["--use_8bit"]),
    (["serve", "--n_gpu_layers", "-5"], ["--n_gpu_layers"]),
    pytest.param(["score", "--device", "cuda", "hi"], ["--device cuda", "CUDA is not available"],
                 marks=NO_CUDA),
    pytest.param(["score", "--device", "cuda:1", "hi"], ["--device cuda:1"], marks=NO_CUDA),
    pytest.param(["score", "--load_in_4bit", "hi"], ["--load_in_4bit", "CUDA"], marks=NO_CUDA),
    pytest.param(["score", "--load_in_8bit", "hi"], ["--load_in_8bit", "CUDA"], marks=NO_CUDA),
    pytest.param(["score", "--load_in_4bit", "--device", "cpu", "hi"], ["CUDA"], marks=NO_CUDA),
    pytest.param(["compare", "--device", "cuda", "--output_dir", "{TMP}/o"], ["CUDA"],
                 marks=NO_CUDA),
]


@pytest.mark.parametrize(("argv", "words"), BAD)
def test_bad_hardware_setting_is_one_line(argv, words, no_model_loads, capfd, tmp_path,
                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(TMP=tmp_path) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse exits
        code = e.code
    lines = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("tdreward: error:"), lines
    for w in words:
        assert w in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_bad_device_is_one_line_in_a_shell():
    assert_one_line_error(run_cli("score", "--device", "foo", "hi", timeout=120), "--device")
    assert_one_line_error(run_cli("score", "--dtype", "int8", "hi", timeout=120), "--dtype")


# --------------------------------------------------------------------------- settings
def test_auto_resolves_to_this_machine():
    """auto: CUDA, else MPS, else the CPU; bfloat16 there, float32 on the CPU."""
    place = HardwareSettings().resolve()
    if torch.cuda.is_available():
        assert place.device.startswith("cuda:") and place.dtype in ("bfloat16", "float16")
    elif place.device == "mps":
        assert place.dtype == "bfloat16"
    else:
        assert place == CPU_FLOAT32
    assert HardwareSettings(device="cpu").resolve() == CPU_FLOAT32
    assert BF16.resolve() == Placement("cpu", "bfloat16")
    assert HardwareSettings(device="cpu", dtype="float16").resolve().torch_dtype == torch.float16


def test_training_settings_keep_cpu_qlora():
    """lora's QLoRA runs on the CPU (tests/test_lora.py trains one): its settings allow what
    the scoring commands refuse, and resolve to float32 compute there."""
    hw = TrainingHardwareSettings(load_in_4bit=True, device="cpu")
    assert hw.resolve() == Placement("cpu", "float32", 4)
    with pytest.raises(TDRewardError, match="--use_8bit"):
        TrainingHardwareSettings(load_in_4bit=True, load_in_8bit=True)
    if not torch.cuda.is_available():
        with pytest.raises(TDRewardError, match="CUDA"):
            HardwareSettings(load_in_4bit=True, device="cpu")


def test_one_quantisation_config_builder():
    """Placement.quantization_config is the one BitsAndBytesConfig (lora's and scoring's)."""
    pytest.importorskip("bitsandbytes")
    q = Placement("cuda:0", "bfloat16", 4).quantization_config()
    assert q.load_in_4bit and not q.load_in_8bit and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_use_double_quant and q.bnb_4bit_compute_dtype == torch.bfloat16
    q8 = Placement("cuda:0", "float16", 8).quantization_config()
    assert q8.load_in_8bit and not q8.load_in_4bit


def test_load_arguments_follow_the_placement():
    """What from_pretrained gets: the CPU in float32 as before; a GPU loads straight onto
    it; quantisation and device_map pass through."""
    from tdreward.backends.hf import placement_kwargs

    assert placement_kwargs(CPU_FLOAT32) == {"dtype": torch.float32}
    assert placement_kwargs(Placement("cpu", "bfloat16")) == {"dtype": torch.bfloat16}
    assert placement_kwargs(Placement("cuda:1", "bfloat16"))["device_map"] == {"": "cuda:1"}
    assert placement_kwargs(Placement("cuda:0", "float16", None, "auto"))["device_map"] == "auto"
    if pytest.importorskip("bitsandbytes"):
        kw = placement_kwargs(Placement("cuda:0", "bfloat16", 8))
        assert kw["quantization_config"].load_in_8bit and kw["device_map"] == {"": "cuda:0"}


# --------------------------------------------------------------------------- (d) the flags
LM_COMMANDS = ["score", "train-critic", "compare", "experiment", "test-instruct", "evaluate",
               "train", "lora", "quickstart"]
LLAMACPP_COMMANDS = ["compare", "experiment", "test-instruct", "evaluate", "serve"]
HARDWARE_FLAGS = ["--device", "--dtype", "--load_in_4bit", "--load_in_8bit", "--device_map"]


def test_every_command_that_loads_an_lm_has_the_flags_once():
    from tdreward.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, flags in [(c, HARDWARE_FLAGS) for c in LM_COMMANDS] + [
            (c, ["--n_gpu_layers"]) for c in LLAMACPP_COMMANDS]:
        p = sub.choices[name]
        for flag in flags:
            owners = [a for a in p._actions if flag in a.option_strings]
            assert len(owners) == 1, (name, flag)
    lora = sub.choices["lora"]
    assert {"--use_4bit", "--use_8bit"} <= {s for a in lora._actions for s in a.option_strings}


def test_flags_and_config_files_reach_the_settings(tmp_path):
    from tdreward.cli import _apply_config, build_parser
    from tdreward.evaluation.compare import _backend_options
    from tdreward.evaluation.compare_config import CompareConfig
    from tdreward.evaluation.score_config import ScoreConfig
    from tdreward.flags import from_args

    args = build_parser().parse_args(["score", "--device", "cpu", "--dtype", "bfloat16", "hi"])
    assert from_args(ScoreConfig, args).hardware == BF16
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("dtype: bfloat16\ndevice: cpu\nn_gpu_layers: 7\n", encoding="utf-8")
    argv = ["compare", "--config", str(cfg_file), "--output_dir", str(tmp_path / "o")]
    parser = build_parser()
    _apply_config(parser, argv)
    cfg = from_args(CompareConfig, parser.parse_args(argv))
    assert cfg.hardware == BF16 and cfg.llamacpp.n_gpu_layers == 7
    options = _backend_options(cfg)
    assert options.hardware == BF16 and options.n_gpu_layers == 7
    # --device cpu keeps llama.cpp off the GPU too, unless --n_gpu_layers says otherwise.
    assert _backend_options(CompareConfig(output_dir=str(tmp_path / "o"), hardware=BF16)
                            ).n_gpu_layers == 0


def test_generation_cache_keys_tell_placements_apart():
    """A bfloat16 generation is another sample than a float32 one; CPU float32 keeps the key
    earlier versions wrote."""
    from tdreward.evaluation.gen_cache import placement_key

    none = LlamaCppSettings()
    assert placement_key("transformers", HardwareSettings(device="cpu"), none) == {}
    assert placement_key("transformers", BF16, none) == {
        "placement": {"device": "cpu", "dtype": "bfloat16", "bits": None, "device_map": None}}
    assert placement_key("llamacpp", BF16, LlamaCppSettings(0)) == {}
    assert placement_key("llamacpp", BF16, LlamaCppSettings(12)) == {"n_gpu_layers": 12}
    assert placement_key("ollama", BF16, LlamaCppSettings(12)) == {}


def test_ppo_policy_dtype(tmp_path):
    """train: a policy trained whole stays float32 under auto; LoRA takes the device's dtype;
    an explicit --dtype wins. It loads on the CPU and accelerate moves it."""
    from tdreward.training.ppo_config import PPOConfig
    from tdreward.training.ppo_trainer import policy_placement

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n", encoding="utf-8")
    base = {"prompts": str(prompts), "output_dir": str(tmp_path / "o")}
    assert policy_placement(PPOConfig(**base)) == CPU_FLOAT32
    assert policy_placement(PPOConfig(**base, hardware=BF16)).dtype == "bfloat16"
    auto = HardwareSettings().resolve().dtype
    assert policy_placement(PPOConfig(**base, use_lora=True)) == Placement("cpu", auto)
    cfg = PPOConfig(**base, hardware=BF16)
    assert PPOConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


# --------------------------------------------------------------------------- generators
@pytest.mark.integration
def test_transformers_generator_loads_in_the_given_dtype():
    from tdreward.backends.registry import BackendOptions, make_generator

    gen = make_generator(EMBEDDED, "transformers", BackendOptions(hardware=BF16))
    try:
        assert gen.model.dtype == torch.bfloat16
        (g,) = gen.generate(["The capital of France is"], max_new_tokens=4, temperature=0.0)
        assert 1 <= g.n_tokens <= 4 and all(math.isfinite(x) and x <= 0 for x in g.logprobs)
    finally:
        gen.close()


@pytest.mark.integration
def test_n_gpu_layers_reaches_llama_cpp():
    pytest.importorskip("llama_cpp")
    import llama_cpp

    from tdreward.backends.llamacpp import LlamaCppModel, resolve_gpu_layers

    offload = llama_cpp.llama_supports_gpu_offload()
    assert resolve_gpu_layers(None) == (-1 if offload else 0)
    assert resolve_gpu_layers(5) == 5 and LlamaCppSettings().gpu_layers("cpu") == 0
    for n in (0, -1):  # a CPU-only build takes -1 and runs on the CPU
        with LlamaCppModel(f"llamacpp:{EMBEDDED}", n_ctx=64, n_gpu_layers=n) as m:
            # llama-cpp-python hands llama.cpp "all" as INT32_MAX.
            assert m.n_gpu_layers == n
            assert m.llm.model_params.n_gpu_layers == (n if n >= 0 else 2**31 - 1)
            assert len(m.token_logprobs(m.tokenize("Hello there"))) >= 1
    with pytest.raises(TDRewardError, match="n_gpu_layers"):
        LlamaCppModel(f"llamacpp:{EMBEDDED}", n_ctx=64, n_gpu_layers=-3)


def test_serve_passes_n_gpu_layers(tmp_path):
    """`serve --n_gpu_layers N` is the server's n_gpu_layers (tests/test_serve.py runs a server
    with it); unset, what this llama.cpp build can offload."""
    pytest.importorskip("llama_cpp.server")
    import llama_cpp

    from tdreward.cli import build_parser
    from tdreward.commands.serve import ServeConfig, model_settings
    from tdreward.flags import from_args

    gguf = tmp_path / "m.gguf"
    for argv, want in ((["--n_gpu_layers", "-1"], -1), (["--n_gpu_layers", "3"], 3),
                       ([], -1 if llama_cpp.llama_supports_gpu_offload() else 0)):
        cfg = from_args(ServeConfig, build_parser().parse_args(["serve", *argv]))
        assert model_settings(cfg, gguf, "m").n_gpu_layers == want
