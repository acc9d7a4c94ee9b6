"""Decode kernels. `decode_attention` (absorbed MLA attention) and `apply_rope` (the rope channels of query and
shared key) pick their Triton kernel on CUDA and the PyTorch formula elsewhere. On Hopper GPUs the attention's
first stage is the warp-specialised Gluon kernel of `mla_decode_ws` wherever its geometry applies
(`mla_decode.KernelConfig.ring_slots`).

Backend selection: ``set_decode_backend("auto" | "torch" | "triton")`` or the environment variable
``TRANSMLA_DECODE_BACKEND``; ``auto`` uses Triton for CUDA tensors in float16/bfloat16/float32 when no gradient
is needed, PyTorch otherwise; ``triton`` forces it (on the CPU: Triton's interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch

from .reference import apply_rope_torch, causal_mask, decode_attention_reference

_BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("TRANSMLA_DECODE_BACKEND", "auto")


def set_decode_backend(name: str) -> None:
    """Force the absorbed-decode backend: ``"auto"`` (default), ``"torch"`` or ``"triton"``."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"decode backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_decode_backend() -> str:
    return _backend


def triton_available() -> bool:
    try:
        from .mla_decode import triton_available as available
    except Exception:  # pragma: no cover - a broken triton install counts as absent
        return False
    return available()


def _wants_triton(*tensors: torch.Tensor) -> bool:
    if _backend == "torch":
        return False
    if _backend == "triton":
        return True
    t = tensors[0]
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16, torch.float32) and not needs_grad and triton_available()


def _triton_at_inference(*tensors: torch.Tensor) -> bool:
    """`_wants_triton`, and no gradient needed and no torch.compile tracing: the fused inference launches have
    neither autograd nor a compile path, also when the ``triton`` backend is forced."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    return not needs_grad and not torch.compiler.is_compiling() and _wants_triton(*tensors)


def apply_rope(
    q_rope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on ``q_rope [B, H, T, d]`` and ``k_rope [B, 1, T, d]`` with ``cos``/``sin`` ``[B|1, 1, T, d]``:
    ``x·cos + rotate_half(x)·sin`` for each. One Triton launch for both where the backend allows it (bitwise the
    same numbers as the PyTorch formula's ten kernels), the formula otherwise."""
    if _triton_at_inference(q_rope, k_rope, cos, sin):
        from .rope import apply_rope_triton, fused_rope_supported

        if fused_rope_supported(q_rope, k_rope, cos, sin):
            return apply_rope_triton(q_rope, k_rope, cos, sin)
    return apply_rope_torch(q_rope, cos, sin), apply_rope_torch(k_rope, cos, sin)


def rope_into_cache(
    q_rope: torch.Tensor,
    k_rope: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    latent: torch.Tensor,
    cache_latent: torch.Tensor,
    cache_rope: torch.Tensor,
    length: torch.Tensor,
    ticket: torch.Tensor,
) -> torch.Tensor | None:
    """`apply_rope` and a static cache layer's update in one Triton launch (`rope.rope_into_cache_triton`):
    returns the rotated query ``[B, H, T, d]`` after writing ``latent [B, 1, T, r]`` and the rotated ``k_rope``
    at ``length`` in ``cache_latent [B, 1, L, r]``/``cache_rope [B, 1, L, d]`` and advancing ``length`` by ``T``.
    Returns ``None``, having changed nothing, where the backend or the inputs do not allow it (the caller then
    rotates and updates separately): not on the CPU by default, not for gradients, not under torch.compile."""
    if not _triton_at_inference(q_rope, k_rope, cos, sin, latent):
        return None
    from .rope import rope_into_cache_supported, rope_into_cache_triton

    args = (q_rope, k_rope, cos, sin, latent, cache_latent, cache_rope, length, ticket)
    return rope_into_cache_triton(*args) if rope_into_cache_supported(*args) else None


def decode_attention(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention ``[B, T, H, r]`` (shapes in `reference`). ``kv_len`` (optional int tensor) bounds
    the tokens the Triton kernel reads; it must only exclude positions that ``mask`` already masks."""
    if _wants_triton(q_lat, q_rope, latent, k_rope):
        from .mla_decode import decode_attention_triton, mla_decode_op

        if mla_decode_op is not None and torch.compiler.is_compiling():
            return mla_decode_op(q_lat, q_rope, latent, k_rope, scale, mask, kv_len)
        return decode_attention_triton(q_lat, q_rope, latent, k_rope, scale, mask, kv_len)
    return decode_attention_reference(q_lat, q_rope, latent, k_rope, scale, mask)


__all__ = [
    "apply_rope",
    "rope_into_cache",
    "decode_attention",
    "decode_attention_reference",
    "causal_mask",
    "set_decode_backend",
    "get_decode_backend",
    "triton_available",
]
