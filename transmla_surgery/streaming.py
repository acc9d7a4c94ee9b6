"""Layer-streaming conversion of a safetensors checkpoint directory, one decoder layer in memory at a time.

`convert_checkpoint` never builds the whole model: the model skeleton lives on the ``meta`` device, each decoder
layer's weights are read lazily from the safetensors shards (on the CPU, then copied into their device storage),
converted, written to the output as their own shard, and dropped. Host memory holds one layer's tensors while
they are written; the embedding table and all float64 linear algebra (factorisation, o_proj least squares) stay
on the CPU.

What lives on the conversion device, per layer and phase (Llama-3-8B figures: bf16, 32K calibration tokens):

* always: the calibration hidden states at the current layer boundary (``tokens × D``, 268 MB);
* Gram: the source attention block and ``input_layernorm`` (84 MB; the MLP is not loaded yet) and the float64
  running Gram ``(D+1)²`` (134 MB), moved to the CPU and freed before the factorisation;
* o_proj refit: source and converted attention blocks (84 + 97 MB) and the regression sums
  ``(n_in+1)·(n_in+n_out+1)`` float64 (268 MB), moved to the CPU for the solve and freed;
* advance: the converted block and the MLP (97 + 352 MB; the source block has been dropped, or, with
  ``calibration_inputs="original"``, the converted block waits on the CPU instead).

Transients are bounded by chunking: layers run over micro-batches of whole sequences of about ``chunk_tokens``
tokens (the MLP over at most that many rows), and the accumulators cast and fold at most
`calibration.ACCUMULATE_ROWS` rows at a time into their sums in place (``addmm_``), so no whole-batch float64 copy
and no second full-size product exists; weight finiteness is checked slice by slice. Peak device memory is
therefore the largest phase above plus ~50 MB of activations: 806 MB measured on an H200 for 64 × 512 tokens,
under the ``1.5 × one layer + calibration buffer`` = 923 MB bound (``bench/convert_scale.py``). Attention needs
whole sequences, so its activations grow with the sequence length: with 4096-token sequences the peak was 1128 MB.
``refit_target="model"`` doubles the buffer (it tracks the original stream too).

The result is a converted checkpoint (``config.json`` with the ``transmla`` record, sharded safetensors, the
tokenizer files) that `transmla_surgery.load_converted` loads and that is bit-identical to converting the whole
model in memory with ``keep_activations=True`` (same micro-batches, same summation order).
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
from .calibration import LayerInputBuffer, _positive, materialize
from .config import MLAConfig
from .errors import ConfigError, UnsupportedModelError
from .report import ConversionReport
from .surgery import _all_finite, _progress, convert_buffered_layer, record_conversion, resolved_config

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


# The parts of a decoder layer the attention conversion (Gram, factorisation, o_proj refit) reads; the rest (the
# MLP, post-attention norm) is loaded only for the advance, once the float64 running sums are gone.
ATTENTION_PARTS = ("input_layernorm", "self_attn")


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


def _materialize(module: nn.Module, prefix: str, ckpt: LazyCheckpoint, device: torch.device, dtype: torch.dtype) -> None:
    """Give a meta-device module real storage on ``device`` and fill every parameter/buffer from the checkpoint.

    Tensors are read on the CPU and copied into the allocated storage, so the device never holds a second copy.
    """
    module.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            value = ckpt.get(prefix + name, "cpu")
            if tuple(value.shape) != tuple(tensor.shape):
                raise UnsupportedModelError(f"{prefix + name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(tensor.shape)}")
            tensor.copy_(value.to(dtype) if value.is_floating_point() else value)
            del value


def _materialize_parts(
    layer: nn.Module, index: int, parts: Iterable[str] | None, ckpt: LazyCheckpoint, device: torch.device, dtype: torch.dtype
) -> None:
    """Load the named children of decoder layer ``index`` (``None``: every child still on ``meta``) and check
    their weights are finite. A layer with parameters of its own is loaded whole."""
    prefix = f"model.layers.{index}."
    if any(True for _ in layer.parameters(recurse=False)) or any(True for _ in layer.buffers(recurse=False)):
        if _is_meta(layer):
            _materialize(layer, prefix, ckpt, device, dtype)
            _check_weights_finite_layer(layer, index)
        return
    children = dict(layer.named_children())
    names = [n for n, c in children.items() if _is_meta(c)] if parts is None else [n for n in parts if n in children]
    for name in names:
        if _is_meta(children[name]):
            _materialize(children[name], f"{prefix}{name}.", ckpt, device, dtype)
            _check_weights_finite_layer(children[name], index, f"{name}.")


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
    chunk_tokens: int | None = None,
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
        chunk_tokens: tokens per layer forward over the calibration states (whole sequences, at least one; the
            MLP sees at most this many rows at a time); default `calibration.CHUNK_TOKENS` (512). Bounds the
            activation memory; the rounding of the result depends on it (bit-identity with `convert_to_mla`
            holds at the default, which both use).

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
    if chunk_tokens is not None:
        _positive("chunk_tokens", chunk_tokens)  # refused before anything is read or written
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
    buffer = LayerInputBuffer.from_states(
        layers, hidden, masks, kwargs, track_reference=config.refit_target == "model", chunk_tokens=chunk_tokens
    )
    del hidden, kwargs, h  # the buffer owns the states (and overwrites them in place as it advances)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    weight_map: dict[str, str] = {}
    try:
        with _progress(progress) as bar:
            task = None if bar is None else bar.add_task("streaming conversion (layers)", total=len(layers))
            for i, layer in enumerate(layers):
                # Attention and its input norm first: the Gram and the o_proj refit need nothing else.
                _materialize_parts(layer, i, ATTENTION_PARTS, ckpt, device, dtype)
                original = layer.self_attn

                def before_advance(layer=layer, i=i, original=original) -> None:
                    # The float64 sums are gone; load the MLP now, and move off the device whichever attention
                    # block the advance does not run.
                    if config.calibration_inputs == "original":
                        layer.self_attn.to("cpu")  # the converted block waits on the CPU until it is written
                    elif buffer.reference is None:
                        original.to("meta")
                    _materialize_parts(layer, i, None, ckpt, device, dtype)

                report.layers.append(
                    convert_buffered_layer(i, layer, original, buffer, src, config, hf_config, math_device="cpu",
                                           before_advance=before_advance)
                )
                del original, before_advance  # nothing keeps the source attention alive past its layer
                _materialize_parts(layer, i, None, ckpt, device, dtype)  # the last layer is never advanced
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


def _check_weights_finite_layer(layer: nn.Module, index: int, prefix: str = "") -> None:
    for name, p in layer.named_parameters():
        if p.is_floating_point() and not _all_finite(p):
            raise UnsupportedModelError(f"layer {index} {prefix}{name} holds NaN or Inf; refusing to convert")
