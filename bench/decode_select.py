"""Which decode-kernel configuration for which amount of work, and what the decode step's small kernels cost
(issue 4). One GPU call:

    PYTHONUNBUFFERED=1 python bench/decode_select.py --out bench/results     # writes decode_select.json

1. ``rope``: the fused RoPE launch (`kernels.rope`) against PyTorch's formula at the end-to-end batches: bitwise
   equality in bf16 and time per call (back-to-back CUDA-graph replays, `decode.time_graph`); and the launch that
   also writes a static cache layer (`MLAStaticCache.rotate_and_update`) against RoPE then transformers' update.
   ``bmm``: the per-head up-projections around the kernel, as the library writes them and one alternative.
   ``proj``: ``q_proj`` and ``kv_a_proj_with_mqa`` as two products and as one (`fuse_input_projections`).
   ``length``: the attention call as ``generate`` makes it (the static cache's length and a bool padding mask)
   against the bare call of the end-to-end harness, per configuration.
2. ``attention``: the attention call alone at the goal's shapes and the Llama-3-8B shape's end-to-end batch at
   8K: the library's automatic choice (`mla_decode.auto_config`), the two configurations it chooses between, and
   one-block-per-SM variants with 32-token tiles.
3. ``ws``, ``wsfixed``, ``wstiming``: the warp-specialised Gluon stage 1 (`kernels/mla_decode_ws.py`): checks
   against the float64 reference, bitwise repeatability (eager and CUDA graph), time per call beside the Triton
   stage 1; where a batch-16 call's fixed
   cost goes (contexts from one tile to 32K, stage 1 alone and whole, one call per graph and eight over eight
   caches); per-program global-timer stamps (queries, first tile, loop, epilogue, and per tile: scores,
   softmax, outputs). ``floor``: what reading a batch-16 × 8K cache costs with nothing else (a read-only Triton
   kernel at 128 to 528 programs, ``torch.sum``, ``copy_``) beside the attention call.
4. ``e2e``: Llama-3-8B and Llama-2-7B shapes at 8K, original against converted (`decode.time_decode`, the same
   harness as decode.py): the library as it is, without the RoPE-and-write launch, without the fused input
   projections, without both (run 7's code), each step's time recorded.
Earlier calls of this script, each on a fresh H200 (bench/results/decode.md): runs 6 and 7,
``decode_select.run1.json`` … ``.run6.json`` (explicit split counts, the fused RoPE, the per-head products,
16-bit partials, 16-row head blocks, balanced schedules computed in the kernel, lazy rescaling, the streamed
schedule); run 8, ``decode_select.run7.json`` … ``.run9.json`` (the RoPE-and-write launch, the fused input
projections, 32-token tiles; a merge applying ``W_UV``, commit ab881b9, slower; per-step times),
``.run10.json`` … ``.run12.json`` (``length``: before, with two changes that did not help, after the padding
classification and the split schedule for calls with a length); runs 9-10, ``.run13.json`` … ``.run20.json``
(the warp-specialised stage 1's design steps, decode.md); runs 11-12, ``.run21`` … ``.run37`` (queries by TMA,
bitwise repeatability; the floors, the merge inside stage 1, overlapped output products, score accumulators:
the commits named in decode.md have the switches since removed); run 13, ``.run38``; later, ``.run39`` …
``.run51`` (two multiplying warpgroups, PDL prefetch, 16-bit partials, the first tile alone, L2 prefetch, the
merge inside thread-block clusters: each variant in a commit and its revert, named in decode.md).
Prints a short table last. ``--smoke`` runs tiny shapes on any device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as D  # noqa: E402  (harness: copy ceiling, timer, model shapes, step function)

import transmla_surgery.cache as cache_mod  # noqa: E402
from transmla_surgery.kernels import decode_attention_reference, rope_into_cache  # noqa: E402
from transmla_surgery.kernels.reference import apply_rope_torch  # noqa: E402

ROWS: list[dict] = []


def log(msg: str) -> None:
    print(f"[{time.time() - D.START:6.1f}s] {msg}", flush=True)


def rope_section(dev: torch.device, smoke: bool) -> None:
    from transmla_surgery.cache import MLAStaticLayer
    from transmla_surgery.kernels.rope import apply_rope_triton

    dtype = torch.bfloat16
    for b in ((3,) if smoke else (54, 191, 205)):
        h, d = 32, 64
        q = torch.randn(b, 1, h, 192, device=dev, dtype=dtype)
        kv = torch.randn(b, 1, 576, device=dev, dtype=dtype)
        ang = torch.rand(b, 1, 128, device=dev) * 6
        cos, sin = ang.cos().to(dtype)[..., ::2].unsqueeze(1), ang.sin().to(dtype)[..., ::2].unsqueeze(1)
        q_rope, k_rope = q.transpose(1, 2)[..., 128:], kv[..., 512:].view(b, 1, 1, d)
        qo, ko = apply_rope_triton(q_rope, k_rope, cos, sin)
        same = torch.equal(qo, apply_rope_torch(q_rope, cos, sin)) and torch.equal(ko, apply_rope_torch(k_rope, cos, sin))
        t_fused = D.time_graph(lambda: apply_rope_triton(q_rope, k_rope, cos, sin), dev, reps=200)
        t_torch = D.time_graph(lambda: (apply_rope_torch(q_rope, cos, sin), apply_rope_torch(k_rope, cos, sin)), dev, reps=200)
        # the rotation and the static cache's update: one launch against the rope launch and transformers' update
        layer = MLAStaticLayer(256, b, 512, d, dtype, dev)
        latent = kv[..., :512].view(b, 1, 1, 512)

        def fused():
            layer.cumulative_length.fill_(5)
            return layer.rotate_and_update(q_rope, latent, k_rope, cos, sin)

        def separate():
            layer.cumulative_length.fill_(5)
            qo, ko = apply_rope_triton(q_rope, k_rope, cos, sin)
            return layer.update(latent, ko)

        fused()
        snap = (layer.keys.clone(), layer.values.clone(), int(layer.cumulative_length))
        separate()
        same_cache = torch.equal(layer.keys, snap[0]) and torch.equal(layer.values, snap[1]) and snap[2] == int(layer.cumulative_length)
        t_rc = D.time_graph(fused, dev, reps=200)
        t_sep = D.time_graph(separate, dev, reps=200)
        ROWS.append(dict(kind="rope", batch=b, bitwise_equal=same, fused_us=t_fused * 1e3, torch_us=t_torch * 1e3,
                         rope_into_cache_us=t_rc * 1e3, rope_then_update_us=t_sep * 1e3, cache_equal=same_cache))
        log(f"rope B={b:4d}: fused {t_fused * 1e3:6.2f} us, PyTorch formula {t_torch * 1e3:6.2f} us, bitwise equal: {same}; "
            f"with the cache write {t_rc * 1e3:6.2f} us against rope + update {t_sep * 1e3:6.2f} us (same cache: {same_cache})")


def bmm_section(dev: torch.device, smoke: bool) -> None:
    """The per-head up-projections around the kernel at the end-to-end batches: as the library does them (output
    written straight into `o_proj`'s layout with `bmm(out=)`) against a contiguous product and a copy."""
    from types import SimpleNamespace

    from transmla_surgery.absorbed import absorb_query, expand_output

    h, dn, dv, r = (4, 16, 16, 32) if smoke else (32, 128, 128, 512)
    w = torch.randn(h * (dn + dv), r, device=dev, dtype=torch.bfloat16) * 0.02
    mod = SimpleNamespace(num_heads=h, qk_nope_head_dim=dn, v_head_dim=dv, kv_lora_rank=r, kv_b_proj=SimpleNamespace(weight=w))
    w_uv = w.view(h, dn + dv, r)[:, dn:]
    for b in ((3,) if smoke else (54, 191, 205)):
        q = torch.randn(b, 1, h, dn + 64, device=dev, dtype=torch.bfloat16)
        q_nope = q.transpose(1, 2)[..., :dn]
        o_lat = torch.randn(h, b, 1, r, device=dev, dtype=torch.bfloat16).permute(1, 2, 0, 3)

        def contiguous_then_copy():
            o = o_lat.permute(2, 0, 1, 3).reshape(h, b, r)
            return torch.bmm(o, w_uv.transpose(1, 2)).transpose(0, 1).reshape(b, 1, h * dv)

        t_abs = D.time_graph(lambda: absorb_query(mod, q_nope), dev, reps=200)
        t_out = D.time_graph(lambda: expand_output(mod, o_lat), dev, reps=200)
        t_alt = D.time_graph(contiguous_then_copy, dev, reps=200)
        same = torch.equal(expand_output(mod, o_lat), contiguous_then_copy())
        ROWS.append(dict(kind="bmm", batch=b, absorb_us=t_abs * 1e3, expand_out_us=t_out * 1e3, expand_copy_us=t_alt * 1e3, equal=same))
        log(f"bmm B={b:4d}: absorb {t_abs * 1e3:6.2f} us; expand with out= {t_out * 1e3:6.2f} us, contiguous + copy "
            f"{t_alt * 1e3:6.2f} us (equal: {same})")


def proj_section(dev: torch.device, smoke: bool) -> None:
    """The converted layer's two input projections at the end-to-end batches: ``q_proj`` (hidden → H·(d_nope +
    d_rope)) and ``kv_a_proj_with_mqa`` (hidden → r + d_rope) as two products, as one product on the concatenated
    weight, and the small one computed transposed."""
    import torch.nn.functional as F

    hidden, q_out, kv_out = (64, 4 * 24, 40) if smoke else (4096, 32 * 192, 576)
    wq = torch.randn(q_out, hidden, device=dev, dtype=torch.bfloat16) * 0.02
    wkv = torch.randn(kv_out, hidden, device=dev, dtype=torch.bfloat16) * 0.02
    wcat = torch.cat([wq, wkv])
    for b in ((3,) if smoke else (54, 191, 205)):
        x = torch.randn(b, 1, hidden, device=dev, dtype=torch.bfloat16)
        t_q = D.time_graph(lambda: F.linear(x, wq), dev, reps=200)
        t_kv = D.time_graph(lambda: F.linear(x, wkv), dev, reps=200)
        t_both = D.time_graph(lambda: (F.linear(x, wq), F.linear(x, wkv)), dev, reps=200)
        t_cat = D.time_graph(lambda: F.linear(x, wcat), dev, reps=200)
        t_kv_t = D.time_graph(lambda: torch.mm(wkv, x.view(b, hidden).t()).t(), dev, reps=200)
        ROWS.append(dict(kind="proj", batch=b, q_us=t_q * 1e3, kv_a_us=t_kv * 1e3, both_us=t_both * 1e3,
                         fused_us=t_cat * 1e3, kv_a_transposed_us=t_kv_t * 1e3))
        log(f"proj B={b:4d}: q_proj {t_q * 1e3:6.2f} us, kv_a {t_kv * 1e3:6.2f} us (transposed {t_kv_t * 1e3:6.2f}), "
            f"both {t_both * 1e3:6.2f} us, one fused product {t_cat * 1e3:6.2f} us")


def attention_section(dev: torch.device, copy_bw: float, smoke: bool) -> None:
    from transmla_surgery.kernels import mla_decode as md

    one = md.DEFAULT_CONFIG
    two = md.LARGE_WORK_CONFIG
    # the library's automatic choice (`config=None`) and the two configurations it chooses between
    variants = [("auto", None), ("1/SM", one), ("2/SM", two),
                ("1/SM 32x4", replace(one, block_n=32, num_stages=4)), ("1/SM 32x5", replace(one, block_n=32, num_stages=5))]
    # (batch, context): decode.py's end-to-end shapes (largest batch in 70 GiB, prompt + 128) and the goal's shapes
    shapes = [(2, 256), (4, 512)] if smoke else [(16, 8192), (64, 8192), (16, 32768), (191, 8320)]
    heads, r, dr = 32, 512, 64
    scale = 192**-0.5
    dtype = torch.bfloat16
    for b, s in shapes:
        nbytes = D.mla_call_bytes(b, s, heads, r, dr)
        q_lat = torch.randn(b, 1, heads, r, device=dev, dtype=dtype)
        q_rope = torch.randn(b, 1, heads, dr, device=dev, dtype=dtype)
        kv = torch.randn(b, s, r + dr, device=dev, dtype=dtype)
        ref = decode_attention_reference(q_lat[:1].float(), q_rope[:1].float(), kv[:1, :, :r].float(), kv[:1, :, r:].float(), scale)
        for label, cfg in variants:
            try:
                out = md.decode_attention_triton(q_lat, q_rope, kv[..., :r], kv[..., r:], scale, config=cfg)
                err = D.rel(out[:1], ref)
                ms = D.time_graph(lambda: md.decode_attention_triton(q_lat, q_rope, kv[..., :r], kv[..., r:], scale, config=cfg), dev, reps=25)
            except Exception as exc:  # record and go on
                log(f"attention B={b} S={s} {label}: failed {repr(exc)[:150]}")
                continue
            used_cfg = cfg or md.auto_config(b, 1, s)
            hb = -(-heads // used_cfg.block_h)
            splits = md.choose_num_splits(b, hb, s, used_cfg.block_n, 132 * used_cfg.ctas_per_sm, block_rows=used_cfg.block_h)
            ROWS.append(dict(kind="attention", batch=b, context=s, variant=label, config=asdict(used_cfg), splits=splits, us=ms * 1e3,
                             TBps=nbytes / (ms * 1e-3) / 1e12, fraction_of_copy=nbytes / (ms * 1e-3) / copy_bw, rel_err=err))
            log(f"attention B={b:5d} S={s:6d} {label:20s} splits={splits:2d} {ms * 1e3:8.1f} us "
                f"{nbytes / (ms * 1e-3) / 1e12:5.2f} TB/s ({nbytes / (ms * 1e-3) / copy_bw:5.1%}) err={err:.1e}")
        del q_lat, q_rope, kv
        D.free(dev)


WSVAR_CASES = [(16, 1, 32, 8192, torch.bfloat16, None, None, None), (4, 1, 32, 4099, torch.bfloat16, None, None, None),
               (3, 1, 32, 2000, torch.bfloat16, 8, "rows", None), (5, 2, 16, 777, torch.float16, 3, None, "additive"),
               (6, 1, 32, 1500, torch.bfloat16, 4, "rows", "bool"), (2, 1, 32, 700, torch.bfloat16, 2, None, None),
               (2, 1, 32, 1300, torch.bfloat16, 9, None, None), (1, 1, 8, 3000, torch.float16, 7, "one", None),
               (3, 1, 16, 2500, torch.bfloat16, None, None, None), (2, 1, 32, 40000, torch.bfloat16, 20, None, None),
               (64, 1, 32, 2048, torch.bfloat16, None, None, None)]


def ws_section(dev: torch.device, copy_bw: float, smoke: bool) -> None:
    """The warp-specialised Gluon stage 1 (`mla_decode_ws`), as the library runs it: checked against the float64
    reference (lengths with NaN past them, bool and additive masks, two query tokens, 8 and 16 heads, head-major
    queries, explicit split counts), the same call three times and a CUDA graph replayed five times bitwise equal
    to the first call; then timed beside the Triton stage 1, interleaved, twice, as graphs over distinct caches.
    (Earlier calls of this section compared switches since settled: runs 13-20, 21-22 (commit abe846f: one ready
    barrier per tile, the merge inside stage 1, tiles shared dynamically), 23 and 25 (commit 222859b: the queries
    by TMA, the merge's partials loaded with their log-sum-exps, partials relaid through shared memory); runs
    24, 26-28 the determinism bisection.)"""
    from transmla_surgery.kernels import mla_decode as md

    heads, r, dr = 32, 512, 64
    scale = 192**-0.5
    cases = WSVAR_CASES
    torch.manual_seed(0)
    for label, cfg in (("library", md.DEFAULT_CONFIG),):
        for b, t, h, s, dtype, splits, lens, mkind in cases:
            if b == 16:  # head-major queries, as the absorbed path hands them over
                q_lat = torch.randn(h, b, t, r, device=dev, dtype=dtype).permute(1, 2, 0, 3)
                q_rope = torch.randn(h, b, t, dr, device=dev, dtype=dtype).permute(1, 2, 0, 3)
            else:
                q_lat = torch.randn(b, t, h, r, device=dev, dtype=dtype)
                q_rope = torch.randn(b, t, h, dr, device=dev, dtype=dtype)
            kv = torch.randn(b, s, r + dr, device=dev, dtype=dtype)
            lat, kr = kv[..., :r], kv[..., r:]
            kv_len = None
            if lens == "rows":
                kv_len = torch.randint(s // 3, s + 1, (b,), device=dev)
                kv_len[0] = 1  # most splits of this row empty
                for i in range(b):
                    kv[i, int(kv_len[i]):] = float("nan")  # past the length: never read
            elif lens == "one":
                kv_len = torch.tensor(s - 100, device=dev)
            mask = None
            if mkind == "bool":
                mask = torch.ones(b, t, s, dtype=torch.bool, device=dev)
                mask[:, :, : s // 5] = False
                mask[1, :, :] = True
            elif mkind == "additive":
                mask = torch.randn(b, t, s, device=dev, dtype=dtype)
            ref_mask = mask
            if kv_len is not None:  # the reference sees the length as a mask (and the NaN rows as zeros)
                keep = torch.arange(s, device=dev)[None, :] < kv_len.reshape(-1, 1).expand(b, 1)
                kvz = torch.where(keep[..., None], kv, torch.zeros_like(kv))
                lat_r, kr_r = kvz[..., :r], kvz[..., r:]
                lm = keep[:, None, :].expand(b, t, s)
                if mask is None:
                    ref_mask = lm
                elif mask.dtype == torch.bool:
                    ref_mask = mask & lm
                else:
                    ref_mask = torch.where(lm, mask, torch.full_like(mask, float("-inf")))
            else:
                lat_r, kr_r = lat, kr
            ref = decode_attention_reference(q_lat.double(), q_rope.double(), lat_r.double(), kr_r.double(), scale,
                                             None if ref_mask is None else (ref_mask if ref_mask.dtype == torch.bool else ref_mask.double()))
            try:
                outs = [md.decode_attention_triton(q_lat, q_rope, lat, kr, scale, mask, kv_len, num_splits=splits,
                                                   config=cfg) for _ in range(3)]
                err = max(D.rel(o, ref) for o in outs)
                same = all(torch.equal(outs[0], o) for o in outs[1:])
                graph = torch.cuda.CUDAGraph()
                static = {}
                with torch.cuda.graph(graph):
                    static["o"] = md.decode_attention_triton(q_lat, q_rope, lat, kr, scale, mask, kv_len,
                                                             num_splits=splits, config=cfg)
                for _ in range(5):
                    graph.replay()
                torch.cuda.synchronize(dev)
                same = same and torch.equal(static["o"], outs[0])
                if not same:  # where the calls differ
                    for k, o in enumerate(outs[1:] + [static["o"]], 1):
                        d = (o.float() - outs[0].float()).abs().nan_to_num(123.0)
                        if d.max() > 0:
                            at = torch.nonzero(d > 0)
                            log(f"  call {k} differs: max {float(d.max()):.3e} at {int(at.shape[0])} places, rows "
                                f"{sorted(set(at[:, 0].tolist()))[:6]} heads {sorted(set(at[:, 2].tolist()))[:6]}; "
                                f"lengths {None if kv_len is None else kv_len.tolist()}")
                ok = err < 1e-2 and same
            except Exception as exc:
                err, ok, same = float("nan"), False, False
                log(f"ws check {label} B={b} T={t} S={s}: failed {repr(exc)[:300]}")
            used = md._ws.supported(q_lat, q_rope, lat, kr, mask, kv_len)
            ok = ok and used
            ROWS.append(dict(kind="ws_check", variant=label, used_ws=used, batch=b, tokens=t, heads=h, context=s,
                             dtype=str(dtype), splits=splits, lengths=lens, mask=mkind, rel_err=err,
                             repeat_and_graph_equal=same, ok=ok))
            log(f"ws check {label:13s} B={b:2d} T={t} H={h:2d} S={s:5d} splits={splits} len={lens} mask={mkind}"
                f" err={err:.2e} same={same} {'OK' if ok else 'FAIL'}")
    shapes = [(1, 8192), (16, 4096), (16, 8192), (16, 32768), (54, 8320), (64, 8192), (191, 8320), (64, 32768)]
    variants = [("Triton stage 1", replace(md.DEFAULT_CONFIG, ring_slots=0)), ("library", md.DEFAULT_CONFIG)]
    dtype = torch.bfloat16
    for b, s in shapes:
        nbytes = D.mla_call_bytes(b, s, heads, r, dr)
        copies = max(1, min(8, -(-(256 << 20) // nbytes)))
        q_lat = [torch.randn(b, 1, heads, r, device=dev, dtype=dtype) for _ in range(copies)]
        q_rope = [torch.randn(b, 1, heads, dr, device=dev, dtype=dtype) for _ in range(copies)]
        kv = [torch.randn(b, s, r + dr, device=dev, dtype=dtype) for _ in range(copies)]
        for rep in range(2):
            for label, cfg in variants:
                try:
                    ms = D.time_graph(lambda: [md.decode_attention_triton(q_lat[i], q_rope[i], kv[i][..., :r], kv[i][..., r:], 0.07, config=cfg)
                                               for i in range(copies)], dev, reps=30, inner=copies)
                except Exception as exc:
                    log(f"ws time B={b} S={s} {label}: failed {repr(exc)[:200]}")
                    continue
                ROWS.append(dict(kind="ws_time", batch=b, context=s, variant=label, rep=rep, us=ms * 1e3,
                                 TBps=nbytes / (ms * 1e-3) / 1e12, fraction_of_copy=nbytes / (ms * 1e-3) / copy_bw))
                log(f"ws time B={b:4d} S={s:6d} {label:14s} {ms * 1e3:8.1f} us {nbytes / (ms * 1e-3) / 1e12:5.2f} TB/s "
                    f"({nbytes / (ms * 1e-3) / copy_bw:5.1%})")
        del q_lat, q_rope, kv
        D.free(dev)


def floor_section(dev: torch.device, copy_bw: float, smoke: bool) -> None:
    """How fast the bytes of a batch-16 × 8K call can be read at all: a Triton kernel that only reads the
    ``[B·S, 576]`` bfloat16 cache (a float32 checksum per program), its rows cut into ``P`` equal contiguous ranges
    (128: the attention's 16 rows × 8 splits; 132: one per SM; 264, 528: two and four programs per SM), beside
    `torch.sum` of the cache, a ``copy_`` of it (cache-sized, not the 2 GiB of the copy ceiling) and the
    library's attention call, interleaved, as graphs over distinct caches like `ws`."""
    import triton
    import triton.language as tl

    from transmla_surgery.kernels import mla_decode as md

    if md._interpreting():  # the smoke run on a CPU
        md._patch_interpreter_for_numpy2()

    @triton.jit
    def read_rows(X, Out, rows_per_prog, n_rows, BLOCK: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        r0 = pid * rows_per_prog
        r1 = tl.minimum(r0 + rows_per_prog, n_rows)
        offs_r = tl.arange(0, BLOCK)
        offs_c = tl.arange(0, 64)
        acc = tl.zeros([BLOCK, 64], tl.float32)
        for r in tl.range(r0, r1, BLOCK, num_stages=STAGES):
            rows = r + offs_r
            ok = (rows < r1)[:, None]
            base = X + rows.to(tl.int64)[:, None] * 576 + offs_c[None, :]
            for c in tl.static_range(9):
                acc += tl.load(base + c * 64, mask=ok, other=0.0).to(tl.float32)
        tl.store(Out + pid, tl.sum(acc))

    heads, r, dr = 32, 512, 64
    b, s = (2, 256) if smoke else (16, 8192)
    dtype = torch.bfloat16
    cache_bytes = b * s * (r + dr) * 2
    nbytes = D.mla_call_bytes(b, s, heads, r, dr)
    copies = max(1, min(8, -(-(256 << 20) // nbytes)))
    kv = [torch.randn(b, s, r + dr, device=dev, dtype=dtype) for _ in range(copies)]
    q_lat = [torch.randn(b, 1, heads, r, device=dev, dtype=dtype) for _ in range(copies)]
    q_rope = [torch.randn(b, 1, heads, dr, device=dev, dtype=dtype) for _ in range(copies)]
    dst = torch.empty_like(kv[0])
    sums = torch.empty(1024, device=dev, dtype=torch.float32)
    n_rows = b * s
    # the checksum of the read kernel against torch's (so the reads are real)
    read_rows[(128,)](kv[0], sums, n_rows // 128, n_rows, BLOCK=32, STAGES=4, num_warps=4)
    check = float(sums[:128].double().sum()) / float(kv[0].double().sum())
    ROWS.append(dict(kind="floor_check", what="read kernel checksum / torch sum", ratio=check, ok=abs(check - 1) < 1e-3))
    log(f"floor: read kernel checksum / torch sum = {check:.6f}")
    variants = {}
    for progs in (128, 132, 264, 528):
        for block, stages in ((32, 4), (64, 3)):
            per = -(-n_rows // progs)
            variants[f"read P={progs} block={block} stages={stages}"] = (
                lambda per=per, progs=progs, block=block, stages=stages:
                [read_rows[(progs,)](kv[i], sums, per, n_rows, BLOCK=block, STAGES=stages, num_warps=4)
                 for i in range(copies)])
    variants["torch.sum (float32)"] = lambda: [kv[i].sum(dtype=torch.float32) for i in range(copies)]
    variants["copy_ of the cache (read + write)"] = lambda: [dst.copy_(kv[i]) for i in range(copies)]
    variants["attention, library"] = lambda: [md.decode_attention_triton(q_lat[i], q_rope[i], kv[i][..., :r],
                                                                         kv[i][..., r:], 0.07) for i in range(copies)]
    for rep in range(2):
        for what, fn in variants.items():
            ms = D.time_graph(fn, dev, reps=30, inner=copies)
            moved = 2 * cache_bytes if what.startswith("copy_") else (nbytes if what.startswith("attention") else cache_bytes)
            ROWS.append(dict(kind="floor", what=what, rep=rep, batch=b, context=s, us=ms * 1e3, bytes=moved,
                             TBps=moved / (ms * 1e-3) / 1e12, fraction_of_copy=moved / (ms * 1e-3) / copy_bw))
            log(f"floor B={b} S={s} {what:36s} {ms * 1e3:7.1f} us {moved / (ms * 1e-3) / 1e12:5.2f} TB/s "
                f"({moved / (ms * 1e-3) / copy_bw:5.1%} of the copy ceiling)")
    del kv, q_lat, q_rope, dst
    D.free(dev)


def _stage1_inputs(dev: torch.device, b: int, s: int, layers: int):
    """Queries, ``layers`` distinct caches (a model's layers) and the partial buffers of one split-schedule call
    of the warp-specialised stage 1: ``(q_lat, q_rope, caches, splits, split_len, o_part, lse)``."""
    from transmla_surgery.kernels import mla_decode as md

    heads, r, dr = 32, 512, 64
    dtype = torch.bfloat16
    q_lat = torch.randn(b, 1, heads, r, device=dev, dtype=dtype)
    q_rope = torch.randn(b, 1, heads, dr, device=dev, dtype=dtype)
    kvs = [torch.randn(b, s, r + dr, device=dev, dtype=dtype) for _ in range(layers)]
    splits = md.choose_num_splits(b, 1, s, 64, 132)
    split_len = -(-(-(-s // splits)) // 64) * 64
    splits = -(-s // split_len)
    o_part = torch.empty(b, heads, splits, r, device=dev, dtype=torch.float32)
    lse = torch.empty(b, heads, splits, device=dev, dtype=torch.float32)
    return q_lat, q_rope, kvs, splits, split_len, o_part, lse


def wsfixed_section(dev: torch.device, copy_bw: float, smoke: bool) -> None:
    """Where a call's fixed cost goes: the warp-specialised stage 1 at batch 16 over a range of contexts, whole
    and stage 1 alone, timed as back-to-back replays of a one-call graph and as graphs of 8 calls over 8
    distinct caches (the layers of a model's decode step); an empty graph's replay; split counts at 16 × 8K."""
    from transmla_surgery.kernels import mla_decode as md

    heads, r, dr = 32, 512, 64
    cfg_ws = replace(md.DEFAULT_CONFIG, ring_slots=18)
    cfg_triton = replace(md.DEFAULT_CONFIG, ring_slots=0)
    x = torch.zeros(16, device=dev)
    ms = D.time_graph(lambda: x.add_(1), dev, reps=50)
    ROWS.append(dict(kind="wsfixed", what="empty graph (one tiny kernel)", us=ms * 1e3))
    log(f"wsfixed: one tiny kernel per replay {ms * 1e3:6.1f} us")
    layers = 8
    b = 16
    for s in (64, 2048, 8192, 32768):
        nbytes = b * s * (r + dr) * 2
        q_lat, q_rope, kvs, splits, split_len, o_part, lse = _stage1_inputs(dev, b, s, layers)

        def whole(kv, cfg):
            return md.decode_attention_triton(q_lat, q_rope, kv[..., :r], kv[..., r:], 0.07, config=cfg)

        def stage1(kv):
            md._ws.launch_stage1(q_lat, q_rope, kv[..., :r], kv[..., r:], o_part, lse, 1, heads, heads, split_len,
                                 splits, 0.1, nbuf=18, pdl=True)

        timings = {
            "ws whole, 1 per graph": D.time_graph(lambda: whole(kvs[0], cfg_ws), dev, reps=50),
            "ws whole, 8 per graph": D.time_graph(lambda: [whole(kv, cfg_ws) for kv in kvs], dev, reps=20, inner=layers),
            "ws stage 1, 1 per graph": D.time_graph(lambda: stage1(kvs[0]), dev, reps=50),
            "ws stage 1, 8 per graph": D.time_graph(lambda: [stage1(kv) for kv in kvs], dev, reps=20, inner=layers),
            "triton 1/SM whole, 1 per graph": D.time_graph(lambda: whole(kvs[0], cfg_triton), dev, reps=50),
            "triton 1/SM whole, 8 per graph": D.time_graph(lambda: [whole(kv, cfg_triton) for kv in kvs], dev, reps=20, inner=layers),
        }
        for what, ms in timings.items():
            ROWS.append(dict(kind="wsfixed", what=what, batch=b, context=s, splits=splits, us=ms * 1e3,
                             fraction_of_copy=nbytes / (ms * 1e-3) / copy_bw))
            log(f"wsfixed B={b} S={s:6d} splits={splits:2d} {what:32s} {ms * 1e3:8.1f} us ({nbytes / (ms * 1e-3) / copy_bw:5.1%})")
        if s == 8192:
            for sp in (8,):
                for label, cfg in (("ws", cfg_ws), ("triton 1/SM", cfg_triton)):
                    ms = D.time_graph(lambda: [md.decode_attention_triton(q_lat, q_rope, kv[..., :r], kv[..., r:], 0.07, num_splits=sp, config=cfg) for kv in kvs], dev, reps=20, inner=layers)
                    ROWS.append(dict(kind="wsfixed", what=f"{label} splits={sp}, 8 per graph", batch=b, context=s, splits=sp,
                                     us=ms * 1e3, fraction_of_copy=nbytes / (ms * 1e-3) / copy_bw))
                    log(f"wsfixed B={b} S={s} {label} splits={sp:2d}, 8 per graph {ms * 1e3:8.1f} us ({nbytes / (ms * 1e-3) / copy_bw:5.1%})")
        del kvs, q_lat, q_rope
        D.free(dev)


def wstiming_section(dev: torch.device, copy_bw: float, smoke: bool) -> None:
    """Per-program global-timer stamps of the warp-specialised stage 1 (`launch_stage1(timing=...)`) in a graph of
    8 stage-1 launches over 8 caches: launch spread, PDL wait, query load, first tile, loop, epilogue, end spread
    and the gap to the next launch, in microseconds."""
    from transmla_surgery.kernels import mla_decode as md

    heads, r = 32, 512
    layers = 8
    for b, s, q_tma in ((16, 8192, False), (16, 8192, True), (64, 8192, True)):
        q_lat, q_rope, kvs, splits, split_len, o_part, lse = _stage1_inputs(dev, b, s, layers)
        stamps = torch.zeros(layers, b * splits, 136, device=dev, dtype=torch.int64)

        def run():
            for i, kv in enumerate(kvs):
                md._ws.launch_stage1(q_lat, q_rope, kv[..., :r], kv[..., r:], o_part, lse, 1, heads, heads,
                                     split_len, splits, 0.1, nbuf=18, pdl=True, timing=stamps[i], q_tma=q_tma)

        ms = D.time_graph(run, dev, reps=10, inner=layers)
        st = stamps.double().cpu()
        t0 = st[:, :, 0].min()
        info = []
        for i in range(layers):
            x = (st[i] - t0) / 1e3  # µs since the first program's entry
            e0, e1, q, f, lp, ep = (x[:, k] for k in range(6))
            nxt = ((st[i + 1, :, 0].min() - t0) / 1e3).item() if i + 1 < layers else float("nan")
            row = dict(layer=i, entry_min=e0.min().item(), entry_spread=(e0.max() - e0.min()).item(),
                       pdl_wait_med=(e1 - e0).median().item(), q_med=(q - e1).median().item(),
                       first_tile_med=(f - q).median().item(), first_tile_max=(f - q).max().item(),
                       loop_min=(lp - f).min().item(), loop_med=(lp - f).median().item(), loop_max=(lp - f).max().item(),
                       epilogue_med=(ep - lp).median().item(), epilogue_max=(ep - lp).max().item(),
                       end_med=ep.median().item(), end_max=ep.max().item(), next_entry=nxt,
                       sms=int(torch.unique(st[i, :, 6]).numel()))
            # per tile: waiting for data + scores, softmax, output products; medians over programs, µs
            tiles = min(32, -(-split_len // 64))
            pt = (st[i, :, 8:8 + 4 * tiles].view(-1, tiles, 4) / 1e3)
            row["tile_scores_med"] = [round(v, 3) for v in (pt[:, :, 1] - pt[:, :, 0]).median(0).values.tolist()]
            row["tile_softmax_med"] = [round(v, 3) for v in (pt[:, :, 2] - pt[:, :, 1]).median(0).values.tolist()]
            row["tile_output_med"] = [round(v, 3) for v in (pt[:, :, 3] - pt[:, :, 2]).median(0).values.tolist()]
            row["tile_period_med"] = [round(v, 3) for v in (pt[:, 1:, 0] - pt[:, :-1, 0]).median(0).values.tolist()]
            if i in (2, 5):  # per program: SM, batch row, split, first tile, loop (µs): where the spread comes from
                row["programs"] = [dict(sm=int(st[i, k, 6]), row=k // splits, split=k % splits,
                                        first=round(float((f - q)[k]), 3), loop=round(float((lp - f)[k]), 3),
                                        end=round(float(ep[k]), 3))
                                   for k in range(st.shape[1])]
            info.append(row)
        ROWS.append(dict(kind="wstiming", batch=b, context=s, splits=splits, queries_by_tma=q_tma,
                         us_per_call=ms * 1e3, layers=info))
        log(f"wstiming B={b} S={s} splits={splits} programs={b * splits} queries by TMA={q_tma}: {ms * 1e3:.1f} us per call")
        for row in info[2:3]:
            log("  " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                if not isinstance(v, list)))
            for k in ("tile_scores_med", "tile_softmax_med", "tile_output_med", "tile_period_med"):
                log(f"  {k}: {row[k][:20]}")
        del kvs
        D.free(dev)


def set_fused_projections(model: torch.nn.Module, on: bool) -> None:
    """Fuse the converted blocks' input projections, or give each its own buffer again (two products)."""
    from transmla_surgery import MLAAttention, fuse_input_projections

    if on:
        fuse_input_projections(model)
        return
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, MLAAttention)):
            for lin in block._input_projections():
                lin.weight.data = lin.weight.data.clone()
    D.free(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


def length_section(dev: torch.device, copy_bw: float, smoke: bool) -> None:
    """The attention call as `generate` makes it: with the static cache's filled length (``kv_len``) and a bool
    padding mask, against the bare call the end-to-end harness makes (no mask, no length), per configuration."""
    from transmla_surgery.kernels import mla_decode as md

    heads, r, dr = (4, 32, 16) if smoke else (32, 512, 64)
    dtype = torch.bfloat16
    shapes = [(3, 256)] if smoke else [(191, 8320), (64, 32768), (16, 8192)]
    for b, s in shapes:
        q_lat = torch.randn(b, 1, heads, r, device=dev, dtype=dtype)
        q_rope = torch.randn(b, 1, heads, dr, device=dev, dtype=dtype)
        kv = torch.randn(b, s, r + dr, device=dev, dtype=dtype)
        n_len = torch.tensor(s, device=dev)
        mask = torch.ones(b, 1, s, dtype=torch.bool, device=dev)
        mask[:, :, :7] = False  # left padding
        nbytes = b * s * (r + dr) * 2
        # the library's choice (the warp-specialised stage 1 where it applies), and the Triton stage 1 as run 8's
        # library chose it
        for label, cfg in (("auto", None), ("Triton 1/SM", replace(md.DEFAULT_CONFIG, ring_slots=0)),
                           ("Triton 2/SM", replace(md.LARGE_WORK_CONFIG, ring_slots=0))):
            row = dict(kind="length", batch=b, context=s, variant=label)
            for name, m, n in (("bare", None, None), ("kv_len", None, n_len), ("kv_len+mask", mask, n_len)):
                ms = D.time_graph(lambda: md.decode_attention_triton(q_lat, q_rope, kv[..., :r], kv[..., r:], 0.07, m, n,
                                                                     config=cfg), dev, reps=25)
                row[f"{name}_us"] = ms * 1e3
            ROWS.append(row)
            log(f"length B={b:4d} S={s:6d} {label:14s} bare {row['bare_us']:7.1f} us, with kv_len {row['kv_len_us']:7.1f} us, "
                f"with kv_len and a mask {row['kv_len+mask_us']:7.1f} us ({nbytes / (row['kv_len+mask_us'] * 1e-6) / copy_bw:5.1%})")
        del q_lat, q_rope, kv
        D.free(dev)


def e2e_section(dev: torch.device, copy_bw: float, smoke: bool) -> None:
    from transformers import LlamaForCausalLM

    from transmla_surgery.kernels import mla_decode as md

    default, large = md.DEFAULT_CONFIG, md.LARGE_WORK_CONFIG
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    prompt, new = (48, 4) if smoke else (8192, 128)
    ctx = prompt + new
    limit = (8 << 20) if smoke else 70 * D.GiB
    rank, rope = (32, 8) if smoke else (512, 64)
    for name in ("llama3-8b", "llama2-7b"):
        cfg = D.llama_config(name, smoke)
        model = D.build_on_device(LlamaForCausalLM, cfg, dev, dtype)
        g, hd, layers = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers
        for side in ("original", "mla"):
            if side == "mla":
                D.swap_in_mla(model, rank, rope, dev, dtype)
            per_token = layers * (2 * g * hd if side == "original" else rank + rope) * 2
            w_all = D.param_bytes(model, read_per_step=False)
            batch = int((limit - w_all) // (ctx * per_token))
            # (label, (default, large-work) configurations, rope and cache write in one launch, input projections
            # as one product)
            variants = [("stock", None, True, True)] if side == "original" else [
                ("library", (default, large), True, True),
                ("two input products", (default, large), True, False),
                ("separate rope+update", (default, large), False, True),
                ("neither (run 7)", (default, large), False, False),
                ("library", (default, large), True, True),
            ]
            for label, kcfg, fused, fused_proj in variants:
                if kcfg is not None:
                    md.DEFAULT_CONFIG, md.LARGE_WORK_CONFIG = kcfg
                cache_mod.rope_into_cache = rope_into_cache if fused else (lambda *args: None)
                if side == "mla":
                    set_fused_projections(model, fused_proj)
                cache = D.filled_cache(model, cfg, side, batch, ctx, dev, dtype)
                t = D.time_decode(model, cache, batch, prompt, new, dev)
                ROWS.append(dict(kind="e2e", model=name, side=side, variant=label, batch=batch, context=ctx,
                                 configs=None if kcfg is None else [asdict(c) for c in kcfg], **t))
                st = t["steps_ms"]
                log(f"e2e {name} {side:8s} B={batch:4d} {label:24s} {t['tokens_per_s']:9.1f} tok/s {t['ms_per_step_mean']:7.2f} ms/step"
                    f" (median {t['ms_per_step_median']:.2f}; steps 0-3 {[round(x, 2) for x in st[:4]]}, min {min(st):.2f}, max {max(st):.2f};"
                    f" by quarter {[round(sum(st[i:i + len(st) // 4]) / max(1, len(st) // 4), 2) for i in range(0, len(st), max(1, len(st) // 4))]})")
                del cache
                D.free(dev)
        md.DEFAULT_CONFIG, md.LARGE_WORK_CONFIG, cache_mod.rope_into_cache = default, large, rope_into_cache
        del model
        D.free(dev)


def table() -> str:
    lines = []
    shapes = sorted({(r["batch"], r["context"]) for r in ROWS if r["kind"] == "ws_time"})
    labels = list(dict.fromkeys(r["variant"] for r in ROWS if r["kind"] == "ws_time"))
    if shapes:
        lines.append("us per call (share of copy) " + " ".join(f"{f'B{b}x{s}':>15s}" for b, s in shapes))
        for lab in labels:
            cells = []
            for b, s in shapes:
                rs = [r for r in ROWS if r["kind"] == "ws_time" and r["variant"] == lab and (r["batch"], r["context"]) == (b, s)]
                r = min(rs, key=lambda r: r["us"]) if rs else None  # the better of the interleaved repeats
                cells.append(f"{r['us']:7.1f} ({r['fraction_of_copy']:4.0%})" if r else " " * 15)
            lines.append(f"{lab:27s} " + " ".join(f"{c:>15s}" for c in cells))
        checks = [r for r in ROWS if r["kind"] == "ws_check"]
        lines.append(f"ws checks: {sum(r['ok'] for r in checks)} of {len(checks)} passed")
    floors = [r for r in ROWS if r["kind"] == "floor"]
    for what in dict.fromkeys(r["what"] for r in floors):
        r = min((x for x in floors if x["what"] == what), key=lambda x: x["us"])
        lines.append(f"floor B{r['batch']}x{r['context']} {what:36s} {r['us']:7.1f} us {r['TBps']:5.2f} TB/s "
                     f"({r['fraction_of_copy']:4.0%})")
    for name in ("llama3-8b", "llama2-7b"):
        rows = [r for r in ROWS if r["kind"] == "e2e" and r["model"] == name]
        base = next((r for r in rows if r["side"] == "original"), None)
        for r in rows:
            ratio = "" if base is None or r is base else f"  {r['tokens_per_s'] / base['tokens_per_s']:5.2f}x"
            lines.append(f"{name:9s} {r['side']:8s} {r['variant']:24s} B={r['batch']:4d} {r['ms_per_step_mean']:7.2f} ms {r['tokens_per_s']:9.1f} tok/s{ratio}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sections", default="rope,bmm,proj,length,attention,e2e")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.smoke:
        raise SystemExit("decode_select.py times Triton kernels: it needs a CUDA GPU")
    meta = dict(device=D.device_name(dev), torch=torch.__version__, command=" ".join(sys.argv))
    log(str(meta))
    copy_bw = D.measure_copy(dev, args.smoke)
    meta["copy_GBps"] = copy_bw / 1e9
    for section in args.sections.split(","):
        {"rope": lambda: rope_section(dev, args.smoke), "bmm": lambda: bmm_section(dev, args.smoke),
         "proj": lambda: proj_section(dev, args.smoke), "length": lambda: length_section(dev, copy_bw, args.smoke),
         "attention": lambda: attention_section(dev, copy_bw, args.smoke),
         "ws": lambda: ws_section(dev, copy_bw, args.smoke),
         "wsfixed": lambda: wsfixed_section(dev, copy_bw, args.smoke),
         "wstiming": lambda: wstiming_section(dev, copy_bw, args.smoke),
         "floor": lambda: floor_section(dev, copy_bw, args.smoke),

         "e2e": lambda: e2e_section(dev, copy_bw, args.smoke)}[section]()
        (out / "decode_select.json").write_text(json.dumps({"meta": meta, "rows": ROWS}, indent=1))
    print("\n" + table(), flush=True)


if __name__ == "__main__":
    main()
