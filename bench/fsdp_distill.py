"""Distillation under Lightning's FSDPStrategy on two GPUs against one GPU, resume from a checkpoint, export (issue 8).

A 1.1B-parameter random-weight Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab
32000; seeded, built on each GPU from the seed) is converted to MLA by `MLASurgery` (kv_lora_rank 256, rope 64,
random-token calibration), then trained with `Distillation` (the original attention blocks swapped in as teacher,
only attention trains) and `GradualRankReduction` (256 → 192), bf16-mixed, AdamW, gradient clipping 1.0:

* ``single``: one GPU (``devices=1``), ``WARMUP + MEASURE`` steps;
* ``fsdp``: two GPUs, ``FSDPStrategy()`` with nothing else set (`MLASurgery` wraps each decoder layer and each MLA
  block as its own unit), the same per-GPU batch; a full checkpoint after step ``WARMUP + MEASURE``, then
  ``AFTER`` more steps, then `MLAExport` (full weights gathered to rank 0, DeepSeek-V3 export in bf16, reloaded
  through the stock ``DeepseekV3ForCausalLM`` and verified);
* ``resume``: a new Trainer on two GPUs resumes from that checkpoint (`MLASurgery` without calibration builds
  the empty MLA structure) and runs the same ``AFTER`` steps: its global steps, per-step losses and final weight
  norm are compared with the uninterrupted run's.

Tokens per second are counted over the ``MEASURE`` steps after ``WARMUP`` (CUDA-synchronised), all GPUs together.
Every step's tokens come from the global step and the process rank (seeded), so a resumed run sees the data of
the uninterrupted one.

    PYTHONPATH=. python bench/fsdp_distill.py --out $OUT           # the benchmark: 2 GPUs, about 4-5 minutes
    PYTHONPATH=. python bench/fsdp_distill.py --smoke --out /tmp/x  # the whole path on the CPU, tiny model (~30 s)

The driver runs each phase as a subprocess (``--phase single|fsdp|resume``; Lightning's launcher re-runs the
phase's command line for the second process; a phase past its time limit is killed and reported), writes
``<out>/fsdp_distill.json``, the three phase logs and the export's ``config.json`` (five files; the checkpoint and
the export itself go to ``--work``, a temporary directory by default) and prints a table last. Exit status 0
when both throughputs were measured, the resume matched and the export verified.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import callbacks_package  # noqa: E402

FULL = dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=32000,
            kv_lora_rank=256, rope=64, target_rank=192, batch=4, seq=1024, calib=(4, 2, 512),
            warmup=10, measure=30, after=10, precision="bf16-mixed", lr=1e-4)
SMOKE = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=128,
             kv_lora_rank=24, rope=8, target_rank=16, batch=2, seq=32, calib=(2, 4, 32),
             warmup=2, measure=3, after=2, precision="32-true", lr=1e-3)
TIMEOUTS = {"single": 120, "fsdp": 240, "resume": 120}  # seconds per phase: at most 8 minutes in all
SEED = 0


# ============================================================================================== the model and data
def build_model(cfg: dict, device: torch.device):
    """The seeded random-weight Llama, built directly on ``device`` (the same weights on every GPU of a kind)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                         max_position_embeddings=max(2048, cfg["seq"]), rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.train()


def tokens(cfg: dict, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * (step + 1) + rank)
    return torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)


def calibration(cfg: dict) -> list[torch.Tensor]:
    n, b, t = cfg["calib"]
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, cfg["vocab"], (b, t), generator=g) for _ in range(n)]


def make_module(cfg: dict, model):
    from transmla_surgery.training import CausalLM

    class BenchLM(CausalLM):
        """`CausalLM` (AdamW, warm-up + cosine, FSDP-aware clipping) whose batch of step ``s`` on process ``r`` is
        ``tokens(s, r)``: the same data after a resume."""

        def training_step(self, batch, batch_idx):
            ids = tokens(cfg, self.global_step, self.trainer.global_rank).to(self.device)
            return super().training_step(ids, batch_idx)

    return BenchLM.wrap(model, lr=cfg["lr"], warmup=0.1)


# ============================================================================================== one phase
def _meter_class():
    import lightning.pytorch as L

    class Meter(L.Callback):
        """Times the ``measure`` steps after ``warmup`` (synchronised), records every step's loss, distillation
        KL and rank, the peak memory of training and, at the end, the global norm of the trainable weights."""

        def __init__(self, warmup: int, measure: int, cuda: bool, profile: bool = False) -> None:
            self.warmup, self.measure, self.cuda = warmup, measure, cuda
            self.profile, self.profiler = profile, None
            self.t0 = self.t1 = None
            self.steps: list[dict] = []
            self.first_step = None
            self.peak = self.resident = None
            self.weight_norm = None

        def _sync(self) -> None:
            if self.cuda:
                torch.cuda.synchronize()

        def on_train_start(self, trainer, pl_module):
            self.first_step = trainer.global_step
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                self.resident = torch.cuda.memory_allocated()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.warmup:
                self._sync()
                self.t0 = time.perf_counter()
            if self.profile and trainer.global_rank == 0 and trainer.global_step == self.warmup + self.measure + 1:
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
                self.profiler = torch.profiler.profile(activities=acts)
                self.profiler.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step - 1
            m = trainer.callback_metrics
            self.steps.append({"step": step, "loss": float(outputs["loss"]),
                               "kl": float(m["distill/kl"]) if "distill/kl" in m else None,
                               "rank": float(m["mla/rank"]) if "mla/rank" in m else None})
            if trainer.global_step == self.warmup + self.measure:
                self._sync()
                self.t1 = time.perf_counter()
            if self.profiler is not None and trainer.global_step == self.warmup + self.measure + 4:
                self._sync()
                self.profiler.__exit__(None, None, None)
                table = self.profiler.key_averages()
                key = "cuda_time_total" if self.cuda else "cpu_time_total"
                print(f"[profile rank 0, 3 steps] by {key}\n" + table.table(sort_by=key, row_limit=25), flush=True)
                print("[profile rank 0, 3 steps] by self_cpu_time_total\n"
                      + table.table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
                self.profiler = None

        def on_train_end(self, trainer, pl_module):
            if self.cuda:
                self.peak = torch.cuda.max_memory_allocated()
            # Under FSDP each process holds a shard of every trainable parameter: sum the squares over processes.
            local = sum(float(p.detach().float().pow(2).sum()) for p in pl_module.parameters() if p.requires_grad)
            total = trainer.strategy.reduce(torch.tensor(local, dtype=torch.float64, device=pl_module.device),
                                            reduce_op="sum") if trainer.world_size > 1 else torch.tensor(local)
            self.weight_norm = math.sqrt(float(total))

    return Meter


def run_phase(phase: str, out: Path, smoke: bool, *, batch: int | None = None, sharding: str | None = None,
              lean: bool = False, profile: bool = False, tag: str | None = None) -> None:
    """One phase; ``out`` is the work directory (checkpoint, export, this phase's per-rank JSON)."""
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy

    callbacks_package()
    from transmla_surgery.callbacks._fsdp import cpu_fsdp_strategy
    from transmla_surgery import MLAConfig
    from transmla_surgery.callbacks import Distillation, GradualRankReduction, MLAExport, MLASurgery

    warnings.filterwarnings("ignore")
    cfg = dict(SMOKE if smoke else FULL)
    if batch:
        cfg["batch"] = batch
    cuda = not smoke
    if smoke:
        torch.set_num_threads(1)
    devices = 1 if phase == "single" else 2
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    L.seed_everything(SEED)
    start = time.perf_counter()
    model = build_model(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    module = make_module(cfg, model)
    checkpoint_at = cfg["warmup"] + cfg["measure"]
    max_steps = checkpoint_at if phase == "single" or lean else checkpoint_at + cfg["after"]
    max_steps += 4 if profile else 0  # the profiled steps come after the timed ones
    config = MLAConfig(kv_lora_rank=cfg["kv_lora_rank"], qk_rope_head_dim=cfg["rope"])
    meter = _meter_class()(cfg["warmup"], cfg["measure"], cuda, profile)
    callbacks = [
        MLASurgery(config, None if phase == "resume" else calibration(cfg), train="attention", keep_activations=True),
        GradualRankReduction(cfg["target_rank"], schedule="linear", end=0.5, multiple_of=8 if not smoke else 1),
        Distillation(weight=1.0, loss_weight=0.0, chunk_size=1024),
        meter,
    ]
    export = None
    if phase == "fsdp" and not lean:
        export = MLAExport(out / "export", dtype="bfloat16", verify=True, overwrite=True)
        callbacks += [export, ModelCheckpoint(dirpath=out / "ckpt", filename="step{step}", auto_insert_metric_name=False,
                                              every_n_train_steps=checkpoint_at, save_top_k=-1, save_last=False)]
    if devices == 1:
        strategy = "auto"
    else:
        kw = {"sharding_strategy": sharding} if sharding else {}
        strategy = cpu_fsdp_strategy(**kw) if smoke else FSDPStrategy(**kw)  # MLASurgery completes the rest
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=devices, strategy=strategy,
                        precision=cfg["precision"], max_steps=max_steps, gradient_clip_val=1.0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        enable_checkpointing=phase == "fsdp" and not lean, callbacks=callbacks, log_every_n_steps=1)
    data = torch.utils.data.DataLoader(range(10**6), batch_size=1)  # the batches are made from the step (tokens())
    ckpt_path = out / "ckpt" / f"step{checkpoint_at}.ckpt" if phase == "resume" else None
    trainer.fit(module, data, ckpt_path=ckpt_path)
    rank = trainer.global_rank
    seconds = None if meter.t0 is None or meter.t1 is None else meter.t1 - meter.t0
    tokens_measured = cfg["measure"] * cfg["batch"] * cfg["seq"] * trainer.world_size
    result = {
        "phase": phase, "rank": rank, "world_size": trainer.world_size, "wall_s": time.perf_counter() - start,
        "source_parameters": n_params,
        "first_step": meter.first_step, "global_step": trainer.global_step, "steps": meter.steps,
        "measured_seconds": seconds, "tokens_per_s": None if not seconds else tokens_measured / seconds,
        "peak_memory_gib": None if meter.peak is None else meter.peak / 2**30,
        "resident_at_train_start_gib": None if meter.resident is None else meter.resident / 2**30,
        "weight_norm": meter.weight_norm,
        "wrapped_units": _units(trainer),
    }
    if export is not None and rank == 0:
        rep = export.reports.get("final")
        result["export"] = None if rep is None else {
            "path": str(rep.path), "verified": bool(rep.verified), "verification": rep.verification,
            "tolerances": rep.tolerances, "kv_lora_rank": rep.kv_lora_rank, "dtype": str(rep.dtype),
            "cache_width": rep.cache_width, "seconds": rep.seconds}
    result.update(batch=cfg["batch"], sharding=(sharding or "FULL_SHARD") if devices > 1 else None, tag=tag)
    (out / f"{tag or phase}_rank{rank}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


def _units(trainer) -> dict | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return None
    if not isinstance(trainer.strategy.model, FSDP):
        return None
    names: dict[str, int] = {}
    for unit in FSDP.fsdp_modules(trainer.strategy.model):
        key = type(unit.module).__name__
        names[key] = names.get(key, 0) + 1
    return names


# ============================================================================================== the driver
def _launch(phase: str, out: Path, work: Path, smoke: bool, timeout: float, extra: list[str] | None = None,
            tag: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--out", str(work)] + (["--smoke"] if smoke else [])
    cmd += (extra or []) + (["--tag", tag] if tag else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log = out / f"{tag or phase}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the phase and the rank it launched
            proc.wait()
            rc = "timeout"
    status = {"rc": rc, "wall_s": round(time.perf_counter() - start, 1), "log": str(log)}
    if rc != 0:
        status["log_tail"] = log.read_text(errors="replace")[-2500:]
    print(f"[fsdp_distill] {tag or phase}: rc={rc} in {status['wall_s']} s", flush=True)
    return status


def _read(out: Path, phase: str, rank: int) -> dict | None:
    path = out / f"{phase}_rank{rank}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-12)


def drive(out: Path, work: Path, smoke: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    cfg = SMOKE if smoke else FULL
    t_start = time.perf_counter()
    phases = {}
    for phase in ("single", "fsdp", "resume"):
        if phase == "resume" and phases["fsdp"]["rc"] != 0:
            phases[phase] = {"rc": "skipped: the fsdp phase failed"}
            continue
        phases[phase] = _launch(phase, out, work, smoke, TIMEOUTS[phase] * (3 if smoke else 1))
    single, f0, f1 = _read(work, "single", 0), _read(work, "fsdp", 0), _read(work, "fsdp", 1)
    r0 = _read(work, "resume", 0)

    tps1 = single and single["tokens_per_s"]
    tps2 = f0 and f0["tokens_per_s"]
    scaling = tps2 / tps1 if tps1 and tps2 else None
    resume = None
    if f0 and r0:
        ckpt = cfg["warmup"] + cfg["measure"]
        want = {s["step"]: s for s in f0["steps"] if s["step"] >= ckpt}
        got = {s["step"]: s for s in r0["steps"]}
        loss_diff = [_rel(got[s]["loss"], want[s]["loss"]) for s in sorted(got) if s in want]
        kl_diff = [_rel(got[s]["kl"], want[s]["kl"]) for s in sorted(got) if s in want and want[s]["kl"]]
        resume = {
            "checkpoint_step": ckpt, "resumed_first_step": r0["first_step"], "resumed_final_step": r0["global_step"],
            "uninterrupted_final_step": f0["global_step"], "steps_compared": sorted(set(got) & set(want)),
            "max_rel_loss_diff": max(loss_diff) if loss_diff else None,
            "max_rel_kl_diff": max(kl_diff) if kl_diff else None,
            "ranks_equal": [got[s]["rank"] for s in sorted(got)] == [want[s]["rank"] for s in sorted(got) if s in want],
            "weight_norm_uninterrupted": f0["weight_norm"], "weight_norm_resumed": r0["weight_norm"],
            "weight_norm_rel_diff": _rel(r0["weight_norm"], f0["weight_norm"]),
        }
        # CPU float32: equal to rounding. GPU bf16: flash-attention backward and other reductions are not
        # deterministic, so the runs part in the last bits from the first resumed step on.
        loss_tol, norm_tol = (1e-5, 1e-6) if smoke else (5e-2, 1e-3)
        resume["tolerances"] = {"rel_loss": loss_tol, "rel_weight_norm": norm_tol}
        resume["ok"] = bool(
            r0["first_step"] == ckpt and r0["global_step"] == f0["global_step"] and resume["ranks_equal"]
            and resume["steps_compared"] == list(range(ckpt, f0["global_step"]))
            and resume["max_rel_loss_diff"] is not None and resume["max_rel_loss_diff"] <= loss_tol
            and resume["weight_norm_rel_diff"] is not None and resume["weight_norm_rel_diff"] <= norm_tol)
    export = f0.get("export") if f0 else None
    if export and Path(export["path"], "config.json").exists():
        (out / "export_config.json").write_text(Path(export["path"], "config.json").read_text())
    device = "cpu (smoke)" if smoke else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    params = (single or f0 or {}).get("source_parameters")
    try:
        import transformers
        import lightning

        versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                    "lightning": lightning.__version__, "python": platform.python_version()}
    except ImportError:
        versions = {"torch": torch.__version__}
    result = {
        "device": device, "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0, "versions": versions,
        "smoke": smoke, "config": cfg, "parameters": params,
        "tokens_per_step_per_device": cfg["batch"] * cfg["seq"],
        "single": None if not single else {"tokens_per_s": tps1, "peak_memory_gib": single["peak_memory_gib"],
                                           "measured_seconds": single["measured_seconds"], "wall_s": single["wall_s"]},
        "fsdp": None if not f0 else {
            "tokens_per_s": tps2, "tokens_per_s_per_gpu": None if not tps2 else tps2 / 2,
            "peak_memory_gib_per_gpu": [f["peak_memory_gib"] for f in (f0, f1) if f],
            "resident_at_train_start_gib_per_gpu": [f["resident_at_train_start_gib"] for f in (f0, f1) if f],
            "measured_seconds": f0["measured_seconds"], "wrapped_units": f0["wrapped_units"], "wall_s": f0["wall_s"]},
        "scaling_2_over_1": scaling, "scaling_efficiency": None if scaling is None else scaling / 2,
        "resume": resume, "export": export, "phases": phases,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }
    (out / "fsdp_distill.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    def fmt(x, spec=".0f"):
        return "-" if x is None else format(x, spec)

    peaks = result["fsdp"]["peak_memory_gib_per_gpu"] if result["fsdp"] else []
    print(f"\nFSDP distillation, {device}, {cfg['layers']} layers × hidden {cfg['hidden']}, "
          f"{cfg['batch']}×{cfg['seq']} tokens per GPU per step, {cfg['precision']} — {out / 'fsdp_distill.json'}")
    print(f"{'run':<26}{'tokens/s':>12}{'per GPU':>12}{'peak GiB/GPU':>16}")
    print(f"{'1 GPU':<26}{fmt(tps1):>12}{fmt(tps1):>12}{fmt(single and single['peak_memory_gib'], '.1f'):>16}")
    print(f"{'FSDP, 2 GPUs':<26}{fmt(tps2):>12}{fmt(tps2 and tps2 / 2):>12}"
          f"{' / '.join(format(p, '.1f') for p in peaks if p is not None) or '-':>16}")
    print(f"scaling 2 GPUs / 1 GPU: {fmt(scaling, '.2f')}× (efficiency {fmt(scaling and scaling / 2, '.0%')})")
    if resume:
        print(f"resume from step {resume['checkpoint_step']}: first step {resume['resumed_first_step']}, final "
              f"{resume['resumed_final_step']} (uninterrupted {resume['uninterrupted_final_step']}), max rel loss diff "
              f"{fmt(resume['max_rel_loss_diff'], '.1e')}, weight-norm rel diff {fmt(resume['weight_norm_rel_diff'], '.1e')}"
              f" -> {'OK' if resume['ok'] else 'MISMATCH'}")
    else:
        print(f"resume: not run ({phases.get('resume', {}).get('rc')})")
    if export:
        print(f"export (rank 0, gathered): kv_lora_rank {export['kv_lora_rank']}, {export['dtype']}, "
              f"verified={export['verified']} in {fmt(export.get('seconds'), '.0f')} s, stock DeepseekV3 reload "
              f"relative logit errors { {k: float(f'{v:.2e}') for k, v in export['verification'].items()} }")
    else:
        print("export: none")
    for name, st in phases.items():
        if st.get("rc") != 0:
            print(f"phase {name} failed: rc={st.get('rc')} (log {st.get('log')})")
    print(f"total wall time {result['total_wall_s']} s")
    ok = bool(tps1 and tps2 and resume and resume["ok"] and export and export["verified"])
    return 0 if ok else 1


SCALING = (  # tag, phase, extra arguments: what limits two-GPU throughput (no checkpoint, no export)
    ("fsdp_b4_full_profiled", "fsdp", ["--lean", "--profile"]),
    ("fsdp_b4_grad_op", "fsdp", ["--lean", "--sharding", "SHARD_GRAD_OP"]),
    ("single_b8", "single", ["--batch", "8"]),
    ("fsdp_b8_grad_op", "fsdp", ["--lean", "--batch", "8", "--sharding", "SHARD_GRAD_OP"]),
)


def scaling(out: Path, work: Path, smoke: bool) -> int:
    """Throughput of FSDP variants (sharding strategy, batch per GPU) against one GPU; one profiled run."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for tag, phase, extra in SCALING:
        status = _launch(phase, out, work, smoke, 150 if smoke else 90, extra, tag)
        r = _read(work, tag, 0)
        rows[tag] = {"status": status, "tokens_per_s": r and r["tokens_per_s"], "batch": r and r["batch"],
                     "sharding": r and r["sharding"], "world_size": r and r["world_size"],
                     "peak_memory_gib": r and r["peak_memory_gib"]}
    device = "cpu (smoke)" if smoke else torch.cuda.get_device_name(0)
    (out / "fsdp_scaling.json").write_text(json.dumps({"device": device, "runs": rows}, indent=2, default=str) + "\n")
    print(f"\nFSDP scaling variants, {device}")
    print(f"{'run':<24}{'GPUs':>6}{'batch':>7}{'sharding':>15}{'tokens/s':>11}{'peak GiB':>10}")
    for tag, r in rows.items():
        print(f"{tag:<24}{str(r['world_size']):>6}{str(r['batch']):>7}{str(r['sharding']):>15}"
              f"{(r['tokens_per_s'] or 0):>11.0f}{(r['peak_memory_gib'] or 0):>10.1f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fsdp_distill",
                        help="fsdp_distill.json and the three phase logs (four files)")
    parser.add_argument("--work", type=Path, default=None,
                        help="checkpoint (6.5 GB), export and per-process results; default a temporary directory, "
                             "removed at the end")
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU processes (gloo), FSDP shimmed for CPU")
    parser.add_argument("--phase", choices=["single", "fsdp", "resume"], help="(internal) run one phase")
    parser.add_argument("--scaling", action="store_true",
                        help="instead of the benchmark: FSDP variants and a profile (fsdp_scaling.json)")
    parser.add_argument("--batch", type=int, default=None, help="(with --phase) sequences per GPU per step")
    parser.add_argument("--sharding", default=None, help="(with --phase) FSDP sharding_strategy")
    parser.add_argument("--lean", action="store_true", help="(with --phase) no checkpoint, no export")
    parser.add_argument("--profile", action="store_true", help="(with --phase) profile 3 steps on rank 0")
    parser.add_argument("--tag", default=None, help="(with --phase) result name")
    args = parser.parse_args()
    if args.phase:
        run_phase(args.phase, args.out, args.smoke, batch=args.batch, sharding=args.sharding, lean=args.lean,
                  profile=args.profile, tag=args.tag)
        return 0
    if not args.smoke and torch.cuda.device_count() < 2:
        print(f"bench/fsdp_distill.py needs 2 GPUs ({torch.cuda.device_count()} visible); try --smoke", file=sys.stderr)
        return 2
    import shutil
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="fsdp_distill_"))
    try:
        return (scaling if args.scaling else drive)(args.out, work, args.smoke)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
