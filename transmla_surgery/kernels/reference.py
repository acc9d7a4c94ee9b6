"""PyTorch latent (absorbed) decode attention: the CPU fallback and the reference the Triton kernel is tested against.

After absorption, MLA decode is multi-query attention with one shared KV "head" per sequence: the key of cached
token ``s`` is ``[c_s ; k_rope,s]`` (width ``r + d_rope``) and its value is ``c_s`` (width ``r``).

Shapes (``B`` batch, ``T`` query tokens, ``H`` heads, ``S`` cached tokens incl. the new ones):
    q_lat ``[B, T, H, r]``, q_rope ``[B, T, H, d_rope]``, latent ``[B, S, r]``, k_rope ``[B, S, d_rope]``,
    mask ``[B or 1, T, S]`` (bool: True = attend; or additive float) or ``None`` → output ``[B, T, H, r]``.

With ``mask=None`` the last query token sees every cached token and query ``t`` sees ``S - T + t + 1`` of them
(causal, aligned at the end), exactly as the expanded path's eager attention does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(query_length: int, kv_length: int, device: torch.device) -> torch.Tensor:
    """Bool ``[1, T, S]``: query ``t`` (the last ``T`` of ``S`` positions) sees keys ``s <= S - T + t``."""
    return torch.ones(query_length, kv_length, dtype=torch.bool, device=device).tril(kv_length - query_length)[None]


def decode_attention_reference(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``T·H`` query rows over the shared latent cache; see the module docstring for shapes.

    Arithmetic follows the host's eager attention: scores and softmax in float32 (in float64 for float64
    inputs), probabilities cast back to the input dtype before the value product, masked scores set to the
    dtype's most negative finite value (so a fully masked row averages instead of producing NaN).
    """
    b, t, h, r = q_lat.shape
    s = latent.shape[1]
    acc = torch.float64 if q_lat.dtype == torch.float64 else torch.float32
    q_l = q_lat.reshape(b, t * h, r)
    q_r = q_rope.reshape(b, t * h, q_rope.shape[-1])
    # [B, T·H, S]: one batched product per part; the key is shared by all heads (MQA), so no per-head copy
    scores = torch.bmm(q_l, latent.transpose(1, 2)).to(acc) + torch.bmm(q_r, k_rope.transpose(1, 2)).to(acc)
    scores = (scores * scale).view(b, t, h, s)
    if mask is None and t > 1:
        mask = causal_mask(t, s, q_lat.device)
    if mask is not None:
        m = mask[..., :s].unsqueeze(2)  # [B|1, T, 1, S], broadcast over heads
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
        else:
            scores = scores + m.to(scores.dtype)
    probs = F.softmax(scores, dim=-1).to(latent.dtype).view(b, t * h, s)
    return torch.bmm(probs, latent).view(b, t, h, r)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x[d/2:], x[:d/2]]`` over the last dimension (Hugging Face's rotate-half RoPE layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE ``x·cos + rotate_half(x)·sin`` (the training path, with autograd, and the reference of
    `rope.apply_rope_triton`)."""
    return x * cos + rotate_half(x) * sin
