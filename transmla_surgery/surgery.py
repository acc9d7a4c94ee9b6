"""`convert_to_mla`: the transactional layer loop (calibrate, factorise, swap; roll back on any failure)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .architectures import SourceAttention, check_supported, decoder_layers, source_weights
from .calibration import (
    GramAccumulator,
    LayerInputBuffer,
    RegressionAccumulator,
    attention_input_grams,
    materialize,
    visit_attention_inputs,
)
from .config import MLAConfig
from .errors import CalibrationError, ConfigError, ConversionError, TransMLAError, UnsupportedModelError
from .factorize import factorize_layer, least_squares_map
from .mla_attention import MLAAttention, MLAGeometry
from .report import ConversionReport, LayerReport

CONFIG_KEY = "transmla"  # attribute of model.config recording the conversion (saved in config.json)


def resolved_config(src: SourceAttention, config: MLAConfig) -> dict[str, Any]:
    """The config as applied to this geometry (``freqfold`` resolved): what reports and records show."""
    return {**config.to_dict(), "freqfold": config.resolved_freqfold(src.head_dim)}


def record_conversion(host_config: Any, src: SourceAttention, config: MLAConfig) -> None:
    """Write the ``transmla`` record (format, resolved config, block geometry) into a model config, so that
    ``save_pretrained`` carries it and `load_converted` can rebuild the blocks."""
    record = {"format": RECORD_FORMAT, "mla_config": resolved_config(src, config), "geometry": mla_geometry(src, config).to_dict()}
    setattr(host_config, CONFIG_KEY, record)


def mla_geometry(src: SourceAttention, config: MLAConfig) -> MLAGeometry:
    """The geometry of the MLA block that replaces a source block: ``d_nope = d_v = d``."""
    return MLAGeometry(
        hidden_size=src.hidden_size,
        num_heads=src.num_heads,
        qk_nope_head_dim=src.head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=src.head_dim,
        kv_lora_rank=config.kv_lora_rank,
        source_head_dim=src.head_dim,
        q_lora_rank=config.q_lora_rank,
        q_bias=src.q_bias,
        kv_bias=src.k_bias or src.v_bias,
        o_bias=src.o_bias,
        latent_norm=False,
        latent_norm_eps=config.latent_norm_eps,
    )


def _all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``torch.isfinite(t).all()`` a slice at a time: on a whole MLP weight, ``isfinite`` allocates about twice
    the weight (``abs`` and boolean temporaries), which would be the streaming conversion's peak."""
    flat = t.detach().reshape(-1)
    ok = torch.ones((), dtype=torch.bool, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        ok &= torch.isfinite(flat[start : start + chunk]).all()
    return bool(ok)


def _check_weights_finite(model: nn.Module) -> None:
    for i, layer in enumerate(decoder_layers(model)):
        for name, p in layer.self_attn.named_parameters():
            if not p.dtype.is_floating_point:
                raise UnsupportedModelError(
                    f"layer {i} self_attn.{name} has dtype {p.dtype}: conversion needs floating-point weights "
                    "(dequantise a quantised model first)"
                )
            if p.is_meta:
                raise UnsupportedModelError(f"layer {i} self_attn.{name} is on the 'meta' device (no data); load the weights first")
            if not _all_finite(p):
                raise UnsupportedModelError(f"layer {i} self_attn.{name} holds NaN or Inf; refusing to convert")
        norm = getattr(layer.input_layernorm, "weight", None)
        if norm is not None and not _all_finite(norm):
            raise UnsupportedModelError(f"layer {i} input_layernorm.weight holds NaN or Inf; refusing to convert")


def _check_uniform_layer_types(model: nn.Module) -> None:
    types = getattr(model.config, "layer_types", None)
    if types and len(set(types)) > 1:
        raise UnsupportedModelError(
            f"keep_activations=True needs one attention type in all layers, got {sorted(set(types))}; "
            "use keep_activations=False"
        )


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


@torch.no_grad()
def convert_to_mla(
    model: nn.Module,
    config: MLAConfig,
    calibration: Iterable,
    *,
    keep_activations: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Replace every GQA attention block of ``model`` by an `MLAAttention` block, in place.

    Args:
        model: a transformers ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` (any GQA, MHA
            or MQA geometry), on any device and dtype.
        config: target geometry and method options.
        calibration: an iterable of ``input_ids`` tensors ``[batch, seq]`` or of dicts with ``input_ids`` and an
            optional ``attention_mask`` (masked positions enter no statistic). It is validated whole before the
            model is touched, and re-run once per layer when ``config.calibration_inputs == "converted"``.
        keep_activations: keep the hidden states entering the current layer for all calibration tokens
            (``tokens × hidden`` values) and advance them one layer at a time: one layer-forward per layer
            instead of re-running the stream through all earlier layers (quadratic in depth). Off by default, so
            that memory does not grow with the amount of calibration data.
        progress: show a rich progress bar.

    Returns:
        A `ConversionReport` (per layer: rope and latent energy kept, K/V balance, KV values per token).

    Raises:
        ConfigError, UnsupportedModelError, CalibrationError: before anything is changed.
        ConversionError: for a failure part-way; every layer has then been put back as it was.
    """
    if not isinstance(config, MLAConfig):
        raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
    src = check_supported(model)
    config.check_against_geometry(
        num_kv_heads=src.num_kv_heads, head_dim=src.head_dim, num_heads=src.num_heads, hidden_size=src.hidden_size
    )
    if config.refit_output and config.refit_target == "model" and not keep_activations:
        raise ConfigError("refit_target='model' needs keep_activations=True (it tracks the original stream too)")
    if config.refit_target == "model" and config.calibration_inputs != "converted":
        raise ConfigError("refit_target='model' needs calibration_inputs='converted'")
    _check_weights_finite(model)
    batches = materialize(calibration, getattr(model.config, "vocab_size", None))
    layers = decoder_layers(model)
    originals = [layer.self_attn for layer in layers]
    device = originals[0].q_proj.weight.device
    report = ConversionReport(config=resolved_config(src, config))
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    try:
        with _progress(progress) as bar:
            n_layers = len(layers)
            if keep_activations:
                total, unit = n_layers, "layer"
            else:
                total, unit = (n_layers if config.calibration_inputs == "converted" else 1) * len(batches), "batch"
            task = None if bar is None else bar.add_task(f"calibrating + converting ({unit}s)", total=total)
            advance = None if bar is None else (lambda: bar.advance(task))
            grams = buffer = None
            if keep_activations:
                _check_uniform_layer_types(model)
                buffer = LayerInputBuffer(model, batches, track_reference=config.refit_target == "model")
            elif config.calibration_inputs == "original":
                grams = attention_input_grams(model, list(range(n_layers)), batches, progress=advance)
            for i, layer in enumerate(layers):
                if buffer is not None:
                    row = convert_buffered_layer(i, layer, originals[i], buffer, src, config, model.config)
                    if advance is not None:
                        advance()
                else:
                    acc = grams.pop(i) if grams is not None else attention_input_grams(model, [i], batches, progress=advance)[i]
                    visit = lambda fn, i=i: visit_attention_inputs(model, {i: fn}, batches)  # noqa: E731
                    layer.self_attn, row = convert_layer(i, originals[i], acc, visit, src, config, model.config)
                report.layers.append(row)
    except BaseException as exc:
        for layer, original in zip(layers, originals):
            layer.self_attn = original
        if isinstance(exc, (TransMLAError, KeyboardInterrupt)):
            raise
        raise ConversionError(
            f"conversion failed at layer {len(report.layers)} ({type(exc).__name__}: {exc}); "
            "the model has been restored unchanged"
        ) from exc

    record_conversion(model.config, src, config)
    report.seconds = time.perf_counter() - start
    report.peak_memory_bytes = _peak_memory(device)
    return report


def convert_layer(
    index: int,
    original: nn.Module,
    acc: GramAccumulator,
    visit,
    src: SourceAttention,
    config: MLAConfig,
    host_config: Any,
    math_device: torch.device | str | None = None,
) -> tuple[MLAAttention, LayerReport]:
    """Factorise one source attention block from its input statistics and build its `MLAAttention`
    (refitting ``o_proj`` through ``visit`` when configured). The model itself is not touched.

    ``math_device`` is where the float64 factorisation runs (default: the block's device); streaming conversion
    puts it on the CPU so that the accelerator holds only the layer, its activations and running sums.
    """
    weight = original.q_proj.weight
    math_device = weight.device if math_device is None else torch.device(math_device)
    geometry = mla_geometry(src, config)
    sigma = acc.second_moment(math_device)
    acc.release()  # the running sum (on the block's device) is not needed once its moment is on math_device
    weights = factorize_layer(
        sigma,
        src,
        source_weights(original, math_device),
        kv_lora_rank=config.kv_lora_rank,
        rope_dim=config.qk_rope_head_dim,
        fold=config.resolved_freqfold(src.head_dim),
        balance_kv=config.balance_kv,
        key_weight=config.key_weight,
        subspace=config.subspace,
        rope_selection=config.rope_selection,
        q_lora_rank=config.q_lora_rank,
        damping=config.damping,
    )
    block = build_mla_block(geometry, index, host_config, weights.tensors, dtype=weight.dtype, device=weight.device)
    if config.refit_output:
        refit_output_projection(block, original, visit, src.o_bias, math_device=math_device)
    block.train(original.training)
    row = LayerReport(
        layer=index,
        rope_energy=weights.rope_energy,
        latent_energy=weights.latent_energy,
        alpha=weights.alpha,
        kv_before=2 * src.num_kv_heads * src.head_dim,
        kv_after=geometry.cache_width,
        calibration_tokens=acc.count,
    )
    return block, row


def convert_buffered_layer(
    index: int,
    layer: nn.Module,
    original: nn.Module,
    buffer: LayerInputBuffer,
    src: SourceAttention,
    config: MLAConfig,
    host_config: Any,
    math_device: torch.device | str | None = None,
    before_advance: Callable[[], None] | None = None,
) -> LayerReport:
    """Convert one decoder layer from buffered hidden states, swap the block in, and advance the buffer.

    Order: attention-input Gram, factorisation and ``o_proj`` refit (all on layer ``index``'s inputs), then the
    advance, which is the only step that runs the whole layer (MLP included): ``before_advance`` is called just
    before it, so that streaming conversion can load the MLP weights only then. With
    ``calibration_inputs="original"`` the buffer is advanced through the original attention block.
    """
    last = index + 1 == len(buffer.layers)
    acc = buffer.attention_gram(index)
    if config.refit_target == "model":
        visit = lambda fn: buffer.visit_with_reference(index, original, fn)  # noqa: E731
    else:
        visit = lambda fn: buffer.visit(index, fn)  # noqa: E731
    layer.self_attn, row = convert_layer(index, original, acc, visit, src, config, host_config, math_device)
    del acc
    if not last:
        if before_advance is not None:
            before_advance()
        if config.calibration_inputs == "original":
            buffer.advance(index, attention=original)  # the next layer sees what the original layer computes
        else:
            buffer.advance(index, original)  # the next layer sees what this layer computes once converted
    return row


@torch.no_grad()
def refit_output_projection(
    block: MLAAttention,
    original: nn.Module,
    visit,
    has_bias: bool,
    ridge: float = 1e-3,
    math_device: torch.device | str | None = None,
) -> None:
    """Refit ``block.o_proj`` by least squares so the block's output matches the source block's on the same
    calibration inputs (running float64 sums, no stored activations).

    The per-head attention outputs ``a`` (``[tokens, H·d_v]``) that reach ``o_proj`` carry every change the
    lossy steps made (partial RoPE moves attention weights, the latent truncates values); refitting the linear
    map from ``a`` to the source's output recovers what a linear map can. At full rank of an exact conversion
    it returns ``W_O`` itself. ``visit`` hands each batch's attention input to a callback (and, for
    ``refit_target="model"``, the output that would bring the converted stream back to the original one).
    The sums accumulate on the block's device; the solve runs on ``math_device`` (default: the block's device),
    the device copies of the sums being freed first.
    """
    hidden = block.o_proj.out_features
    acc = RegressionAccumulator(block.o_proj.in_features, hidden, block.o_proj.weight.device)
    captured: dict[str, torch.Tensor] = {}
    handle = block.o_proj.register_forward_pre_hook(lambda module, args: captured.__setitem__("a", args[0]))
    modes = (block.training, original.training)
    block.eval()
    original.eval()
    try:
        def visitor(x: torch.Tensor, mask: torch.Tensor | None, kwargs: dict, target: torch.Tensor | None = None) -> None:
            if target is None:
                target = original(hidden_states=x, **kwargs)[0]
            block(hidden_states=x, **kwargs)
            acc.add(captured.pop("a"), target, mask)

        visit(visitor)
    finally:
        handle.remove()
        block.train(modes[0])
        original.train(modes[1])
    math_device = block.o_proj.weight.device if math_device is None else torch.device(math_device)
    inputs, cross = acc.inputs.to(math_device), acc.cross.to(math_device)
    acc.inputs = acc.cross = None  # frees the device sums when the solve runs elsewhere
    prior = block.o_proj.weight.detach().to(math_device, torch.float64)
    if has_bias:
        prior = torch.cat([prior, block.o_proj.bias.detach().to(math_device, torch.float64)[:, None]], dim=1)
    w = least_squares_map(inputs, cross, prior, bias=has_bias, ridge=ridge)
    del inputs, cross, prior
    if not bool(torch.isfinite(w).all()):
        raise CalibrationError("output-projection refit produced non-finite weights")
    if has_bias:
        block.o_proj.weight.copy_(w[:, :-1])
        block.o_proj.bias.copy_(w[:, -1])
    else:
        block.o_proj.weight.copy_(w)


def build_mla_block(
    geometry: MLAGeometry,
    layer_idx: int,
    host_config: Any,
    tensors: dict[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> MLAAttention:
    """An `MLAAttention` of ``geometry`` on ``device``/``dtype``, filled from float64 ``tensors`` if given."""
    block = MLAAttention(geometry, layer_idx, host_config)
    if tensors is not None:
        state = block.state_dict()
        missing = sorted(set(state) - set(tensors))
        unexpected = sorted(set(tensors) - set(state))
        if missing or unexpected:
            raise ConversionError(f"layer {layer_idx}: weights do not fit the block (missing {missing}, unexpected {unexpected})")
        for name, value in tensors.items():
            if not bool(torch.isfinite(value).all()):
                raise CalibrationError(
                    f"layer {layer_idx}: factorisation produced non-finite {name}; is the calibration degenerate?"
                )
            state[name] = value
        block.load_state_dict(state)
    return block.to(device=device, dtype=dtype)


def apply_mla_structure(model: nn.Module) -> nn.Module:
    """Swap empty `MLAAttention` blocks into a model whose config records a conversion (``config.transmla``),
    ready for ``load_state_dict`` of a converted checkpoint."""
    info = getattr(model.config, CONFIG_KEY, None)
    if not info:
        raise UnsupportedModelError("model.config has no 'transmla' record: this is not a converted model")
    geometry = geometry_from_record(info, model.config)
    for i, layer in enumerate(decoder_layers(model)):
        old = layer.self_attn
        ref = next(old.parameters())
        layer.self_attn = build_mla_block(geometry, i, model.config, dtype=ref.dtype, device=ref.device)
    return model


RECORD_FORMAT = 1  # format of the `transmla` record this library writes and reads


def geometry_from_record(record: Any, host_config: Any = None) -> MLAGeometry:
    """The `MLAGeometry` of a ``transmla`` config record, validated field by field (a hand-edited or damaged
    ``config.json`` gets a `ConfigError` naming the field, not a ``KeyError`` or a wrongly shaped model)."""
    from dataclasses import MISSING, fields

    where = f"the '{CONFIG_KEY}' record"
    if not isinstance(record, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(record).__name__}")
    fmt = record.get("format")
    if fmt != RECORD_FORMAT:
        raise ConfigError(f"{where} has format {fmt!r}; this library reads format {RECORD_FORMAT}")
    data = record.get("geometry")
    if not isinstance(data, dict):
        raise ConfigError(f"{where} lacks a 'geometry' object (got {type(data).__name__})")
    spec = {f.name: f for f in fields(MLAGeometry)}
    unknown = sorted(set(data) - set(spec))
    missing = sorted(n for n, f in spec.items() if f.default is MISSING and n not in data)
    if missing:
        raise ConfigError(f"{where}: geometry lacks required field(s) {missing}")
    if unknown:
        raise ConfigError(f"{where}: geometry has unknown field(s) {unknown}; allowed: {sorted(spec)}")
    for name, value in data.items():
        if name in ("q_bias", "kv_bias", "o_bias", "latent_norm"):
            ok = isinstance(value, bool)
        elif name == "latent_norm_eps":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value < 1.0
        elif name == "q_lora_rank" and value is None:
            ok = True
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if not ok:
            raise ConfigError(f"{where}: geometry.{name} = {value!r} is not valid")
    geometry = MLAGeometry(**data)
    if geometry.qk_rope_head_dim % 2:
        raise ConfigError(f"{where}: geometry.qk_rope_head_dim = {geometry.qk_rope_head_dim} must be even")
    if host_config is not None:
        for name, key in (("hidden_size", "hidden_size"), ("num_heads", "num_attention_heads")):
            host = getattr(host_config, key, None)
            if host is not None and host != getattr(geometry, name):
                raise ConfigError(
                    f"{where}: geometry.{name} = {getattr(geometry, name)} does not match the model's {key} = {host}"
                )
    return geometry


def is_converted(model: nn.Module) -> bool:
    return any(isinstance(layer.self_attn, MLAAttention) for layer in decoder_layers(model))
