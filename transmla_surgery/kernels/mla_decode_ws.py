"""Hopper (sm_90) stage 1 of the absorbed-MLA decode, warp-specialised, in Gluon.

Same contract and partial outputs as `mla_decode._stage1_fn` (float32 ``O_part [B, M, splits, r]`` normalised,
base-2 ``Lse [B, M, splits]``), so the split chooser and the merge kernel of `mla_decode` are shared. It handles
bfloat16/float16 caches of the DeepSeek geometry (``r = 512``, ``d_rope = 64``) with at most 32 query rows
(``T·H``), any mask `mla_decode` takes (none: causal, aligned at the end; bool; additive) and a length bound;
`supported` / `geometry_supported` say when.

Why another stage 1: the Triton kernel runs everything in the same four warps, one tile after the other; its
asynchronous copies are issued by the warps that multiply, and the next copies only start once a tile's products
are done. On an H200 its tile loop streams at about 88% of the copy bandwidth with one block per SM
(bench/results/decode.md). Here each block (one per SM, on the split schedule) has

* a **loader** (one warp, 24 registers): tensor-memory-accelerator (TMA) copies of ``[64 tokens, 64 channels]``
  chunks of the cache (8 KiB each: the rope key, then the 8 latent chunks of a tile) into ``NBUF`` ring slots,
  ``NBUF / 9`` tiles deep: each of a tile's 9 chunk positions has its own sub-ring and its own array of "ready"
  barriers (the copy's bytes arrived), and a tile's rope chunk, latent chunks 1-4 and 5-8 each one "empty"
  barrier (their reader is done). Triton's shared-memory barrier pass puts a CTA-wide ``bar.sync`` between two
  waits on one barrier array, and the multiplying warpgroup releases slots through one thread after a
  ``bar.sync``: with one array for the whole ring that was 18 ``bar.sync`` per tile, and with 9 arrays and 3
  releases a tile the call is 3-7% faster on an H200 (20 slots in one ring against these 18, each beside the
  Triton stage 1 on its machine; decode.md, run 13). The loader runs ahead of the multiplying warps by up to
  the whole ring and costs them no instructions.
* one **consumer** warpgroup: token-major warpgroup MMA, scores ``Sᵀ [64 tokens, rows] = K · Qᵀ`` (the MMA's M
  is the tile's 64 tokens; a decode step has only ``rows <= 32``), an online softmax over the tile's tokens
  whose sums stay per thread until the last tile, output ``Oᵀ [512, rows] += Vᵀ · Pᵀ`` as eight ``[64, rows]``
  accumulators; each chunk goes back to the loader as soon as its products are done.

With one query token (decode) the loader's first copies are the queries themselves, 9 TMA boxes of ``[32 rows,
64]`` through the queries' batch and head strides (`q_descriptors`); otherwise the multiplying warps load them
before the loader starts (behind its first copies they waited 4-7 µs). Tokens past the split's end or the row's
length are masked out of the softmax, and a partial last tile's latent rows past them are zeroed in shared memory
(the cache may hold anything there, NaN included, and 0 · NaN is NaN in the output product); copies past the end
of the whole cache are zero-filled by the TMA unit. Two consumers taking alternate tiles, and issuing the next
tile's scores early, were slower: the ring then held 2.2 tiles (now 2), and holding two leaves nothing in flight
(decode.md, runs 9-10; run 12 again for the next tile's outputs behind this tile's scores).

Gluon has no CPU interpreter: `tests/test_kernel_compile.py` compiles this kernel for sm_90a on the CPU, and its
numerics are checked against the PyTorch reference on a Hopper GPU by `bench/decode.py`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except Exception:  # pragma: no cover - triton absent or without Gluon
    gluon = None

DEFAULT_NBUF = 18  # ring slots of 8 KiB, 2 tiles deep (27 with the 36 KiB of queries and the P tile: past 227 KiB)
RING_SLOTS_ALLOWED = (9, 18)  # whole tiles: 9 sub-rings of 1 or 2 slots
TILE_TOKENS = 64  # tokens per tile: the M of one warpgroup MMA
ROW_BLOCK = 32  # query rows per program (padded)


def available() -> bool:
    return gluon is not None


def supported(q_lat: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
              mask: torch.Tensor | None, kv_len: torch.Tensor | None) -> bool:
    """Whether this kernel takes the call: Gluon present, a CUDA GPU of compute capability 9.x and a geometry
    `geometry_supported` accepts. Any mask `decode_attention_triton` takes and a length (``kv_len``) are
    allowed."""
    if gluon is None or not latent.is_cuda:
        return False
    if not _hopper(latent.device.index if latent.device.index is not None else torch.cuda.current_device()):
        return False
    return geometry_supported(q_lat, latent, k_rope)


def geometry_supported(q_lat: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> bool:
    """The shapes and layouts this kernel handles, on any device: a 16-bit cache with ``r = 512`` and
    ``d_rope = 64`` whose rows can be addressed as one 2-D tensor of ``B·S`` tokens (what its TMA descriptors
    describe: batch rows one after the other, rows and base 16-byte aligned, channels contiguous), and at most
    32 query rows (``T·H``)."""
    b, t, h, r = q_lat.shape
    s = latent.shape[1]
    if latent.dtype not in (torch.bfloat16, torch.float16) or k_rope.dtype != latent.dtype:
        return False
    if r != 512 or latent.shape[-1] != 512 or k_rope.shape[-1] != 64 or t * h > ROW_BLOCK:
        return False
    for x in (latent, k_rope):
        if x.stride(-1) != 1 or (b > 1 and x.stride(0) != s * x.stride(1)):
            return False
        if (x.stride(1) * x.element_size()) % 16 or x.data_ptr() % 16:
            return False
    return True


@lru_cache(maxsize=8)
def _hopper(device_index: int) -> bool:
    """An NVIDIA GPU of compute capability 9.x (warpgroup MMA, TMA, ``setmaxnreg``), not ROCm."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] == 9


if gluon is not None:
    BLOCK_N = gl.constexpr(TILE_TOKENS)
    CHUNK = gl.constexpr(64)  # channels per ring slot (128 bytes of a 16-bit dtype: one 128-byte swizzle row)
    ROWS = gl.constexpr(ROW_BLOCK)

    @gluon.jit
    def _pdl_enter():
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _now():
        """The global nanosecond timer (for `launch_stage1(timing=...)` only)."""
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                         pack=1)

    @gluon.jit
    def _loader(c_desc, r_desc, ring, ready, empty, row0, start, n_tiles, ql_desc, qr_desc, q_smem, q_bar, b,
                D: gl.constexpr, Q_TMA: gl.constexpr):
        """The loader warp: with ``Q_TMA`` first the queries (9 chunks ``[32 rows, 64]`` into ``q_smem``, one
        barrier), then every chunk of the split's tiles, in order, into the ring, ``D`` tiles deep (each waits for
        its slot to be handed back)."""
        nbytes: gl.constexpr = BLOCK_N * CHUNK * 2
        if Q_TMA:
            q3: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
            mbarrier.expect(q_bar, 9 * ROWS * CHUNK * 2)
            tma.async_copy_global_to_shared(qr_desc, [b, 0, 0], q_bar,
                                            q_smem.index(0)._reinterpret(q_smem.dtype, [1, ROWS, CHUNK], q3))
            for c in gl.static_range(8):
                tma.async_copy_global_to_shared(ql_desc, [b, 0, c * CHUNK], q_bar,
                                                q_smem.index(c + 1)._reinterpret(q_smem.dtype, [1, ROWS, CHUNK], q3))
        for i in range(n_tiles):
            tok = row0 + start + i * BLOCK_N
            d = i % D
            for p in gl.static_range(9):
                # slots come back in three groups (the rope chunk, latent chunks 1-4, 5-8); a fresh barrier counts
                # as having completed the phase before phase 0, so the first round passes
                mbarrier.wait(empty[0 if p == 0 else (1 if p < 5 else 2)].index(d), ((i // D) & 1) ^ 1)
                mbarrier.expect(ready[p].index(d), nbytes)
                if p == 0:
                    tma.async_copy_global_to_shared(r_desc, [tok, 0], ready[p].index(d), ring.index(p * D + d))
                else:
                    tma.async_copy_global_to_shared(c_desc, [tok, (p - 1) * CHUNK], ready[p].index(d),
                                                    ring.index(p * D + d))

    @gluon.jit
    def _issue_scores(ring, ready, q_smem, i, D: gl.constexpr, mma: gl.constexpr):
        """Issue tile ``i``'s scores ``Sᵀ = Σ_p K_p · Q_pᵀ`` (rope chunk, then the 8 latent chunks), each chunk's
        product as soon as its copy has landed; asynchronous: 9 MMA groups the caller waits for. (Waiting for
        all 9 first measured 0-2% slower on an H200, decode_select.run20.)"""
        d = i % D
        s = gl.zeros([BLOCK_N, ROWS], gl.float32, layout=mma)
        for p in gl.static_range(9):
            mbarrier.wait(ready[p].index(d), (i // D) & 1)
            s = warpgroup_mma(ring.index(p * D + d), q_smem.index(p).permute((1, 0)), s, use_acc=p > 0,
                              is_async=True)
        return s

    @gluon.jit
    def _load_mask(Mask, m_base, stride_mt, stride_ms, i, start, end, t_row, tok0, MASK_MODE: gl.constexpr,
                   ONE_TOKEN: gl.constexpr):
        """Tile ``i``'s mask values: ``[64]`` (one query token: one mask row for all heads) or ``[64, ROWS]``;
        issued before the tile's scores so that the load's latency hides behind them."""
        offs = start + i * BLOCK_N + tok0
        other = 0 if MASK_MODE == 1 else 0.0
        if ONE_TOKEN:
            mv = gl.load(Mask + m_base + offs * stride_ms, mask=offs < end, other=other)
        else:
            mv = gl.load(Mask + m_base + t_row[None, :] * stride_mt + offs[:, None] * stride_ms,
                         mask=(offs < end)[:, None], other=other)
        return mv

    @gluon.jit
    def _softmax_to_smem(s, mv, i, p_buf, start, end, row_limit, row_ok, tok0, m_i, l_i, sm_scale_log2,
                         MASK_MODE: gl.constexpr, ONE_TOKEN: gl.constexpr):
        """Online softmax over tile ``i``'s tokens (axis 0 of ``Sᵀ``); the probabilities go to ``p_buf`` as the
        output products' B operand. Returns the running maximum, the running sums and this tile's rescale factor.
        The sums are kept per thread, ``[64, ROWS]`` in the scores' layout, and reduced over the tokens once after
        the last tile: one cross-warp reduction per tile (the maximum) instead of two, 6% faster at batch 64 × 8K
        and 191 × 8320 on an H200 (decode_select.run20). ``mv``: the tile's mask (`_load_mask`; ``MASK_MODE`` 1
        bool as bytes, 2 additive, 0 none: causal, aligned at the end)."""
        offs = start + i * BLOCK_N + tok0
        valid = (offs < end)[:, None] & row_ok[None, :]
        qk = s * sm_scale_log2
        if MASK_MODE == 0:
            valid = valid & (offs[:, None] < row_limit[None, :])
        elif MASK_MODE == 1:
            if ONE_TOKEN:
                valid = valid & (mv != 0)[:, None]
            else:
                valid = valid & (mv != 0)
        else:
            # clamp first: the dtype's most negative value times log2(e) would overflow float32
            bias = gl.maximum(mv.to(gl.float32), -1.0e30) * 1.4426950408889634
            if ONE_TOKEN:
                qk = qk + bias[:, None]
            else:
                qk = qk + bias
        qk = gl.where(valid, qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 0))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
        alpha = gl.exp2(m_i - m_safe)
        p_t = gl.exp2(qk - m_safe[None, :])
        l_new = l_i * alpha[None, :] + p_t
        p_buf.store(p_t.to(p_buf.dtype))
        fence_async_shared()  # the generic-proxy store, then the MMA's async-proxy read
        return m_new, l_new, alpha

    @gluon.jit
    def _issue_output(ring, p_buf, i, alpha, o0, o1, o2, o3, o4, o5, o6, o7, D: gl.constexpr):
        """Issue ``Oᵀ_c = α·Oᵀ_c + V_cᵀ · Pᵀ`` for the 8 latent chunks of tile ``i`` (asynchronous: 8 groups)."""
        d = i % D
        a = alpha[None, :]
        o0 = warpgroup_mma(ring.index(1 * D + d).permute((1, 0)), p_buf, o0 * a, is_async=True)
        o1 = warpgroup_mma(ring.index(2 * D + d).permute((1, 0)), p_buf, o1 * a, is_async=True)
        o2 = warpgroup_mma(ring.index(3 * D + d).permute((1, 0)), p_buf, o2 * a, is_async=True)
        o3 = warpgroup_mma(ring.index(4 * D + d).permute((1, 0)), p_buf, o3 * a, is_async=True)
        o4 = warpgroup_mma(ring.index(5 * D + d).permute((1, 0)), p_buf, o4 * a, is_async=True)
        o5 = warpgroup_mma(ring.index(6 * D + d).permute((1, 0)), p_buf, o5 * a, is_async=True)
        o6 = warpgroup_mma(ring.index(7 * D + d).permute((1, 0)), p_buf, o6 * a, is_async=True)
        o7 = warpgroup_mma(ring.index(8 * D + d).permute((1, 0)), p_buf, o7 * a, is_async=True)
        return o0, o1, o2, o3, o4, o5, o6, o7

    @gluon.jit
    def _finish_output(empty, i, o0, o1, o2, o3, o4, o5, o6, o7, D: gl.constexpr):
        """Wait for tile ``i``'s output products and hand its latent chunks back to the loader, the first four as
        soon as their products are done."""
        d = i % D
        o0, o1, o2, o3 = warpgroup_mma_wait(num_outstanding=4, deps=(o0, o1, o2, o3))
        mbarrier.arrive(empty[1].index(d), count=1)  # latent chunks 1-4
        o4, o5, o6, o7 = warpgroup_mma_wait(num_outstanding=0, deps=(o4, o5, o6, o7))
        mbarrier.arrive(empty[2].index(d), count=1)  # latent chunks 5-8
        return o0, o1, o2, o3, o4, o5, o6, o7

    @gluon.jit
    def _zero_tail(ring, i, n_valid, D: gl.constexpr):
        """Zero the rows ``n_valid..63`` of tile ``i``'s 8 latent chunks: tokens past the row's length (or the
        split's end) may hold anything, NaN included, and a probability of 0 times NaN is NaN in the output
        product. Runs once per program at most (its last tile, when partial)."""
        zl: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        keep = (gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, zl)) < n_valid)[:, None]
        for p in gl.static_range(1, 9):
            buf = ring.index(p * D + i % D)
            x = buf.load(zl)
            buf.store(gl.where(keep, x, gl.zeros_like(x)))
        fence_async_shared()  # generic-proxy stores, then the output products' async-proxy reads

    @gluon.jit
    def _consumer(q_chunks, q_smem, ring, ready, empty, p_buf, O_part, Lse, Mask, m_base, stride_mt, stride_ms,
                  start, end, n_tiles, M, T, kv_len, sm_scale_log2, o_base, lse_base, stride_om, stride_lsem, Timing,
                  q_bar, D: gl.constexpr, MASK_MODE: gl.constexpr, ONE_TOKEN: gl.constexpr, TIMING: gl.constexpr,
                  Q_TMA: gl.constexpr):
        """The multiplying warpgroup (the default partition): waits for the queries (``Q_TMA``: the loader's
        copies) or stores them (their loads were issued before the loader started), then runs the split's tiles
        and writes the normalised partial output ``O_part`` (``o_base`` + row · ``stride_om`` + channel) and the
        base-2 log-sum-exp (``lse_base`` + row · ``stride_lsem``)."""
        if Q_TMA:
            mbarrier.wait(q_bar, 0)
        else:
            for c in gl.static_range(9):
                q_smem.index(c).store(q_chunks[c])
            fence_async_shared()
        if TIMING:
            gl.store(Timing + 2, _now())

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, ROWS, 16])
        tok_l: gl.constexpr = gl.SliceLayout(1, mma)
        row_l: gl.constexpr = gl.SliceLayout(0, mma)
        rows = gl.arange(0, ROWS, layout=row_l)
        row_ok = rows < M
        t_row = rows // (M // T)
        row_limit = kv_len - T + t_row + 1  # causal limit (aligned at the end)
        tok0 = gl.arange(0, BLOCK_N, layout=tok_l)

        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_l)
        l_i = gl.zeros([BLOCK_N, ROWS], gl.float32, layout=mma)  # per-thread shares of the sums
        o0 = gl.zeros([CHUNK, ROWS], gl.float32, layout=mma)
        o1 = gl.zeros([CHUNK, ROWS], gl.float32, layout=mma)
        o2 = gl.zeros([CHUNK, ROWS], gl.float32, layout=mma)
        o3 = gl.zeros([CHUNK, ROWS], gl.float32, layout=mma)
        o4 = gl.zeros([CHUNK, ROWS], gl.float32, layout=mma)
        o5 = gl.zeros([CHUNK, ROWS], gl.float32, layout=mma)
        o6 = gl.zeros([CHUNK, ROWS], gl.float32, layout=mma)
        o7 = gl.zeros([CHUNK, ROWS], gl.float32, layout=mma)
        t_first = gl.to_tensor(0).to(gl.int64)
        for i in range(n_tiles):
            mv = 0
            if MASK_MODE != 0:
                mv = _load_mask(Mask, m_base, stride_mt, stride_ms, i, start, end, t_row, tok0, MASK_MODE, ONE_TOKEN)
            if TIMING:  # per tile (the first 32): issue, scores done, softmax done, output done
                if i < 32:
                    gl.store(Timing + 8 + 4 * i, _now())
            s = _issue_scores(ring, ready, q_smem, i, D, mma)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            mbarrier.arrive(empty[0].index(i % D), count=1)  # the rope chunk is no longer read
            if TIMING:
                if i == 0:
                    t_first = _now()
                if i < 32:
                    gl.store(Timing + 9 + 4 * i, _now())
            m_i, l_i, alpha = _softmax_to_smem(s, mv, i, p_buf, start, end, row_limit, row_ok, tok0, m_i, l_i,
                                               sm_scale_log2, MASK_MODE, ONE_TOKEN)
            if start + (i + 1) * BLOCK_N > end:  # the last tile, partial
                _zero_tail(ring, i, end - start - i * BLOCK_N, D)
            if TIMING:
                if i < 32:
                    gl.store(Timing + 10 + 4 * i, _now())
            o0, o1, o2, o3, o4, o5, o6, o7 = _issue_output(ring, p_buf, i, alpha, o0, o1, o2, o3, o4, o5, o6, o7, D)
            o0, o1, o2, o3, o4, o5, o6, o7 = _finish_output(empty, i, o0, o1, o2, o3, o4, o5, o6, o7, D)
            if TIMING:
                if i < 32:
                    gl.store(Timing + 11 + 4 * i, _now())
        if TIMING:
            gl.store(Timing + 3, t_first)
            gl.store(Timing + 4, _now())

        l_i = gl.sum(l_i, 0)
        has = l_i > 0.0
        inv = (1.0 / gl.where(has, l_i, 1.0))[None, :]
        lse = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
        gl.store(Lse + lse_base + rows * stride_lsem, lse, mask=row_ok)
        # straight from the accumulator layout: each group of 4 lanes writes 8 consecutive channels (32 bytes)
        ch = gl.arange(0, CHUNK, layout=tok_l)
        o_ptr = O_part + o_base + rows[None, :] * stride_om + ch[:, None]
        ok = row_ok[None, :]
        gl.store(o_ptr + 0 * CHUNK, o0 * inv, mask=ok)
        gl.store(o_ptr + 1 * CHUNK, o1 * inv, mask=ok)
        gl.store(o_ptr + 2 * CHUNK, o2 * inv, mask=ok)
        gl.store(o_ptr + 3 * CHUNK, o3 * inv, mask=ok)
        gl.store(o_ptr + 4 * CHUNK, o4 * inv, mask=ok)
        gl.store(o_ptr + 5 * CHUNK, o5 * inv, mask=ok)
        gl.store(o_ptr + 6 * CHUNK, o6 * inv, mask=ok)
        gl.store(o_ptr + 7 * CHUNK, o7 * inv, mask=ok)
        if TIMING:
            gl.store(Timing + 5, _now())

    @gluon.jit
    def _stage1_ws(
        QL, QR, c_desc, r_desc, Mask, Len, O_part, Lse,
        stride_qlb, stride_qlt, stride_qlh, stride_qrb, stride_qrt, stride_qrh,
        stride_mb, stride_mt, stride_ms,
        stride_lb,
        stride_ob, stride_om, stride_os,
        stride_lseb, stride_lsem,
        S, T, H, M, split_len, sm_scale_log2, Timing, ql_desc, qr_desc,
        NBUF: gl.constexpr, MASK_MODE: gl.constexpr, ONE_TOKEN: gl.constexpr, HAS_LEN: gl.constexpr,
        PDL: gl.constexpr,
        TIMING: gl.constexpr = False, Q_TMA: gl.constexpr = False,
    ):
        """Grid ``(splits, B)``. ``MASK_MODE``: 0 none (causal, aligned at the end), 1 bool (read as bytes), 2
        additive, ``Mask[b·stride_mb + t·stride_mt + s·stride_ms]``; ``ONE_TOKEN``: ``T == 1`` (one mask row per
        tile). ``HAS_LEN``: ``Len[b · stride_lb]`` bounds the tokens read. ``TIMING`` (a diagnostic): each program
        writes 136 int64 to ``Timing[program]``: global-timer nanoseconds at entry, after the PDL wait, queries
        stored, first tile's scores done, loop done, partial written; its SM; one unused; then for each of the
        first 32 tiles: before its scores, scores done, softmax done, output products done."""
        if TIMING:
            Timing = Timing + (gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)) * 136
            gl.store(Timing + 0, _now())
            gl.store(Timing + 6, gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32,
                                                           is_pure=False, pack=1).to(gl.int64))
        if PDL:
            _pdl_enter()
        if TIMING:
            gl.store(Timing + 1, _now())
        dtype: gl.constexpr = c_desc.dtype
        pid_s = gl.program_id(0)
        b = gl.program_id(1)
        b64 = b.to(gl.int64)

        # The queries: with Q_TMA the loader's first copies; else their loads go out first, before the barriers
        # are set up and the loader starts (behind the loader's first copies, 160 KiB per SM, they took 4-7 µs on
        # an H200, decode_select.run15/16). By TMA, 1-4% faster at batch 1-64 (decode_select.run23).
        if Q_TMA:
            q_chunks = (0, 0, 0, 0, 0, 0, 0, 0, 0)  # unused: the consumer waits for the loader's copies
        else:
            ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
            q_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld))
            q_ch = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, ld))
            q_t = q_rows // H
            q_h = q_rows - q_t * H
            q_ok = (q_rows < M)[:, None]
            ql_ptr = QL + b64 * stride_qlb + (q_t * stride_qlt + q_h * stride_qlh)[:, None] + q_ch[None, :]
            qr = gl.load(QR + b64 * stride_qrb + (q_t * stride_qrt + q_h * stride_qrh)[:, None] + q_ch[None, :],
                         mask=q_ok, other=0.0)
            q0 = gl.load(ql_ptr + 0 * CHUNK, mask=q_ok, other=0.0)
            q1 = gl.load(ql_ptr + 1 * CHUNK, mask=q_ok, other=0.0)
            q2 = gl.load(ql_ptr + 2 * CHUNK, mask=q_ok, other=0.0)
            q3 = gl.load(ql_ptr + 3 * CHUNK, mask=q_ok, other=0.0)
            q4 = gl.load(ql_ptr + 4 * CHUNK, mask=q_ok, other=0.0)
            q5 = gl.load(ql_ptr + 5 * CHUNK, mask=q_ok, other=0.0)
            q6 = gl.load(ql_ptr + 6 * CHUNK, mask=q_ok, other=0.0)
            q7 = gl.load(ql_ptr + 7 * CHUNK, mask=q_ok, other=0.0)
            q_chunks = (qr, q0, q1, q2, q3, q4, q5, q6, q7)

        kv_len = S
        if HAS_LEN:
            kv_len = gl.minimum(gl.load(Len + b64 * stride_lb).to(gl.int32), S)
        start = pid_s * split_len
        end = gl.minimum(start + split_len, kv_len)
        n_tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)
        D: gl.constexpr = NBUF // 9  # tiles in the ring: the helpers take this depth
        ring = gl.allocate_shared_memory(dtype, [9 * D, BLOCK_N, CHUNK], c_desc.layout)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, CHUNK], dtype)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, ROWS], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [9, ROWS, CHUNK], q_sl)
        p_buf = gl.allocate_shared_memory(dtype, [BLOCK_N, ROWS], p_sl)
        # Barriers: ready[p] (one array per chunk position p, D deep) and empty[g] (the rope chunk, latent chunks 1-4,
        # 5-8): one array per position so that consecutive waits touch different allocations and Triton's barrier
        # pass adds no bar.sync between them (module docstring). ready[0][D]: the queries' barrier with Q_TMA. It
        # sits in an array that stays allocated to the end: an initialised mbarrier whose memory the compiler hands
        # to something else (a separate allocation, unused after the queries, was) is undefined behaviour, and
        # measured as the last bit of head 0 changing from call to call on an H200 (decode_select.run26-28)
        bl: gl.constexpr = mbarrier.MBarrierLayout()
        ready = (gl.allocate_shared_memory(gl.int64, [D + 1, 1], bl), gl.allocate_shared_memory(gl.int64, [D, 1], bl),
                 gl.allocate_shared_memory(gl.int64, [D, 1], bl), gl.allocate_shared_memory(gl.int64, [D, 1], bl),
                 gl.allocate_shared_memory(gl.int64, [D, 1], bl), gl.allocate_shared_memory(gl.int64, [D, 1], bl),
                 gl.allocate_shared_memory(gl.int64, [D, 1], bl), gl.allocate_shared_memory(gl.int64, [D, 1], bl),
                 gl.allocate_shared_memory(gl.int64, [D, 1], bl))
        empty = (gl.allocate_shared_memory(gl.int64, [D, 1], bl), gl.allocate_shared_memory(gl.int64, [D, 1], bl),
                 gl.allocate_shared_memory(gl.int64, [D, 1], bl))
        for k in gl.static_range(D):
            for p in gl.static_range(9):
                mbarrier.init(ready[p].index(k), count=1)
            for g in gl.static_range(3):
                mbarrier.init(empty[g].index(k), count=1)
        q_bar = ready[0].index(D)
        if Q_TMA:
            mbarrier.init(q_bar, count=1)
        fence_async_shared()

        o_base = b64 * stride_ob + pid_s * stride_os
        lse_base = b64 * stride_lseb + pid_s  # Lse [B, M, splits], splits contiguous
        gl.warp_specialize([
            (_consumer, (q_chunks, q_smem, ring, ready, empty, p_buf, O_part, Lse,
                         Mask, b64 * stride_mb, stride_mt, stride_ms, start, end, n_tiles, M, T, kv_len,
                         sm_scale_log2, o_base, lse_base, stride_om, stride_lsem, Timing, q_bar, D, MASK_MODE,
                         ONE_TOKEN, TIMING, Q_TMA)),
            (_loader, (c_desc, r_desc, ring, ready, empty, b * S, start, n_tiles, ql_desc, qr_desc, q_smem, q_bar, b,
                       D, Q_TMA)),
        ], [1], [24])


def nvmma_layout(dtype: torch.dtype):
    """The shared-memory layout of one ``[64 tokens, 64 channels]`` ring slot (128-byte swizzle)."""
    return gl.NVMMASharedLayout.get_default_for([TILE_TOKENS, 64], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def descriptors(latent: torch.Tensor, k_rope: torch.Tensor):
    """TMA descriptors of the latent and rope caches as 2-D ``[B·S, channels]`` tensors, ``[64, 64]`` boxes."""
    b, s, r = latent.shape
    layout = nvmma_layout(latent.dtype)
    c_desc = TensorDescriptor(latent, [b * s, r], [latent.stride(1), 1], [TILE_TOKENS, 64], layout)
    r_desc = TensorDescriptor(k_rope, [b * s, k_rope.shape[-1]], [k_rope.stride(1), 1], [TILE_TOKENS, 64], layout)
    return c_desc, r_desc


def q_descriptors(ql: torch.Tensor, qr: torch.Tensor):
    """TMA descriptors ``(latent part, rope part)`` of one query token's rows, ``[B, H, channels]`` through the
    queries' batch and head strides (the absorbed path's head-major products and contiguous ones alike),
    ``[1, 32, 64]`` boxes: heads past ``H`` are outside the tensor, so the copy fills them with zeros. ``None``
    where TMA cannot address them (strides or base not 16-byte aligned)."""
    b, _, h, _ = ql.shape
    if any(x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16 or (x.stride(2) * x.element_size()) % 16
           for x in (ql, qr)):
        return None
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=ql.element_size() * 8, rank=3)
    return tuple(TensorDescriptor(x, [b, h, x.shape[-1]], [x.stride(0), x.stride(2), 1], [1, ROW_BLOCK, 64], layout)
                 for x in (ql, qr))


def launch_stage1(ql, qr, latent, k_rope, o_part, lse, t, h, m_rows, split_len, num_splits, sm_scale_log2,
                  *, mask_mode: int = 0, mask_t: torch.Tensor | None = None, mask_strides: tuple = (0, 0, 0),
                  len_t: torch.Tensor | None = None, len_stride: int = 0, nbuf: int = DEFAULT_NBUF,
                  pdl: bool = False, timing: torch.Tensor | None = None, q_tma: bool = True) -> None:
    """Launch stage 1 over grid ``(num_splits, B)``: the partials ``o_part [B, M, splits, r]`` (float32) and
    ``lse [B, M, splits]`` (splits contiguous), as `mla_decode._stage1_fn` writes them. The mask and the length
    come as `mla_decode.decode_attention_triton` prepares them for either stage 1: ``mask_mode`` (0 none, 1 bool
    read as bytes, 2 additive), ``mask_t`` ``[B or 1, T, S]`` with ``mask_strides`` (0 where broadcast); ``len_t``
    (flat int tensor) with ``len_stride`` (0: one length for all rows). ``q_tma``: one query token's rows come
    by TMA where `q_descriptors` can describe them (else, and with ``False``, by loads). ``timing`` (a
    diagnostic, int64 ``[B · num_splits, 136]``): per-program timestamps, see `_stage1_ws`."""
    assert lse.stride(-1) == 1
    if nbuf not in RING_SLOTS_ALLOWED:
        raise ValueError(f"the warp-specialised stage 1 takes {' or '.join(map(str, RING_SLOTS_ALLOWED))} ring "
                         f"slots (whole tiles of 9 chunks within a block's shared memory), not {nbuf}")
    b, s = latent.shape[0], latent.shape[1]
    c_desc, r_desc = descriptors(latent, k_rope)
    qd = q_descriptors(ql, qr) if q_tma and t == 1 else None
    kw = {"launch_pdl": True} if pdl else {}
    _stage1_ws[(num_splits, b)](
        ql, qr, c_desc, r_desc, lse if mask_t is None else mask_t, lse if len_t is None else len_t, o_part, lse,
        ql.stride(0), ql.stride(1), ql.stride(2), qr.stride(0), qr.stride(1), qr.stride(2),
        *mask_strides,
        len_stride,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        s, t, h, m_rows, split_len, sm_scale_log2, lse if timing is None else timing,
        *(qd if qd is not None else (c_desc, c_desc)),
        NBUF=nbuf, MASK_MODE=mask_mode, ONE_TOKEN=t == 1, HAS_LEN=len_t is not None, PDL=pdl,
        TIMING=timing is not None, Q_TMA=qd is not None, num_warps=4, **kw,
    )
