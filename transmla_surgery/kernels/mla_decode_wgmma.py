"""Hopper (sm_90) stage 1 of the absorbed-MLA decode, written in Gluon: warpgroup MMA on token-major tiles fed
by a fine-grained ring of asynchronous copies.

Same contract and the same partial outputs as `mla_decode._stage1_fn` (float32 ``O_part [B, M, splits, r]`` and
base-2 ``Lse [B, M, splits]``), so `mla_decode`'s split chooser and merge kernel are shared. What differs is how
one tile of ``BLOCK_N = 64`` cached tokens is processed:

* **Token-major products.** Scores are computed transposed, ``Sᵀ [64 tokens, rows] = K · Qᵀ``, so the MMA's
  M dimension is the 64 tokens of a tile (warpgroup MMA needs M = 64; a decode step has only ``rows = H·T <= 32``
  query rows). The output is accumulated transposed too, ``Oᵀ [r, rows] += Vᵀ · Pᵀ``, as ``r / 64``
  accumulators of ``[64, rows]``. Each operand is read from shared memory once per tile by the tensor cores
  (the `mma.sync` kernel re-reads the tile and the queries through registers once per warp).
* **A ring of 8 KiB chunks.** A tile is 9 chunks of ``[64 tokens, 64 channels]``: the rope key first, then the
  8 latent chunks. The ring holds ``NBUF`` chunks (22 by default: 176 KiB, beside 36 KiB of queries); a chunk's
  slot is refilled with the chunk ``NBUF`` places later as soon as the products reading it have finished, the
  rope chunk right after the scores, the latent chunks after their output products. While one tile is being
  multiplied about 1.4 more are in flight; whole-tile buffers leave room for one (two tiles of 72 KiB and the
  queries fill the 227 KiB a block may use).
* Every chunk copy is masked past the split's end (zero-filled, no memory traffic), so each loop iteration
  issues exactly 9 copy groups and the number of groups to wait for is a compile-time constant.

Supports the DeepSeek geometry ``r = 512``, ``d_rope = 64`` in bfloat16/float16 with at most 32 query rows;
`supported` says when, and the caller falls back to the Triton kernel otherwise. Gluon has no CPU interpreter:
the CPU test suite compiles this kernel for sm_90 (`tests/test_kernel_compile.py`); its numerics are checked on
a Hopper GPU by `bench/decode.py`.
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except Exception:  # pragma: no cover - triton absent or without Gluon
    gluon = None

DEFAULT_NBUF = 22


def available() -> bool:
    return gluon is not None


def supported(q_lat: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> bool:
    """Whether this kernel handles the call: a Hopper GPU, 16-bit cache, ``r = 512``, ``d_rope = 64``, at most 32
    query rows (``T·H``)."""
    if gluon is None or not latent.is_cuda:
        return False
    if torch.cuda.get_device_capability(latent.device)[0] != 9:
        return False
    b, t, h, r = q_lat.shape
    return (latent.dtype in (torch.bfloat16, torch.float16) and r == 512 and k_rope.shape[-1] == 64
            and t * h <= 32 and latent.stride(-1) == 1 and k_rope.stride(-1) == 1)


if gluon is not None:
    BLOCK_N = gl.constexpr(64)  # tokens per tile: the M of one warpgroup MMA
    CHUNK = gl.constexpr(64)  # channels per ring chunk (128 bytes of bfloat16: one swizzle row)

    @gluon.jit
    def _issue_chunk(ring, slot, C, KR, c_base, r_base, stride_cs, stride_rs, tile_start, end,
                     PART: gl.constexpr, ld_layout: gl.constexpr):
        """One ``[64 tokens, 64 channels]`` chunk into ring slot ``slot`` as one copy group (part 0: rope key,
        part p >= 1: latent channels ``64(p-1) .. 64p``); tokens at or past ``end`` are zero-filled."""
        tok = tile_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld_layout))
        ch = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, ld_layout))
        ok = (tok < end)[:, None]
        if PART == 0:
            ptrs = KR + r_base + tok[:, None] * stride_rs + ch[None, :]
        else:
            ptrs = C + c_base + tok[:, None] * stride_cs + ((PART - 1) * CHUNK + ch)[None, :]
        cp.async_copy_global_to_shared(ring.index(slot), ptrs, mask=ok)
        cp.commit_group()

    @gluon.jit
    def _scores(ring, q_smem, first, NBUF: gl.constexpr, BLOCK_H: gl.constexpr, mma: gl.constexpr):
        """Issue ``Sᵀ [64 tokens, rows] = Σ_p K_p · Q_pᵀ`` over the 9 chunks from ring position ``first``
        (asynchronous: 9 MMA groups, the caller waits)."""
        s = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma)
        s = warpgroup_mma(ring.index(first % NBUF), q_smem.index(0).permute((1, 0)), s, use_acc=False,
                          is_async=True)
        for p in gl.static_range(1, 9):
            s = warpgroup_mma(ring.index((first + p) % NBUF), q_smem.index(p).permute((1, 0)), s, is_async=True)
        return s

    @gluon.jit
    def _stage1_wgmma(
        QL, QR, C, KR, Mask, Len, O_part, Lse,
        stride_qlb, stride_qlt, stride_qlh, stride_qrb, stride_qrt, stride_qrh,
        stride_cb, stride_cs,
        stride_rb, stride_rs,
        stride_mb, stride_mt, stride_ms,
        stride_lb,
        stride_ob, stride_om, stride_os,
        stride_lseb, stride_lsem,
        S, T, H, M, split_len, sm_scale_log2,
        BLOCK_H: gl.constexpr, NBUF: gl.constexpr, MASK_MODE: gl.constexpr, HAS_LEN: gl.constexpr,
        PDL: gl.constexpr,
    ):
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
        dtype: gl.constexpr = C.dtype.element_ty
        pid_s = gl.program_id(0)
        b = gl.program_id(1).to(gl.int64)

        # ---- layouts: the MMA result (token-major), copies (16 bytes per thread), output stores
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_H, 16])
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        st: gl.constexpr = gl.BlockedLayout([4, 1], [16, 2], [1, 4], [0, 1])
        tok_l: gl.constexpr = gl.SliceLayout(1, mma)
        row_l: gl.constexpr = gl.SliceLayout(0, mma)
        chunk_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, CHUNK], dtype)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, CHUNK], dtype)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_H], dtype)

        ring = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, CHUNK], chunk_sl)
        q_smem = gl.allocate_shared_memory(dtype, [9, BLOCK_H, CHUNK], q_sl)
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_H], p_sl)

        kv_len = S
        if HAS_LEN:
            kv_len = gl.minimum(gl.load(Len + b * stride_lb).to(gl.int32), S)
        start = pid_s * split_len
        end = gl.minimum(start + split_len, kv_len)
        n_tiles = gl.cdiv(end - start, BLOCK_N)
        c_base = b * stride_cb
        r_base = b * stride_rb

        # ---- prologue: the first NBUF chunks in flight before anything waits
        for k in gl.static_range(NBUF):
            _issue_chunk(ring, k, C, KR, c_base, r_base, stride_cs, stride_rs, start + (k // 9) * BLOCK_N, end,
                         k % 9, ld)

        # ---- queries: chunk 0 the rope part, chunks 1..8 the latent part, rows past M zero
        q_rows = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld))
        q_ch = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, ld))
        q_t = q_rows // H
        q_h = q_rows - q_t * H
        q_ok = (q_rows < M)[:, None]
        qr = gl.load(QR + b * stride_qrb + (q_t * stride_qrt + q_h * stride_qrh)[:, None] + q_ch[None, :],
                     mask=q_ok, other=0.0)
        q_smem.index(0).store(qr)
        for c in gl.static_range(8):
            ql = gl.load(QL + b * stride_qlb + (q_t * stride_qlt + q_h * stride_qlh)[:, None] + (c * CHUNK + q_ch)[None, :],
                         mask=q_ok, other=0.0)
            q_smem.index(c + 1).store(ql)

        rows = gl.arange(0, BLOCK_H, layout=row_l)
        row_ok = rows < M
        t_row = rows // H
        row_limit = kv_len - T + t_row + 1  # causal limit without a mask (aligned at the end)
        tok0 = gl.arange(0, BLOCK_N, layout=tok_l)

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=row_l)
        l_i = gl.zeros([BLOCK_H], gl.float32, layout=row_l)
        o0 = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma)
        o1 = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma)
        o2 = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma)
        o3 = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma)
        o4 = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma)
        o5 = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma)
        o6 = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma)
        o7 = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma)
        fence_async_shared()
        gl.thread_barrier()

        for i in range(n_tiles):
            base = 9 * i
            offs = start + i * BLOCK_N + tok0
            valid = (offs < end)[:, None] & row_ok[None, :]
            # the mask tile is loaded first: its latency then overlaps the wait and the score products
            if MASK_MODE == 1:
                mv = gl.load(Mask + b * stride_mb + t_row[None, :] * stride_mt + offs[:, None] * stride_ms,
                             mask=valid, other=0)
            elif MASK_MODE == 2:
                bias = gl.load(Mask + b * stride_mb + t_row[None, :] * stride_mt + offs[:, None] * stride_ms,
                               mask=valid, other=0.0)
            # tile i's 9 chunks have landed once at most NBUF - 9 younger groups are pending
            cp.wait_group(NBUF - 9)
            fence_async_shared()  # the copies wrote through the generic proxy; the MMA reads through the async one
            gl.thread_barrier()

            s = _scores(ring, q_smem, base, NBUF, BLOCK_H, mma)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            gl.thread_barrier()
            # the rope chunk is free: refill it with the chunk NBUF places later
            _issue_chunk(ring, base % NBUF, C, KR, c_base, r_base, stride_cs, stride_rs,
                         start + (i + NBUF // 9) * BLOCK_N, end, NBUF % 9, ld)

            qk = s * sm_scale_log2
            if MASK_MODE == 0:
                valid = valid & (offs[:, None] < row_limit[None, :])
            elif MASK_MODE == 1:
                valid = valid & (mv != 0)
            else:
                # clamp first: the dtype's most negative value times log2(e) would overflow float32
                qk = qk + gl.maximum(bias.to(gl.float32), -1.0e30) * 1.4426950408889634
            qk = gl.where(valid, qk, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(qk, 0))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: keep exp2 finite
            alpha = gl.exp2(m_i - m_safe)
            p_t = gl.exp2(qk - m_safe[None, :])
            l_i = l_i * alpha + gl.sum(p_t, 0)
            m_i = m_new
            p_smem.store(p_t.to(dtype))
            fence_async_shared()
            gl.thread_barrier()

            # output, token-major: Oᵀ_c = α·Oᵀ_c + V_cᵀ · Pᵀ for the 8 latent chunks
            a = alpha[None, :]
            o0 = warpgroup_mma(ring.index((base + 1) % NBUF).permute((1, 0)), p_smem, o0 * a, is_async=True)
            o1 = warpgroup_mma(ring.index((base + 2) % NBUF).permute((1, 0)), p_smem, o1 * a, is_async=True)
            o2 = warpgroup_mma(ring.index((base + 3) % NBUF).permute((1, 0)), p_smem, o2 * a, is_async=True)
            o3 = warpgroup_mma(ring.index((base + 4) % NBUF).permute((1, 0)), p_smem, o3 * a, is_async=True)
            o4 = warpgroup_mma(ring.index((base + 5) % NBUF).permute((1, 0)), p_smem, o4 * a, is_async=True)
            o5 = warpgroup_mma(ring.index((base + 6) % NBUF).permute((1, 0)), p_smem, o5 * a, is_async=True)
            o6 = warpgroup_mma(ring.index((base + 7) % NBUF).permute((1, 0)), p_smem, o6 * a, is_async=True)
            o7 = warpgroup_mma(ring.index((base + 8) % NBUF).permute((1, 0)), p_smem, o7 * a, is_async=True)
            o0, o1, o2, o3 = warpgroup_mma_wait(num_outstanding=4, deps=(o0, o1, o2, o3))
            gl.thread_barrier()
            for j in gl.static_range(1, 5):
                _issue_chunk(ring, (base + j) % NBUF, C, KR, c_base, r_base, stride_cs, stride_rs,
                             start + (i + (NBUF + j) // 9) * BLOCK_N, end, (NBUF + j) % 9, ld)
            o4, o5, o6, o7 = warpgroup_mma_wait(num_outstanding=0, deps=(o4, o5, o6, o7))
            gl.thread_barrier()
            for j in gl.static_range(5, 9):
                _issue_chunk(ring, (base + j) % NBUF, C, KR, c_base, r_base, stride_cs, stride_rs,
                             start + (i + (NBUF + j) // 9) * BLOCK_N, end, (NBUF + j) % 9, ld)

        cp.wait_group(0)  # the masked copies past the end still write their zeros

        has = l_i > 0.0
        inv = 1.0 / gl.where(has, l_i, 1.0)
        lse = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
        gl.store(Lse + b * stride_lseb + rows * stride_lsem + pid_s, lse, mask=row_ok)

        s_rows = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, st))
        s_ch = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, st))
        o_base = O_part + b * stride_ob + pid_s * stride_os + s_rows[None, :] * stride_om + s_ch[:, None]
        s_ok = (s_rows < M)[None, :]
        inv_b = inv[None, :]
        gl.store(o_base + 0 * CHUNK, gl.convert_layout(o0 * inv_b, st), mask=s_ok)
        gl.store(o_base + 1 * CHUNK, gl.convert_layout(o1 * inv_b, st), mask=s_ok)
        gl.store(o_base + 2 * CHUNK, gl.convert_layout(o2 * inv_b, st), mask=s_ok)
        gl.store(o_base + 3 * CHUNK, gl.convert_layout(o3 * inv_b, st), mask=s_ok)
        gl.store(o_base + 4 * CHUNK, gl.convert_layout(o4 * inv_b, st), mask=s_ok)
        gl.store(o_base + 5 * CHUNK, gl.convert_layout(o5 * inv_b, st), mask=s_ok)
        gl.store(o_base + 6 * CHUNK, gl.convert_layout(o6 * inv_b, st), mask=s_ok)
        gl.store(o_base + 7 * CHUNK, gl.convert_layout(o7 * inv_b, st), mask=s_ok)
