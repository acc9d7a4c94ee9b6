"""Conversion at scale: layer-streaming conversion of a safetensors directory against whole-model conversion.

Builds a random-weight model of the given shape (default: Llama-3-8B, GQA-8, bf16), saves it as sharded
safetensors, then measures on one device:

* streaming: ``convert_checkpoint(src, out, ...)`` — one decoder layer on the device at a time;
* whole model: load everything onto the device and ``convert_to_mla(..., keep_activations=True)``.

For each: wall time, peak device memory (``torch.cuda.max_memory_allocated``), peak host RSS (sampled), and
the per-layer cost, from which the 70B figures are projected (80 layers, hidden 8192, 64 heads, 8 KV heads).
Streaming is checked against its bound, ``1.5 × one layer's weights + the calibration buffer`` (issue 8), with a
per-phase breakdown of the device peak (weights loading, Gram, factorisation, o_proj refit, advance, the rest)
next to what each phase holds by design. Writes ``bench/results/convert_scale.json`` and prints a table last.

    python bench/convert_scale.py --out bench/results            # GPU
    python bench/convert_scale.py --smoke --out /tmp/scale       # tiny shape on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from memory import PeakRSS
from transmla_surgery import MLAConfig, convert_checkpoint, convert_to_mla

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0),
    "smoke": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, rope_theta=10000.0),
}


def layer_bytes(shape: dict, dtype_bytes: int) -> int:
    d, f, h, g, hd = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    return dtype_bytes * (d * h * hd * 2 + 2 * d * g * hd + 3 * d * f + 2 * d)


def component_bytes(shape: dict, dtype_bytes: int, rank: int, rope: int, tokens: int) -> dict[str, int]:
    """What streaming conversion keeps on the device, by design, in bytes (default config: converted inputs,
    o_proj refit on the layer)."""
    d, f, h, g, hd = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    return {
        "source_attention": dtype_bytes * (2 * d * h * hd + 2 * d * g * hd),
        "mla_attention": dtype_bytes * (d * h * (hd + rope) + d * (rank + rope) + rank * h * 2 * hd + h * hd * d),
        "mlp": dtype_bytes * 3 * d * f,
        "norms": dtype_bytes * 2 * d,
        "calibration_buffer": dtype_bytes * tokens * d,
        "gram_float64": 8 * (d + 1) ** 2,
        "regression_float64": 8 * ((h * hd + 1) ** 2 + d * (h * hd + 1)),
    }


def resident_by_phase(c: dict[str, int]) -> dict[str, int]:
    """Bytes each streaming phase holds by design (before transients: activations, float64 row chunks)."""
    return {
        "gram": c["source_attention"] + c["norms"] // 2 + c["calibration_buffer"] + c["gram_float64"],
        "refit": c["source_attention"] + c["mla_attention"] + c["norms"] // 2 + c["calibration_buffer"] + c["regression_float64"],
        "advance": c["mla_attention"] + c["mlp"] + c["norms"] + c["calibration_buffer"],
    }


class PhasePeaks:
    """Peak device memory per phase of streaming conversion (CUDA).

    Wraps the functions that make up the phases; at each phase boundary the peak counter is read (it holds the
    peak since the previous boundary) and reset, so every byte of the run's peak is attributed to exactly one
    phase, or to ``other`` (between phases: building the buffer, building the MLA block, writing shards), and the
    run's overall peak is the largest reading.
    """

    def __init__(self) -> None:
        from transmla_surgery import calibration, streaming, surgery

        self.targets = {
            "load_weights": (streaming, "_materialize_parts"),
            "gram": (calibration.LayerInputBuffer, "attention_gram"),
            "factorize": (surgery, "factorize_layer"),
            "refit": (surgery, "refit_output_projection"),
            "advance": (calibration.LayerInputBuffer, "advance"),
        }
        self.phases: dict[str, dict[str, int]] = {}
        self._saved: dict[str, object] = {}

    def _close(self, name: str, entry: int | None = None) -> None:
        peak = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        rec = self.phases.setdefault(name, {"peak_bytes": 0, "max_entry_bytes": 0, "max_exit_bytes": 0, "calls": 0})
        rec["peak_bytes"] = max(rec["peak_bytes"], peak)
        rec["max_exit_bytes"] = max(rec["max_exit_bytes"], int(torch.cuda.memory_allocated()))
        if entry is not None:
            rec["max_entry_bytes"] = max(rec["max_entry_bytes"], entry)
            rec["calls"] += 1

    def _wrap(self, name: str, real):
        def wrapped(*args, **kwargs):
            self._close("other")
            entry = int(torch.cuda.memory_allocated())
            try:
                return real(*args, **kwargs)
            finally:
                self._close(name, entry)

        return wrapped

    def __enter__(self) -> "PhasePeaks":
        torch.cuda.reset_peak_memory_stats()
        for name, (owner, attr) in self.targets.items():
            self._saved[name] = getattr(owner, attr)
            setattr(owner, attr, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, (owner, attr) in self.targets.items():
            setattr(owner, attr, self._saved[name])
        self._close("other")

    @property
    def peak(self) -> int:
        return max(r["peak_bytes"] for r in self.phases.values())


def build_checkpoint(shape: dict, path: Path, dtype: torch.dtype, device: str) -> int:
    """Random-weight model of ``shape`` saved as sharded safetensors (built layer by layer on ``device``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=False)
    config.dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    model.to(dtype).save_pretrained(path, max_shard_size="2GB")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=[k for k in SHAPES if k != "llama3-70b"])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--calib-seqs", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work", default="/tmp/convert_scale")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--skip-whole", action="store_true")
    args = parser.parse_args()
    shape_name = "smoke" if args.smoke else args.shape
    shape = SHAPES[shape_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rank, rope = (512, 64) if shape["head_dim"] == 128 else (32, 8)
    config = MLAConfig(kv_lora_rank=rank, qk_rope_head_dim=rope)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, shape["vocab_size"], (8, args.seq_len), generator=gen) for _ in range(args.calib_seqs // 8)]
    calib_tokens = args.calib_seqs * args.seq_len

    t0 = time.perf_counter()
    ckpt_bytes = build_checkpoint(shape, work / "src", dtype, device)
    build_s = time.perf_counter() - t0
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": shape_name, "dtype": str(dtype), "checkpoint_bytes": ckpt_bytes,
        "config": {"kv_lora_rank": rank, "qk_rope_head_dim": rope},
        "calibration_tokens": calib_tokens, "build_seconds": build_s,
        "command": "python " + " ".join(sys.argv), "runs": {},
    }
    lb = layer_bytes(shape, 2 if dtype == torch.bfloat16 else 4)
    buffer_bytes = calib_tokens * shape["hidden_size"] * (2 if dtype == torch.bfloat16 else 4)
    results["one_layer_weight_bytes"] = lb
    results["calibration_buffer_bytes"] = buffer_bytes

    dtype_bytes = 2 if dtype == torch.bfloat16 else 4
    components = component_bytes(shape, dtype_bytes, rank, rope, calib_tokens)
    bound = int(1.5 * lb + buffer_bytes)
    results["bound_bytes"] = bound
    results["bound"] = "1.5 x one_layer_weight_bytes + calibration_buffer_bytes (issue 8)"
    results["design_bytes"] = {"components": components, "resident_by_phase": resident_by_phase(components)}

    # ---- streaming (the report's own peak would only cover the time since PhasePeaks' last reset)
    gc.collect()
    with PeakRSS() as rss, (PhasePeaks() if device == "cuda" else nullcontext()) as phases:
        t0 = time.perf_counter()
        convert_checkpoint(work / "src", work / "out", config, calib, device=device, dtype=dtype, progress=False)
        seconds = time.perf_counter() - t0
    peak = phases.peak if device == "cuda" else None
    results["runs"]["streaming"] = {
        "seconds": seconds, "per_layer_seconds": seconds / shape["num_hidden_layers"],
        "peak_device_bytes": peak,
        "meets_bound": None if peak is None else peak <= bound,
        "peak_over_bound": None if peak is None else peak / bound,
        "peak_host_rss_bytes": rss.peak,
        "host_rss_limit_bytes": ckpt_bytes + 4 * 10**9,
        "meets_host_limit": rss.peak <= ckpt_bytes + 4 * 10**9,
        # per phase: the device peak while it ran, and memory_allocated at its entry and exit (max over layers)
        "device_by_phase": phases.phases if device == "cuda" else None,
    }
    shutil.rmtree(work / "out", ignore_errors=True)

    # ---- whole model
    if not args.skip_whole:
        from transformers import AutoModelForCausalLM

        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(work / "src", dtype=dtype, device_map=device if device == "cuda" else None)
            load_s = time.perf_counter() - t0
            convert_to_mla(model, config, calib, keep_activations=True, progress=False)
            seconds = time.perf_counter() - t0
        results["runs"]["whole_model"] = {
            "seconds": seconds, "load_seconds": load_s,
            "peak_device_bytes": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
            "peak_host_rss_bytes": rss.peak,
        }
        del model

    # ---- 70B projection from measured per-layer costs
    big = SHAPES["llama3-70b"]
    s = results["runs"]["streaming"]
    scale_layer = layer_bytes(big, 2) / layer_bytes(shape, 2)
    big_components = component_bytes(big, 2, rank, rope, calib_tokens)
    big_resident = resident_by_phase(big_components)
    peak_70b = None
    if s["device_by_phase"] is not None:
        # each phase: what it holds by design at 70B + its measured transients (activations and float64 row
        # chunks, linear in the hidden size at a fixed chunk of tokens) scaled by the width ratio
        width = big["hidden_size"] / shape["hidden_size"]
        measured = s["device_by_phase"]
        per_phase = {
            name: int(big_resident[name] + max(0, measured[name]["peak_bytes"] - here) * width)
            for name, here in resident_by_phase(components).items() if name in measured
        }
        peak_70b = max(per_phase.values())
    results["projection_70b"] = {
        "assumption": "per-layer time scales with layer bytes (weight reads and hidden-size-squared statistics); "
        "device peak = max over phases of what the phase holds by design at 70B (attention/MLA/MLP weights, "
        "calibration buffer at hidden 8192, float64 sums) + the measured transients scaled by the width ratio",
        "one_layer_weight_bytes": layer_bytes(big, 2),
        "calibration_buffer_bytes": big_components["calibration_buffer"],
        "bound_bytes": int(1.5 * layer_bytes(big, 2) + big_components["calibration_buffer"]),
        "seconds": s["per_layer_seconds"] * scale_layer * big["num_hidden_layers"],
        "peak_device_bytes": peak_70b,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convert_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    gib = 2**30
    print(f"\n{results['device']}  shape={shape_name}  checkpoint {ckpt_bytes / gib:.1f} GiB  one layer {lb / gib:.2f} GiB  "
          f"calibration buffer {buffer_bytes / gib:.2f} GiB")
    print(f"{'run':<12}{'seconds':>10}{'peak device GiB':>18}{'peak host GiB':>16}")
    for name, r in results["runs"].items():
        dev = "-" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / gib:.2f}"
        print(f"{name:<12}{r['seconds']:>10.1f}{dev:>18}{r['peak_host_rss_bytes'] / gib:>16.2f}")
    p = results["projection_70b"]
    dev = "-" if p["peak_device_bytes"] is None else f"{p['peak_device_bytes'] / gib:.2f}"
    print(f"{'70B (proj.)':<12}{p['seconds']:>10.1f}{dev:>18}")
    st = results["runs"]["streaming"]
    verdict = "n/a on the CPU" if st["meets_bound"] is None else ("met" if st["meets_bound"] else "NOT met")
    print(f"streaming bound {bound / gib:.3f} GiB (1.5 x layer + buffer): {verdict}")
    if st["device_by_phase"]:
        design = results["design_bytes"]["resident_by_phase"]
        print(f"{'phase':<14}{'peak GiB':>10}{'entry GiB':>11}{'design GiB':>12}{'calls':>7}")
        for name, r in st["device_by_phase"].items():
            d = "-" if name not in design else f"{design[name] / gib:.3f}"
            print(f"{name:<14}{r['peak_bytes'] / gib:>10.3f}{r['max_entry_bytes'] / gib:>11.3f}{d:>12}{r['calls']:>7}")

if __name__ == "__main__":
    main()
