"""RoPE on the query's and the shared key's rope channels in one Triton launch (inference).

`MLAAttention` rotates ``q_rope`` ``[B, H, T, d]`` and ``k_rope`` ``[B, 1, T, d]`` (``d = qk_rope_head_dim``,
Hugging Face "rotate-half" layout) with the host model's ``cos, sin`` ``[B, 1, T, d]``:

    x·cos + rotate_half(x)·sin,   rotate_half(x) = [-x[d/2:], x[:d/2]]

Spelled out in PyTorch that is five kernels per tensor (two products, a negation, a concatenation, a sum), ten
per layer per decode step, each a few microseconds of launch-bound work on a few hundred kilobytes: at batch 191
they were 0.8 ms of a 27.7 ms Llama-3-8B-shaped step on an H200 (bench/results/decode.md). Here one program per
``(batch, token)`` reads that token's ``H`` query rows, its key row and its ``cos``/``sin`` through their
strides (the inputs are views into the projections' outputs and the host's rotary tables) and writes both
rotated tensors contiguously.

The result is bitwise the PyTorch formula's: each product is rounded to the input dtype before the sum, as
PyTorch's separate kernels round it, and fused multiply-adds are disabled. So prefill, decode and the
training path (PyTorch, for autograd) see the same numbers.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .mla_decode import _interpreting, _patch_interpreter_for_numpy2, tl, triton


def _rope_fn(
    Q, K, COS, SIN, QO, KO,
    sq_b, sq_h, sq_t, sk_b, sk_t, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
    T, H,
    LAT, CL, LEN, TICKET, sl_b, sl_t, scl_b, scl_s, sko_b, sko_s, L, R,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, CACHE: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``CACHE``: ``KO`` is a static cache's rope-key buffer and ``CL`` its latent buffer (strides ``sko_*``,
    ``scl_*``, ``L`` positions); token ``t`` of the batch's rows goes to position ``LEN + t`` of both (``LAT``:
    the new latent, strides ``sl_*``, width ``R``), and the last program to finish adds ``T`` to ``LEN``."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    i = tl.arange(0, HALF)
    c_lo = tl.load(COS + b * sc_b + t * sc_t + i * sc_d).to(tl.float32)
    c_hi = tl.load(COS + b * sc_b + t * sc_t + (i + HALF) * sc_d).to(tl.float32)
    s_lo = tl.load(SIN + b * ss_b + t * ss_t + i * ss_d).to(tl.float32)
    s_hi = tl.load(SIN + b * ss_b + t * ss_t + (i + HALF) * ss_d).to(tl.float32)
    dt = QO.dtype.element_ty

    # the query's H rows: out_lo = x_lo·c_lo + (-x_hi)·s_lo, out_hi = x_hi·c_hi + x_lo·s_hi, every product and
    # the sum rounded to the storage dtype as PyTorch's separate kernels round them
    h = tl.arange(0, BLOCK_H)
    h_ok = h < H
    q_row = Q + b * sq_b + t * sq_t + h[:, None] * sq_h
    x_lo = tl.load(q_row + i[None, :], mask=h_ok[:, None], other=0.0).to(tl.float32)
    x_hi = tl.load(q_row + (i[None, :] + HALF), mask=h_ok[:, None], other=0.0).to(tl.float32)
    lo = (x_lo * c_lo[None, :]).to(dt).to(tl.float32) + (-x_hi * s_lo[None, :]).to(dt).to(tl.float32)
    hi = (x_hi * c_hi[None, :]).to(dt).to(tl.float32) + (x_lo * s_hi[None, :]).to(dt).to(tl.float32)
    qo_row = QO + ((b * H + h[:, None]) * T + t) * (2 * HALF)  # contiguous [B, H, T, d]
    tl.store(qo_row + i[None, :], lo.to(dt), mask=h_ok[:, None])
    tl.store(qo_row + (i[None, :] + HALF), hi.to(dt), mask=h_ok[:, None])

    # the shared key row
    k_row = K + b * sk_b + t * sk_t
    y_lo = tl.load(k_row + i).to(tl.float32)
    y_hi = tl.load(k_row + i + HALF).to(tl.float32)
    lo = (y_lo * c_lo).to(dt).to(tl.float32) + (-y_hi * s_lo).to(dt).to(tl.float32)
    hi = (y_hi * c_hi).to(dt).to(tl.float32) + (y_lo * s_hi).to(dt).to(tl.float32)
    if CACHE:
        start = tl.load(LEN)
        pos = start.to(tl.int64) + t
        in_cache = pos < L  # past the buffer's end nothing is written (transformers' own update would fail there)
        ko_row = KO + b * sko_b + pos * sko_s
        tl.store(ko_row + i, lo.to(dt), mask=in_cache & (i < HALF))
        tl.store(ko_row + i + HALF, hi.to(dt), mask=in_cache & (i < HALF))
        j = tl.arange(0, BLOCK_R)
        c = tl.load(LAT + b * sl_b + t * sl_t + j, mask=j < R)
        tl.store(CL + b * scl_b + pos * scl_s + j, c, mask=in_cache & (j < R))
        # Every program has read LEN above, before its ticket: the one drawing the last ticket may advance it
        # (and re-arm the ticket for the next call). One launch fewer than a separate in-place add.
        ticket = tl.atomic_add(TICKET, 1)
        if ticket == tl.num_programs(0) - 1:
            tl.store(LEN, start + T)
            tl.store(TICKET, 0)
    else:
        ko_row = KO + (b * T + t) * (2 * HALF)  # contiguous [B, 1, T, d]
        tl.store(ko_row + i, lo.to(dt))
        tl.store(ko_row + i + HALF, hi.to(dt))


@lru_cache(maxsize=2)
def _kernel(interpret: bool):
    del interpret  # part of the cache key only: `triton.jit` reads the mode when it decorates
    return triton.jit(_rope_fn)


def fused_rope_supported(q_rope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `apply_rope_triton` takes these inputs: Triton present, one floating dtype for all four on one kind
    of device, a power-of-two rope width, shapes as documented there, the rope tensors contiguous in ``d``."""
    tensors = (q_rope, k_rope, cos, sin)
    if triton is None or len({x.device for x in tensors}) != 1:
        return False
    if any(x.dtype != q_rope.dtype for x in tensors) or q_rope.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if any(x.dim() != 4 for x in tensors):
        return False
    b, _, t, d = q_rope.shape
    if d < 2 or d & (d - 1) or tuple(k_rope.shape) != (b, 1, t, d) or q_rope.stride(-1) != 1 or k_rope.stride(-1) != 1:
        return False
    return all(tuple(x.shape[1:]) == (1, t, d) and x.shape[0] in (1, b) for x in (cos, sin))


def apply_rope_triton(
    q_rope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated ``(q_rope, k_rope)`` in one launch: ``q_rope [B, H, T, d]``, ``k_rope [B, 1, T, d]``, ``cos``/``sin``
    ``[B or 1, 1, T, d]`` (any strides; the rope tensors contiguous in ``d``); outputs contiguous, bitwise equal
    to `apply_rope_torch`. Inputs as `fused_rope_supported` accepts; no autograd."""
    b, h, t, d = q_rope.shape
    q_out = torch.empty(b, h, t, d, dtype=q_rope.dtype, device=q_rope.device)
    k_out = torch.empty(b, 1, t, d, dtype=k_rope.dtype, device=k_rope.device)
    # no cache: the eight cache arguments are unused
    _launch(q_rope, k_rope, cos, sin, q_out, k_out, (q_out, q_out, q_out, q_out, 0, 0, 0, 0, 0, 0, 0, 0), block_r=0)
    return q_out, k_out


def _launch(
    q_rope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
    k_target: torch.Tensor, cache_args: tuple, block_r: int,
) -> None:
    """One program per ``(batch, token)``; ``block_r > 0``: the cache variant (``k_target`` a cache buffer)."""
    b, h, t, d = q_rope.shape
    if b * t == 0:
        return
    interpret = _interpreting()
    if interpret:
        _patch_interpreter_for_numpy2()
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    sb = sin.stride(0) if sin.shape[0] > 1 else 0
    # no fused multiply-add: the products are rounded before the sum, as in PyTorch
    options = {} if interpret else {"enable_fp_fusion": False}
    _kernel(interpret)[(b * t,)](
        q_rope, k_rope, cos, sin, q_out, k_target,
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2), k_rope.stride(0), k_rope.stride(2),
        cb, cos.stride(2), cos.stride(3), sb, sin.stride(2), sin.stride(3),
        t, h, *cache_args,
        HALF=d // 2, BLOCK_H=max(2, triton.next_power_of_2(h)), CACHE=block_r > 0, BLOCK_R=max(2, block_r),
        num_warps=4 if h * d >= 2048 else 1, **options,
    )


def rope_into_cache_supported(
    q_rope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, latent: torch.Tensor,
    cache_latent: torch.Tensor, cache_rope: torch.Tensor, length: torch.Tensor, ticket: torch.Tensor,
) -> bool:
    """Whether `rope_into_cache_triton` takes these inputs: those `fused_rope_supported` takes, a latent
    ``[B, 1, T, r]`` and buffers ``[B, 1, L, r]``/``[B, 1, L, d]`` of the same dtype and device, contiguous in the
    last dimension, and one-element integer ``length``/``ticket`` tensors there."""
    if not fused_rope_supported(q_rope, k_rope, cos, sin):
        return False
    b, _, t, d = k_rope.shape
    r = latent.shape[-1]
    if latent.dim() != 4 or tuple(latent.shape[:3]) != (b, 1, t) or latent.stride(-1) != 1:
        return False
    if cache_latent.dim() != 4 or cache_rope.dim() != 4 or cache_latent.shape[0] != b or cache_rope.shape[0] != b:
        return False
    if cache_latent.shape[1] != 1 or cache_rope.shape[1] != 1 or cache_latent.shape[-1] != r or cache_rope.shape[-1] != d:
        return False
    if cache_latent.shape[2] != cache_rope.shape[2] or cache_latent.stride(-1) != 1 or cache_rope.stride(-1) != 1:
        return False
    if any(x.dtype != q_rope.dtype or x.device != q_rope.device for x in (latent, cache_latent, cache_rope)):
        return False
    return all(
        x.device == q_rope.device and x.numel() == 1 and x.dtype in (torch.int32, torch.int64) for x in (length, ticket)
    )


def rope_into_cache_triton(
    q_rope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, latent: torch.Tensor,
    cache_latent: torch.Tensor, cache_rope: torch.Tensor, length: torch.Tensor, ticket: torch.Tensor,
) -> torch.Tensor:
    """RoPE and a static cache's update in one launch; returns the rotated query ``[B, H, T, d]`` (contiguous).

    Writes ``latent [B, 1, T, r]`` and the rotated ``k_rope [B, 1, T, d]`` at positions ``length .. length+T-1`` of
    ``cache_latent [B, 1, L, r]`` / ``cache_rope [B, 1, L, d]`` (positions from ``L`` on are not written) and adds
    ``T`` to ``length`` in place, as transformers' ``StaticLayer.update`` does with five kernels (a range, two
    additions, two indexed copies). ``ticket`` (one integer, zero between calls) counts the finished programs so
    that the last one advances ``length``: use one per cache layer, never shared by concurrent launches. The
    numbers are bitwise those of `apply_rope_triton` and ``index_copy_``."""
    b, h, t, d = q_rope.shape
    q_out = torch.empty(b, h, t, d, dtype=q_rope.dtype, device=q_rope.device)
    r = latent.shape[-1]
    cache_args = (latent, cache_latent, length, ticket, latent.stride(0), latent.stride(2),
                  cache_latent.stride(0), cache_latent.stride(2), cache_rope.stride(0), cache_rope.stride(2),
                  cache_latent.shape[2], r)
    _launch(q_rope, k_rope, cos, sin, q_out, cache_rope, cache_args, block_r=triton.next_power_of_2(r))
    return q_out
