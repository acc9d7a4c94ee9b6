"""Issue 7, interrupted training: a Lightning run with the four callbacks (MLASurgery, GradualRankReduction,
Distillation; ModelCheckpoint saving ``last.ckpt`` every step) is SIGKILLed, mid-step or at seeded random moments,
and resumed from its last checkpoint in a fresh process. The resumed run must continue exactly where the killed one
stood: the same rank at every later step (the schedule and its length come from the checkpoint), the same
distillation (KL to the same teacher, the same loss, step by step, bit for bit), the same latent moments, and in the
end the very same weights as a run that was never interrupted.

(test_callbacks.py::test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run covers a clean stop and resume in
one process; here the process dies without warning, possibly while writing a checkpoint.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, calibration, tiny_model

STEPS = 8
KILL_STEP = 5  # killed during step 6 (after its backward, before its optimizer step): last.ckpt is step 5
SEED = 11
RANDOM_KILLS = 2


def _rows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4 * STEPS, 16), generator=torch.Generator().manual_seed(5))


def train(workdir: str, resume: bool, calibrate: bool, kill_at_step: int | None, ready) -> None:
    """One training process: fit for ``STEPS`` steps (resuming from ``last.ckpt`` if asked), logging every step to
    ``log.jsonl`` and, at the end, the weights and the rank callback's state."""
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    from transmla_surgery import MLAConfig
    from transmla_surgery.callbacks import Distillation, GradualRankReduction, MLASurgery
    from transmla_surgery.rank import active_rank, mla_blocks

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    hf_logging.disable_progress_bar()
    work = Path(workdir)
    data = _rows()

    class StepLM(L.LightningModule):
        """Takes its batch by global step, so the data of step ``s`` is the same in every run (Lightning restarts
        a plain DataLoader from its first batch on resume)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            s = self.global_step % STEPS
            x = data[4 * s : 4 * s + 4]
            out = self.model(input_ids=x, labels=x)
            self.log("train/loss", out.loss)
            return out.loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)

    class Log(Callback):
        def on_train_start(self, trainer, pl_module):
            ready.send(trainer.global_step)  # the clock of a random kill starts here

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            row = {"step": trainer.global_step, "rank": sorted({active_rank(b) for b in mla_blocks(pl_module.model)}),
                   "loss": float(outputs["loss"]), "kl": float(m["distill/kl"]), "user_loss": float(m["train/loss"])}
            with open(work / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    class Die(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

    L.seed_everything(0, verbose=False)
    module = StepLM(tiny_model("llama").eval())
    config = MLAConfig(kv_lora_rank=24, qk_rope_head_dim=8)
    # reorder=True: the energy-sorted cuts depend on the running latent moments, the state hardest to resume
    rank_cb = GradualRankReduction(8, schedule="cosine", end=0.75, energy_decay=0.5, reorder=True)
    callbacks = [
        MLASurgery(config, calibration() if calibrate else None, train="attention"),
        rank_cb,
        Distillation(weight=1.0, loss_weight=0.5, chunk_size=16),
        ModelCheckpoint(dirpath=work / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1),
        Log(),
        Die(),
    ]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=work / "ckpt" / "last.ckpt" if resume else None)
    save_file({k: v.contiguous() for k, v in module.model.state_dict().items()}, str(work / "final.safetensors"))
    state = rank_cb.state_dict()
    moments = [] if state["moments"] is None else state["moments"]["moments"]
    torch.save({"rank": state["rank"], "total": state["total"], "moments": moments}, work / "rank_state.pt")


def run(server, work: Path, *, resume: bool = False, calibrate: bool = True, kill_at_step: int | None = None,
        kill_after: float | None = None, timeout: float = 300.0) -> tuple[bool, float]:
    """A training process; SIGKILLed ``kill_after`` seconds after training started if given. Returns
    (killed, seconds of training)."""
    receive, send = server.Pipe(duplex=False)
    proc = server.Process(target=train, args=(str(work), resume, calibrate, kill_at_step, send))
    proc.start()
    send.close()
    started = receive.poll(timeout)
    start = time.perf_counter()
    proc.join(kill_after if (started and kill_after is not None) else timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join(30)
        assert kill_after is not None, f"the training process hung for {timeout} s"
    receive.close()
    assert proc.exitcode in (0, -signal.SIGKILL), f"training process failed with exit code {proc.exitcode}"
    return proc.exitcode == -signal.SIGKILL, time.perf_counter() - start


def log(work: Path) -> list[dict]:
    path = work / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final(work: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(work / "final.safetensors"), torch.load(work / "rank_state.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    killed, seconds = run(server, work)
    assert not killed
    rows = log(work)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ranks = [r["rank"] for r in rows]
    assert ranks[0] == [24] and ranks[-1] == [8] and len({tuple(r) for r in ranks}) > 2  # the schedule moves
    return {"work": work, "rows": rows, "final": final(work), "seconds": seconds}


def check_resumed(reference, work: Path, resumed_from: int) -> None:
    rows = log(work)
    want = {r["step"]: r for r in reference["rows"]}
    after = [r for r in rows if r["step"] > resumed_from]
    # the resumed process logged exactly the remaining steps, each as in the uninterrupted run, bit for bit
    tail = after[len(after) - (STEPS - resumed_from):]
    assert [r["step"] for r in tail] == list(range(resumed_from + 1, STEPS + 1))
    for r in tail:
        assert r == want[r["step"]], (r, want[r["step"]])
    weights, state = final(work)
    ref_weights, ref_state = reference["final"]
    assert weights.keys() == ref_weights.keys()
    for k in ref_weights:
        assert torch.equal(weights[k], ref_weights[k]), k
    assert (state["rank"], state["total"]) == (ref_state["rank"], ref_state["total"]) == (8, STEPS)
    assert len(state["moments"]) == len(ref_state["moments"]) == 2  # one per layer
    assert all(torch.equal(a, b) for a, b in zip(state["moments"], ref_state["moments"]))


def last_step(work: Path) -> int:
    ckpt = work / "ckpt" / "last.ckpt"
    if not ckpt.exists():
        return 0
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


@pytest.mark.parametrize("calibrate", [False, True], ids=["structure-only", "reconverted"])
def test_training_killed_mid_step_resumes_with_the_same_schedule_distillation_and_weights(server, reference,
                                                                                          tmp_path, calibrate):
    """SIGKILL between a step's backward and its optimizer step; resume from last.ckpt, either building the empty
    MLA structure (``MLASurgery(config, None)``, the intended way) or converting again."""
    killed, _ = run(server, tmp_path, kill_at_step=KILL_STEP)
    assert killed
    assert [r["step"] for r in log(tmp_path)] == list(range(1, KILL_STEP + 1))
    assert last_step(tmp_path) == KILL_STEP
    killed, _ = run(server, tmp_path, resume=True, calibrate=calibrate)
    assert not killed
    check_resumed(reference, tmp_path, KILL_STEP)


def test_training_killed_at_random_moments_resumes_from_its_last_checkpoint(server, reference, tmp_path):
    """Seeded random kill times over the run (checkpoint writes included); each is resumed from whatever
    last.ckpt holds (from scratch if none was written yet) and must end as the uninterrupted run."""
    rng = random.Random(SEED)
    seen = []
    for k in range(RANDOM_KILLS):
        work = tmp_path / f"run{k}"
        work.mkdir()
        delay = rng.uniform(0.1, 0.9) * reference["seconds"]
        killed, _ = run(server, work, kill_after=delay)
        step = last_step(work)
        seen.append((round(delay, 2), killed, step))
        run(server, work, resume=step > 0, calibrate=step == 0)
        check_resumed(reference, work, step)
    print("(delay, killed, resumed from step):", seen)
