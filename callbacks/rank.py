"""`GradualRankReduction`: lower the MLA latent rank over training, with static shapes, resumable.

Like Lightning's ``ModelPruning``: shapes never change (a mask on latent channels), the rank is a function of
training progress, cut channels are zeroed so checkpoints hold the reduced model in folded form, logging is
rank-zero. Like ``BaseFinetuning``: the state (current rank, the schedule's total, the running latent moments)
is the callback's ``state_dict`` and is re-applied when a run resumes, so a stopped and resumed run ends with the
same weights as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from transmla_surgery.errors import ConfigError
from transmla_surgery.rank import (
    LatentMoments,
    Schedule,
    active_rank,
    mla_blocks,
    reduce_rank,
    schedule_fraction,
    scheduled_rank,
)

from . import _fsdp
from .surgery import find_model

Interval = Literal["step", "epoch"]


class GradualRankReduction(Callback):
    """Lower every block's active latent rank from ``start_rank`` to ``target_rank`` as training progresses.

    Args:
        target_rank: the final rank (what `MLAExport` truncates to).
        start_rank: the rank at progress 0; default the converted ``kv_lora_rank``.
        schedule: ``"linear"``, ``"cosine"``, ``"steps"`` (``num_steps`` equal cuts) or a function mapping local
            progress ``p ∈ [0, 1]`` to the fraction of the reduction done.
        interval: progress by optimizer step (``global_step / total_steps``) or by epoch
            (``current_epoch / max_epochs``).
        begin, end: progress at which the reduction starts and reaches ``target_rank`` (``end < 1`` leaves time
            to recover at the final rank).
        total: steps (or epochs) that progress 1 stands for; default ``trainer.max_steps`` (or the estimated
            stepping batches) / ``trainer.max_epochs``. Fixed at the first fit and kept in the state.
        reorder: before each cut, rotate each block's active latent (exactly, orthogonally) so its channels are
            sorted by their running second moment, then cut the weakest. Off by default: the conversion already
            orders the latent by an attention-weighted energy, and on SmolLM2 (rank 160 → 64, no training)
            cutting in that order gave WikiText-2 perplexity 133 where re-ordering by the latent moment gave 140
            (moments measured on WikiText) and 183 (on novels); see bench/results/recovery_smollm2.md.
        energy_decay: decay of the moving average of the latent second moment, per training batch.
        multiple_of: ranks move in steps of this many channels (e.g. 8 or 16 for kernels).
        model_attr: see `MLASurgery`.

    Under Lightning's ``FSDPStrategy`` each process cuts the part of the weights and optimizer state it holds (the
    masks are whole on every process); ``reorder=True`` is refused there (a rotation mixes whole rows and columns
    of sharded tensors and their optimizer moments).
    """

    def __init__(
        self,
        target_rank: int,
        start_rank: int | None = None,
        *,
        schedule: Schedule = "linear",
        interval: Interval = "step",
        begin: float = 0.0,
        end: float = 0.8,
        num_steps: int = 4,
        total: int | None = None,
        reorder: bool = False,
        energy_decay: float = 0.9,
        multiple_of: int = 1,
        model_attr: str | None = None,
    ) -> None:
        for name, value in (("target_rank", target_rank), ("num_steps", num_steps), ("multiple_of", multiple_of)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if start_rank is not None and (isinstance(start_rank, bool) or not isinstance(start_rank, int) or start_rank < target_rank):
            raise ConfigError(f"start_rank must be an integer >= target_rank={target_rank}, got {start_rank!r}")
        if not callable(schedule) and schedule not in ("linear", "cosine", "steps"):
            raise ConfigError(f"schedule must be 'linear', 'cosine', 'steps' or a function, got {schedule!r}")
        if interval not in ("step", "epoch"):
            raise ConfigError(f"interval must be 'step' or 'epoch', got {interval!r}")
        if not (0.0 <= begin < end <= 1.0):
            raise ConfigError(f"need 0 <= begin < end <= 1, got begin={begin}, end={end}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ConfigError(f"total must be a positive integer, got {total!r}")
        if not 0.0 <= energy_decay < 1.0:
            raise ConfigError(f"energy_decay must be in [0, 1), got {energy_decay}")
        self.target_rank = target_rank
        self._start_arg = start_rank  # as given (the state key must not change when start_rank is resolved)
        self.start_rank = start_rank
        self.schedule = schedule
        self.interval = interval
        self.begin, self.end, self.num_steps = begin, end, num_steps
        self.total = total
        self._total_arg = total  # as given (resuming warns when the saved length differs from an unset one)
        self.reorder = reorder
        self.energy_decay = energy_decay
        self.multiple_of = multiple_of
        self.model_attr = model_attr
        self.rank: int | None = None  # current active rank (None before the first fit)
        self._moments: LatentMoments | None = None
        self._blocks: list = []
        self._model = None
        self._kv_before = 0
        self._rope_dim = 0
        self._restored: dict[str, Any] | None = None
        self._restored_moments: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_rank=self.target_rank, start_rank=self._start_arg)

    # ------------------------------------------------------------------ schedule
    def _total(self, trainer: pl.Trainer) -> int:
        if self.interval == "epoch":
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ConfigError("GradualRankReduction(interval='epoch') needs Trainer(max_epochs=...) or total=")
            return int(trainer.max_epochs)
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        est = trainer.estimated_stepping_batches
        if est == float("inf"):
            raise ConfigError("GradualRankReduction cannot tell how long training lasts: set max_steps, max_epochs or total=")
        return int(est)

    def progress(self, trainer: pl.Trainer) -> float:
        done = trainer.current_epoch if self.interval == "epoch" else trainer.global_step
        return min(1.0, done / max(1, self.total or 1))

    def rank_at(self, progress: float) -> int:
        assert self.start_rank is not None
        fraction = schedule_fraction(progress, self.schedule, begin=self.begin, end=self.end, num_steps=self.num_steps)
        return scheduled_rank(fraction, self.start_rank, self.target_rank, self.multiple_of)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # MLASurgery may come later in the callback list: the blocks are looked up in on_fit_start. What can be
        # checked against the config of a listed MLASurgery is checked now, before any conversion.
        from .surgery import MLASurgery

        if self.reorder and _fsdp.fsdp_strategy(trainer) is not None:
            raise ConfigError(
                "GradualRankReduction(reorder=True) is not supported under FSDP: the re-ordering rotates whole "
                "weights and optimizer moments, which FSDP shards flat across processes; use reorder=False (the "
                "default, and the better setting measured on SmolLM2) or DDP"
            )
        for cb in trainer.callbacks:
            if isinstance(cb, MLASurgery):
                self._check_ranks(cb.config.kv_lora_rank)

    def _check_ranks(self, width: int) -> None:
        start = width if self.start_rank is None else self.start_rank
        if start > width or self.target_rank > width:
            raise ConfigError(
                f"GradualRankReduction(start_rank={self.start_rank}, target_rank={self.target_rank}) exceeds the "
                f"converted kv_lora_rank={width}"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = find_model(pl_module, self.model_attr)
        blocks = mla_blocks(model)
        width = blocks[0].kv_lora_rank
        self._check_ranks(width)
        if self.start_rank is None:
            self.start_rank = width
        self._blocks, self._model = blocks, model
        self._kv_before = 2 * int(model.config.num_key_value_heads) * blocks[0].geometry.source_head_dim
        self._rope_dim = blocks[0].qk_rope_head_dim
        if self.reorder:
            if self._moments is None or self._moments.blocks is not blocks:
                self._moments = LatentMoments(blocks, self.energy_decay)
            self._moments.collecting = False
            self._moments.attach()
        if self.rank is None and self._restored is None:
            self.total = self.total or self._total(trainer)
            self.rank = self.start_rank
        # One device and DDP have restored the checkpoint's callback state by now; FSDP restores it after
        # on_fit_start (Lightning's restore_checkpoint_after_setup), so on_train_start applies it there.
        self._apply_restored(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_restored(trainer)

    def _apply_restored(self, trainer: pl.Trainer) -> None:
        if self._restored is not None:  # resumed: the saved schedule and rank win
            state, self._restored = self._restored, None
            if self._total_arg is None and state["total"] != self._total(trainer):
                rank_zero_warn(
                    f"GradualRankReduction keeps the resumed schedule length {state['total']} ({self.interval}s), "
                    f"not this trainer's {self._total(trainer)}"
                )
            self.total = state["total"]
            self.rank = state["rank"]
        if self._moments is not None and self._restored_moments is not None:
            self._moments.load_state_dict(self._restored_moments)
            self._restored_moments = None
        if {active_rank(b) for b in self._blocks} != {self.rank}:
            # A resumed model's mask is not persistent; its cut channels are already zero in the weights.
            self._cut(trainer, self.rank, reorder=False)

    def _cut(self, trainer: pl.Trainer, rank: int, *, reorder: bool = True) -> None:
        root = _fsdp.sharded_root(trainer)
        if root is not None:  # FSDP: each rank cuts the part of the weights and optimizer state it holds
            _fsdp.reduce_rank_sharded(self._blocks, rank, root, trainer.optimizers)
        else:
            reduce_rank(self._blocks, rank, moments=self._moments if reorder else None, optimizers=trainer.optimizers)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        rank = self.rank_at(self.progress(trainer))
        if self.rank is not None and rank < self.rank:
            self._cut(trainer, rank)
            self.rank = rank
        if self._moments is not None:
            self._moments.collecting = True  # this batch's training forward(s) count

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._moments is not None:
            self._moments.collecting = False  # nothing between batches (evaluation, other callbacks) counts
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
            if trainer.world_size > 1:  # every rank must hold the same moments, hence the same rotations
                reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
            self._moments.fold(reduce)
        compression = 1.0 - (self.rank + self._rope_dim) / self._kv_before
        pl_module.log("mla/rank", float(self.rank), on_step=True, on_epoch=False, prog_bar=True, rank_zero_only=True)
        pl_module.log("mla/kv_compression", compression, on_step=True, on_epoch=False, rank_zero_only=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._moments is not None:
            self._moments.detach()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "rank": self.rank,
            "start_rank": self.start_rank,
            "target_rank": self.target_rank,
            "total": self.total,
            "moments": None if self._moments is None else self._moments.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("target_rank") != self.target_rank:
            raise ConfigError(
                f"checkpoint's GradualRankReduction has target_rank={state_dict.get('target_rank')}, this one "
                f"{self.target_rank}"
            )
        self._restored = {"rank": state_dict["rank"], "total": state_dict["total"]}
        self._restored_moments = state_dict.get("moments")
