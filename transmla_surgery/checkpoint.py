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

from .errors import UnsupportedModelError
from .surgery import CONFIG_KEY, apply_mla_structure


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards named by ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{directory} holds neither model.safetensors nor model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(str(directory / shard)))
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
        UnsupportedModelError: the directory is not a converted model (an export loads with ``load_exported``).
        ValueError: the weights do not fit the recorded geometry (missing or unexpected tensors).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    directory = Path(path)
    config = AutoConfig.from_pretrained(str(directory))
    if getattr(config, "model_type", None) == "deepseek_v3":
        raise UnsupportedModelError(
            f"{directory} is a DeepSeek-V3 export: load it with load_exported / from_pretrained"
        )
    if not getattr(config, CONFIG_KEY, None):
        raise UnsupportedModelError(f"{directory}/config.json has no '{CONFIG_KEY}' record: not a converted model")
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device(device), no_init_weights():  # every parameter is overwritten below; skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        apply_mla_structure(model)
    state = _read_state_dict(directory)
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - _tied_keys(model)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{directory}: weights do not fit the converted geometry (missing {sorted(missing)}, unexpected "
            f"{sorted(result.unexpected_keys)})"
        )
    model.tie_weights()
    return model.eval()

