"""First look at the Gluon warpgroup-MMA decode kernel on a Hopper GPU, before `bench/decode.py` relies on it.

Checks `decode_attention_triton(..., config=KernelConfig(wgmma=True))` against the float32 PyTorch reference
(bf16 and fp16; no mask, bool and float masks; a NaN-poisoned tail past the length bound; 8 to 32 query rows;
1 to 64 splits), then times it against the library default at batch 16 and 64 × 8K (CUDA graphs, inputs
rotated past the L2 cache). Meant to run under `timeout`: a kernel that hangs must not take the whole GPU call
with it. Exit status 0 only when every check passed.

    timeout 150 python bench/decode_wgmma_smoke.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transmla_surgery.kernels import mla_decode as md  # noqa: E402
from transmla_surgery.kernels import mla_decode_wgmma as wg  # noqa: E402
from transmla_surgery.kernels.reference import decode_attention_reference  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def main() -> int:
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name(dev)}; gluon kernel available: {wg.available()}", flush=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    cfg = md.KernelConfig(wgmma=True, num_stages=3)
    ok_all = True
    cases = [  # (B, T, H, S, dtype, mask, bounded, splits)
        (4, 1, 32, 4099, torch.bfloat16, None, False, None),
        (2, 1, 32, 64, torch.bfloat16, None, False, None),
        (3, 1, 32, 1000, torch.bfloat16, "bool", True, None),
        (2, 2, 16, 777, torch.bfloat16, "float", False, None),
        (1, 1, 8, 2048, torch.float16, "bool", False, 64),
        (5, 1, 32, 300, torch.float16, None, False, 1),
        (16, 1, 32, 8192, torch.bfloat16, None, False, None),
        (2, 1, 32, 5000, torch.bfloat16, "bool", True, 7),
    ]
    for b, t, h, s, dtype, mask_kind, bounded, splits in cases:
        q_lat = torch.randn(b, t, h, 512, generator=g).to(dev, dtype)
        q_rope = torch.randn(b, t, h, 64, generator=g).to(dev, dtype)
        buf = torch.randn(b, s, 576, generator=g).to(dev, dtype)
        mask, kv_len, filled = None, None, s
        if mask_kind is not None:
            keep = torch.rand(b, t, s, generator=g) > 0.2
            keep[..., -1] = True
            if bounded:
                filled = s - 100
                buf[:, filled:] = float("nan")  # must never be read
                keep[..., filled:] = False
                keep[..., filled - 1] = True
                kv_len = torch.tensor(filled, device=dev)
            keep = keep.to(dev)
            mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, device=dev, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
        ref = decode_attention_reference(
            q_lat.float(), q_rope.float(), buf[:, :filled, :512].float(), buf[:, :filled, 512:].float(), 0.07,
            None if mask is None else (mask[..., :filled] if mask.dtype == torch.bool else mask[..., :filled].float()),
        )
        used = wg.supported(q_lat, buf[..., :512], buf[..., 512:])
        t0 = time.time()
        try:
            out = md.decode_attention_triton(q_lat, q_rope, buf[..., :512], buf[..., 512:], 0.07, mask, kv_len,
                                             num_splits=splits, config=cfg)
            torch.cuda.synchronize()
            err = rel(out, ref)
            ok = bool(torch.isfinite(out).all()) and err < (2e-2 if dtype == torch.bfloat16 else 5e-3)
        except Exception as exc:
            err, ok = float("nan"), False
            print(f"  failed: {type(exc).__name__}: {str(exc)[:600]}", flush=True)
        ok_all &= ok
        print(f"B={b} T={t} H={h} S={s} {dtype} mask={mask_kind} bounded={bounded} splits={splits} gluon={used}: "
              f"rel err {err:.2e} {'OK' if ok else 'FAIL'} ({time.time() - t0:.1f}s)", flush=True)
    if not ok_all:
        print("SMOKE FAILED", flush=True)
        return 1

    # a CUDA-graph replay with PDL launches equals the eager call
    b, s = 16, 8192
    ql = torch.randn(b, 1, 32, 512, device=dev, dtype=torch.bfloat16)
    qr = torch.randn(b, 1, 32, 64, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(b, s, 576, device=dev, dtype=torch.bfloat16)
    for name, c in (("wgmma+pdl", md.KernelConfig(wgmma=True, pdl=True)), ("default+pdl", md.KernelConfig(num_stages=3, pdl=True))):
        eager = md.decode_attention_triton(ql, qr, kv[..., :512], kv[..., 512:], 0.07, config=c).clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = md.decode_attention_triton(ql, qr, kv[..., :512], kv[..., 512:], 0.07, config=c)
        graph.replay()
        torch.cuda.synchronize()
        same = torch.equal(out, eager)
        ok_all &= same
        print(f"{name}: CUDA-graph replay equals eager: {same}", flush=True)
        del graph

    # timing: CUDA-graph replays over copies that exceed the L2 cache
    configs = [("default 64/4/3", md.DEFAULT_CONFIG), ("default+pdl", md.KernelConfig(num_stages=3, pdl=True)),
               ("wgmma nbuf22", cfg), ("wgmma nbuf22+pdl", md.KernelConfig(wgmma=True, pdl=True)),
               ("wgmma nbuf20+pdl", md.KernelConfig(wgmma=True, pdl=True, nbuf=20)),
               ("wgmma nbuf18+pdl", md.KernelConfig(wgmma=True, pdl=True, nbuf=18))]
    table = {}
    shapes = ((1, 8192), (16, 4096), (16, 8192), (64, 8192), (191, 8320), (16, 32768), (64, 32768))
    for b, s in shapes:
        nbytes = b * s * 576 * 2
        n = max(1, min(32, (256 << 20) // nbytes + 1))
        ql = [torch.randn(b, 1, 32, 512, device=dev, dtype=torch.bfloat16) for _ in range(n)]
        qr = [torch.randn(b, 1, 32, 64, device=dev, dtype=torch.bfloat16) for _ in range(n)]
        kv = [torch.randn(b, s, 576, device=dev, dtype=torch.bfloat16) for _ in range(n)]
        for name, c in configs:
            try:
                fn = lambda: [md.decode_attention_triton(ql[i], qr[i], kv[i][..., :512], kv[i][..., 512:], 192**-0.5, config=c) for i in range(n)]
                fn()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                graph.replay()
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(20):
                    graph.replay()
                e1.record()
                e1.synchronize()
                table[(name, b, s)] = e0.elapsed_time(e1) / (20 * n) * 1e3
                del graph
            except Exception as exc:
                print(f"  {name} B={b} S={s} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        del ql, qr, kv
        torch.cuda.empty_cache()
    copy_bw = 4.25e12
    print(f"\nus per call (share of {copy_bw / 1e12:.2f} TB/s):", flush=True)
    print(f"{'kernel':20s} " + " ".join(f"{f'B{b}x{s // 1024}K':>15s}" for b, s in shapes), flush=True)
    for name, _ in configs:
        cells = []
        for b, s in shapes:
            us = table.get((name, b, s))
            cells.append(f"{us:7.1f} ({b * s * 1152 / (us * 1e-6) / copy_bw:4.0%})" if us else f"{'-':>15s}")
        print(f"{name:20s} " + " ".join(cells), flush=True)
    print("SMOKE OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
