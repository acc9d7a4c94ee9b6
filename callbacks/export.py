"""`MLAExport`: at the end of ``fit``, truncate the latent to its final rank and export a DeepSeek-V3 checkpoint.

The export (``transmla_surgery.export.export_deepseek``) writes, reloads through the stock loader and verifies;
it is imported when the export runs. Truncation (`transmla_surgery.rank.truncate_rank`) makes the masked rank
physical, so the exported cache is really smaller. ``on_fit_end`` runs after the strategy's teardown (under DDP
the model is back on the CPU); every process truncates its model, global rank 0 writes, the others wait. Under
FSDP the model stays sharded: the full weights are gathered to global rank 0, which rebuilds, truncates and writes
a plain copy while the others wait.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from transmla_surgery.errors import ConfigError
from transmla_surgery.rank import mla_blocks, model_rank, reduce_rank, truncate_rank

from . import _fsdp
from .rank import GradualRankReduction
from .surgery import find_model


def _exporter():
    from transmla_surgery.export import export_deepseek  # lazy: heavy, and optional for training

    return export_deepseek


class MLAExport(Callback):
    """Export the trained model (and optionally the best checkpoint) as DeepSeek-V3 checkpoints.

    Args:
        dirpath: the final model goes to ``dirpath/final`` (``dirpath/best`` for the best checkpoint).
        rank: latent rank to export; default the target of a `GradualRankReduction` in the trainer, else the
            active rank. Must not exceed the active rank.
        export_best: also export ``trainer.checkpoint_callback.best_model_path`` (at the rank saved in it).
        tokenizer: saved with the export; default ``pl_module.tokenizer`` if there is one.
        overwrite: replace earlier exports.
        model_attr: see `MLASurgery`.
        **export_kwargs: passed to ``export_deepseek`` (``dtype``, ``verify``, ``on_unsupported``, ``biases``).

    After the fit, ``reports`` maps ``"final"``/``"best"`` to what ``export_deepseek`` returned (rank 0).

    Under Lightning's ``FSDPStrategy`` every rank holds a shard of the model: the full weights are gathered to the
    CPU of global rank 0 (``FULL_STATE_DICT``, ``offload_to_cpu``, ``rank0_only``), a plain copy is rebuilt and
    exported there while the other ranks wait; the sharded model in the LightningModule stays as it is, and
    ``model`` (rank 0) holds the exported copy at its final rank. ``export_best`` then needs
    ``state_dict_type="full"`` (a one-file checkpoint).
    """

    def __init__(
        self,
        dirpath: str | Path,
        rank: int | None = None,
        *,
        export_best: bool = False,
        tokenizer: Any = None,
        overwrite: bool = False,
        model_attr: str | None = None,
        **export_kwargs: Any,
    ) -> None:
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"rank must be a positive integer, got {rank!r}")
        self.dirpath = Path(dirpath)
        self.rank = rank
        self.export_best = export_best
        self.tokenizer = tokenizer
        self.overwrite = overwrite
        self.model_attr = model_attr
        self.export_kwargs = export_kwargs
        self.reports: dict[str, Any] = {}
        self.model: torch.nn.Module | None = None

    def _final_rank(self, trainer: pl.Trainer, model: torch.nn.Module) -> int:
        if self.rank is not None:
            return self.rank
        for cb in trainer.callbacks:
            if isinstance(cb, GradualRankReduction):
                return cb.target_rank
        return model_rank(model)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = _fsdp.fsdp_strategy(trainer)
        if stage == "fit" and self.export_best and strategy is not None and strategy._state_dict_type != "full":
            raise ConfigError(
                "MLAExport(export_best=True) under FSDPStrategy(state_dict_type='sharded'): the best checkpoint is a "
                "directory of shards; use state_dict_type='full' (one file) or export_best=False"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = find_model(pl_module, self.model_attr)
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
        export = _exporter()
        root = _fsdp.sharded_root(trainer)
        if self.export_best:
            best = self._best_model(trainer, pl_module, model, gathered=root is not None)
            if best is not None and trainer.is_global_zero:
                self.reports["best"] = export(best, self.dirpath / "best", tokenizer, overwrite=self.overwrite, **self.export_kwargs)
        rank = self._final_rank(trainer, model)
        if root is not None:
            # FSDP: every rank holds a shard. Gather the full weights to global rank 0 (CPU), rebuild a plain copy
            # there and export it; the sharded training model is left as it is.
            state = _fsdp.full_state_dict(root, pl_module, model)
            if trainer.is_global_zero:
                model = _fsdp.rebuild(model, state)
                del state
            else:
                model = None
        if model is not None:
            # Cut to the final rank first if training stopped above it (no energy re-ordering: no moments here).
            reduce_rank(mla_blocks(model), rank)
            truncate_rank(model, rank)
            if root is not None:
                self.model = model  # rank 0: the gathered full model, truncated (what was exported)
        if trainer.is_global_zero:
            self.reports["final"] = export(model, self.dirpath / "final", tokenizer, overwrite=self.overwrite, **self.export_kwargs)
            rank_zero_info(f"MLAExport: wrote {self.dirpath / 'final'} (kv_lora_rank {rank})")
        trainer.strategy.barrier("MLAExport")

    def _best_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: torch.nn.Module,
                    gathered: bool = False) -> torch.nn.Module | None:
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        if not ckpt:
            rank_zero_info("MLAExport(export_best=True): no best checkpoint recorded; exporting the final model only")
            return None
        if gathered and not trainer.is_global_zero:
            return None  # FSDP: only global rank 0 builds and writes it
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        prefix = next(_fsdp._clean(name) for name, m in pl_module.named_modules() if m is model) + "."
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        if gathered:
            best = _fsdp.rebuild(model, state)
        else:
            best = copy.deepcopy(model).cpu()
            best.load_state_dict(state)
        for block in mla_blocks(best):  # the mask is not in checkpoints; the saved rank is applied below
            block.latent_mask.fill_(1)
        rank = None
        for cb in trainer.callbacks:
            if isinstance(cb, GradualRankReduction):
                saved = checkpoint.get("callbacks", {}).get(cb.state_key)
                rank = None if saved is None else saved.get("rank")
        rank = rank or model_rank(best)
        if self.rank is not None:
            rank = min(rank, self.rank)
        reduce_rank(mla_blocks(best), rank)
        return truncate_rank(best, rank)
