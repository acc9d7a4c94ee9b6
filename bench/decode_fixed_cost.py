"""Where the fixed cost of a decode-attention call goes (issue 4): stage 1 alone against stage 1 + merge, over
contexts, for a few kernel configurations and split counts.

    PYTHONUNBUFFERED=1 python3 bench/decode_fixed_cost.py --out $OUT      # GPU; writes decode_fixed_cost.json

For each configuration and batch, the calls are timed at 4K, 8K, 16K and 32K cached tokens (32 heads, 512+64,
bf16) as back-to-back CUDA-graph replays (inputs rotated past the L2 cache, as `bench/decode.py` does), once
whole and once with the merge launch left out. A least-squares line through time against context gives the
streaming rate (its slope, as TB/s of cache read) and the fixed cost (its value at zero tokens); the difference
between the two timings is the merge's share. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as D  # noqa: E402  (the harness's timer: back-to-back CUDA-graph replays, median of 5 groups)

from transmla_surgery.kernels import mla_decode as md  # noqa: E402

_KERNELS = md._kernels  # gives the real (stage 1, merge) pair; put back after each stage-1-only timing


class _NoLaunch:
    """Stands in for the merge kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b·x``: ``(a, b)``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    K = md.KernelConfig
    configs = [("default", md.DEFAULT_CONFIG, None), ("2-stage occ2", K(num_stages=2, ctas_per_sm=2, pdl=True), None),
               ("default splits=4", md.DEFAULT_CONFIG, 4), ("2-stage occ2 splits=2", K(num_stages=2, ctas_per_sm=2, pdl=True), 2),
               ("2-stage occ2 splits=8", K(num_stages=2, ctas_per_sm=2, pdl=True), 8)]
    contexts = (4096, 8192, 16384, 32768)
    real = md._kernels(False)
    rows = []
    for batch in (16, 64):
        for s in contexts:
            nbytes = batch * s * 576 * 2
            n = max(1, min(32, -(-(256 << 20) // nbytes)))
            ql = [torch.randn(batch, 1, 32, 512, device=dev, dtype=torch.bfloat16) for _ in range(n)]
            qr = [torch.randn(batch, 1, 32, 64, device=dev, dtype=torch.bfloat16) for _ in range(n)]
            kv = [torch.randn(batch, s, 576, device=dev, dtype=torch.bfloat16) for _ in range(n)]
            for name, cfg, splits in configs:
                for merge in (True, False):
                    if not merge:
                        md._kernels = lambda interpret, _r=real: (_r[0], _NoLaunch(), _r[2])
                    try:
                        fn = lambda: [md.decode_attention_triton(ql[i], qr[i], kv[i][..., :512], kv[i][..., 512:], 192**-0.5,
                                                                  num_splits=splits, config=cfg) for i in range(n)]
                        us = D.time_graph(fn, dev, reps=20, inner=n) * 1e3
                    finally:
                        md._kernels = _KERNELS
                    rows.append(dict(name=name, config=asdict(cfg), splits=splits, batch=batch, context=s, merge=merge,
                                     us=us, bytes=nbytes))
                    print(f"B={batch:3d} S={s:6d} {name:24s} {'whole' if merge else 'stage 1':8s} {us:8.1f} us", flush=True)
            del ql, qr, kv
            torch.cuda.empty_cache()
    print("\nfit over 4K-32K: fixed cost (µs at zero tokens) and streaming rate (TB/s of cache read)", flush=True)
    summary = []
    for batch in (16, 64):
        for name, _, _ in configs:
            for merge in (True, False):
                pts = [(r["context"], r["us"]) for r in rows if r["batch"] == batch and r["name"] == name and r["merge"] == merge]
                a, b = fit([p[0] for p in pts], [p[1] for p in pts])
                rate = batch * 576 * 2 / (b * 1e-6) / 1e12
                summary.append(dict(batch=batch, name=name, merge=merge, fixed_us=a, rate_TBps=rate))
                print(f"  B={batch:3d} {name:24s} {'whole' if merge else 'stage 1':8s} fixed {a:6.1f} us   rate {rate:5.2f} TB/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_fixed_cost.json").write_text(json.dumps({"device": torch.cuda.get_device_name(dev), "rows": rows,
                                                            "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
