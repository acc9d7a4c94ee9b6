"""Absorbed decode: MLA attention computed directly on the latent cache (DeepSeek's "weight absorption").

Per head ``h``, ``kv_b_proj`` holds ``W_UK,h`` (``[d_nope, r]``) and ``W_UV,h`` (``[d_v, r]``). The expanded path
computes ``k_nope,h(s) = W_UK,h c_s`` and ``v_h(s) = W_UV,h c_s`` for every cached token ``s``; the absorbed path
moves both maps to the query side instead:

    score_h(s) = q_nope,hᵀ W_UK,h c_s + q_rope,hᵀ k_rope,s = [W_UK,hᵀ q_nope,h ; q_rope,h]ᵀ [c_s ; k_rope,s]
    out_h      = Σ_s p_h(s) W_UV,h c_s = W_UV,h (Σ_s p_h(s) c_s)

so attention is multi-query attention with one KV head of width ``r + d_rope`` whose value is its first ``r``
channels (`kernels.decode_attention`). It reads ``r + d_rope`` values per cached token instead of
``H·(d_nope + d_rope + d_v)``, and does no work proportional to ``cached tokens × H × r`` outside attention.
Both paths are the same function (tests check them against each other).

``W_UK``/``W_UV`` are views of ``kv_b_proj.weight`` taken at every call: nothing is precomputed, so there is
nothing to invalidate when training changes the weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .kernels import decode_attention

DEFAULT_ABSORB_MAX_QUERY = 16  # query tokens up to which a cached forward absorbs (decode, speculative steps)


def can_absorb(module: nn.Module, query_length: int, attention_mask: Any, kwargs: dict[str, Any]) -> bool:
    """Whether `MLAAttention.forward` should take the absorbed path (it is called only when a cache is given).

    Not for long queries (prefill: the expanded SDPA path is cheaper there), not when gradients flow through a
    training-mode block (the expanded path is the training path, with its dropout), not when attention weights
    are requested, and only for tensor masks ``[B|1, 1, T, S]`` (or none).
    """
    if query_length > getattr(module, "absorb_max_query", DEFAULT_ABSORB_MAX_QUERY):
        return False
    if module.training and (torch.is_grad_enabled() or module.attention_dropout > 0):
        return False
    if kwargs.get("output_attentions"):
        return False
    if attention_mask is None:
        return True
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[1] == 1


def _up_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_UK [H, d_nope, r]`` and ``W_UV [H, d_v, r]`` as views of ``kv_b_proj.weight``."""
    w = module.kv_b_proj.weight.view(module.num_heads, module.qk_nope_head_dim + module.v_head_dim, module.kv_lora_rank)
    return w[:, : module.qk_nope_head_dim], w[:, module.qk_nope_head_dim :]


def absorb_query(module: nn.Module, q_nope: torch.Tensor) -> torch.Tensor:
    """``q_nope [B, H, T, d_nope]`` → latent-space query ``[B, T, H, r]`` (``q_lat,h = W_UK,hᵀ q_nope,h``)."""
    b, h, t, dn = q_nope.shape
    w_uk, _ = _up_weights(module)
    q = q_nope.permute(1, 0, 2, 3).reshape(h, b * t, dn)  # one batched product per head
    return torch.bmm(q, w_uk).view(h, b, t, -1).permute(1, 2, 0, 3)


def expand_output(module: nn.Module, o_lat: torch.Tensor) -> torch.Tensor:
    """Latent-space output ``[B, T, H, r]`` → ``[B, T, H·d_v]`` (``out_h = W_UV,h o_lat,h``), ready for ``o_proj``."""
    b, t, h, r = o_lat.shape
    _, w_uv = _up_weights(module)
    o = o_lat.permute(2, 0, 1, 3).reshape(h, b * t, r)
    if torch.is_grad_enabled() and (o.requires_grad or w_uv.requires_grad):  # `out=` has no autograd
        return torch.bmm(o, w_uv.transpose(1, 2)).permute(1, 0, 2).reshape(b, t, h * module.v_head_dim)
    out = o.new_empty(b * t, h, module.v_head_dim)
    # the per-head products written straight into `[B·T, H, d_v]` (cuBLAS takes the output's row stride), so
    # `o_proj` reads them without a copy between layouts
    torch.bmm(o, w_uv.transpose(1, 2), out=out.transpose(0, 1))
    return out.view(b, t, h * module.v_head_dim)


def _cache_length(cache: Any, layer_idx: int) -> torch.Tensor | None:
    """The filled length of a static cache layer (a device tensor, so no host sync), else ``None``."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    length = getattr(layers[layer_idx], "cumulative_length", None)
    return length if isinstance(length, torch.Tensor) else None


def absorbed_attention(
    module: nn.Module,
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Any = None,
) -> torch.Tensor:
    """Attention output ``[B, T, H·d_v]`` (before ``o_proj``) from the cache, without expanding it.

    Args:
        q_nope: ``[B, H, T, d_nope]``; q_rope: ``[B, H, T, d_rope]`` (already rotated).
        latent: ``[B, 1, S, r]`` and k_rope ``[B, 1, S, d_rope]``: what the cache returned (all cached tokens,
            the new ones included; a static cache returns its whole buffer and the mask hides the unfilled part).
        attention_mask: ``None`` (causal), bool ``[B|1, 1, T, S']`` (True = attend) or additive float.
        cache: the cache object; a static layer's filled length bounds what the Triton kernel reads.
    """
    q_lat = absorb_query(module, q_nope)
    q_r = q_rope.transpose(1, 2)  # [B, T, H, d_rope]
    s = latent.shape[2]
    mask = None if attention_mask is None else attention_mask[:, 0, :, :s]
    # Positions at or past a static layer's filled length are masked by any mask transformers builds, so the
    # kernel may stop there. Without a mask every returned position is attended (as in the expanded path).
    kv_len = _cache_length(cache, module.layer_idx) if mask is not None else None
    o_lat = decode_attention(q_lat, q_r, latent[:, 0], k_rope[:, 0], module.scaling, mask, kv_len)
    return expand_output(module, o_lat.to(q_nope.dtype))
