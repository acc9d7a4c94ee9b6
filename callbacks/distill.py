"""`Distillation`: add ``weight·T²·KL(teacher ‖ student)`` to the loss Lightning backpropagates.

Mechanism. A callback cannot replace the loss (``on_before_backward`` only sees it) and a second backward breaks
DDP, so in ``setup`` the callback wraps the LightningModule's ``training_step`` with an instance attribute
(Lightning looks the hook up by name at every call, the DDP wrapper too). The wrapper

1. calls the user's ``training_step`` while a forward hook on the model's decoder stack records each student
   forward's keyword arguments and final hidden states ``[B, T, D]`` (still attached to the graph);
2. runs the teacher on the same inputs under ``torch.no_grad()`` in eval mode;
3. returns ``loss_weight · user_loss + weight · T²·KL`` (in place of ``loss`` in a returned dict), so the one
   backward Lightning runs covers both, under DDP and gradient accumulation alike.

``teardown`` removes the wrapper and the hook. The teacher comes from `MLASurgery` (which keeps it before
converting) or is given; it is never registered in the LightningModule: it is in no checkpoint and no optimizer.
Metrics (torchmetrics): ``distill/kl`` and ``distill/top1`` (agreement of the argmaxes) as token means, and
``distill/ppl`` (student next-token perplexity on the same batch), all over non-padding tokens.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from transmla_surgery.architectures import decoder_layers
from transmla_surgery.distill import (
    ModelTeacher,
    Teacher,
    base_model,
    distillation_loss,
    hidden_state_loss,
    output_head,
)
from transmla_surgery.errors import ConfigError

from . import _fsdp
from .surgery import MLASurgery, find_model

IGNORE = -100


def _valid_mask(kwargs: dict[str, Any], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """``[B, T]`` bool: tokens that take part (the 2-D ``attention_mask`` if given, else all)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(shape):
        return mask.to(device=device).bool()
    return torch.ones(shape, dtype=torch.bool, device=device)


def _next_tokens(kwargs: dict[str, Any], valid: torch.Tensor) -> torch.Tensor | None:
    """``[B, T]`` next-token targets (``-100`` where there is none: last position, padding)."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.shape != valid.shape:
        return None
    tgt = torch.full_like(ids, IGNORE)
    tgt[:, :-1] = ids[:, 1:]
    ok = torch.zeros_like(valid)
    ok[:, :-1] = valid[:, :-1] & valid[:, 1:]
    return tgt.masked_fill(~ok, IGNORE)


class Distillation(Callback):
    """Distil from the original model into the converted one.

    Args:
        weight: factor of ``T²·KL(teacher ‖ student)`` (mean over non-padding tokens).
        loss_weight: factor of the user's own loss (the value ``training_step`` returns); 0 distils only.
        temperature: ``T``.
        hidden_weight: factor of the layer-wise residual-stream loss (`hidden_state_loss`: mean over decoder
            layers of the student's squared error to the teacher's layer output, relative to the teacher's energy
            there). 0 (default) adds nothing and records no layer outputs. A dense signal at every layer: when only
            attention trains, the rest of the network is the teacher's, so each stream can match exactly.
        chunk_size: tokens per KL chunk (peak logits memory ``2 · chunk_size · vocab``).
        teacher: a frozen teacher model to use instead of the one `MLASurgery` keeps (it is never registered in
            the LightningModule).
        model_attr: see `MLASurgery`.
    """

    def __init__(
        self,
        weight: float = 1.0,
        loss_weight: float = 1.0,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        *,
        hidden_weight: float = 0.0,
        teacher: nn.Module | None = None,
        model_attr: str | None = None,
    ) -> None:
        for name, value in (("weight", weight), ("loss_weight", loss_weight), ("hidden_weight", hidden_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise ConfigError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        self.weight = float(weight)
        self.loss_weight = float(loss_weight)
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.hidden_weight = float(hidden_weight)
        self.model_attr = model_attr
        self._given_teacher = ModelTeacher(teacher) if teacher is not None else None
        self.teacher: Teacher | None = None
        self._model: nn.Module | None = None
        self._module: pl.LightningModule | None = None
        self._handle = None
        self._capturing = False
        self._captured: list[tuple[dict[str, Any], torch.Tensor, list[torch.Tensor]]] = []
        self._layer_handles: list[Any] = []
        self._layer_states: list[torch.Tensor] = []  # outputs of the decoder layers in the forward under way
        self._recording = False
        self.metrics = nn.ModuleDict({"kl": MeanMetric(), "top1": MeanMetric(), "ppl": Perplexity(ignore_index=IGNORE)})

    # ------------------------------------------------------------------ setup / teardown
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ConfigError(
                "Distillation adds its loss to what training_step returns, which needs automatic optimization; with "
                "manual optimization add transmla_surgery.distill.distillation_loss to your loss yourself"
            )
        self._model = find_model(pl_module, self.model_attr)
        self._handle = base_model(self._model).register_forward_hook(self._capture, with_kwargs=True)
        if self.hidden_weight > 0:
            self._layer_handles = [layer.register_forward_hook(self._record_layer) for layer in decoder_layers(self._model)]
        self._install(pl_module)

    def _install(self, pl_module: pl.LightningModule) -> None:
        if "training_step" in vars(pl_module):
            raise ConfigError("training_step is already wrapped (two Distillation callbacks?)")
        original = pl_module.training_step  # the bound class method
        callback = self

        def training_step(module: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
            return callback._training_step(module, original, *args, **kwargs)

        pl_module.training_step = types.MethodType(training_step, pl_module)
        self._module = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles = []
        if self._module is not None and "training_step" in vars(self._module):
            del self._module.training_step  # the class method shows through again
        self._module = None
        self.teacher = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        teacher = self._given_teacher
        if teacher is None:
            keepers = [cb for cb in trainer.callbacks if isinstance(cb, MLASurgery) and cb.teacher is not None]
            if not keepers:
                raise ConfigError(
                    "Distillation has no teacher: add MLASurgery(...) to the same Trainer (it keeps the original "
                    "before converting) or pass Distillation(teacher=<frozen original model>)"
                )
            teacher = keepers[0].teacher
        param = next(p for p in base_model(self._model).parameters() if p.is_floating_point())
        # Lightning moved the student to its device (and a "-true" precision's dtype); the teacher follows. Under
        # FSDP the student computes in the mixed-precision parameter dtype (its sharded parameters keep theirs).
        dtype = param.dtype
        mixed = getattr(trainer.strategy, "mixed_precision_config", None) if _fsdp.sharded_root(trainer) is not None else None
        if mixed is not None and getattr(mixed, "param_dtype", None) is not None:
            dtype = mixed.param_dtype
        self.teacher = teacher.to(param.device, dtype)
        self.metrics.to(param.device)

    # ------------------------------------------------------------------ the step
    def _record_layer(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Fires for the student's training forward (capturing, grad on) and, with the swap-in teacher, for the
        # teacher's pass through the same layers (recording, under no_grad).
        if self._recording or (self._capturing and torch.is_grad_enabled()):
            self._layer_states.append(output[0] if isinstance(output, tuple) else output)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (self._capturing and torch.is_grad_enabled()):
            return
        if args:  # transformers passes keywords; a positional first argument is input_ids
            kwargs = {"input_ids": args[0], **kwargs}
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        layers, self._layer_states = self._layer_states, []
        self._captured.append((dict(kwargs), hidden, layers))

    def _training_step(self, module: pl.LightningModule, original: Any, *args: Any, **kwargs: Any) -> Any:
        self._captured = []
        self._layer_states = []
        self._capturing = True
        try:
            out = original(*args, **kwargs)
        finally:
            self._capturing = False
        captured, self._captured = self._captured, []
        if out is None:
            return out  # the user skipped this batch
        loss = out["loss"] if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor):
            raise ConfigError(f"Distillation: training_step must return a loss tensor or a dict with 'loss', got {type(out).__name__}")
        if not captured:
            raise ConfigError(
                "Distillation: training_step did not run the model with gradients enabled, so there is nothing to "
                "distil (the callback hooks the forward of the model's decoder stack)"
            )
        parts = [self._distil(kw, hidden, layers) for kw, hidden, layers in captured]
        kd = torch.stack([p[0] for p in parts]).mean()
        total = self.loss_weight * loss + self.weight * kd
        batch_size = int(captured[0][1].shape[0])
        module.log("distill/loss", kd.detach(), on_step=True, on_epoch=False, batch_size=batch_size)
        if self.hidden_weight > 0:
            hidden_loss = torch.stack([p[1] for p in parts]).mean()
            total = total + self.hidden_weight * hidden_loss
            module.log("distill/hidden", hidden_loss.detach(), on_step=True, on_epoch=False, batch_size=batch_size)
        for name, metric in self.metrics.items():
            if metric.update_count:
                # compute() syncs across processes (every rank reaches this line each step); logged as is.
                module.log(f"distill/{name}", metric.compute(), on_step=True, on_epoch=False,
                           prog_bar=name == "kl", batch_size=batch_size)
            metric.reset()
        if isinstance(out, Mapping):
            return {**out, "loss": total}
        return total

    def _teacher_pass(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher's final hidden states and, when ``hidden_weight > 0``, its decoder layers' outputs."""
        assert self.teacher is not None and self._model is not None
        if self.hidden_weight <= 0:
            return self.teacher.hidden_states(self._model, kwargs), []
        extra = []
        if isinstance(self.teacher, ModelTeacher):  # its own layers: hook them for this pass
            extra = [layer.register_forward_hook(self._record_layer) for layer in decoder_layers(self.teacher.model)]
        self._layer_states, self._recording = [], True
        try:
            final = self.teacher.hidden_states(self._model, kwargs)
        finally:
            self._recording = False
            for handle in extra:
                handle.remove()
        states, self._layer_states = self._layer_states, []
        return final, states

    def _distil(self, kwargs: dict[str, Any], hidden: torch.Tensor, layers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.teacher is not None and self._model is not None
        teacher_hidden, teacher_layers = self._teacher_pass(kwargs)
        valid = _valid_mask(kwargs, hidden.shape[:2], hidden.device)
        hidden_loss = hidden_state_loss(layers, teacher_layers, valid) if self.hidden_weight > 0 else None
        targets = _next_tokens(kwargs, valid)
        flat = valid.reshape(-1)
        hs = hidden.reshape(-1, hidden.shape[-1])[flat]
        ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[flat]
        tg = None if targets is None else targets.reshape(-1)[flat]
        metrics = self.metrics

        def observe(zs: torch.Tensor, zt: torch.Tensor, tg: torch.Tensor) -> None:
            if tg.numel() and bool((tg != IGNORE).any()):
                metrics["ppl"].update(zs.unsqueeze(0), tg.unsqueeze(0))

        result = distillation_loss(
            hs, ht, output_head(self._model), self.teacher.head(self._model),
            temperature=self.temperature, chunk_size=self.chunk_size, targets=tg, observe=observe,
        )
        if result.count:
            metrics["kl"].update(result.kl_sum / result.count, weight=result.count)
            metrics["top1"].update(result.agree / result.count, weight=result.count)
        else:
            rank_zero_warn("Distillation: a batch had no non-padding tokens")
        return result.loss, hidden_loss
