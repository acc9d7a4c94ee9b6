"""The ``transmla`` command.

``transmla convert`` with no arguments converts the embedded default model (SmolLM2-135M, installed from the
package registry) calibrated on the embedded default text (the Python documentation shipped with every
Python), and prints the conversion report and the perplexity before and after on held-out text.
User errors (missing file, bad field, rank out of range) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import TransMLAError

console = Console()


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a model's attention to MLA and report quality before/after",
        description=(
            "Convert every attention block of a Hugging Face GQA model (Llama, Mistral, Qwen2) to MLA, "
            "training-free. With no arguments: SmolLM2-135M on the embedded default text."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="a local Hugging Face model directory or a .gguf file (default: SmolLM2-135M)")
    p.add_argument("--text", default=None, help="a .txt or .jsonl file for calibration and held-out evaluation (default: embedded Python docs)")
    p.add_argument("--kv-lora-rank", type=int, default=64, help="latent width r_kv cached per token and layer")
    p.add_argument("--qk-rope-head-dim", type=int, default=32, help="rope key width d_rope cached per token and layer")
    p.add_argument("--freqfold", type=int, default=None, help="FreqFold factor M (default: chosen from the head dim)")
    p.add_argument("--q-lora-rank", type=int, default=None, help="low-rank query projection (default: full q_proj)")
    p.add_argument("--calibration-inputs", choices=["converted", "original"], default="converted")
    p.add_argument("--subspace", choices=["attention", "variance"], default="attention")
    p.add_argument("--rope-selection", choices=["attention", "variance"], default="variance")
    p.add_argument("--no-refit-output", dest="refit_output", action="store_false",
                   help="do not refit o_proj to the source block's outputs")
    p.add_argument("--calib-seqs", type=int, default=32, help="calibration sequences")
    p.add_argument("--eval-seqs", type=int, default=16, help="held-out evaluation sequences (after the calibration ones)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stream-only", action="store_true",
                   help="keep no activations (memory independent of calibration size; slower, quadratic in depth)")
    p.add_argument("--output", default=None, help="save the converted model here (save_pretrained), with its report and plot")
    p.add_argument("--plot", default=None, help="write the per-layer energy plot (PNG) here")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    import torch

    from . import MLAConfig, convert_to_mla
    from .data import batched, default_text, perplexity, read_text, tokenize, windows
    from .models import load_model

    config = MLAConfig(  # validated before anything is loaded
        kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.qk_rope_head_dim,
        freqfold=args.freqfold,
        q_lora_rank=args.q_lora_rank,
        calibration_inputs=args.calibration_inputs,
        subspace=args.subspace,
        rope_selection=args.rope_selection,
        refit_output=args.refit_output,
    )
    if args.output and Path(args.output).exists():
        raise FileExistsError(f"--output {args.output} already exists; choose a new directory")
    text = default_text() if args.text is None else read_text(args.text)
    with console.status("loading model"):
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    stream = tokenize(tokenizer, text)
    calib = windows(stream, args.calib_seqs, args.seq_len)
    held_out = windows(stream, args.eval_seqs, args.seq_len, offset=args.calib_seqs * args.seq_len)
    console.print(
        f"model: {args.model or 'SmolLM2-135M (default)'}; text: {args.text or 'embedded Python docs'} "
        f"({stream.numel()} tokens); calibration {args.calib_seqs}×{args.seq_len}, held-out {args.eval_seqs}×{args.seq_len}"
    )
    with console.status("perplexity before"):
        before = perplexity(model, held_out, args.batch_size)
    report = convert_to_mla(model, config, batched(calib, args.batch_size), keep_activations=not args.stream_only)
    console.print(report)
    with console.status("perplexity after"):
        after = perplexity(model, held_out, args.batch_size)
    table = Table(title="summary")
    for col in ("", "before", "after"):
        table.add_column(col, justify="right")
    table.add_row("KV values / token (all layers)", str(report.kv_before), str(report.kv_after))
    table.add_row("held-out perplexity", f"{before:.2f}", f"{after:.2f}")
    console.print(table)
    if args.output:
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        (Path(args.output) / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        console.print(f"saved converted model to {args.output}")
    plot = args.plot or (str(Path(args.output) / "conversion.png") if args.output else None)
    if plot:
        try:
            console.print(f"per-layer energy plot: {report.save_plot(plot)}")
        except ImportError:
            console.print("matplotlib is not installed: no plot (pip install 'transmla-surgery[plots]')")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transmla", description="GQA → MLA attention surgery for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        code = args.func(args)
    except (TransMLAError, FileNotFoundError, FileExistsError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    console.print(f"done in {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
