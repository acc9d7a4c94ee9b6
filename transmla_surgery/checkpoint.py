"""Loading our own ``save_pretrained`` of a converted (not exported) model.

A converted model saves like any transformers model (``model.save_pretrained(dir)``): its ``config.json`` is the
source's (``model_type: llama`` …) plus the ``transmla`` record, and its weights carry `MLAAttention` names. A
plain ``from_pretrained`` would build GQA attention and drop those weights, so `load_converted` builds the source
architecture without initialising it, swaps in empty MLA blocks (`surgery.apply_mla_structure`) and loads every
tensor, refusing anything missing or unexpected. For a stock DeepSeek-V3 checkpoint use `export.export_deepseek`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import torch
from torch import nn

from .errors import CheckpointError, ConfigError, UnsupportedModelError
from .surgery import CONFIG_KEY, apply_mla_structure, geometry_from_record

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"




def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: ``model.safetensors``, or the shards its index names.

    Safetensors only: a ``pytorch_model.bin`` (a pickle, which can run code when loaded) is never considered.
    Raises `CheckpointError` (naming the file) for a missing or malformed index or a shard outside the directory.
    """
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = directory / WEIGHTS_INDEX
    if not index.is_file():
        raise CheckpointError(
            f"{directory} holds neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX} (only safetensors weights are loaded)"
        )
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index ({type(exc).__name__}: {exc})") from exc
    files = []
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{index} names {shard!r}, not a .safetensors file in {directory}")
        if not (directory / shard).is_file():
            raise CheckpointError(f"{index} names {shard}, which is missing from {directory}")
        files.append(directory / shard)
    if not files:
        raise CheckpointError(f"{index} names no weight files")
    return files


def check_safetensors(files: list[Path]) -> None:
    """Parse every file's safetensors header (cheap: no tensor is read) and check that the file covers every tensor
    it declares; raise `CheckpointError` naming the first truncated or corrupt file."""
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # SafetensorError, OSError: truncated, empty, garbage, unreadable
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); is it truncated or corrupt?") from exc


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards named by ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(directory):
        try:
            tensors = load_file(str(file))
        except Exception as exc:  # SafetensorError, OSError
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); is it truncated or corrupt?") from exc
        duplicate = sorted(set(tensors) & set(state))
        if duplicate:
            raise CheckpointError(f"{file} repeats tensors of another shard: {duplicate[:5]}")
        state.update(tensors)
    return state


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that legitimately stay out of a checkpoint because they are tied to another."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied)


def load_converted(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """Rebuild a converted model saved with ``save_pretrained``: source class, MLA blocks, every weight checked.

    Args:
        path: directory written by ``save_pretrained`` of a model converted by `convert_to_mla`.
        dtype: parameter dtype; ``None`` uses the config's ``dtype`` (float32 if unset).
        device: where to build the model.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        UnsupportedModelError: the directory is not a converted model (an export loads with ``load_exported``).
        ConfigError: the ``transmla`` record of ``config.json`` is damaged (names the field), or ``dtype`` is not a
            floating-point dtype.
        CheckpointError (a ValueError): a weight file is missing, truncated or corrupt (names the file), or the
            weights do not fit the recorded geometry (missing, unexpected or wrongly shaped tensors).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (load_converted reads a local save_pretrained directory)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    if getattr(config, "model_type", None) == "deepseek_v3":
        raise UnsupportedModelError(
            f"{directory} is a DeepSeek-V3 export: load it with load_exported / from_pretrained"
        )
    if not getattr(config, CONFIG_KEY, None):
        raise UnsupportedModelError(f"{directory}/config.json has no '{CONFIG_KEY}' record: not a converted model")
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        geometry_from_record(getattr(config, CONFIG_KEY), config)
    except ConfigError as exc:
        raise ConfigError(f"{directory / 'config.json'}: {exc}") from exc
    check_safetensors(safetensors_files(directory))  # cheap (headers only): a damaged file fails before any build
    with torch.device(device), no_init_weights():  # every parameter is overwritten below; skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        apply_mla_structure(model)
    state = _read_state_dict(directory)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: the record's geometry does not describe these weights
        raise CheckpointError(f"{directory}: weights do not fit the recorded geometry: {exc}") from exc
    missing = set(result.missing_keys) - _tied_keys(model)
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: weights do not fit the converted geometry (missing {sorted(missing)}, unexpected "
            f"{sorted(result.unexpected_keys)})"
        )
    model.tie_weights()
    return model.eval()

