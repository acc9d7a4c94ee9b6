"""What differs between the supported source families, and what the conversion refuses.

A supported model is a Hugging Face causal LM whose decoder layers hold a plain GQA/MHA/MQA attention block
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, optional biases, rotate-half RoPE over the full head) behind an
``input_layernorm``: Llama, Mistral and Qwen2. Anything else (per-head q/k norms, partial rotary, attention
soft-capping, fused qkv) is refused with the reason, before the model is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class SourceAttention:
    """Geometry of one source attention block.

    ``W_Q: [H·d, D]``, ``W_K, W_V: [G·d, D]``, ``W_O: [D, H·d]``; the block's input is ``x = norm(h)`` with
    ``norm`` the layer's ``input_layernorm``.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_bias: bool
    k_bias: bool
    v_bias: bool
    o_bias: bool

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layers at .model.layers; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} causal LMs from transformers"
        )
    return layers


def rotary_embedding(model: nn.Module) -> nn.Module:
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no model.rotary_emb (RoPE); cannot convert")
    return rotary


def check_supported(model: nn.Module) -> SourceAttention:
    """Return the (shared) source geometry of every layer, or raise `UnsupportedModelError` saying why not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    partial = getattr(config, "partial_rotary_factor", None)
    rope_params = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope_params, dict):
        partial = rope_params.get("partial_rotary_factor", partial)
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(
            f"partial_rotary_factor={partial}: only RoPE over the whole head is supported (1.0)"
        )
    rotary_embedding(model)
    layers = decoder_layers(model)
    geometry: SourceAttention | None = None
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise UnsupportedModelError(f"layer {i} has no self_attn")
        for name in ("q_norm", "k_norm"):
            if isinstance(getattr(attn, name, None), nn.Module):
                raise UnsupportedModelError(
                    f"layer {i} attention has a per-head {name}: a norm between the projection and RoPE cannot be "
                    "folded into a latent projection (supported: plain q/k/v/o projections)"
                )
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not isinstance(getattr(attn, n, None), nn.Linear)]
        if missing:
            from .mla_attention import MLAAttention

            if isinstance(attn, MLAAttention):
                raise UnsupportedModelError(f"layer {i} is already converted to MLA; convert a fresh model")
            raise UnsupportedModelError(
                f"layer {i} attention ({type(attn).__name__}) lacks nn.Linear {missing}; supported: separate "
                "q_proj/k_proj/v_proj/o_proj"
            )
        if not isinstance(getattr(layer, "input_layernorm", None), nn.Module):
            raise UnsupportedModelError(f"layer {i} has no input_layernorm before attention")
        if getattr(config, "attn_logit_softcapping", None):
            raise UnsupportedModelError("attention logit soft-capping cannot be represented in MLA")
        head_dim = int(getattr(attn, "head_dim", 0) or attn.q_proj.out_features // config.num_attention_heads)
        h = attn.q_proj.out_features // head_dim
        g = attn.k_proj.out_features // head_dim
        if h * head_dim != attn.q_proj.out_features or g * head_dim != attn.k_proj.out_features or h % g:
            raise UnsupportedModelError(
                f"layer {i}: q/k projection widths {attn.q_proj.out_features}/{attn.k_proj.out_features} are not "
                f"whole heads of head_dim {head_dim} with H divisible by G"
            )
        if head_dim % 2:
            raise UnsupportedModelError(f"layer {i}: odd head_dim {head_dim} cannot carry RoPE pairs")
        scaling = getattr(attn, "scaling", head_dim**-0.5)
        if abs(scaling - head_dim**-0.5) > 1e-12 * head_dim**-0.5:
            raise UnsupportedModelError(
                f"layer {i}: softmax scale {scaling} differs from 1/sqrt(head_dim); not supported"
            )
        this = SourceAttention(
            hidden_size=attn.q_proj.in_features,
            num_heads=h,
            num_kv_heads=g,
            head_dim=head_dim,
            q_bias=attn.q_proj.bias is not None,
            k_bias=attn.k_proj.bias is not None,
            v_bias=attn.v_proj.bias is not None,
            o_bias=attn.o_proj.bias is not None,
        )
        if geometry is not None and this != geometry:
            raise UnsupportedModelError(f"layer {i} geometry {this} differs from layer 0 {geometry}")
        geometry = this
    assert geometry is not None
    return geometry


@dataclass(frozen=True)
class SourceWeights:
    """One source attention block's weights as float64 tensors (biases ``None`` when absent)."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    b_q: torch.Tensor | None
    b_k: torch.Tensor | None
    b_v: torch.Tensor | None
    b_o: torch.Tensor | None


def source_weights(attn: nn.Module, device: torch.device | str = "cpu") -> SourceWeights:
    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(device=device, dtype=torch.float64)

    return SourceWeights(
        w_q=f64(attn.q_proj.weight),
        w_k=f64(attn.k_proj.weight),
        w_v=f64(attn.v_proj.weight),
        w_o=f64(attn.o_proj.weight),
        b_q=f64(attn.q_proj.bias),
        b_k=f64(attn.k_proj.bias),
        b_v=f64(attn.v_proj.bias),
        b_o=f64(attn.o_proj.bias),
    )


def input_norm_bound(layer: nn.Module, hidden_size: int) -> float:
    """An upper bound on ``‖x‖²`` for any attention input ``x = input_layernorm(h)``.

    RMSNorm output is ``w ⊙ h / rms(h)`` and ``‖h / rms(h)‖² = D``, so ``‖x‖² ≤ D · max(w²)`` for every token.
    """
    w = getattr(layer.input_layernorm, "weight", None)
    wmax = 1.0 if w is None else float(w.detach().abs().max())
    return hidden_size * wmax * wmax


def host_rope_info(model: nn.Module) -> dict[str, Any]:
    """The source's RoPE as the export needs it: theta, rope type, scaling parameters."""
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return {"rope_theta": theta, "rope_type": params.get("rope_type", "default"), "rope_parameters": params}
