"""Causal-LM training for the recipes: a LightningModule, a DataModule of packed text, recipe-ready callbacks.

```python
import lightning.pytorch as L
from transmla_surgery import MLAConfig
from transmla_surgery.callbacks import Distillation, GradualRankReduction
from transmla_surgery.training import CausalLM, Export, Surgery, TextDataModule

module = CausalLM("path/to/hf_model_or.gguf", lr=3e-4)               # None: SmolLM2-135M
data = TextDataModule("corpus.txt", seq_len=256, batch_size=4)       # None: the embedded Python docs
callbacks = [Surgery(MLAConfig(kv_lora_rank=160, qk_rope_head_dim=32)), GradualRankReduction(64),
             Distillation(loss_weight=0.0), Export("out/")]
L.Trainer(max_steps=100, callbacks=callbacks).fit(module, datamodule=data)
```

The text is tokenised whole and packed into non-overlapping windows of ``seq_len`` tokens, in this order:
``calib_seqs`` calibration windows (what `Surgery` converts with), ``val_seqs`` held-out windows (validation
perplexity; taken from ``val_text`` instead when given), then every remaining window for training. With the
defaults (32 + 16 windows of 256 tokens) the held-out windows are the ones ``transmla convert`` and
``transmla eval`` report on.

`Surgery` and `Export` are the library's `MLASurgery` and `MLAExport` with what a configuration file cannot
express filled in: the calibration batches come from the data module, the export goes under the trainer's
``default_root_dir`` and its target is checked before training starts. `RunMonitor` records what the summary and
the plots of a run show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .callbacks import MLAExport, MLASurgery
from .config import MLAConfig
from .data import default_text, perplexity, read_text, tokenize, windows
from .errors import CalibrationError, ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_TEXT_NAME = "embedded Python docs (pydoc_data.topics)"


# ============================================================================================== text
def load_text(source: Union[str, Path, None] = None, *, field: str = "text", split: str = "train") -> str:
    """The text of ``source``: ``None`` → the embedded default (`data.default_text`); a ``.txt`` file; a ``.jsonl``
    file (its ``field`` of every line); a directory written by ``datasets``' ``save_to_disk`` (its ``field``
    column, split ``split`` of a ``DatasetDict``; needs the ``datasets`` package)."""
    if source is None:
        return default_text()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"text file {path} does not exist")
    if not path.is_dir():
        return read_text(path, field)
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{path} is a directory: reading a Hugging Face `datasets` directory needs the datasets package "
            "(pip install datasets); otherwise give a .txt or .jsonl file"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError and friends: not a save_to_disk directory
        raise ConfigError(f"{path} is not a Hugging Face datasets directory written by save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{path} has no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
    if field not in ds.column_names:
        raise ConfigError(f"{path} has no column {field!r} (columns: {ds.column_names})")
    return "\n\n".join(str(x) for x in ds[field] if x)


def text_name(source: Union[str, Path, None]) -> str:
    return DEFAULT_TEXT_NAME if source is None else str(source)


# ============================================================================================== KV cache
def kv_values_per_token(model: nn.Module) -> int:
    """Values the model caches per token, summed over layers: ``rank + d_rope`` per converted (MLA) layer at its
    active rank, ``kv_lora_rank + qk_rope_head_dim`` per layer of a DeepSeek-V3 checkpoint, ``2·G·d`` per layer
    of a GQA/MHA source."""
    from .mla_attention import MLAAttention
    from .rank import active_rank

    blocks = [m for m in model.modules() if isinstance(m, MLAAttention)]
    if blocks:
        return sum(active_rank(b) + b.qk_rope_head_dim for b in blocks)
    cfg = model.config
    layers = int(cfg.num_hidden_layers)
    if getattr(cfg, "model_type", None) == "deepseek_v3":
        return layers * (int(cfg.kv_lora_rank) + int(cfg.qk_rope_head_dim))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return layers * 2 * int(kv_heads) * int(head_dim)


def dtype_bytes(dtype: Union[torch.dtype, str]) -> int:
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype) or getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


# ============================================================================================== module
class CausalLM(L.LightningModule):
    """A Hugging Face causal LM trained on the next-token loss, with AdamW, linear warm-up and cosine decay.

    Args:
        model: a local Hugging Face model directory or a ``.gguf`` file; ``None`` loads the embedded default,
            SmolLM2-135M (`models.load_model`). From Python, a loaded transformers model may be given instead
            (with ``_tokenizer=``: `CausalLM.wrap`).
        dtype: dtype the weights are loaded in (``bfloat16`` with ``trainer.precision: bf16-true`` halves memory).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup: linear warm-up length: a fraction of the run (< 1) or a number of optimizer steps (>= 1).
        min_lr_ratio: the cosine decay ends at ``lr · min_lr_ratio`` at the last step.
        gradient_checkpointing: recompute each decoder layer in the backward pass (activation checkpointing:
            much less activation memory for about a third more compute).

    Logs ``train/loss`` (next-token cross-entropy), ``val/loss`` and ``val/ppl`` (over every predicted token of the
    validation windows), ``lr``.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        *,
        dtype: Literal["float32", "bfloat16"] = "float32",
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup: float = 0.1,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        _model: Any = None,
        _tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        for name, value in (("lr", lr), ("warmup", warmup), ("min_lr_ratio", min_lr_ratio), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ConfigError(f"model.{name} must be a finite number >= 0, got {value!r}")
        if lr == 0:
            raise ConfigError("model.lr must be > 0")
        if min_lr_ratio > 1:
            raise ConfigError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters(ignore=["_model", "_tokenizer"])
        if isinstance(model, nn.Module):
            _model, model = model, None
        if _model is not None:
            self.model, self.tokenizer = _model, _tokenizer
        else:
            from .models import load_model

            self.model, self.tokenizer = load_model(model, dtype=DTYPES[dtype])
        self.source = "SmolLM2-135M (default)" if model is None and _model is None else str(model or type(_model).__name__)
        self.lr, self.weight_decay, self.betas = float(lr), float(weight_decay), tuple(betas)
        self.warmup, self.min_lr_ratio = float(warmup), float(min_lr_ratio)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps the modes it is given
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._val_nll = 0.0
        self._val_count = 0
        self.val_perplexity: Optional[float] = None

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer: Any = None, **kwargs: Any) -> "CausalLM":
        """A `CausalLM` around an already loaded transformers model (and its tokenizer)."""
        return cls(None, _model=model, _tokenizer=tokenizer, **kwargs)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, **kwargs)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch, labels=batch, use_cache=False)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch.shape[0])
        return out.loss

    # ------------------------------------------------------------------ validation: exact token-mean perplexity
    def on_validation_epoch_start(self) -> None:
        self._val_nll, self._val_count = 0.0, 0

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        logits = self.model(input_ids=batch, use_cache=False).logits[:, :-1]
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        self._val_nll += float(nll)
        self._val_count += batch[:, 1:].numel()

    def on_validation_epoch_end(self) -> None:
        stats = torch.tensor([self._val_nll, float(self._val_count)], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        if stats[1] > 0:
            loss = float(stats[0] / stats[1])
            self.val_perplexity = math.exp(loss)
            self.log("val/loss", loss, sync_dist=False, rank_zero_only=True)
            self.log("val/ppl", self.val_perplexity, prog_bar=True, sync_dist=False, rank_zero_only=True)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("nothing to train: every parameter of the model is frozen")
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError("training has no end: set trainer.max_steps (or trainer.max_epochs)")
        total = max(1, int(total))
        warm = int(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        floor = self.min_lr_ratio

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            p = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        """Under FSDP, clip by norm with FSDP's own ``clip_grad_norm_`` (the norm over every process's gradient
        shard), which Lightning's FSDP precision plugin leaves to the module; elsewhere Lightning's clipping."""
        strategy = self.trainer.strategy
        algorithm = str(gradient_clip_algorithm or "norm").lower()
        if gradient_clip_val and _is_fsdp(strategy) and algorithm == "norm":
            strategy.model.clip_grad_norm_(float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _is_fsdp(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(strategy, FSDPStrategy) and isinstance(strategy.model, FullyShardedDataParallel)


# ============================================================================================== data
class _Rows(Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


class TextDataModule(L.LightningDataModule):
    """Text tokenised whole and packed into windows: calibration, held-out and training windows.

    Args:
        text: a ``.txt`` or ``.jsonl`` file, or a directory saved by ``datasets``' ``save_to_disk``; ``None``
            uses the embedded default text (the Python documentation, about 0.5 MB).
        val_text: take the held-out windows from this text instead (same formats); default: from ``text``,
            right after the calibration windows.
        text_field: the field of each ``.jsonl`` line / the column of a ``datasets`` directory.
        split: the split of a ``datasets`` ``DatasetDict``.
        seq_len: tokens per window.
        batch_size: training windows per batch (per device).
        calib_seqs: calibration windows (the first ones of the text), for the conversion.
        calib_batch_size: calibration windows per batch.
        val_seqs: held-out windows for the validation perplexity.
        max_tokens: use only the first ``max_tokens`` tokens of ``text`` (``None``: all).
        shuffle: shuffle the training windows (every epoch, from the run's seed).
        num_workers: DataLoader worker processes.

    The tokenizer is the LightningModule's (``module.tokenizer``), taken in ``setup`` or given to `prepare`.
    """

    def __init__(
        self,
        text: Optional[str] = None,
        *,
        val_text: Optional[str] = None,
        text_field: str = "text",
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 4,
        calib_seqs: int = 32,
        calib_batch_size: int = 8,
        val_seqs: int = 16,
        max_tokens: Optional[int] = None,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("calib_seqs", calib_seqs, 0),
                                 ("calib_batch_size", calib_batch_size, 1), ("val_seqs", val_seqs, 0),
                                 ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{name} must be an integer >= {low}, got {value!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < seq_len):
            raise ConfigError(f"data.max_tokens must be an integer >= seq_len={seq_len}, got {max_tokens!r}")
        for name, path in (("text", text), ("val_text", val_text)):
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"data.{name}: text file {path} does not exist")
        self.text, self.val_text = text, val_text
        self.text_field, self.split = text_field, split
        self.seq_len, self.batch_size = seq_len, batch_size
        self.calib_seqs, self.calib_batch_size, self.val_seqs = calib_seqs, calib_batch_size, val_seqs
        self.max_tokens, self.shuffle, self.num_workers = max_tokens, shuffle, num_workers
        self.calib_rows: Optional[torch.Tensor] = None
        self.val_rows: Optional[torch.Tensor] = None
        self.train_rows: Optional[torch.Tensor] = None
        self.stream_tokens = 0

    def prepare(self, tokenizer: Any) -> "TextDataModule":
        """Tokenise and split the text (once)."""
        if self.train_rows is not None:
            return self
        if tokenizer is None:
            raise ConfigError("TextDataModule needs a tokenizer (the LightningModule's .tokenizer)")
        t = self.seq_len
        stream = tokenize(tokenizer, load_text(self.text, field=self.text_field, split=self.split))
        if self.max_tokens is not None:
            stream = stream[: self.max_tokens]
        self.stream_tokens = int(stream.numel())
        empty = torch.empty(0, t, dtype=torch.long)
        self.calib_rows = windows(stream, self.calib_seqs, t) if self.calib_seqs else empty
        offset = self.calib_seqs * t
        if self.val_text is not None:
            val_stream = tokenize(tokenizer, load_text(self.val_text, field=self.text_field, split=self.split))
            self.val_rows = windows(val_stream, self.val_seqs, t) if self.val_seqs else empty
        else:
            self.val_rows = windows(stream, self.val_seqs, t, offset=offset) if self.val_seqs else empty
            offset += self.val_seqs * t
        n = max(0, (stream.numel() - offset) // t)
        self.train_rows = stream[offset : offset + n * t].view(n, t).clone()
        return self

    def setup(self, stage: str) -> None:
        if self.train_rows is None:
            self.prepare(getattr(self.trainer.lightning_module, "tokenizer", None) if self.trainer else None)

    def calibration_batches(self) -> list[torch.Tensor]:
        """The calibration windows as ``[calib_batch_size, seq_len]`` batches (what `Surgery` converts with)."""
        if self.calib_rows is None:
            raise ConfigError("TextDataModule.calibration_batches() before the text was prepared")
        if not self.calib_rows.shape[0]:
            raise CalibrationError("data.calib_seqs is 0: the conversion needs calibration windows")
        return list(self.calib_rows.split(self.calib_batch_size))

    def train_dataloader(self) -> DataLoader:
        assert self.train_rows is not None
        if self.train_rows.shape[0] < self.batch_size and (self.trainer is None or self.trainer.max_steps != 0):
            need = (self.calib_seqs + (0 if self.val_text else self.val_seqs) + self.batch_size) * self.seq_len
            raise CalibrationError(
                f"text too short to train: {self.stream_tokens} tokens leave {self.train_rows.shape[0]} training "
                f"windows of {self.seq_len} after the calibration and held-out ones; one batch needs {need} tokens"
            )
        return DataLoader(_Rows(self.train_rows), batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.val_rows is not None
        return DataLoader(_Rows(self.val_rows), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def describe(self) -> dict[str, Any]:
        return {
            "text": text_name(self.text), "val_text": None if self.val_text is None else str(self.val_text),
            "tokens": self.stream_tokens, "seq_len": self.seq_len,
            "calibration_windows": 0 if self.calib_rows is None else int(self.calib_rows.shape[0]),
            "held_out_windows": 0 if self.val_rows is None else int(self.val_rows.shape[0]),
            "training_windows": 0 if self.train_rows is None else int(self.train_rows.shape[0]),
        }


# ============================================================================================== callbacks
class Surgery(MLASurgery):
    """`MLASurgery` that calibrates on the data module's calibration windows (`TextDataModule.calibration_batches`).

    Args:
        config: the target geometry: ``kv_lora_rank`` (latent width), ``qk_rope_head_dim`` and the method options
            of `MLAConfig`.
        train: ``"attention"`` trains only the new attention blocks (every other weight frozen); ``"all"``
            trains every weight (distillation then keeps a full frozen copy of the original as teacher).
        teacher: what `Distillation` distils from: ``"auto"``, ``"swap"`` (the original attention blocks, swapped
            in; exact when only attention trains), ``"copy"`` (a frozen copy of the whole model), ``"none"``.
        keep_activations: keep one layer's calibration hidden states (one layer-forward per layer) instead of
            re-running the calibration stream per layer (quadratic in depth).
        progress: show the conversion's progress bar.
        convert_on: ``"accelerator"`` converts on the training device, ``"model"`` where the model is.
        model_attr: the LightningModule attribute holding the model (default: the single transformers model).
    """

    def __init__(
        self,
        config: MLAConfig,
        *,
        train: Literal["all", "attention"] = "attention",
        teacher: Literal["auto", "swap", "copy", "none"] = "auto",
        keep_activations: bool = True,
        progress: bool = True,
        convert_on: Literal["accelerator", "model"] = "accelerator",
        model_attr: Optional[str] = None,
    ) -> None:
        super().__init__(config, None, model_attr=model_attr, train=train, teacher=teacher,
                         keep_activations=keep_activations, progress=progress, convert_on=convert_on)
        self.from_datamodule = True  # False: build the MLA structure only (resuming: weights from the checkpoint)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.from_datamodule and self.calibration is None:
            dm = trainer.datamodule
            if dm is None or not callable(getattr(dm, "calibration_batches", None)):
                raise ConfigError(
                    "Surgery takes its calibration windows from the data module (calibration_batches()); "
                    "use TextDataModule, or MLASurgery(config, calibration=<batches>)"
                )
            self.calibration = dm.calibration_batches
        super().setup(trainer, pl_module, stage)


class Export(MLAExport):
    """`MLAExport` with the export options spelled out; writes ``<dirpath>/final`` when the fit ends.

    Args:
        dirpath: where the exports go; ``None``: ``<trainer.default_root_dir>/export``.
        rank: latent rank to export; default the target of the rank reduction, else the active rank.
        dtype: weights dtype of the export (``bfloat16``, ``float32``); ``None`` keeps the model's.
        verify: reload the export through the stock DeepSeek-V3 class and compare logits before placing it.
        on_unsupported: ``"error"`` refuses what serving engines would compute differently, ``"warn"`` exports it.
        biases: attention biases (Qwen2): ``"keep"`` (exact in transformers) or ``"drop"`` (every engine agrees).
        overwrite: replace an earlier export (checked before training starts).
        export_best: also export the best checkpoint of the ModelCheckpoint callback.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        rank: Optional[int] = None,
        *,
        dtype: Optional[Literal["float32", "bfloat16"]] = None,
        verify: bool = True,
        on_unsupported: Literal["error", "warn"] = "error",
        biases: Literal["keep", "drop"] = "keep",
        overwrite: bool = False,
        export_best: bool = False,
        model_attr: Optional[str] = None,
    ) -> None:
        kwargs: dict[str, Any] = {"verify": verify, "on_unsupported": on_unsupported, "biases": biases}
        if dtype is not None:
            kwargs["dtype"] = dtype
        super().__init__(dirpath or ".", rank, export_best=export_best, overwrite=overwrite, model_attr=model_attr,
                         **kwargs)
        self._dirpath_given = dirpath is not None

    def resolve(self, default_root_dir: Union[str, Path]) -> Path:
        """The final export directory, checked: an existing one needs ``overwrite``."""
        if not self._dirpath_given:
            self.dirpath = Path(default_root_dir) / "export"
        final = self.dirpath / "final"
        if final.exists() and not self.overwrite and any(final.iterdir()):
            raise FileExistsError(
                f"export target {final} already exists: choose another export.dirpath or set export.overwrite true"
            )
        return final

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.resolve(trainer.default_root_dir)  # fail now, not after training
        super().setup(trainer, pl_module, stage)


class RunMonitor(Callback):
    """Records a run for its summary and plots: the original model's held-out perplexity (in ``setup``, so it must
    come before `MLASurgery` in the callback list), the converted model's when the fit starts, the per-step
    training figures (losses, active rank, distillation KL, learning rate) and every validation perplexity.
    ``save_plots`` draws loss, perplexity and rank against the step (matplotlib)."""

    KEYS = ("train/loss", "distill/loss", "distill/kl", "distill/top1")

    def __init__(self, eval_original: bool = True, eval_at_start: bool = True) -> None:
        self.eval_original = eval_original
        self.eval_at_start = eval_at_start
        self.original_perplexity: Optional[float] = None
        self.start_perplexity: Optional[float] = None
        self.start_rank: Optional[int] = None
        self.start_step = 0
        self.steps: list[dict[str, float]] = []
        self.validations: list[dict[str, float]] = []
        self._model: Optional[nn.Module] = None
        self._pending_start = False

    @staticmethod
    def _rank(model: nn.Module) -> Optional[int]:
        from .mla_attention import MLAAttention
        from .rank import model_rank

        if not any(isinstance(m, MLAAttention) for m in model.modules()):
            return None
        return model_rank(model)

    def _rows(self, trainer: L.Trainer) -> Optional[torch.Tensor]:
        rows = getattr(trainer.datamodule, "val_rows", None)
        return rows if rows is not None and rows.shape[0] else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before any surgery (this callback comes first): the original model's held-out perplexity."""
        from .surgery import is_converted

        self._model = getattr(pl_module, "model", pl_module)
        rows = self._rows(trainer)
        if stage == "fit" and self.eval_original and rows is not None and not is_converted(self._model):
            if not any(isinstance(cb, MLASurgery) and cb.convert_on == "model" for cb in trainer.callbacks):
                self._model.to(trainer.strategy.root_device)  # where Lightning (and MLASurgery) will put it anyway
            self.original_perplexity = perplexity(self._model, rows, getattr(trainer.datamodule, "batch_size", 4))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._model = getattr(pl_module, "model", pl_module)
        self._pending_start = True
        if not trainer.strategy.restore_checkpoint_after_setup:  # the checkpoint (if any) is loaded by now
            self._record_start(trainer)

    def _record_start(self, trainer: L.Trainer) -> None:
        self._pending_start = False
        model = self._model
        self.start_rank = self._rank(model)
        rows = self._rows(trainer)
        if self.eval_at_start and rows is not None:
            # Under FSDP the model is sharded: every process runs it through the wrapped LightningModule (whose
            # forward, CausalLM's, returns the transformers output), which gathers each layer as it goes.
            runner = trainer.strategy.model if _is_fsdp(trainer.strategy) else model
            self.start_perplexity = perplexity(runner, rows, getattr(trainer.datamodule, "batch_size", 4))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step  # the loops' state (a resumed step count) is restored by now

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # FSDP restores a checkpoint after on_fit_start, and GradualRankReduction applies its saved rank in
        # on_train_start: the start figures are taken before the first batch (and before this batch's rank cut,
        # as this callback comes before the others).
        if self._pending_start:
            self._record_start(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        row = {"step": float(trainer.global_step)}
        metrics = trainer.callback_metrics
        for key in self.KEYS:
            if key in metrics:
                row[key] = float(metrics[key])
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        rank = self._rank(self._model) if self._model is not None else None
        if rank is not None:  # the rank this step trained at (read from the model: no callback-order dependence)
            row["mla/rank"] = float(rank)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            row["loss"] = float(loss)
        if self.steps and self.steps[-1]["step"] == row["step"]:  # gradient accumulation: keep the last
            self.steps[-1] = row
        else:
            self.steps.append(row)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        ppl = getattr(pl_module, "val_perplexity", None)
        if ppl is None and "val/ppl" in trainer.callback_metrics:
            ppl = float(trainer.callback_metrics["val/ppl"])
        if ppl is not None:
            rank = self.steps[-1].get("mla/rank") if self.steps else self.start_rank
            self.validations.append({"step": float(trainer.global_step), "ppl": float(ppl),
                                     **({"mla/rank": rank} if rank is not None else {})})

    def history(self) -> dict[str, Any]:
        return {"original_perplexity": self.original_perplexity,
                "start": {"step": self.start_step, "perplexity": self.start_perplexity, "rank": self.start_rank},
                "steps": self.steps, "validations": self.validations}

    @classmethod
    def from_history(cls, history: dict[str, Any]) -> "RunMonitor":
        """A monitor holding a recorded ``history()`` (e.g. ``summary.json["history"]``), to draw its plots again."""
        monitor = cls()
        monitor.original_perplexity = history.get("original_perplexity")
        start = history.get("start", {})
        monitor.start_step = int(start.get("step") or 0)
        monitor.start_perplexity, monitor.start_rank = start.get("perplexity"), start.get("rank")
        monitor.steps, monitor.validations = list(history.get("steps", [])), list(history.get("validations", []))
        return monitor

    def save_plots(self, directory: Union[str, Path], *, original_perplexity: Optional[float] = None,
                   final_perplexity: Optional[float] = None, title: str = "") -> list[Path]:
        """``loss.png``, ``perplexity.png`` and (with a converted model) ``rank.png`` in ``directory``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []

        def save(fig, ax, name: str, ylabel: str, what: str) -> None:
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}{what}".strip())
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            written.append(out / name)

        steps = [r["step"] for r in self.steps]
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        same = all(abs(r.get("loss", 0.0) - r.get("distill/loss", 0.0)) < 1e-6 for r in self.steps)
        for key, label in (("train/loss", "next-token loss (train)"), ("distill/loss", "distillation T²·KL"),
                           ("loss", "loss backpropagated")):
            pts = [(r["step"], r[key]) for r in self.steps if key in r]
            if key == "loss" and same and any("distill/loss" in r for r in self.steps):
                continue  # distillation only (loss_weight 0): the same curve as the KL
            if pts:
                ax.plot(*zip(*pts), label=label, lw=1.2)
                drawn = True
        if drawn:
            ax.legend()
            save(fig, ax, "loss.png", "nats / token", "training loss")
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4))
        pts = ([(self.start_step, self.start_perplexity)] if self.start_perplexity is not None else []) + [
            (v["step"], v["ppl"]) for v in self.validations]
        if final_perplexity is not None:
            last = steps[-1] if steps else self.start_step
            pts.append((last, final_perplexity))
        if pts:
            ax.plot(*zip(*pts), "o-", label="converted model (held-out)")
        rank_pts = ([(self.start_step, self.start_rank)] if self.start_rank is not None else []) + [
            (r["step"], r["mla/rank"]) for r in self.steps if "mla/rank" in r]
        if len({r for _, r in rank_pts}) > 1:  # the rank changed: show it on a second axis
            ax2 = ax.twinx()
            ax2.step(*zip(*rank_pts), where="post", color="tab:purple", alpha=0.35, label="latent rank")
            ax2.set_ylabel("latent rank", color="tab:purple")
            ax2.tick_params(axis="y", colors="tab:purple")
        if original_perplexity is not None:
            ax.axhline(original_perplexity, color="tab:green", ls="--", label=f"original model ({original_perplexity:.2f})")
        ax.legend()
        save(fig, ax, "perplexity.png", "held-out perplexity", "held-out perplexity")
        plt.close(fig)

        if rank_pts:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.step(*zip(*rank_pts), where="post", color="tab:purple")
            save(fig, ax, "rank.png", "active latent rank (kv_lora_rank)", "latent rank")
            plt.close(fig)
        return written


def write_json(path: Union[str, Path], data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


__all__ = [
    "CausalLM", "TextDataModule", "Surgery", "Export", "RunMonitor", "load_text", "kv_values_per_token", "dtype_bytes",
]
