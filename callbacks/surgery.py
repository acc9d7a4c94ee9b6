"""`MLASurgery`: convert the LightningModule's Hugging Face model to MLA in ``setup``.

``setup`` runs before ``configure_model``, before checkpoint weights are restored and before the optimizers
exist (see ``shared/design/integration.md``), so the optimizer sees the new attention parameters and resuming
from a checkpoint of a converted model loads into the converted structure. It also runs before a DDP or FSDP
strategy wraps the model (``strategy.setup``), so FSDP shards the converted model. FSDP restores a checkpoint
after ``on_fit_start`` (``restore_checkpoint_after_setup``): what depends on the restore waits for
``on_train_start`` there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from transmla_surgery.architectures import check_supported, decoder_layers
from transmla_surgery.config import MLAConfig
from transmla_surgery.distill import Teacher, keep_teacher
from transmla_surgery.errors import ConfigError, UnsupportedModelError
from transmla_surgery.mla_attention import MLAAttention
from transmla_surgery.report import ConversionReport
from transmla_surgery.surgery import apply_mla_structure, convert_to_mla, is_converted, record_conversion

from . import _fsdp

Trainable = Literal["all", "attention"]
TeacherKind = Literal["auto", "swap", "copy", "none"]


def find_model(pl_module: nn.Module, attr: str | None = None) -> nn.Module:
    """The Hugging Face model inside ``pl_module``: the attribute ``attr`` (dotted path allowed), or the single
    top-level ``transformers.PreTrainedModel`` among its submodules."""
    from transformers import PreTrainedModel

    if attr is not None:
        obj: Any = pl_module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise AttributeError(f"{type(pl_module).__name__} has no attribute {attr!r} (model_attr)")
            obj = getattr(obj, part)
        if not isinstance(obj, nn.Module) or not hasattr(obj, "config"):
            raise UnsupportedModelError(f"{type(pl_module).__name__}.{attr} is {type(obj).__name__}, not a transformers model")
        return obj
    found = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, PreTrainedModel) and name]
    top = [(n, m) for n, m in found if not any(n.startswith(other + ".") for other, _ in found)]
    if len(top) != 1:
        names = ", ".join(n for n, _ in top) or "none"
        raise UnsupportedModelError(
            f"{type(pl_module).__name__} holds {len(top)} transformers models at the top level ({names}); pass "
            "model_attr='<attribute>' to say which one to convert"
        )
    return top[0][1]


def attention_parameter_names(model: nn.Module) -> set[str]:
    """Names (in ``model``) of every parameter inside an `MLAAttention` block."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, MLAAttention):
            names.update(f"{prefix}.{n}" for n, _ in module.named_parameters())
    return names


def _structure_only(model: nn.Module, config: MLAConfig) -> None:
    """Empty MLA blocks of ``config``'s geometry (weights come from a checkpoint), recorded as `convert_to_mla`
    records a conversion."""
    record_conversion(model.config, check_supported(model), config)
    modes = [layer.self_attn.training for layer in decoder_layers(model)]
    apply_mla_structure(model)
    for layer, mode in zip(decoder_layers(model), modes):  # as convert_to_mla does: the block keeps the mode
        layer.self_attn.train(mode)


class MLASurgery(Callback):
    """Convert the wrapped Hugging Face model's attention to MLA in ``setup``.

    Args:
        config: the target geometry (`MLAConfig`).
        calibration: token batches for `convert_to_mla` (an iterable, or a function returning one, called only when
            needed). ``None`` builds the MLA structure without calibrating: only for resuming, where the weights
            come from the checkpoint; ``on_fit_start`` raises if no checkpoint was loaded.
        model_attr: attribute (dotted path) of the LightningModule holding the model; default: the single
            top-level ``PreTrainedModel``.
        train: ``"attention"`` freezes every other parameter of the model (``requires_grad=False``), so only the
            new attention trains; ``"all"`` leaves ``requires_grad`` as it is.
        teacher: what to keep for `Distillation` before converting. ``"swap"`` keeps the original attention blocks
            (cheap; exact only when just attention trains), ``"copy"`` a frozen copy of the whole model, ``"none"``
            nothing; ``"auto"``: ``"swap"`` with ``train="attention"``, else ``"copy"``, and only when a
            `Distillation` callback is in the trainer.
        keep_activations, progress: passed to `convert_to_mla`.
        convert_on: ``"accelerator"`` moves the model to the strategy's device before converting (calibration runs
            there; Lightning would move it there next anyway), ``"model"`` converts where the model is.

    After ``setup``: ``report`` (the `ConversionReport`, ``None`` when nothing was calibrated), ``teacher``.

    Under Lightning's ``FSDPStrategy`` the conversion runs on each process before the strategy wraps the model, and
    the strategy's options are checked and completed (`callbacks._fsdp.configure`): unset ``auto_wrap_policy``
    wraps each decoder layer and each MLA block, unset ``sync_module_states`` becomes true on GPUs,
    ``use_orig_params=False`` is refused.
    """

    def __init__(
        self,
        config: MLAConfig,
        calibration: Iterable | Callable[[], Iterable] | None,
        *,
        model_attr: str | None = None,
        train: Trainable = "all",
        teacher: TeacherKind = "auto",
        keep_activations: bool = False,
        progress: bool = False,
        convert_on: Literal["accelerator", "model"] = "accelerator",
    ) -> None:
        if not isinstance(config, MLAConfig):
            raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
        if train not in ("all", "attention"):
            raise ConfigError(f"train must be 'all' or 'attention', got {train!r}")
        if teacher not in ("auto", "swap", "copy", "none"):
            raise ConfigError(f"teacher must be 'auto', 'swap', 'copy' or 'none', got {teacher!r}")
        if convert_on not in ("accelerator", "model"):
            raise ConfigError(f"convert_on must be 'accelerator' or 'model', got {convert_on!r}")
        if calibration is not None and not callable(calibration) and isinstance(calibration, (str, bytes)):
            raise ConfigError("calibration must be token batches (or a function returning them), not a string")
        if teacher == "swap" and train == "all":
            rank_zero_warn(
                "MLASurgery(teacher='swap', train='all'): the swapped-in teacher shares every non-attention weight "
                "with the student, so it drifts as they train; use teacher='copy' or train='attention'"
            )
        self.config = config
        self.calibration = calibration
        self.model_attr = model_attr
        self.train = train
        self.teacher_kind = teacher
        self.keep_activations = keep_activations
        self.progress = progress
        self.convert_on = convert_on
        self.report: ConversionReport | None = None
        self.teacher: Teacher | None = None
        self.structure_only = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kv_lora_rank=self.config.kv_lora_rank, rope=self.config.qk_rope_head_dim)

    def _teacher_kind(self, trainer: pl.Trainer, stage: str) -> str | None:
        from .distill import Distillation

        if stage != "fit" or self.teacher_kind == "none":
            return None
        if self.teacher_kind == "auto":
            if not any(isinstance(cb, Distillation) for cb in trainer.callbacks):
                return None
            return "swap" if self.train == "attention" else "copy"
        return self.teacher_kind

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = find_model(pl_module, self.model_attr)
        _fsdp.check_options(trainer)  # a strategy the callbacks refuse is refused before the model changes
        if is_converted(model):  # a later fit/validate on the same module: nothing to convert again
            self._freeze(model)
            _fsdp.configure(trainer, model, train=self.train)
            return
        # Everything that can fail on bad input fails here, before the model changes.
        src = check_supported(model)
        self.config.check_against_geometry(
            num_kv_heads=src.num_kv_heads, head_dim=src.head_dim, num_heads=src.num_heads, hidden_size=src.hidden_size
        )
        calibration = self.calibration() if callable(self.calibration) else self.calibration
        if self.convert_on == "accelerator":
            model.to(trainer.strategy.root_device)
        kind = self._teacher_kind(trainer, stage)
        if kind == "copy" and _fsdp.fsdp_strategy(trainer) is not None:
            rank_zero_warn(
                "MLASurgery(teacher='copy') under FSDP: the teacher is a whole, unsharded frozen copy of the model on "
                "every GPU; with train='attention' the swapped-in teacher needs only the original attention blocks"
            )
        self.teacher = keep_teacher(model, kind) if kind else None
        if calibration is None:
            _structure_only(model, self.config)
            self.structure_only = True
        else:
            self.report = convert_to_mla(
                model, self.config, calibration, keep_activations=self.keep_activations, progress=self.progress
            )
            rank_zero_info(
                f"MLASurgery: converted {len(self.report.layers)} layers, KV cache {self.report.kv_before} → "
                f"{self.report.kv_after} values/token ({self.report.compression:.1%} smaller) in {self.report.seconds:.1f} s"
            )
        self._freeze(model)
        _fsdp.configure(trainer, model, train=self.train)  # before the strategy wraps the converted model

    def _freeze(self, model: nn.Module) -> None:
        if self.train != "attention":
            return
        keep = attention_parameter_names(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._check_restored(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.restore_checkpoint_after_setup:  # FSDP loads the checkpoint after on_fit_start
            self._check_restored(trainer)

    def _check_restored(self, trainer: pl.Trainer) -> None:
        if self.structure_only and trainer.ckpt_path is None:
            raise ConfigError(
                "MLASurgery(calibration=None) built empty MLA blocks for resuming, but no checkpoint was loaded: "
                "pass trainer.fit(..., ckpt_path=...) or give calibration data"
            )

    def state_dict(self) -> dict[str, Any]:
        # The conversion itself is in the model weights; this records what produced them (never the teacher).
        return {"mla_config": self.config.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("mla_config")
        if saved is not None and saved != self.config.to_dict():
            rank_zero_warn(f"MLASurgery: the checkpoint was converted with {saved}, this callback has {self.config.to_dict()}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.teacher = None  # the teacher's memory is released with the fit
