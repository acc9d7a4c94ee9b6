"""What the callbacks do differently under Lightning's `FSDPStrategy` (PyTorch FSDP1, ``use_orig_params=True``).

Lightning's FSDPStrategy wraps the LightningModule in ``strategy.setup``, after every callback's ``setup`` (so
`MLASurgery` converts the plain model and FSDP shards the converted one) and before ``on_fit_start``. Once
wrapped, outside a forward each rank holds only its shard: with ``use_orig_params=True`` every original parameter
is a *flattened* 1-D view of the part of it in this rank's shard (size 0 when none is). Buffers (``latent_mask``)
are not sharded: every rank holds them whole.

* `configure` (called by `MLASurgery.setup`, before the wrap) fills in the strategy options the conversion needs and
  refuses the ones it cannot work with.
* `reduce_rank_sharded` lowers the active latent rank on the local shards: the mask (whole on every rank), and the
  cut channels' weights and optimizer state where this rank holds them. No communication.
* `full_state_dict` gathers the full weights to global rank 0 (CPU); `rebuild` makes a plain, unsharded copy of the
  model from them there, for the export.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from transmla_surgery.architectures import decoder_layers
from transmla_surgery.errors import ConfigError, UnsupportedModelError
from transmla_surgery.mla_attention import MLAAttention
from transmla_surgery.rank import _check_maskable, _check_rank, active_rank

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def fsdp_strategy(trainer: pl.Trainer) -> Any:
    """The trainer's strategy if it is Lightning's `FSDPStrategy` (or a subclass), else ``None``."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer.strategy
    return strategy if isinstance(strategy, FSDPStrategy) else None


def sharded_root(trainer: pl.Trainer) -> nn.Module | None:
    """The FSDP-wrapped root module once the strategy has wrapped the LightningModule, else ``None``."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if fsdp_strategy(trainer) is None:
        return None
    root = trainer.strategy.model
    return root if isinstance(root, FSDP) else None


def check_options(trainer: pl.Trainer) -> None:
    """Refuse FSDPStrategy options the callbacks cannot work with; `MLASurgery` calls it before converting, so a
    refusal leaves the model as it was."""
    strategy = fsdp_strategy(trainer)
    if strategy is not None and not strategy.kwargs.get("use_orig_params", True):
        raise ConfigError(
            "FSDPStrategy(use_orig_params=False) is not supported by the transmla callbacks: they train, mask and "
            "export the original parameters (and train='attention' mixes frozen and trainable ones in one layer); "
            "leave use_orig_params at its default (True)"
        )


def configure(trainer: pl.Trainer, model: nn.Module, *, train: str) -> None:
    """Check and complete the FSDPStrategy options for a converted ``model`` (before the strategy wraps it).

    * ``use_orig_params`` must be true (Lightning's default): freezing all but attention mixes trainable and frozen
      parameters, and the rank reduction and the optimizer work on the original parameters.
    * ``auto_wrap_policy`` unset: wrap every decoder layer and, separately, every MLA block. Each layer is then a
      unit of its own (sharded, gathered one at a time) and, with ``train="attention"``, the frozen rest of a layer is
      a unit without gradients (no gradient memory, no reduce-scatter for it).
    * ``sync_module_states`` unset (on GPUs): true, so every rank starts from global rank 0's conversion (each rank
      converts its own copy; a GPU eigensolver is not guaranteed to choose the same signs everywhere).
    """
    strategy = fsdp_strategy(trainer)
    if strategy is None:
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if any(isinstance(m, FSDP) for m in model.modules()):
        return  # wrapped in configure_model by the user: their policy holds
    check_options(trainer)
    kwargs = strategy.kwargs
    if "auto_wrap_policy" not in kwargs:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        layer_cls = type(decoder_layers(model)[0])
        kwargs["auto_wrap_policy"] = ModuleWrapPolicy({layer_cls, MLAAttention})
        rank_zero_info(
            f"MLASurgery: FSDPStrategy had no auto_wrap_policy; wrapping each {layer_cls.__name__} and each "
            "MLAAttention block as its own FSDP unit"
        )
    if strategy.root_device.type != "cpu":  # FSDP broadcasts module states only from an accelerator
        kwargs.setdefault("sync_module_states", True)
    sharding = getattr(strategy, "sharding_strategy", None)
    if train == "attention" and getattr(sharding, "name", None) == "FULL_SHARD":
        # The student's forward, the teacher's pass through the same wrapped layers and the backward each gather
        # every layer again under FULL_SHARD; measured on two H200s (bench/results/fsdp_distill.md, 1.1B model,
        # 4 × 1024 tokens per GPU): 29.4K tokens/s with FULL_SHARD, 39.0K with SHARD_GRAD_OP.
        rank_zero_info(
            "MLASurgery: FSDP FULL_SHARD gathers each layer three times per distillation step (student forward, "
            "teacher pass, backward); FSDPStrategy(sharding_strategy='SHARD_GRAD_OP') gathers once and measured "
            "1.3x faster where the gathered weights fit"
        )
    if train == "attention" and strategy.cpu_offload is not None and getattr(strategy.cpu_offload, "offload_params", False):
        rank_zero_warn("FSDPStrategy(cpu_offload=True) with train='attention': supported but slow (every step "
                       "moves the frozen shards too)")


# ---------------------------------------------------------------------------------------------- rank cut
def _shard_infos(root: nn.Module) -> dict[int, tuple[Any, torch.Size]]:
    """``id(original parameter) → (its _ShardParamInfo, its full shape)`` over every FSDP unit under ``root``."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out: dict[int, tuple[Any, torch.Size]] = {}
    for unit in FSDP.fsdp_modules(root):
        handle = getattr(unit, "_handle", None)
        if handle is None:
            continue
        flat = handle.flat_param
        params = getattr(flat, "_params", None)
        if params is None:
            raise ConfigError("FSDP without use_orig_params=True: the rank reduction needs the original parameters")
        for param, info, shape in zip(params, flat._shard_param_infos, flat._shapes):
            out[id(param)] = (info, shape)
    return out


def _local_index(shape: torch.Size, index: tuple, info: Any, device: torch.device) -> torch.Tensor | None:
    """Boolean mask over this rank's flattened piece of a parameter of full ``shape``: the elements ``index``
    selects in the full parameter. ``None`` when this rank holds none of the parameter."""
    if not info.in_shard:
        return None
    full = torch.zeros(shape, dtype=torch.bool)
    full[index] = True
    return full.reshape(-1)[info.intra_param_start_idx : info.intra_param_end_idx + 1].to(device)


@torch.no_grad()
def reduce_rank_sharded(
    blocks: list[MLAAttention], rank: int, root: nn.Module, optimizers: list[torch.optim.Optimizer] | None = None
) -> None:
    """`transmla_surgery.rank.reduce_rank` (without re-ordering) on an FSDP-sharded model: every rank switches off
    the same latent channels in its (whole) mask and zeroes the cut ``kv_a`` rows and ``kv_b`` columns, and their
    optimizer state, in the part of each parameter it holds. Call on every rank, outside forward and backward."""
    for block in blocks:
        _check_maskable(block)
        _check_rank(rank, block.kv_lora_rank, active_rank(block), f"layer {block.layer_idx}")
    infos = _shard_infos(root)
    opts = list(optimizers or [])
    for block in blocks:
        current = active_rank(block)
        if rank == current:
            continue
        cut = slice(rank, current)
        a, b = block.kv_a_proj_with_mqa, block.kv_b_proj
        targets = [(a.weight, (cut,)), (b.weight, (slice(None), cut))] + ([(a.bias, (cut,))] if a.bias is not None else [])
        for param, index in targets:
            found = infos.get(id(param))
            if found is None or param.shape == found[1]:  # not sharded (e.g. NO_SHARD): whole tensors
                views = [param.data] + [v for v in _states(opts, param) if v.shape == param.shape]
                for v in views:
                    v[index] = 0
                continue
            info, shape = found
            local = _local_index(shape, index, info, param.device)
            if local is None:
                continue
            if local.numel() != param.numel():
                raise UnsupportedModelError(
                    f"layer {block.layer_idx}: FSDP shard of {tuple(shape)} has {param.numel()} elements, expected "
                    f"{local.numel()} (unsupported FSDP layout)"
                )
            param.data[local] = 0
            for v in _states(opts, param):
                if v.shape == param.shape:
                    v[local] = 0
        block.latent_mask[rank:] = 0


def _states(optimizers: list[torch.optim.Optimizer], param: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for opt in optimizers:
        state = opt.state.get(param)
        if state:
            out.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out


# ---------------------------------------------------------------------------------------------- gather, rebuild
def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_state_dict(root: nn.Module, pl_module: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``model`` (a submodule of the wrapped ``pl_module``), on the CPU of global
    rank 0; ``{}`` on the other ranks. A collective: every rank must call it."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    prefix = next(_clean(name) for name, m in pl_module.named_modules() if m is model)
    prefix = prefix + "." if prefix else ""
    on_cpu = next(root.parameters()).device.type == "cpu"
    # (offload_to_cpu on a model that is already on the CPU frees the gathered storage under the state dict's views)
    config = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        state = root.state_dict()
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def rebuild(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain CPU copy of the converted Hugging Face ``model`` (same class and config, MLA blocks) holding the
    weights ``state``; every block's latent mask is copied from ``model`` (buffers are whole on every rank)."""
    from transmla_surgery.surgery import apply_mla_structure

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights

    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    dtype = torch.float32 if torch.float32 in dtypes or not dtypes else next(iter(dtypes))
    with torch.device("cpu"), no_init_weights():
        fresh = type(model)(copy.deepcopy(model.config))
    fresh.to(dtype)
    apply_mla_structure(fresh)
    result = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or {}) if getattr(fresh.config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise UnsupportedModelError(
            f"the gathered FSDP state dict does not fit the converted model: missing {sorted(missing)}, unexpected "
            f"{sorted(result.unexpected_keys)}"
        )
    fresh.tie_weights()
    masks = [m.latent_mask for m in model.modules() if isinstance(m, MLAAttention)]
    for block, mask in zip((m for m in fresh.modules() if isinstance(m, MLAAttention)), masks):
        block.latent_mask.copy_(mask.detach().to("cpu", block.latent_mask.dtype))
    fresh.train(model.training)
    return fresh


# ---------------------------------------------------------------------------------------------- CPU processes
def _full_state_dict_context_on_cpu(module: nn.Module, world_size: int, rank0_only: bool = True) -> Any:
    """Lightning's full-state-dict context without ``offload_to_cpu`` (the parameters are on the CPU already)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


def cpu_fsdp_strategy(**kwargs: Any) -> Any:
    """Lightning's ``FSDPStrategy`` on CPU processes (gloo), to test an FSDP setup without GPUs.

    Lightning refuses FSDP without CUDA in two places that do not concern the callbacks: its accelerator
    connector (``The strategy `fsdp` requires a GPU accelerator``, checked only for ``type(strategy) is
    FSDPStrategy``) and the ``device_id`` it passes to PyTorch FSDP (``None`` on the CPU, which PyTorch refuses:
    ``FSDP needs a non-CPU accelerator device``). The returned strategy is FSDPStrategy with ``device_id=cpu``;
    everything else that runs is Lightning's and PyTorch's own, except one more CPU-only change, made for this
    process: Lightning's full-state-dict gather uses ``offload_to_cpu=True``, which segfaults in PyTorch 2.13 when
    the parameters are on the CPU already, so its context is replaced by one without the offload.
    ``kwargs`` go to ``FSDPStrategy``.
    """
    import lightning.pytorch.strategies.fsdp as lightning_fsdp
    from lightning.pytorch.strategies import FSDPStrategy

    lightning_fsdp._get_full_state_dict_context = _full_state_dict_context_on_cpu

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: nn.Module) -> nn.Module:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            init = FSDP.__init__

            def cpu_init(self_: Any, *args: Any, **kw: Any) -> None:
                if kw.get("device_id") is None:
                    kw["device_id"] = torch.device("cpu")
                init(self_, *args, **kw)

            FSDP.__init__ = cpu_init
            try:
                return super()._setup_model(model)
            finally:
                FSDP.__init__ = init

    return CPUFSDPStrategy(process_group_backend="gloo", **kwargs)

