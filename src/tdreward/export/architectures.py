"""How each supported transformers architecture maps to llama.cpp's: hyperparameter keys and
per-tensor layout changes, each the inverse of what transformers' GGUF loader
(`transformers/modeling_gguf_pytorch_utils.py`) undoes on load. Used by `export_gguf`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tdreward.errors import TDRewardError


# --------------------------------------------------------------------------- config helpers
def _rope_theta(cfg, layer_type: str | None = None, default: float = 10000.0) -> float:
    """rope theta from a transformers 5 `rope_parameters` (possibly per layer type) or 4.x."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", None) or default)


def _rope_scaling(cfg, layer_type: str | None = None) -> dict:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    return params if isinstance(params, dict) else {}


def _add_rope_scaling(writer, cfg, layer_type: str | None = None) -> None:
    import gguf

    params = _rope_scaling(cfg, layer_type)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return
    raise TDRewardError(
        f"rope scaling {kind!r} is not supported by this exporter (supported: none, linear)"
    )


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's rotary layout for Llama Q/K rows (its converter's `permute`): HF rotates
    the two halves of each head, llama.cpp interleaved pairs. transformers' GGUF loader
    applies the inverse (`_reverse_permute_weights`)."""
    n = n_head_kv if n_head_kv != n_head else n_head
    return (w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# --------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """How one transformers architecture maps to a llama.cpp architecture."""

    gguf_arch: str  # gguf.MODEL_ARCH member name
    hparams: Callable  # (writer, cfg) -> None
    transform: Callable  # (gguf_name, array, cfg) -> array


def _llama_hparams(w, cfg) -> None:
    head_dim = _head_dim(cfg)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    _add_rope_scaling(w, cfg)


def _llama_transform(name: str, x: np.ndarray, cfg) -> np.ndarray:
    n_head = cfg.num_attention_heads
    if ".attn_q." in name:
        return permute_qk(x, n_head, n_head)
    if ".attn_k." in name:
        return permute_qk(x, n_head, cfg.num_key_value_heads or n_head)
    return x


GEMMA3_SWA_PERIOD = 6  # llama.cpp's gemma3: every 6th layer is global, the rest sliding


def _gemma3_hparams(w, cfg) -> None:
    head_dim = _head_dim(cfg)
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, cap, None) is not None:
            raise TDRewardError(f"Gemma 3 with {cap} set is not supported by llama.cpp's gemma3")
    scalar = getattr(cfg, "query_pre_attn_scalar", head_dim)
    if scalar != head_dim:  # llama.cpp scales attention by 1/sqrt(head_dim) (27B aside)
        raise TDRewardError(
            f"Gemma 3 with query_pre_attn_scalar {scalar} != head_dim {head_dim} is not supported"
        )
    types = getattr(cfg, "layer_types", None)
    expected = ["full_attention" if (i + 1) % GEMMA3_SWA_PERIOD == 0 else "sliding_attention"
                for i in range(cfg.num_hidden_layers)]
    if types is not None and list(types) != expected:
        raise TDRewardError("Gemma 3 layer_types differ from llama.cpp's fixed pattern "
                            f"(every {GEMMA3_SWA_PERIOD}th layer global): not supported")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg, "full_attention", 1_000_000.0))
    w.add_rope_freq_base_swa(_rope_theta(cfg, "sliding_attention", 10_000.0))
    w.add_sliding_window(cfg.sliding_window)
    _add_rope_scaling(w, cfg, "full_attention")


def _gemma3_transform(name: str, x: np.ndarray, cfg) -> np.ndarray:
    # HF Gemma RMSNorm is x * (1 + w); llama.cpp's is x * w (transformers' loader subtracts 1
    # from every GGUF "*norm.weight", q/k norms included).
    return x + 1.0 if name.endswith("norm.weight") else x


def _gpt2_hparams(w, cfg) -> None:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(cfg, flag, False):
            raise TDRewardError(f"GPT-2 with {flag}=True is not supported by llama.cpp")
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)


def _gpt2_transform(name: str, x: np.ndarray, cfg) -> np.ndarray:
    # GPT-2's Conv1D stores [in, out]; GGUF (like nn.Linear) wants [out, in].
    conv1d = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")
    return x.T if name.endswith(conv1d) and x.ndim == 2 else x


ARCHS: dict[str, Arch] = {
    "llama": Arch("LLAMA", _llama_hparams, _llama_transform),
    "gemma3_text": Arch("GEMMA3", _gemma3_hparams, _gemma3_transform),
    "gpt2": Arch("GPT2", _gpt2_hparams, _gpt2_transform),
}
SUPPORTED = "Llama (model_type llama, e.g. SmolLM2), Gemma 3 (gemma3_text), GPT-2 (gpt2)"


def arch_for(cfg) -> Arch:
    """The Arch of a transformers config, or a one-line error listing the supported ones."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHS:
        raise TDRewardError(
            f"GGUF export does not support architecture {model_type!r}; supported: {SUPPORTED}"
        )
    return ARCHS[model_type]


__all__ = ["ARCHS", "Arch", "SUPPORTED", "arch_for", "permute_qk"]
