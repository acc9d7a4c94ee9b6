"""Triton flash-decoding kernel for absorbed MLA: multi-query attention over the latent cache.

On Hopper GPUs stage 1 below is replaced, wherever it applies (16-bit, 512 + 64, at most 32 query rows, a cache
addressable as one ``[B·S, 576]`` tensor), by the warp-specialised Gluon kernel of `mla_decode_ws` (a TMA loader
warp and a warpgroup-MMA warpgroup; ``KernelConfig.ring_slots``): it writes the same partials, which the same
merge (stage 2) combines, and reads masks and the length itself (bench/results/decode.md, runs 9-10).

Same contract as `reference.decode_attention_reference` (shapes there): ``T·H`` query rows of width
``r + d_rope`` attend over one shared KV stream whose key is ``[c_s ; k_rope,s]`` and whose value is ``c_s``.

Two launches:
1. ``_stage1_fn``: grid ``(head blocks, splits, batch)``. Each program takes ``BLOCK_H`` query rows (all heads of a
   token when ``H <= BLOCK_H``, so each cached token is read once for all heads) and one contiguous split of the
   cached sequence, runs an online softmax over ``BLOCK_N``-token tiles (two tensor-core products per tile:
   scores ``q · [c; k_rope]ᵀ`` and output ``p · c``, the value tile being the key tile already loaded) and writes
   a normalised float32 partial output and its log-sum-exp (base 2).
2. ``_stage2_fn``: grid ``(rows, batch)``: merges the splits by their log-sum-exps and writes the output. One
   program per query row takes the maximum of the row's log-sum-exps, then walks the splits ``CHUNK_S`` at a time,
   each chunk's weights and ``[CHUNK_S, r]`` partial tile read by one load each (no chain of one dependent load
   per split); up to 16 splits in one step, whose partials are loaded together with the log-sum-exps (1-2%
   faster at batch 16, decode_select.run23).

Merging in stage 1 instead (the last program of a row, counted by an atomic) and 16-bit partials were both
slower on an H200 (bench/results/decode.md, run 4) and were removed (commit 9fe5822 has them): the stage-1
kernel is bound by its 255 registers per thread, and code after its tile loop changes how ptxas schedules the
loop. The warp-specialised stage 1 merging its row's partials itself (every program of the row resident at once,
counters in global memory) gained 0.5-1%, and sharing a row's tiles dynamically among its programs 1.5-2.5% more,
but that changed the result's last bits from call to call (commit abe846f; decode.md, runs 21-22). A merge that
also applies the per-head up-projection ``W_UV`` on tensor cores (saving the batched product after it) was 2-18%
slower than merge plus product at every batch up to 205 (decode.md, run 8; commit ab881b9 has it).

Queries are read in place through their batch, token and head strides; the output ``[B, T, H, r]`` is a view
of head-major storage (``[H, B, T, r]``), the layout the per-head up-projection after it reads without a copy.

The launch configuration is chosen per call (`auto_config`): one block of 4 warps per multiprocessor with a
three-stage tile pipeline (`DEFAULT_CONFIG`), or for calls with much to read two such blocks per multiprocessor
with two stages each, on the streamed schedule (`LARGE_WORK_CONFIG`). Split schedule: the number of splits is
chosen so that ``batch × head blocks × splits`` programs fill the GPU's block slots in whole waves
(`choose_num_splits`). Streamed schedule (``KernelConfig.streamed``, when the batch does not outnumber the block
slots): the batch's tiles, row after row, are cut into one equal range per block slot, and each range into its
one or two row segments; stage 1 takes its segments' bounds from a table (`_streamed_segments`, built once per
shape), so its tile loop compiles exactly as the split schedule's, and stage 2 reads each row's number of
partials. (Computing the ranges inside the kernel instead, as two tile loops in sequence or one nested in a loop
over segments, compiled to slower code: decode.md, run 6.)

Masks: none (causal, aligned at the end, as the reference), bool (True = attend, read as bytes) or additive
float, each ``[B or 1, T, S]`` with any strides. A bool mask with one query token (decode in ``generate``) is
first classified per row (``_prefix_fn``, one small launch): a row that is left padding followed by attended
positions up to its length runs without reading the mask (``MASK_MODE`` 3, from the tile holding its first
attended position), any other row in a second stage-1 launch that reads it; a mask read in every tile costs the
register-bound loop 50-80% on an H200 (decode.md, run 8). Calls with a length take the split schedule, which
the streamed one loses to there. An optional per-batch (or scalar) length tensor bounds the
tokens read (a static cache's filled length: positions past it are masked anyway), without a host sync, so the
launch can be captured in a CUDA graph. A row whose every key is masked gets zeros (the reference averages
there; such rows are padding and never read).

With ``KernelConfig.pdl`` on a Hopper or newer GPU both kernels are launched as programmatic dependent launches
(PDL): each starts with ``griddepcontrol.wait`` (the previous kernel in the stream has completed and its writes are
visible) and then ``griddepcontrol.launch_dependents``, so the next kernel's programs are launched while this
one's last programs still run, its launch latency hidden. The ``PDL`` constexpr guards that code: off (the
interpreter, older GPUs, ``pdl=False``) the kernels compile exactly as without it.

Triton's ``@jit`` decides between compiling and interpreting (``TRITON_INTERPRET=1``) when it decorates, so the
kernels are decorated lazily, once per mode.
"""

from __future__ import annotations  # also keeps the `tl.constexpr` annotations lazy when triton is absent

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

try:  # Triton is optional: the PyTorch reference is the fallback
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

_GDC_AVAILABLE = False  # whether this Triton has the grid-dependency-control functions PDL needs
if triton is not None:
    try:  # binds `tl.extra.cuda`, which the kernels name when PDL is on
        import triton.language.extra.cuda  # noqa: F401

        _GDC_AVAILABLE = hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    except ImportError:  # pragma: no cover - a Triton without the CUDA extras
        pass

from . import mla_decode_ws as _ws  # noqa: E402  (Gluon; `available()` is False without it)

LOG2E = 1.4426950408889634
CPU_SLOTS = 132  # block slots per occupancy level assumed off the GPU (the interpreter): an H100/H200's SM count
_OUT_OF_RESOURCES = getattr(getattr(getattr(triton, "runtime", None), "errors", None), "OutOfResources", RuntimeError)


def triton_available() -> bool:
    return triton is not None


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of stage 1. ``ctas_per_sm`` is the occupancy assumed when choosing the split count."""

    block_n: int = 64  # cached tokens per tile
    block_h: int = 32  # query rows (heads × query tokens) per program
    # With 4 warps ptxas (sm_90a) spills a little of the [32, 512] float32 accumulator (~160 bytes of stack);
    # 8 warps do not spill, yet measured 10-25% slower on the H200.
    num_warps: int = 4
    num_stages: int = 2
    ctas_per_sm: int = 1
    # Programmatic dependent launch (Hopper and newer, compiled kernels only): both kernels are launched with
    # `launch_pdl=True` and begin with `gdc_wait` then `gdc_launch_dependents`, so each kernel's launch overlaps
    # the end of the one before it in the stream. Ignored under the interpreter, on GPUs before sm_90 and on
    # ROCm. Resources are unchanged, so the out-of-resources fallback keeps it.
    pdl: bool = False
    # Streamed schedule (when batch <= block slots): the batch's tiles cut into one equal contiguous range per
    # block slot; a range holding the end of one row and the start of the next is two segments, each one
    # program of a table (`_streamed_segments`), the second segments ordered longest first so that they go to
    # the slots whose first segment was shortest. No part-full last wave.
    streamed: bool = False
    # Warp-specialised Gluon stage 1 (`mla_decode_ws`: a TMA loader warp and a warpgroup-MMA warpgroup; Hopper,
    # the bare call): with ``ring_slots`` > 0 it runs with that many 8 KiB ring slots where it applies (the split
    # schedule; ``block_n``/``num_warps``/``num_stages`` do not apply to it), the Triton stage 1 elsewhere. Whole
    # tiles of 9 chunks: 9 or 18 (`mla_decode_ws.RING_SLOTS_ALLOWED`).
    ring_slots: int = 0

    def __post_init__(self) -> None:
        if self.ring_slots and self.ring_slots not in _ws.RING_SLOTS_ALLOWED:
            raise ValueError(f"KernelConfig.ring_slots must be 0 (the Triton stage 1) or one of "
                             f"{_ws.RING_SLOTS_ALLOWED} (whole tiles of 9 chunks), not {self.ring_slots}")


# Where the warp-specialised Gluon stage 1 applies (a Hopper GPU; 16-bit, 512 + 64, at most 32 query rows; any
# mask, any length), both configurations below run it, with 18 ring slots of 8 KiB (two tiles): on an H200 it
# streams the cache at 91-108% of the copy bandwidth where the Triton stage 1 reaches 82-97% (batch 64 × 8K
# 149 against 174 µs, 191 × 8320 429 against 516, 16 × 8K 47 against 53; decode.md, run 13). Elsewhere the
# Triton stage 1 runs as configured below.
WS_RING_SLOTS = _ws.DEFAULT_NBUF
# Default launch parameters of the Triton stage 1, from `bench/decode.py` on an H200 (bench/results/decode.md, runs 3 and 4): 64-token
# tiles, 4 warps, 3 stages. The third stage (184 KiB of shared memory as compiled for sm_90,
# `tests/test_kernel_compile.py`) keeps two tiles in flight while one is multiplied; with two stages the next
# load only starts once the previous one has landed, and each SM waits out a full memory latency per tile. Alone
# it is 19-28% faster than two stages at batch >= 16 (batch 64 × 8K: 187 against 247 µs, 77% of the copy
# bandwidth); inside the whole model Llama-3-8B-shaped decoding gained 8% at 8K and 10% at 16K, Llama-2-7B-shaped
# lost 4%. Slower on the H200 and removed again: tensor-descriptor (TMA) loads and a 64-row padded block for
# warpgroup MMA (commit 4bed150 has them), the token-major variant, and a balanced one-program-per-SM schedule
# (commit 1980ec3; why in decode.md, run 4), a Gluon warpgroup-MMA stage 1, 16-bit partials and 32- or 16-token
# tiles at two blocks per SM (commit 65d8ae3; decode.md, run 5); in run 6 balanced schedules twice more (commit
# d01b5ae has the second), 16-bit partials again, 16-row head blocks and lazy rescaling of the running output.
# PDL (run 5): 2-5% at batch <= 16, neutral above and end to end. GPUs with less shared memory fall back to two
# stages, then to `SAFE_CONFIG`.
DEFAULT_CONFIG = KernelConfig(num_stages=3, pdl=True, ring_slots=WS_RING_SLOTS)
# For large calls: two blocks per multiprocessor, two stages each (112 KiB of shared memory and 255 registers per
# thread: two blocks just fit), on the streamed schedule. Two independent tile streams per SM hide each other's
# latencies and stream at 4.3-4.4 TB/s on the H200 against 3.7-3.9 for the default, but a call costs more fixed
# time (twice the programs and partials), so they win only where there is much to read; the streamed schedule
# gives every block slot the same number of tiles, so no last wave runs part-full. On an H200 (bench/results/
# decode_select.run6.json): batch 191 × 8320 465.7 µs against 516.8 for the default (93.6% of the copy
# bandwidth), 96 × 16512 449.1 against 519.3, 205 × 8320 498.3 against 593.3, 64 × 32K 584.5 against 651.4;
# 16 × 32K (8K tiles) 171.0 against 176.7, 64 × 8K (8K tiles) even, 16 × 8K (2K tiles) 19% slower.
LARGE_WORK_CONFIG = KernelConfig(num_stages=2, ctas_per_sm=2, pdl=True, streamed=True, ring_slots=WS_RING_SLOTS)
LARGE_WORK_TILES = 16384  # tiles per call (batch × head blocks × ceil(S / block_n)) from which it is chosen
# Small tiles that fit any supported GPU: the fallback when a launch runs out of shared memory or registers
# (with the failing configuration's `pdl`, which costs no resources).
SAFE_CONFIG = KernelConfig(block_n=16, num_warps=4, num_stages=2)


def _stage1_fn(
    QL, QR, C, KR, Mask, Len, O_part, Lse,
    stride_qlb, stride_qlt, stride_qlh, stride_qrb, stride_qrt, stride_qrh,
    stride_cb, stride_cs,
    stride_rb, stride_rs,
    stride_mb, stride_mt, stride_ms,
    stride_lb,
    stride_ob, stride_om, stride_os,
    stride_lseb, stride_lsem,
    S, T, H, M, split_len, sm_scale_log2, Segments, Prefix,
    DL: tl.constexpr, DR: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr, HAS_LEN: tl.constexpr,
    IEEE: tl.constexpr, PDL: tl.constexpr, TABLE: tl.constexpr, PREFIX: tl.constexpr = 0,
):
    """``PREFIX`` (one query token, a bool mask; `_prefix_fn` has classified each row): 1, the rows whose
    mask within the length is ``[first, length)`` (``MASK_MODE`` 3: no mask is read, the loop starts at the
    tile holding ``first``); 2, the other rows, with their mask (``MASK_MODE`` 1). Each pass leaves the other's
    rows alone (no tile read, nothing written)."""
    if PDL:  # off, nothing is emitted: the kernel compiles as without this block
        tl.extra.cuda.gdc_wait()  # the previous kernel has completed: its outputs (queries, cache) are visible
        tl.extra.cuda.gdc_launch_dependents()  # stage 2 may launch now; it waits for this grid to complete
    pid_h = tl.program_id(0)
    if TABLE:  # streamed schedule: program i takes segment i = (row, first tile, end tile, split) of a table
        seg = Segments + tl.program_id(1) * 4
        b = tl.load(seg).to(tl.int64)
        pid_s = tl.load(seg + 3)
    else:  # split schedule: grid (head blocks, splits, batch)
        pid_s = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)

    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < M
    t_row = rows // H  # query token of each row (rows are ordered token-major, head-minor)
    dl = tl.arange(0, BLOCK_DL)
    dr = tl.arange(0, BLOCK_DR)
    dl_ok = dl < DL
    dr_ok = dr < DR

    h_row = rows - t_row * H
    ql_off = t_row * stride_qlt + h_row * stride_qlh  # rows address [token, head] through both strides: no copy
    qr_off = t_row * stride_qrt + h_row * stride_qrh
    q_l = tl.load(QL + b * stride_qlb + ql_off[:, None] + dl[None, :], mask=row_ok[:, None] & dl_ok[None, :], other=0.0)
    q_r = tl.load(QR + b * stride_qrb + qr_off[:, None] + dr[None, :], mask=row_ok[:, None] & dr_ok[None, :], other=0.0)

    kv_len = S
    if HAS_LEN:
        kv_len = tl.minimum(tl.load(Len + b * stride_lb).to(tl.int32), S)
    if TABLE:
        start = tl.load(seg + 1) * BLOCK_N
        end = tl.minimum(tl.load(seg + 2) * BLOCK_N, kv_len)
    else:
        start = pid_s * split_len
        end = tl.minimum(start + split_len, kv_len)
    first = 0
    skip = False
    if PREFIX != 0:
        first = tl.load(Prefix + b * 2)
        irregular = tl.load(Prefix + b * 2 + 1) != 0
        skip = irregular if PREFIX == 1 else not irregular
        if PREFIX == 1:  # tiles before the row's first attended position hold only padding: not read
            start = tl.maximum(start, (first // BLOCK_N) * BLOCK_N)
        end = tl.where(skip, start, end)
    # causal limit of each row without a mask: row of token t sees s < kv_len - T + t + 1
    row_limit = kv_len - T + t_row + 1

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DL], tl.float32)
    c_base = C + b * stride_cb
    r_base = KR + b * stride_rb
    for s0 in range(start, end, BLOCK_N):
        offs = s0 + tl.arange(0, BLOCK_N)
        s_ok = offs < end
        c = tl.load(c_base + offs[:, None] * stride_cs + dl[None, :], mask=s_ok[:, None] & dl_ok[None, :], other=0.0)
        kr = tl.load(r_base + offs[:, None] * stride_rs + dr[None, :], mask=s_ok[:, None] & dr_ok[None, :], other=0.0)
        if IEEE:
            qk = tl.dot(q_l, tl.trans(c), input_precision="ieee")
            qk = tl.dot(q_r, tl.trans(kr), acc=qk, input_precision="ieee")
        else:
            qk = tl.dot(q_l, tl.trans(c))
            qk = tl.dot(q_r, tl.trans(kr), acc=qk)
        qk = qk * sm_scale_log2
        valid = s_ok[None, :] & row_ok[:, None]
        if MASK_MODE == 0:
            valid = valid & (offs[None, :] < row_limit[:, None])
        elif MASK_MODE == 3:  # the row's mask is [first, length): no load
            valid = valid & (offs[None, :] >= first)
        elif MASK_MODE == 1:
            mv = tl.load(
                Mask + b * stride_mb + t_row[:, None] * stride_mt + offs[None, :] * stride_ms,
                mask=row_ok[:, None] & s_ok[None, :], other=0,
            )
            valid = valid & (mv != 0)
        else:
            bias = tl.load(
                Mask + b * stride_mb + t_row[:, None] * stride_mt + offs[None, :] * stride_ms,
                mask=row_ok[:, None] & s_ok[None, :], other=0.0,
            )
            # clamp first: the dtype's most negative value times log2(e) would overflow float32
            qk = qk + tl.maximum(bias.to(tl.float32), -1.0e30) * 1.4426950408889634
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = tl.dot(p.to(c.dtype), c, acc=acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(c.dtype), c, acc=acc * alpha[:, None])
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptr = O_part + b * stride_ob + rows[:, None] * stride_om + pid_s * stride_os + dl[None, :]
    keep = row_ok & (not skip)
    tl.store(o_ptr, out.to(O_part.dtype.element_ty), mask=keep[:, None] & dl_ok[None, :])
    tl.store(Lse + b * stride_lseb + rows * stride_lsem + pid_s, lse, mask=keep)


def _prefix_fn(Mask, Len, Out, stride_mb, stride_ms, stride_lb, S, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr):
    """One row of a one-token bool mask: ``Out[b] = (first, irregular)``, ``first`` the first attended position
    below the row's length (the length if none) and ``irregular`` whether any position in ``[first, length)``
    is masked, i.e. whether the mask is something else than left padding there."""
    b = tl.program_id(0).to(tl.int64)
    n = S
    if HAS_LEN:
        n = tl.minimum(tl.load(Len + b * stride_lb).to(tl.int32), S)
    first = n
    count = 0
    for s0 in range(0, n, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        keep = tl.load(Mask + b * stride_mb + offs * stride_ms, mask=offs < n, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(keep, offs, n), 0))
        count += tl.sum(keep.to(tl.int32), 0)
    tl.store(Out + b * 2, first)
    tl.store(Out + b * 2 + 1, (count != n - first).to(tl.int32))


def _stage2_fn(
    O_part, Lse, Out, Counts,
    stride_ob, stride_om, stride_os,
    stride_lseb, stride_lsem,
    stride_outb, stride_outt, stride_outh,
    NUM_SPLITS, H,
    DL: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr,
    PDL: tl.constexpr, COUNTS: tl.constexpr,
):
    """One query row: ``out = Σ_j 2^(lse_j - max) · O_j / Σ_j 2^(lse_j - max)`` over its ``NUM_SPLITS`` partials
    (``BLOCK_S``: the split count rounded up to a power of two; ``CHUNK_S = min(BLOCK_S, 16)`` splits per step).
    Splits whose log-sum-exp is ``-inf`` (no key seen) weigh 0; a row with no key at all gets zeros."""
    if PDL:
        tl.extra.cuda.gdc_wait()  # stage 1 has completed: its partials and log-sum-exps are visible
        tl.extra.cuda.gdc_launch_dependents()
    m = tl.program_id(0).to(tl.int64)
    t_row = m // H
    b = tl.program_id(1).to(tl.int64)
    if COUNTS:  # the streamed schedule: rows have different numbers of partials
        NUM_SPLITS = tl.load(Counts + b)
    lse_row = Lse + b * stride_lseb + m * stride_lsem
    base = O_part + b * stride_ob + m * stride_om
    dl = tl.arange(0, BLOCK_DL)
    dl_ok = dl < DL
    sp = tl.arange(0, BLOCK_S)
    sp_ok = sp < NUM_SPLITS
    # all splits' log-sum-exps in one load; weight 0 past the split count and for an empty split (-inf)
    lse = tl.load(lse_row + sp, mask=sp_ok, other=float("-inf"))
    if BLOCK_S == CHUNK_S:
        # One step (up to 16 splits): the partials' load goes out together with the log-sum-exps', not one
        # memory round trip after their maximum.
        o = tl.load(base + sp[:, None] * stride_os + dl[None, :], mask=sp_ok[:, None] & dl_ok[None, :], other=0.0)
        mx = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx))  # every split empty: all weights 0
        acc = tl.sum(w[:, None] * o.to(tl.float32), 0)
        denom = tl.sum(w, 0)
    else:
        mx = tl.max(lse, 0)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        # CHUNK_S splits per step, weights and partial tile each in one load
        ch = tl.arange(0, CHUNK_S)
        acc = tl.zeros([BLOCK_DL], tl.float32)
        denom = tl.zeros([], tl.float32)
        for j0 in range(0, NUM_SPLITS, CHUNK_S):
            sj = j0 + ch
            sj_ok = sj < NUM_SPLITS
            w = tl.exp2(tl.load(lse_row + sj, mask=sj_ok, other=float("-inf")) - mx_safe)
            o = tl.load(base + sj[:, None] * stride_os + dl[None, :], mask=sj_ok[:, None] & dl_ok[None, :],
                        other=0.0)
            acc += tl.sum(w[:, None] * o.to(tl.float32), 0)
            denom += tl.sum(w, 0)
    out = acc / tl.where(denom > 0.0, denom, 1.0)  # no key in the whole row: zeros
    # head-major storage: `Out`'s strides address [batch, token, head]
    out_ptr = Out + b * stride_outb + t_row * stride_outt + (m - t_row * H) * stride_outh + dl
    tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=dl_ok)


@lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """``(stage1, stage2, prefix)`` decorated for the current mode (compiled, or interpreted on the CPU)."""
    del interpret  # part of the cache key only: `triton.jit` reads the mode itself
    return triton.jit(_stage1_fn), triton.jit(_stage2_fn), triton.jit(_prefix_fn)


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False


def _patch_interpreter_for_numpy2() -> None:
    """Triton's CPU interpreter (3.6 and earlier) turns a scalar into a Python int with ``int(array)`` on a
    1-element array, which numpy >= 2.4 refuses; loops with run-time bounds then fail. Read the element instead."""
    from triton.runtime import interpreter as ti

    original = ti._patch_lang_tensor
    if getattr(original, "_transmla_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._transmla_patched = True
    ti._patch_lang_tensor = patched


@lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@lru_cache(maxsize=8)
def _pdl_capable(device_index: int) -> bool:
    """Programmatic dependent launch needs an NVIDIA GPU of compute capability 9.0 or newer (not ROCm, whose
    capability numbers mean something else)."""
    return _GDC_AVAILABLE and torch.version.hip is None and torch.cuda.get_device_capability(device_index) >= (9, 0)


def choose_num_splits(
    batch: int,
    head_blocks: int,
    seq_len: int,
    block_n: int,
    slots: int,
    *,
    block_rows: int = 32,
    latent_dim: int = 512,
    rope_dim: int = 64,
    elem_bytes: int = 2,
    max_splits: int = 64,
) -> int:
    """Split count minimising a simple time model, in units of one tile's read time.

    ``P = batch · head_blocks · splits`` programs run ``slots`` at a time (multiprocessors × occupancy), each
    walking ``ceil(tiles / splits)`` tiles: ``waves(P) · ceil(tiles / splits)``. Each program also writes a
    float32 partial output that the merge reads back: ``P · merge / slots`` with ``merge`` the partial's bytes
    (written and read) over one tile's bytes. At most one split per tile.
    """
    tiles = max(1, math.ceil(seq_len / block_n))
    merge = (block_rows * latent_dim * 4 * 2) / (block_n * (latent_dim + rope_dim) * elem_bytes)
    best, best_cost = 1, float("inf")
    for splits in range(1, min(max_splits, tiles) + 1):
        programs = batch * head_blocks * splits
        cost = math.ceil(programs / slots) * math.ceil(tiles / splits) + programs * merge / slots
        if cost < best_cost - 1e-9:
            best, best_cost = splits, cost
    return best


_SEGMENT_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}


def _streamed_segments(batch: int, tiles_per_row: int, programs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The streamed schedule's segment table ``[n, 4]`` int32 (row, first tile, end tile, split index in the row),
    each row's number of splits ``[batch]`` int32, and the largest of them; built once per shape and device.
    Needs ``batch <= programs < batch · tiles_per_row`` (every range non-empty and within two rows)."""
    key = (batch, tiles_per_row, programs, device)
    if key not in _SEGMENT_TABLES:
        if len(_SEGMENT_TABLES) >= 64:  # a growing dynamic cache makes a new shape every 64 tokens
            _SEGMENT_TABLES.clear()
        _SEGMENT_TABLES[key] = _build_segments(batch, tiles_per_row, programs, device)
    return _SEGMENT_TABLES[key]


def _build_segments(batch: int, tiles_per_row: int, programs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    total = batch * tiles_per_row
    first, second, count = [], [], [0] * batch
    for p in range(programs):
        t0, t1 = p * total // programs, (p + 1) * total // programs
        row = t0 // tiles_per_row
        cut = min(t1, (row + 1) * tiles_per_row)
        first.append((row, t0 - row * tiles_per_row, cut - row * tiles_per_row, count[row]))
        count[row] += 1
        if t1 > cut:  # the range goes on into the next row
            second.append((row + 1, 0, t1 - cut, count[row + 1]))
            count[row + 1] += 1
    # the slot whose first segment ends first takes the longest second segment
    second.sort(key=lambda seg: -(seg[2] - seg[1]))
    table = torch.tensor(first + second, dtype=torch.int32, device=device)
    return table, torch.tensor(count, dtype=torch.int32, device=device), max(count)


def _ws_applies(interpret: bool, q_lat, q_rope, latent, k_rope, mask, kv_len) -> bool:
    """Whether the warp-specialised Gluon stage 1 takes the call (compiled launches on a Hopper GPU, its
    geometry): `mla_decode_ws.supported`, never under the interpreter (Gluon has none)."""
    return not interpret and _ws.supported(q_lat, q_rope, latent, k_rope, mask, kv_len)


def auto_config(batch: int, head_blocks: int, seq_len: int) -> KernelConfig:
    """The launch configuration for a call with ``config=None``: `LARGE_WORK_CONFIG` from `LARGE_WORK_TILES`
    tiles of work on, `DEFAULT_CONFIG` below (tiles counted with the default's ``block_n``)."""
    tiles = batch * head_blocks * math.ceil(seq_len / DEFAULT_CONFIG.block_n)
    return LARGE_WORK_CONFIG if tiles >= LARGE_WORK_TILES else DEFAULT_CONFIG


def decode_attention_triton(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Triton absorbed decode; shapes as `decode_attention_reference`, plus ``kv_len`` (int tensor ``[]``,
    ``[1]`` or ``[B]``) bounding the tokens read. ``latent``/``k_rope`` may be strided views (last dim contiguous),
    e.g. two column ranges of one ``[B, S, r + d_rope]`` buffer."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    requested_splits = num_splits
    b, t, h, r = q_lat.shape
    dr = q_rope.shape[-1]
    s = latent.shape[1]
    m_rows = t * h
    cfg = config or auto_config(b, triton.cdiv(m_rows, DEFAULT_CONFIG.block_h), s)
    if latent.element_size() == 4 and cfg.block_n > 16:
        # float32 tiles take twice the shared memory: keep them within the per-block limit
        cfg = replace(cfg, block_n=16, num_stages=min(cfg.num_stages, 2), ctas_per_sm=1)
    if latent.stride(-1) != 1 or k_rope.stride(-1) != 1:
        raise ValueError("latent and k_rope must be contiguous in their last dimension")
    dtype = latent.dtype
    # Queries in the cache's dtype (tensor-core operands must match), read in place through their batch, token
    # and head strides: the absorbed path hands over `[H, B, T, r]`-ordered products permuted to `[B, T, H, r]`,
    # which a reshape to rows would copy.
    ql = q_lat.to(dtype)
    qr = q_rope.to(dtype)
    if ql.stride(-1) != 1:
        ql = ql.contiguous()
    if qr.stride(-1) != 1:
        qr = qr.contiguous()

    interpret = _interpreting()
    use_ws = cfg.ring_slots > 0 and _ws_applies(interpret, q_lat, q_rope, latent, k_rope, mask, kv_len)
    if use_ws:  # the warp-specialised stage 1: one block per SM, 64-token tiles, on the split schedule
        cfg = replace(cfg, ctas_per_sm=1, block_n=_ws.TILE_TOKENS, block_h=_ws.ROW_BLOCK, streamed=False)
    block_h = max(16, min(cfg.block_h, triton.next_power_of_2(m_rows)))
    head_blocks = triton.cdiv(m_rows, block_h)
    slots = (_sm_count(latent.device.index or 0) if latent.is_cuda else CPU_SLOTS) * cfg.ctas_per_sm
    tiles_per_row, programs = triton.cdiv(s, cfg.block_n), slots // head_blocks
    # with a length bound the streamed schedule measured 25-35% slower than the split one on an H200 (its loop
    # compiles the same; decode.md, run 8), so calls with a length take splits
    streamed = cfg.streamed and num_splits is None and kv_len is None and b <= programs < b * tiles_per_row
    if streamed and latent.is_cuda and torch.cuda.is_current_stream_capturing():
        # a new table would be a host-to-device copy, which CUDA-graph capture forbids: splits instead, unless
        # a call outside the capture (a warm-up) built it already
        streamed = (b, tiles_per_row, programs, latent.device) in _SEGMENT_TABLES
    if streamed:
        segments, counts, num_splits = _streamed_segments(b, tiles_per_row, programs, latent.device)
        split_len = cfg.block_n  # unused by this schedule
    else:
        segments = counts = None
        if num_splits is None:
            num_splits = choose_num_splits(
                b, head_blocks, s, cfg.block_n, slots, block_rows=block_h, latent_dim=r, rope_dim=dr,
                elem_bytes=latent.element_size(),
            )
        split_len = triton.cdiv(triton.cdiv(s, num_splits), cfg.block_n) * cfg.block_n
        num_splits = max(1, triton.cdiv(s, split_len))

    o_part = torch.empty(b, m_rows, num_splits, r, device=ql.device, dtype=torch.float32)
    lse = torch.empty(b, m_rows, num_splits, device=ql.device, dtype=torch.float32)
    # the output is written head-major (`[H, B, T, r]` storage, returned as a `[B, T, H, r]` view): the
    # per-head up-projection that follows (`absorbed.expand_output`) then reads it without a copy
    out = torch.empty(h, b, t, r, device=ql.device, dtype=dtype).permute(1, 2, 0, 3)

    if mask is None:
        mask_mode, mask_t, mstr = 0, ql, (0, 0, 0)
    else:
        mask = mask[..., :s]
        if mask.dtype == torch.bool:
            mask_mode, mask_t = 1, mask.view(torch.uint8)
        else:
            mask_mode, mask_t = 2, mask
        mstr = (mask_t.stride(0) if mask_t.shape[0] > 1 else 0, mask_t.stride(1) if mask_t.shape[1] > 1 else 0, mask_t.stride(2))
    if kv_len is None:
        len_t, len_stride, has_len = ql, 0, False
    else:
        len_t = kv_len.reshape(-1)
        len_stride, has_len = (1 if len_t.numel() > 1 else 0), True

    if interpret:
        _patch_interpreter_for_numpy2()
    stage1, stage2, prefix_kernel = _kernels(interpret)
    # PDL only in compiled launches on Hopper or newer: the interpreter cannot run the `griddepcontrol` asm
    pdl = bool(cfg.pdl) and not interpret and latent.is_cuda and _pdl_capable(latent.device.index or 0)
    launch_kw = {"launch_pdl": True} if pdl else {}
    prefix = ql
    if use_ws:  # mask and length in the same launch: it reads one mask row per tile, not one per head
        _ws.launch_stage1(ql, qr, latent, k_rope, o_part, lse, t, h, m_rows, split_len, num_splits, scale * LOG2E,
                          mask_mode=mask_mode, mask_t=mask_t if mask_mode else None, mask_strides=mstr,
                          len_t=len_t if has_len else None, len_stride=len_stride, nbuf=cfg.ring_slots, pdl=pdl)
        passes = []
    elif mask_mode == 1 and t == 1:
        # One query token and a bool mask (decode in `generate`): a mask read in every tile costs the
        # register-bound loop 50-80% (decode.md, run 8), and within the length it is nearly always left padding.
        # One small launch classifies each row; rows that are left padding run without reading the mask, the
        # others with it.
        prefix = torch.empty(b, 2, device=ql.device, dtype=torch.int32)
        prefix_kernel[(b,)](mask_t, len_t, prefix, mstr[0], mstr[2], len_stride, s, HAS_LEN=has_len, BLOCK=1024)
        passes = [(3, 1), (1, 2)]
    else:
        passes = [(mask_mode, 0)]
    try:
        for pass_mask, pass_prefix in passes:
            stage1[(head_blocks, segments.shape[0]) if streamed else (head_blocks, num_splits, b)](
                ql, qr, latent, k_rope, mask_t, len_t, o_part, lse,
                ql.stride(0), ql.stride(1), ql.stride(2), qr.stride(0), qr.stride(1), qr.stride(2),
                latent.stride(0), latent.stride(1),
                k_rope.stride(0), k_rope.stride(1),
                *mstr,
                len_stride,
                o_part.stride(0), o_part.stride(1), o_part.stride(2),
                lse.stride(0), lse.stride(1),
                s, t, h, m_rows, split_len, scale * LOG2E, segments if streamed else ql, prefix,
                DL=r, DR=dr, BLOCK_DL=triton.next_power_of_2(r), BLOCK_DR=max(16, triton.next_power_of_2(dr)),
                BLOCK_H=block_h, BLOCK_N=cfg.block_n, MASK_MODE=pass_mask, HAS_LEN=has_len,
                IEEE=dtype == torch.float32, PDL=pdl, TABLE=streamed, PREFIX=pass_prefix,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kw,
            )
    except _OUT_OF_RESOURCES:
        if replace(cfg, pdl=SAFE_CONFIG.pdl) == SAFE_CONFIG:
            raise
        # a configuration too large for this GPU's shared memory or registers: one stage fewer, then the small
        # tiles that always fit (`pdl` kept: it needs no resources)
        smaller = (replace(cfg, num_stages=cfg.num_stages - 1) if cfg.num_stages > 2
                   else replace(SAFE_CONFIG, pdl=cfg.pdl))
        return decode_attention_triton(q_lat, q_rope, latent, k_rope, scale, mask, kv_len,
                                       num_splits=requested_splits, config=smaller)
    block_s = max(2, triton.next_power_of_2(num_splits))
    stage2[(m_rows, b)](
        o_part, lse, out, counts if streamed else lse,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        num_splits, h,
        DL=r, BLOCK_DL=triton.next_power_of_2(r), BLOCK_S=block_s, CHUNK_S=min(block_s, 16), PDL=pdl,
        COUNTS=streamed, num_warps=4, **launch_kw,
    )
    return out


# ------------------------------------------------------------------------------------------------ torch.compile
# Under torch.compile the launch goes through an opaque custom op: dynamo then neither traces into Triton's
# launcher nor graph-breaks, and inductor's CUDA graphs capture the two launches as they are.
_OP_SCHEMA = "(Tensor q_lat, Tensor q_rope, Tensor latent, Tensor k_rope, float scale, Tensor? mask, Tensor? kv_len) -> Tensor"
mla_decode_op = None
if triton is not None and hasattr(torch.library, "custom_op"):

    def _op_impl(q_lat, q_rope, latent, k_rope, scale, mask, kv_len):
        return decode_attention_triton(q_lat, q_rope, latent, k_rope, scale, mask, kv_len)

    mla_decode_op = torch.library.custom_op("transmla::mla_decode", _op_impl, mutates_args=(), schema=_OP_SCHEMA)

    def _op_fake(q_lat, q_rope, latent, k_rope, scale, mask, kv_len):
        b, t, h, r = q_lat.shape  # the same head-major storage as the real output
        return q_lat.new_empty((h, b, t, r), dtype=latent.dtype).permute(1, 2, 0, 3)

    mla_decode_op.register_fake(_op_fake)
