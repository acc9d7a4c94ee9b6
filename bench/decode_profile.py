"""Where a decode step's time goes: per-kernel GPU time of one step, original against converted (issue 4).

    python bench/decode_profile.py --out bench/results        # GPU; writes decode_profile.json and .txt

Llama-3-8B shape in bf16 at 8K context (prompt 8192 + 128), each side at its end-to-end batch of
`bench/decode.py` (largest in 70 GiB: 54 original, 191 converted). One eager decode step (the same step
function `decode.py` captures in a CUDA graph) runs under `torch.profiler`; kernels are grouped by name and
their GPU time summed, averaged over the profiled steps. Beside it: the graph-replayed step time, and the
attention kernel alone at the same batch and context for each kernel configuration, so that the attention
share inside the model can be told from the rest. `--smoke` runs tiny shapes on any device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as D  # noqa: E402  (the harness: model shapes, random MLA swap, step function, cache)

from transmla_surgery.kernels import mla_decode as md  # noqa: E402


def profile_step(step, dev: torch.device, steps: int) -> tuple[list[dict], float]:
    """Per-kernel GPU time (µs per step) of ``steps`` eager steps, and the summed kernel time per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        D.sync(dev)
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        kernel = getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA or (
            ev.cpu_time_total == 0 and getattr(ev, "self_device_time_total", 0) > 0)
        if kernel:  # a GPU kernel (or memcpy/memset), not a CPU-side operator
            per[ev.key[:90]][0] += ev.self_device_time_total
            per[ev.key[:90]][1] += ev.count
    rows = [{"kernel": k, "us_per_step": v[0] / steps, "launches_per_step": v[1] / steps} for k, v in per.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows, sum(r["us_per_step"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=3, help="profiled eager steps per side")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type == "cpu":
        D.set_decode_backend("torch")
    from transformers import LlamaForCausalLM

    cfg = D.llama_config("llama3-8b", args.smoke)
    prompt, new = (48, 4) if args.smoke else (8192, 128)
    ctx = prompt + new
    batches = {"original": 3, "mla": 9} if args.smoke else {"original": 54, "mla": 191}
    rank, rope = (32, 8) if args.smoke else (512, 64)
    report: dict = {"device": D.device_name(dev), "torch": torch.__version__, "model": "llama3-8b shape",
                    "prompt": prompt, "context": ctx, "sides": {}}
    lines = [f"device: {report['device']}   llama3-8b shape, context {ctx}, bf16"]
    model = D.build_on_device(LlamaForCausalLM, cfg, dev, dtype)
    use_triton = dev.type == "cuda" and D.triton_available()
    default, large = md.DEFAULT_CONFIG, md.LARGE_WORK_CONFIG
    # each forced on every call: the one-block-per-SM default, the two-blocks-per-SM configuration the library
    # picks for large calls (this shape's), and the latter without PDL, whose merge kernel the profiler then
    # times alone (with PDL its programs are resident, waiting, while stage 1's last wave runs)
    kernels = [default, large, replace(large, pdl=False)]
    for side in ("original", "mla"):
        b = batches[side]
        configs = kernels if (side == "mla" and use_triton) else [None]
        if side == "mla":
            D.swap_in_mla(model, rank, rope, dev, dtype)
        for kcfg in configs:
            if kcfg is not None:
                md.DEFAULT_CONFIG = md.LARGE_WORK_CONFIG = kcfg
            cache = D.filled_cache(model, cfg, side, b, ctx, dev, dtype)
            t = D.time_decode(model, cache, b, prompt, new, dev)  # graph-replayed step (also warms up)
            step = D.decode_step_fn(model, cache, b)
            D.set_length(cache, prompt)
            step()
            rows, kernel_us = profile_step(step, dev, args.steps)
            label = side if kcfg is None else f"{side} [{D.kernel_label(kcfg)}]"
            attn = [r for r in rows if any(k in r["kernel"] for k in ("_stage1", "_stage2", "flash", "fmha", "attention"))]
            entry = {"batch": b, "graph_ms_per_step": t["ms_per_step_mean"], "kernel_us_per_step": kernel_us,
                     "attention_us_per_step": sum(r["us_per_step"] for r in attn),
                     "kernel_config": None if kcfg is None else asdict(kcfg), "kernels": rows[:40]}
            report["sides"][label] = entry
            lines.append(f"\n{label}: batch {b}, graph step {t['ms_per_step_mean']:.2f} ms, eager kernels "
                         f"{kernel_us / 1e3:.2f} ms/step, attention kernels {entry['attention_us_per_step'] / 1e3:.2f} ms/step")
            for r in rows[:22]:
                lines.append(f"  {r['us_per_step']:9.1f} us  {r['launches_per_step']:5.0f}x  {r['kernel'][:88]}")
            del cache
            D.free(dev)
    md.DEFAULT_CONFIG, md.LARGE_WORK_CONFIG = default, large
    if use_triton:
        b, s = batches["mla"], ctx
        heads = cfg.num_attention_heads
        q_lat = torch.randn(b, 1, heads, rank, device=dev, dtype=dtype)
        q_rope = torch.randn(b, 1, heads, rope, device=dev, dtype=dtype)
        kv = torch.randn(b, s, rank + rope, device=dev, dtype=dtype)
        n_len = torch.tensor(s, device=dev)
        alone = {}
        for kcfg in kernels:
            for splits in (None, 2, 4):
                ms = D.time_graph(lambda: md.decode_attention_triton(q_lat, q_rope, kv[..., :rank], kv[..., rank:], 0.07,
                                                                     kv_len=n_len, num_splits=splits, config=kcfg),
                                  dev, reps=20)
                nbytes = b * s * (rank + rope) * 2
                alone[f"{D.kernel_label(kcfg)} splits={splits or 'auto'}"] = {"us": ms * 1e3, "TBps": nbytes / (ms * 1e-3) / 1e12}
        report["attention_alone"] = {"batch": b, "context": s, "per_layer": alone}
        lines.append(f"\nattention alone, one layer, batch {b}, context {s} (x {cfg.num_hidden_layers} layers per step):")
        for k, v in alone.items():
            lines.append(f"  {k:40s} {v['us']:8.1f} us  {v['TBps']:5.2f} TB/s")
    (out / "decode_profile.json").write_text(json.dumps(report, indent=1) + "\n")
    text = "\n".join(lines)
    (out / "decode_profile.txt").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"[{time.time() - t0:.1f} s]", flush=True)
