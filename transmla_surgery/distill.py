"""Distillation from the original model: teachers that cost little, and a KL that never holds full logits twice.

Teachers (both frozen, run in eval mode under ``torch.no_grad()``, never registered inside the student):

* `AttentionSwapTeacher`: the student network itself with the *original* attention blocks swapped back in for the
  teacher's forward. Exact when only attention is trained (everything else is shared and frozen) and costs no
  second model; it must be created before the conversion replaces the blocks (conversion leaves the original
  block objects untouched, so keeping references is enough).
* `ModelTeacher`: a separate frozen copy (needed when the student trains more than attention).

`distillation_loss` computes ``T²·KL(p_teacher ‖ p_student)`` per token from final hidden states ``[N, D]``
through each model's ``lm_head``, over chunks of tokens. Each chunk runs under activation checkpointing, so
autograd keeps only the hidden-state chunk and recomputes its logits in backward: at any time at most one
chunk of ``[chunk, V]`` logits per model exists, never ``[N, V]``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .architectures import decoder_layers
from .errors import ConfigError, UnsupportedModelError

# Keyword arguments of a base-model forward that must not reach a teacher pass (cache, output switches).
_DROP_KWARGS = ("past_key_values", "cache", "use_cache", "output_attentions", "output_hidden_states", "return_dict")


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a transformers causal LM (``model.model`` for Llama/Mistral/Qwen2): its output's
    ``last_hidden_state`` ``[B, T, D]`` is what ``lm_head`` turns into logits."""
    prefix = getattr(model, "base_model_prefix", "model")
    base = getattr(model, prefix, None)
    if not isinstance(base, nn.Module):
        raise UnsupportedModelError(f"{type(model).__name__} has no base model at .{prefix}")
    return base


def output_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Linear output head (lm_head)")
    return head


def teacher_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A student base-model call's keyword arguments, made fit for a teacher pass (no cache, detached)."""
    out = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items() if k not in _DROP_KWARGS}
    out["use_cache"] = False
    return out


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _attention_owner(layer: nn.Module) -> nn.Module:
    """The module that registers ``self_attn``: the decoder layer itself, or the layer inside wrappers that hold it
    as their only child (FSDP's ``FullyShardedDataParallel``, activation checkpointing's ``CheckpointWrapper``).
    Setting ``self_attn`` on a wrapper would register a second module on the wrapper and leave the layer's own
    attention in use."""
    module = layer
    while "self_attn" not in module._modules:
        children = list(module._modules.values())
        if len(children) != 1:
            raise UnsupportedModelError(f"cannot find the attention block of {type(layer).__name__} (no self_attn)")
        module = children[0]
    return module


class AttentionSwapTeacher:
    """The original attention blocks, kept beside the student (not registered in it, so they are in no
    checkpoint and no optimizer); the teacher pass swaps them into the student's layers and back."""

    kind = "swap"

    def __init__(self, originals: list[nn.Module]) -> None:
        self.originals = [_freeze(m) for m in originals]

    @classmethod
    def capture(cls, model: nn.Module) -> "AttentionSwapTeacher":
        """Keep references to ``model``'s current attention blocks (call before conversion)."""
        return cls([layer.self_attn for layer in decoder_layers(model)])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "AttentionSwapTeacher":
        for m in self.originals:
            m.to(device=device, dtype=dtype)
        return self

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        layers = decoder_layers(model)
        if len(layers) != len(self.originals):
            raise UnsupportedModelError(f"teacher has {len(self.originals)} attention blocks, the model {len(layers)} layers")
        owners = [_attention_owner(layer) for layer in layers]
        students = [owner.self_attn for owner in owners]
        try:
            for owner, original in zip(owners, self.originals):
                owner.self_attn = original
            yield
        finally:
            for owner, student in zip(owners, students):
                owner.self_attn = student

    @torch.no_grad()
    def hidden_states(self, student: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        """Teacher's final hidden states ``[B, T, D]`` for the student's base-model call ``kwargs``."""
        with eval_mode(student), self.swapped_in(student):
            return base_model(student)(**teacher_kwargs(kwargs))[0]

    def head(self, student: nn.Module) -> nn.Module:
        return output_head(student)  # shared and frozen: only attention trains with this teacher


class ModelTeacher:
    """A separate frozen model (e.g. a deep copy of the original taken before conversion)."""

    kind = "copy"

    def __init__(self, model: nn.Module) -> None:
        self.model = _freeze(model)

    @classmethod
    def capture(cls, model: nn.Module) -> "ModelTeacher":
        return cls(copy.deepcopy(model))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ModelTeacher":
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def hidden_states(self, student: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        self.model.eval()
        return base_model(self.model)(**teacher_kwargs(kwargs))[0]

    def head(self, student: nn.Module) -> nn.Module:
        return output_head(self.model)


Teacher = AttentionSwapTeacher | ModelTeacher


def keep_teacher(model: nn.Module, kind: str) -> Teacher:
    """Keep what a teacher needs from ``model`` before it is converted: ``"swap"`` or ``"copy"``."""
    if kind == "swap":
        return AttentionSwapTeacher.capture(model)
    if kind == "copy":
        return ModelTeacher.capture(model)
    raise ConfigError(f"teacher kind must be 'swap' or 'copy', got {kind!r}")


# ---------------------------------------------------------------------------------------------- loss
@dataclass
class DistillOutput:
    """``loss``: mean over tokens of ``T²·KL`` (differentiable, scalar); the rest are detached sums over the
    ``count`` tokens: ``kl_sum`` (``T²·KL``), ``agree`` (teacher and student argmax equal)."""

    loss: torch.Tensor
    kl_sum: torch.Tensor
    agree: torch.Tensor
    count: int


ChunkObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def _linear(h: torch.Tensor, head: nn.Module, *, detach: bool) -> torch.Tensor:
    w, b = head.weight, head.bias
    if detach:
        w = w.detach()
        b = None if b is None else b.detach()
    return F.linear(h, w, b)


def distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    targets: torch.Tensor | None = None,
    observe: ChunkObserver | None = None,
) -> DistillOutput:
    """Mean per-token ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` over the ``N`` given tokens.

    Args:
        student_hidden: ``[N, D]`` final hidden states of the kept tokens (padding already removed); carries grad.
        teacher_hidden: ``[N, D]``, no grad.
        student_head, teacher_head: ``lm_head`` modules (``[V, D]``); the teacher's is never differentiated.
        chunk_size: tokens per chunk; peak logits memory is ``2·chunk_size·V`` values.
        targets: optional ``[N]`` next-token ids (``-100`` = none) passed to ``observe``.
        observe: called once per chunk (not again when backward recomputes it) with detached
            ``(student_logits [n, V] float32, teacher_logits [n, V] float32, targets [n] or empty)``, for metrics.
    """
    if student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states must both be [N, D], got {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    n = student_hidden.shape[0]
    zero = student_hidden.new_zeros((), dtype=torch.float32)
    if n == 0:
        return DistillOutput(zero + 0.0 * student_hidden.sum(), zero, zero, 0)
    t2 = temperature * temperature
    kl_total = zero
    kl_sum = torch.zeros((), dtype=torch.float64, device=student_hidden.device)
    agree = torch.zeros((), dtype=torch.float64, device=student_hidden.device)
    for start in range(0, n, chunk_size):
        hs = student_hidden[start : start + chunk_size]
        ht = teacher_hidden[start : start + chunk_size].detach()
        tg = targets[start : start + chunk_size] if targets is not None else hs.new_empty(0, dtype=torch.long)
        seen = {"done": False}  # the observer runs on the first pass only, not on backward's recompute

        def chunk_kl(hs: torch.Tensor, ht: torch.Tensor, tg: torch.Tensor = tg, seen: dict = seen) -> tuple[torch.Tensor, torch.Tensor]:
            zs = _linear(hs, student_head, detach=False).float()
            with torch.no_grad():
                zt = _linear(ht, teacher_head, detach=True).float()
                log_pt = F.log_softmax(zt / temperature, dim=-1)
            log_ps = F.log_softmax(zs / temperature, dim=-1)
            kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).sum() * t2
            match = (zs.detach().argmax(-1) == zt.argmax(-1)).sum()
            if observe is not None and not seen["done"]:
                observe(zs.detach(), zt, tg)
            seen["done"] = True
            return kl, match

        if torch.is_grad_enabled() and hs.requires_grad:
            kl, match = checkpoint(chunk_kl, hs, ht, use_reentrant=False)
        else:
            kl, match = chunk_kl(hs, ht)
        kl_total = kl_total + kl
        kl_sum += kl.detach().double()
        agree += match.double()
    return DistillOutput(kl_total / n, kl_sum, agree, n)


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Layer-wise residual-stream matching: mean over layers of ``Σ‖h_s − h_t‖² / Σ‖h_t‖²`` over valid tokens.

    Args:
        student: per decoder layer, the output hidden states ``[B, T, D]`` (carry grad).
        teacher: the same for the teacher pass (no grad), one per layer.
        valid: ``[B, T]`` bool, the tokens that count (padding masked).

    Each layer's squared error is relative to the teacher's own energy at that layer, so layers whose residual
    stream grows with depth weigh alike; the result is a float32 scalar (0 when the streams agree).
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need one teacher state per student layer, got {len(student)} and {len(teacher)}")
    flat = valid.reshape(-1)
    terms = []
    for hs, ht in zip(student, teacher):
        if hs.shape != ht.shape:
            raise ValueError(f"layer states differ in shape: {tuple(hs.shape)} and {tuple(ht.shape)}")
        s = hs.reshape(-1, hs.shape[-1])[flat].float()
        t = ht.reshape(-1, ht.shape[-1])[flat].detach().float()
        terms.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(terms).mean()

