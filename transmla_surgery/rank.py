"""Latent-rank control of converted MLA blocks: schedules, masks, exact re-ordering, physical truncation.

Notation: ``r`` the block's allocated latent width (``kv_lora_rank``, the parameter shapes), ``k`` its active rank
(the number of leading ones in ``MLAAttention.latent_mask``). Latent channel ``j`` is row ``j`` of
``kv_a_proj_with_mqa`` (``[r + d_rope, D]``) and column ``j`` of ``kv_b_proj`` (``[H·(d_nope + d_v), r]``).

* `set_rank` lowers the active rank with static shapes: the mask switches channels ``k..r-1`` off, and their
  ``kv_a`` rows, ``kv_b`` columns and optimizer-state slices are zeroed, so the weights alone (e.g. a checkpoint
  loaded without the mask) compute the reduced model, and the cut channels stay at zero (zero gradient, zero
  moments, weight decay of zero is zero).
* `rotate_latent` applies an orthogonal change of basis ``c' = Qᵀc`` to the active latent: ``kv_a`` rows become
  ``Qᵀ W_a``, ``kv_b`` columns ``W_b Q``, so ``W_b' c' = W_b c`` exactly (up to rounding). Only an orthogonal ``Q``
  keeps the optimizer's view sensible: first moments rotate exactly; elementwise second moments are mapped by
  ``Q∘Q`` (their expectation for independent coordinates), which keeps them positive.
* `LatentMoments` keeps a running ``E[c cᵀ]`` per block during training; `energy_rotation` is the ``Q`` that sorts
  the latent by that energy, so that the following cut removes the least energetic directions.
* `truncate_rank` makes a rank physical (smaller tensors) for export.

``kv_a_layernorm`` must be the identity (what `convert_to_mla` builds, ``latent_norm=False``): an RMSNorm
normalises over all ``r`` channels, so neither a mask nor a rotation commutes with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Literal

import torch
from torch import nn

from .errors import ConfigError, UnsupportedModelError
from .mla_attention import MLAAttention

ScheduleKind = Literal["linear", "cosine", "steps"]
Schedule = ScheduleKind | Callable[[float], float]

# Optimizer-state entries that are linear in the gradient (rotate like the parameter) and elementwise second
# moments (mapped by Q∘Q). Anything else of the parameter's shape is refused rather than silently corrupted.
_LINEAR_STATE = ("exp_avg", "momentum_buffer")
_SQUARE_STATE = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta")

_CONFIG_KEY = "transmla"  # model.config attribute written by convert_to_mla (see surgery.CONFIG_KEY)


# ---------------------------------------------------------------------------------------------- blocks
def mla_blocks(model: nn.Module) -> list[MLAAttention]:
    """Every `MLAAttention` in ``model``, in module order; raises if there is none."""
    blocks = [m for m in model.modules() if isinstance(m, MLAAttention)]
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MLAAttention blocks: convert it first (convert_to_mla / MLASurgery)"
        )
    return blocks


def _check_maskable(block: MLAAttention) -> None:
    if not isinstance(block.kv_a_layernorm, nn.Identity):
        raise UnsupportedModelError(
            f"layer {block.layer_idx}: kv_a_layernorm is an RMSNorm, which normalises over all latent channels, so "
            "masking, rotating or truncating the latent would change the function; rank control needs the "
            "identity norm that convert_to_mla builds (latent_norm=False)"
        )


def active_rank(block: MLAAttention) -> int:
    """Number of active latent channels (the mask is always a prefix of ones)."""
    mask = block.latent_mask
    k = int(mask.count_nonzero())
    if k and not bool((mask[:k] == 1).all()):
        raise UnsupportedModelError(f"layer {block.layer_idx}: latent_mask is not a prefix of ones: {mask.tolist()}")
    return k


def model_rank(model: nn.Module) -> int:
    """The active latent rank shared by all blocks of ``model``."""
    ranks = {active_rank(b) for b in mla_blocks(model)}
    if len(ranks) != 1:
        raise UnsupportedModelError(f"blocks have different active latent ranks {sorted(ranks)}")
    return ranks.pop()


def kv_values_per_token(model: nn.Module, rank: int | None = None) -> tuple[int, int]:
    """Cached values per token and layer ``(before, after)``: ``2·G·d`` of the source, ``rank + d_rope`` now."""
    block = mla_blocks(model)[0]
    config = model.config
    g = int(config.num_key_value_heads)
    d = block.geometry.source_head_dim
    k = model_rank(model) if rank is None else rank
    return 2 * g * d, k + block.qk_rope_head_dim


def kv_compression(model: nn.Module, rank: int | None = None) -> float:
    """Fraction of the source's KV cache removed at ``rank`` (default: the active rank); 0.75 = 4× smaller."""
    before, after = kv_values_per_token(model, rank)
    return 1.0 - after / before


# ---------------------------------------------------------------------------------------------- schedule
def schedule_fraction(
    progress: float, schedule: Schedule = "linear", *, begin: float = 0.0, end: float = 1.0, num_steps: int = 4
) -> float:
    """How far the reduction has gone (0 = start rank, 1 = target rank) at training ``progress`` ∈ [0, 1].

    ``begin``/``end`` are the progress values where the reduction starts and completes. ``"linear"`` and
    ``"cosine"`` (slow–fast–slow) are continuous; ``"steps"`` cuts ``num_steps`` times, at equal intervals, the
    last at ``end``; a callable maps the local progress ``p ∈ [0, 1]`` to a fraction in ``[0, 1]``.
    """
    p = 1.0 if end <= begin else min(1.0, max(0.0, (progress - begin) / (end - begin)))
    if callable(schedule):
        f = float(schedule(p))
        if not (0.0 <= f <= 1.0) or math.isnan(f):
            raise ConfigError(f"a schedule function must return a fraction in [0, 1]; it returned {f} for {p}")
        return f
    if schedule == "linear":
        return p
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * p))
    if schedule == "steps":
        return math.floor(p * num_steps + 1e-9) / num_steps
    raise ConfigError(f"unknown schedule {schedule!r}: use 'linear', 'cosine', 'steps' or a function of progress")


def scheduled_rank(fraction: float, start: int, target: int, multiple_of: int = 1) -> int:
    """Rank at reduction ``fraction``: ``start`` at 0, ``target`` at 1, never below ``target``, rounded up to
    ``target + n·multiple_of`` (so it only moves when a whole step of ``multiple_of`` channels is due)."""
    remaining = (start - target) * (1.0 - fraction)
    steps = math.ceil(remaining / multiple_of - 1e-9)
    return min(start, target + steps * multiple_of)


# ---------------------------------------------------------------------------------------------- optimizer state
def _param_states(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer-state tensors of ``param`` that have its shape, by name (empty without an optimizer)."""
    if optimizer is None:
        return {}
    state = optimizer.state.get(param, {})
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            if key not in _LINEAR_STATE + _SQUARE_STATE:
                raise UnsupportedModelError(
                    f"optimizer state {key!r} of {type(optimizer).__name__} has an unknown transformation under a "
                    f"latent rotation; supported: {_LINEAR_STATE + _SQUARE_STATE} (Adam(W), SGD, RMSprop, Adagrad)"
                )
            out[key] = value
    return out


def _optimizers(optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None) -> list:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    return list(optimizers)


def _owner(optimizers: list, param: torch.Tensor) -> torch.optim.Optimizer | None:
    for opt in optimizers:
        if param in opt.state:
            return opt
    return None


# ---------------------------------------------------------------------------------------------- rotation, cut
@torch.no_grad()
def rotate_latent(
    block: MLAAttention,
    q: torch.Tensor,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
) -> None:
    """Exact change of basis of the first ``k = q.shape[0]`` latent channels: ``c' = Qᵀ c``.

    Args:
        q: orthogonal ``[k, k]`` (columns = new channels in old coordinates), ``k ≤ r``; checked.
        optimizers: whose state for ``kv_a``/``kv_b`` is transformed alongside (first moments exactly, elementwise
            second moments by ``Q∘Q``).
    """
    _check_maskable(block)
    k = q.shape[0]
    if q.dim() != 2 or q.shape[1] != k or k > block.kv_lora_rank:
        raise ConfigError(f"rotation must be [k, k] with k <= {block.kv_lora_rank}, got {tuple(q.shape)}")
    eye = torch.eye(k, dtype=torch.float64, device=q.device)
    err = float((q.double().T @ q.double() - eye).abs().max()) if k else 0.0
    if err > 1e-6:
        raise ConfigError(f"rotation is not orthogonal (max |QᵀQ − I| = {err:.2e}); only orthogonal rotations are exact")
    opts = _optimizers(optimizers)
    a, b = block.kv_a_proj_with_mqa, block.kv_b_proj

    def rows(t: torch.Tensor, m: torch.Tensor) -> None:  # t[:k] ← mᵀ t[:k]
        t[:k] = (m.T.to(torch.float64) @ t[:k].to(torch.float64)).to(t.dtype)

    def cols(t: torch.Tensor, m: torch.Tensor) -> None:  # t[:, :k] ← t[:, :k] m
        t[:, :k] = (t[:, :k].to(torch.float64) @ m.to(torch.float64)).to(t.dtype)

    qd = q.to(device=a.weight.device, dtype=torch.float64)
    targets = [(a.weight, rows), (b.weight, cols)] + ([(a.bias, rows)] if a.bias is not None else [])
    for param, apply in targets:
        apply(param.data, qd)
        opt = _owner(opts, param)
        for key, value in _param_states(opt, param).items():
            apply(value, qd if key in _LINEAR_STATE else qd * qd)
            if key in _SQUARE_STATE:
                value.clamp_(min=0)  # rounding must not make a second moment negative


@torch.no_grad()
def set_rank(
    block: MLAAttention,
    rank: int,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
) -> None:
    """Lower the active rank of ``block`` to ``rank`` (static shapes): mask, and zero the cut channels' weights and
    optimizer state. Raising the rank is refused (cut channels hold no trained weights)."""
    _check_maskable(block)
    current = active_rank(block)
    _check_rank(rank, block.kv_lora_rank, current, f"layer {block.layer_idx}")
    if rank == current:
        return
    opts = _optimizers(optimizers)
    a, b = block.kv_a_proj_with_mqa, block.kv_b_proj
    cut = slice(rank, current)
    for param, index in [(a.weight, (cut,)), (b.weight, (slice(None), cut))] + (
        [(a.bias, (cut,))] if a.bias is not None else []
    ):
        param.data[index] = 0
        for value in _param_states(_owner(opts, param), param).values():
            value[index] = 0
    block.latent_mask[rank:] = 0


def _check_rank(rank: int, width: int, active: int, where: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ConfigError(f"rank must be an integer, got {rank!r} ({type(rank).__name__})")
    if not 1 <= rank <= width:
        raise ConfigError(f"{where}: rank must be in [1, kv_lora_rank={width}], got {rank}")
    if rank > active:
        raise ConfigError(
            f"{where}: rank {rank} exceeds the active latent rank {active}; channels already cut hold no trained "
            "weights, so a rank can only go down"
        )


def energy_rotation(moment: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``Q`` ``[k, k]`` whose columns are the eigenvectors of the latent second moment ``[k, k]``, by
    descending eigenvalue, each with its largest entry positive (deterministic)."""
    m = 0.5 * (moment + moment.T).to(torch.float64)
    vals, vecs = torch.linalg.eigh(m)
    order = torch.argsort(vals, descending=True, stable=True)
    vecs = vecs[:, order]
    pivot = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[pivot, torch.arange(vecs.shape[1], device=vecs.device)])
    signs[signs == 0] = 1
    return vecs * signs


# ---------------------------------------------------------------------------------------------- energy
class LatentMoments:
    """Running second moments ``E[c cᵀ]`` (``[r, r]`` float64 per block) of the latent seen in training.

    A forward hook on each block's ``kv_a_layernorm`` adds ``cᵀc`` (float32) for forwards with gradients enabled
    while ``collecting`` is true (a training loop switches it on for its training batches; evaluation and a
    no-grad teacher pass are not counted). Module ``training`` flags are not consulted: Hugging Face models come
    out of ``from_pretrained`` in eval mode and Lightning keeps modes as they are. `fold` turns the sums of one
    training batch into an exponential moving average (optionally summed over processes first, so every DDP
    rank holds the same moments and therefore computes the same rotation).
    """

    def __init__(self, blocks: list[MLAAttention], decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"energy decay must be in [0, 1), got {decay}")
        self.blocks = blocks
        self.decay = decay
        self.moments: list[torch.Tensor | None] = [None] * len(blocks)
        self._sums: list[torch.Tensor | None] = [None] * len(blocks)
        self._counts = [0] * len(blocks)
        self._handles: list = []
        self.collecting = True

    def attach(self) -> None:
        self.detach()
        for i, block in enumerate(self.blocks):
            self._handles.append(block.kv_a_layernorm.register_forward_hook(self._hook(i)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not (self.collecting and torch.is_grad_enabled()):
                return
            with torch.no_grad():
                x = output.detach().reshape(-1, output.shape[-1]).float()
                s = x.T @ x
                self._sums[i] = s if self._sums[i] is None else self._sums[i] + s
                self._counts[i] += x.shape[0]

        return hook

    @torch.no_grad()
    def fold(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold the sums since the last call into the moving average. ``all_reduce_sum`` (a collective) must be
        called by every process, so it is called even when this process saw nothing."""
        r = self.blocks[0].kv_lora_rank
        device = self.blocks[0].latent_mask.device
        sums = torch.stack([s if s is not None else torch.zeros(r, r, device=device) for s in self._sums]).double()
        counts = torch.tensor(self._counts, dtype=torch.float64, device=device)
        packed = torch.cat([sums.flatten(), counts])
        if all_reduce_sum is not None:
            packed = all_reduce_sum(packed)
        sums, counts = packed[:-len(self.blocks)].view(len(self.blocks), r, r), packed[-len(self.blocks):]
        for i in range(len(self.blocks)):
            if counts[i] > 0:
                batch = sums[i] / counts[i]
                prev = self.moments[i]
                self.moments[i] = batch if prev is None else self.decay * prev.to(batch) + (1 - self.decay) * batch
        self._sums = [None] * len(self.blocks)
        self._counts = [0] * len(self.blocks)

    def ready(self) -> bool:
        return all(m is not None for m in self.moments)

    @torch.no_grad()
    def rotate(self, i: int, q: torch.Tensor) -> None:
        """Express moment ``i`` in the rotated basis (``Qᵀ M Q`` on its leading ``k × k`` block)."""
        m = self.moments[i]
        if m is None:
            return
        k = q.shape[0]
        qd = q.to(m)
        m[:k, :k] = qd.T @ m[:k, :k] @ qd

    @torch.no_grad()
    def cut(self, i: int, rank: int) -> None:
        m = self.moments[i]
        if m is not None:
            m[rank:, :] = 0
            m[:, rank:] = 0

    def state_dict(self) -> dict:
        return {"decay": self.decay, "moments": [None if m is None else m.detach().cpu().clone() for m in self.moments]}

    def load_state_dict(self, state: dict) -> None:
        moments = state["moments"]
        if len(moments) != len(self.blocks):
            raise ConfigError(f"saved latent moments are for {len(moments)} blocks, the model has {len(self.blocks)}")
        device = self.blocks[0].latent_mask.device
        self.moments = [None if m is None else m.to(device=device, dtype=torch.float64) for m in moments]


@torch.no_grad()
def reduce_rank(
    blocks: list[MLAAttention],
    rank: int,
    *,
    moments: LatentMoments | None = None,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
) -> None:
    """Cut every block to ``rank``; with ``moments``, first rotate each active latent so its channels are sorted by
    current energy (the cut then drops the least energetic directions). Validates every block first."""
    for block in blocks:
        _check_maskable(block)
        _check_rank(rank, block.kv_lora_rank, active_rank(block), f"layer {block.layer_idx}")
    for i, block in enumerate(blocks):
        k = active_rank(block)
        if rank == k:
            continue
        if moments is not None and moments.moments[i] is not None:
            q = energy_rotation(moments.moments[i][:k, :k])
            rotate_latent(block, q, optimizers)
            moments.rotate(i, q)
        set_rank(block, rank, optimizers)
        if moments is not None:
            moments.cut(i, rank)


# ---------------------------------------------------------------------------------------------- truncation
@torch.no_grad()
def truncate_rank(model: nn.Module, rank: int | None = None) -> nn.Module:
    """Make a latent rank physical: every block's ``kv_a_proj_with_mqa`` becomes ``[rank + d_rope, D]`` and
    ``kv_b_proj`` ``[H·(d_nope + d_v), rank]``; ``kv_lora_rank``, the block geometry and ``model.config.transmla``
    follow. ``rank`` defaults to the active rank; it must not exceed it. The function is unchanged when ``rank``
    is the active rank. New parameters replace the old ones: optimizers holding the old ones are stale (use this
    after training, e.g. before export). Validates every block before changing any."""
    blocks = mla_blocks(model)
    if rank is None:
        rank = model_rank(model)
    for block in blocks:
        _check_maskable(block)
        _check_rank(rank, block.kv_lora_rank, active_rank(block), f"layer {block.layer_idx}")
    for block in blocks:
        if rank == block.kv_lora_rank:
            continue
        r = block.kv_lora_rank
        old_a, old_b = block.kv_a_proj_with_mqa, block.kv_b_proj
        w = old_a.weight
        new_a = nn.Linear(old_a.in_features, rank + block.qk_rope_head_dim, bias=old_a.bias is not None,
                          device=w.device, dtype=w.dtype)
        new_a.weight.copy_(torch.cat([w[:rank], w[r:]]))
        if old_a.bias is not None:
            new_a.bias.copy_(torch.cat([old_a.bias[:rank], old_a.bias[r:]]))
        new_b = nn.Linear(rank, old_b.out_features, bias=False, device=old_b.weight.device, dtype=old_b.weight.dtype)
        new_b.weight.copy_(old_b.weight[:, :rank])
        for new, old in ((new_a, old_a), (new_b, old_b)):
            for p_new, p_old in zip(new.parameters(), old.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            new.train(old.training)
        block.kv_a_proj_with_mqa, block.kv_b_proj = new_a, new_b
        block.kv_lora_rank = rank
        block.geometry = replace(block.geometry, kv_lora_rank=rank)
        block.latent_mask = torch.ones(rank, dtype=block.latent_mask.dtype, device=block.latent_mask.device)
    info = getattr(getattr(model, "config", None), _CONFIG_KEY, None)
    if isinstance(info, dict):
        info = {**info, "geometry": {**info.get("geometry", {}), "kv_lora_rank": rank}}
        if isinstance(info.get("mla_config"), dict):
            info["mla_config"] = {**info["mla_config"], "kv_lora_rank": rank}
        setattr(model.config, _CONFIG_KEY, info)
    return model
