"""Layer-streaming conversion of a safetensors checkpoint directory, one decoder layer in memory at a time.

`convert_checkpoint` never builds the whole model: the model skeleton lives on the ``meta`` device, each decoder
layer's weights are read lazily from the safetensors shards onto the conversion device, converted, written to
the output as their own shard, and dropped. What lives on the device at once is one layer (its source weights
and the MLA block replacing it), the calibration hidden states at the current layer boundary, and the float64
running sums of that layer, so device memory is bounded by one layer, not the model; the float64 factorisation
itself and the embedding table stay on the CPU. Host memory holds one layer's tensors while they are written.

The result is a converted checkpoint (``config.json`` with the ``transmla`` record, sharded safetensors, the
tokenizer files) that `transmla_surgery.load_converted` loads and that is bit-identical to converting the whole
model in memory with ``keep_activations=True``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .architectures import check_supported, decoder_layers
from .calibration import LayerInputBuffer, materialize
from .config import MLAConfig
from .errors import ConfigError, UnsupportedModelError
from .report import ConversionReport
from .surgery import _progress, convert_buffered_layer, record_conversion, resolved_config

WEIGHTS_INDEX = "model.safetensors.index.json"


class LazyCheckpoint:
    """Name → tensor access over a directory's safetensors shards, reading only what is asked for."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / WEIGHTS_INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / f for name, f in weight_map.items()}
        elif (directory / "model.safetensors").exists():
            with safe_open(directory / "model.safetensors", framework="pt") as f:
                self.files = {name: directory / "model.safetensors" for name in f.keys()}
        else:
            raise FileNotFoundError(f"{directory} holds no model.safetensors or {WEIGHTS_INDEX}")

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.files if n.startswith(prefix))

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        with safe_open(self.files[name], framework="pt", device=str(device)) as f:
            t = f.get_tensor(name)
        return t if dtype is None else t.to(dtype)


def _materialize(module: nn.Module, prefix: str, ckpt: LazyCheckpoint, device: torch.device, dtype: torch.dtype) -> None:
    """Give a meta-device module real storage on ``device`` and fill every parameter/buffer from the checkpoint."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            value = ckpt.get(prefix + name, device)
            if tuple(value.shape) != tuple(tensor.shape):
                raise UnsupportedModelError(f"{prefix + name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(tensor.shape)}")
            tensor.copy_(value.to(dtype) if value.is_floating_point() else value)


def _causal_padding_mask(mask: torch.Tensor | None, seq: int, device: torch.device) -> torch.Tensor | None:
    """What transformers passes to SDPA layers: ``None`` without padding, else ``[B, 1, T, T]`` bool (causal and
    key not padded)."""
    if mask is None or bool(mask.bool().all()):
        return None
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    return causal[None, None] & mask.to(device).bool()[:, None, None, :]


@torch.no_grad()
def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    config: MLAConfig,
    calibration: Iterable,
    *,
    device: str | torch.device = "cuda" if torch.cuda.is_available() else "cpu",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert the checkpoint in ``source`` to MLA layer by layer and write the converted checkpoint to ``output``.

    Args:
        source: a Hugging Face model directory with safetensors weights (sharded or not).
        output: where to write the converted checkpoint; written into a temporary sibling and renamed, so an
            interrupted run leaves nothing that looks like a checkpoint. Must not exist unless ``overwrite``.
        config: as for `convert_to_mla`; layers are always calibrated from a buffered layer boundary (the
            ``keep_activations=True`` path), advanced through each converted layer (or the original one with
            ``calibration_inputs="original"``).
        device: where each layer is converted (a GPU: memory bounded by one layer plus calibration buffers).
        dtype: compute and output dtype (default: the checkpoint's ``torch_dtype``, else float32).

    Returns:
        The `ConversionReport`, with ``peak_memory_bytes`` the device's peak (CUDA) or the process's peak RSS.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source, output = Path(source), Path(output)
    if not (source / "config.json").exists():
        raise FileNotFoundError(f"{source} is not a model directory (no config.json)")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True to replace it")
    if output.resolve() == source.resolve():
        raise ConfigError("output must differ from source: the source checkpoint is never modified")
    if config.refit_target == "model" and config.calibration_inputs != "converted":
        raise ConfigError("refit_target='model' needs calibration_inputs='converted'")
    ckpt = LazyCheckpoint(source)
    hf_config = AutoConfig.from_pretrained(source)
    device = torch.device(device)
    if dtype is None:
        dtype = getattr(hf_config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    src = check_supported(model)
    config.check_against_geometry(
        num_kv_heads=src.num_kv_heads, head_dim=src.head_dim, num_heads=src.num_heads, hidden_size=src.hidden_size
    )
    types = getattr(hf_config, "layer_types", None)
    if types and len(set(types)) > 1:
        raise UnsupportedModelError(f"streaming conversion needs one attention type in all layers, got {sorted(set(types))}")
    batches = materialize(calibration, getattr(hf_config, "vocab_size", None))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    report = ConversionReport(config=resolved_config(src, config))

    # Layer-0 inputs from the embedding table alone, with the kwargs transformers would pass to each layer.
    # The embedding table stays on the CPU (it is the largest single tensor of many models).
    embed = ckpt.get("model.embed_tokens.weight", "cpu", dtype)
    rotary = type(model.model.rotary_emb)(config=hf_config).to(device)
    hidden, masks, kwargs = [], [], []
    for ids, mask in batches:
        h = nn.functional.embedding(ids, embed).to(device)
        pos = torch.arange(ids.shape[1], device=device)[None]
        hidden.append(h)
        masks.append(mask)
        kwargs.append({
            "attention_mask": _causal_padding_mask(mask, ids.shape[1], device),
            "position_ids": pos,
            "position_embeddings": rotary(h, pos),
        })
    del embed
    layers = decoder_layers(model)
    buffer = LayerInputBuffer.from_states(layers, hidden, masks, kwargs, track_reference=config.refit_target == "model")

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    weight_map: dict[str, str] = {}
    try:
        with _progress(progress) as bar:
            task = None if bar is None else bar.add_task("streaming conversion (layers)", total=len(layers))
            for i, layer in enumerate(layers):
                _materialize(layer, f"model.layers.{i}.", ckpt, device, dtype)
                _check_weights_finite_layer(layer, i)
                report.layers.append(
                    convert_buffered_layer(i, layer, layer.self_attn, buffer, src, config, hf_config, math_device="cpu")
                )
                shard = f"model-layer-{i:05d}.safetensors"
                tensors = {f"model.layers.{i}.{k}": v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
                save_file(tensors, tmp / shard, metadata={"format": "pt"})
                weight_map.update({name: shard for name in tensors})
                layers[i] = layer.to("meta")  # free the layer's device memory
                if bar is not None:
                    bar.advance(task)
        # Everything outside the decoder layers is copied through unchanged, tensor by tensor, on the CPU.
        rest = {}
        for name in ckpt.names():
            if not name.startswith("model.layers."):
                t = ckpt.get(name)
                rest[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
        save_file(rest, tmp / "model-rest.safetensors", metadata={"format": "pt"})
        weight_map.update({name: "model-rest.safetensors" for name in rest})
        total = sum(os.path.getsize(tmp / f) for f in set(weight_map.values()))
        (tmp / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for f in source.iterdir():  # tokenizer and generation files travel with the weights
            if f.is_file() and not f.name.startswith("model") and f.name != "config.json" and not f.name.endswith((".bin", ".pt", ".pth", ".safetensors")):
                shutil.copy2(f, tmp / f.name)
        record_conversion(hf_config, src, config)
        hf_config.dtype = dtype
        hf_config.save_pretrained(tmp)  # written last: a directory without it never loads as a checkpoint
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - start
    report.peak_memory_bytes = (
        int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda"
        else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    )
    return report


def _check_weights_finite_layer(layer: nn.Module, index: int) -> None:
    for name, p in layer.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise UnsupportedModelError(f"layer {index} {name} holds NaN or Inf; refusing to convert")
