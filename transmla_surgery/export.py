"""Export a converted model as a DeepSeek-V3 checkpoint that stock loaders run unchanged, verified by round trip.

``export_deepseek`` writes safetensors weights, ``config.json`` (``model_type: deepseek_v3``), a
``generation_config.json`` and the tokenizer into a hidden temporary sibling of the target directory, reloads it
through the stock ``transformers`` ``DeepseekV3ForCausalLM`` (no ``trust_remote_code``), compares logits with the
in-memory model, and only then renames it into place. What it changes on the way, all exact unless stated:

* **RoPE layout.** Our block keeps the ``d_rope`` rope channels in Hugging Face half layout (channel ``k`` pairs with
  ``k + d_rope/2``); DeepSeek checkpoints store pairs interleaved (``2i, 2i+1``) with ``rope_interleave: true``.
  The rope rows of ``q_proj``/``q_b_proj`` (last ``d_rope`` of every head) and of ``kv_a_proj_with_mqa`` (last
  ``d_rope`` rows) are permuted. The kept frequencies are frequency ``k`` of a ``d_rope``-dim RoPE with the
  source's ``rope_theta``, which is what the stock rotary embedding computes (``head_dim = qk_rope_head_dim``).
* **Latent norms.** Our block has no norm on the latent; the stock class always applies
  ``kv_a_layernorm = RMSNorm(kv_lora_rank, eps=1e-6)`` (and ``q_a_layernorm`` when ``q_lora_rank`` is set). The
  export scales the latent rows of ``kv_a_proj_with_mqa`` (and its bias) by a power of two ``λ`` so small that
  ``u = λ²·mean(c²)/eps ≤ 1e-8`` for *every possible* token (bound below), which makes the norm the linear map
  ``c ↦ w·c/sqrt(eps)`` up to a relative ``1 - 1/sqrt(1+u) ≤ 5e-9``; the norm weight ``w`` is a power of two and
  the remaining factor ``sqrt(eps)/(λ·w) ∈ [0.71, 1.41]`` goes into ``kv_b_proj`` (resp. ``q_b_proj``), so no
  systematic rounding of a shared scale enters bf16 checkpoints. Bound: the attention input is
  ``x = input_layernorm(h)``, so ``‖x‖² ≤ D·max(w_in²)`` (`architectures.input_norm_bound`) and
  ``‖c‖² ≤ σ_max([W_c b_c])²·(‖x‖² + 1)``.
* **Norm eps.** Transformers builds ``kv_a_layernorm`` with a hard-coded eps 1e-6 (``DeepseekV3RMSNorm(
  kv_lora_rank)`` in ``modeling_deepseek_v3.py``) while engines use ``rms_norm_eps``; the fold above depends on
  eps, so the export writes ``rms_norm_eps = 1e-6``. The decoder norms then change eps too, which is *not*
  negligible for a source with 1e-5 (measured and reported); it is compensated exactly by scaling the whole
  residual stream by ``s = sqrt(1e-6 / eps_source)`` (``embed_tokens``, ``o_proj``, ``down_proj``): an RMSNorm with
  eps ``s²·ε`` on ``s·h`` equals one with eps ``ε`` on ``h``. ``lm_head`` reads ``model.norm`` and is unchanged.
* **Softmax scale.** Our block already uses DeepSeek's ``1/sqrt(d_nope + d_rope)``; the stock class multiplies it
  by a YaRN ``mscale`` only for non-default rope types with ``mscale_all_dim``, which the export never writes.
* **Dense MLP.** ``first_k_dense_replace = num_hidden_layers`` (no MoE layer is built), ``n_routed_experts = 1``
  (an integer: one engine's weight loader reads it unconditionally), ``n_group = topk_group = 1``,
  ``routed_scaling_factor = 1.0``, no multi-token-prediction layer.
* **Tied embeddings.** ``lm_head.weight`` is written explicitly with ``tie_word_embeddings: false``.
* **Training-time latent mask** (``MLAAttention.latent_mask``, if present): folded into ``kv_b_proj`` columns.

Verification (`verification_checks`): the stock reload computing in float32 must match the in-memory weights
computing in float32 (a bf16 model is upcast losslessly for this and restored bit-exactly) within 1e-4 for
float32 files and 2e-2 for bfloat16 files; a bfloat16-compute load is checked against a loose 0.3 guard only,
because bf16 inference alone moves SmolLM2's logits by 2 % (source) to 3–8 % (converted, in memory or exported).

What a stock *serving engine* cannot represent, and how the export treats it (``on_unsupported`` decides between
refusing and warning; nothing is dropped silently):

* attention biases (Qwen2): the stock class has biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` iff
  ``attention_bias`` (never on ``q_proj``), engines load none. ``biases="keep"`` writes them (a ``q_proj`` bias is
  carried by an exact full-rank ``q_a_proj → q_a_layernorm → q_b_proj`` factorisation), exact in transformers,
  silently dropped by engines: an engine issue. ``biases="drop"`` writes a bias-free checkpoint every loader
  computes identically; its logit change against the converted model is measured and reported as a loss.
* rope scaling (Llama-3.1 ``llama3``, ``linear``): transformers reproduces it exactly (both are per-frequency
  maps), engines coerce non-default types to DeepSeek-YaRN. Other types (``dynamic``, ``yarn``, …) depend on the
  rotary dimension and are refused outright.
* sliding-window attention (Mistral, Qwen2 with ``use_sliding_window``): DeepSeek-V3 has none; outputs differ for
  sequences longer than the window.
* a cache width ``kv_lora_rank + qk_rope_head_dim`` other than 576 (512 + 64) is correct but engines' fast MLA
  kernels will not be used: always a warning, never an error.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .architectures import SUPPORTED_MODEL_TYPES, decoder_layers, host_rope_info, input_norm_bound
from .errors import ConfigError, TransMLAError, UnsupportedModelError
from .mla_attention import MLAAttention, MLAGeometry, RMSNorm
from .surgery import CONFIG_KEY

OnUnsupported = Literal["error", "warn"]
BiasMode = Literal["keep", "drop"]

EXPORT_EPS = 1e-6  # rms_norm_eps of every export: transformers' kv_a/q_a_layernorm hard-code 1e-6
LINEARITY_TARGET = 1e-8  # bound on u = λ²·mean(c²)/eps; deviation from linear 1 - 1/sqrt(1+u) ≤ u/2
ENGINE_CACHE_WIDTH = 576  # 512 + 64: what FlashMLA and the engines' Triton MLA kernels are built for
TOLERANCES = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 2e-2}  # written weights, float32 compute
BF16_COMPUTE_GUARD = 0.3  # bf16 compute: a guard against breakdown, not a precision claim (see verification_checks)
EXPORT_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}
FOLDABLE_ROPE_TYPES = ("linear", "llama3")  # per-frequency maps: identical on the kept d_rope-dim frequency set
EXPORT_CONFIG_KEY = "transmla_export"  # provenance record in the exported config.json (ignored by loaders)
VERIFY_SEQUENCES = 3
VERIFY_TOKENS = 24
MAX_SHARD_BYTES = 5 * 2**30
EXPLICIT_CONFIG_KEYS = (  # written even when equal to the class default: other loaders may default differently
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "kv_lora_rank", "q_lora_rank",
    "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "first_k_dense_replace", "n_routed_experts",
    "n_shared_experts", "n_group", "topk_group", "num_experts_per_tok", "moe_layer_freq", "routed_scaling_factor",
    "num_nextn_predict_layers", "rope_interleave", "rope_parameters", "rms_norm_eps", "attention_bias",
    "tie_word_embeddings", "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "dtype",
)
_PENDING_CONFIG = "config.json.pending"  # renamed to config.json only after verification


class ExportError(TransMLAError, RuntimeError):
    """An export that failed verification or could not be written; nothing was left at the target path."""


# ============================================================================================== report
@dataclass(frozen=True)
class NormFold:
    """How one linearised latent RMSNorm was folded (``which`` is ``"kv"`` or ``"q"``).

    ``lam`` scales the latent rows of the down projection, ``norm_weight`` is the stock norm's weight (every entry),
    ``up_scale`` multiplies the up projection; ``u_bound`` bounds ``λ²·mean(c²)/eps`` over every possible input and
    ``u_measured`` is its maximum on the verification tokens. Relative deviation from linear ≈ ``u/2``.
    """

    layer: int
    which: str
    lam: float
    norm_weight: float
    up_scale: float
    u_bound: float
    u_measured: float | None = None

    @property
    def deviation_bound(self) -> float:
        return 1.0 - 1.0 / math.sqrt(1.0 + self.u_bound)

    @property
    def deviation_measured(self) -> float | None:
        return None if self.u_measured is None else 1.0 - 1.0 / math.sqrt(1.0 + self.u_measured)


@dataclass
class ExportReport:
    """What an export wrote and how well it reproduces the in-memory model.

    ``verification`` maps each check of `verification_checks` (``"float32"``, ``"bfloat16 weights"``,
    ``"bfloat16 compute"``) to the relative logit error ``‖export − reference‖ / ‖reference‖`` of the stock reload;
    ``reference`` is the in-memory model in float32 compute (with its attention biases zeroed when
    ``biases="drop"``), ``tolerances`` the bound each check had to meet.
    ``losses`` are measured differences between the export and the converted model; ``warnings`` are what a
    stock engine will do differently or worse.
    """

    path: str
    dtype: str
    kv_lora_rank: int
    qk_rope_head_dim: int
    q_lora_rank: int | None
    attention_bias: bool
    rope_parameters: dict[str, Any]
    source_eps: float
    export_eps: float = EXPORT_EPS
    residual_scale: float = 1.0
    naive_eps_change_error: float | None = None  # logit rel. error if the decoder norms' eps changed uncompensated
    engine_bias_drop_error: float | None = None  # logit rel. error of the converted model with its biases removed
    verification: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    norm_folds: list[NormFold] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def engine_fast_geometry(self) -> bool:
        """Whether the cache is the 512 + 64 = 576 that engines' fast MLA kernels are built for."""
        return self.cache_width == ENGINE_CACHE_WIDTH

    @property
    def verified(self) -> bool:
        return bool(self.verification) and all(
            err <= self.tolerances.get(dt, 0.0) for dt, err in self.verification.items()
        )

    def max_deviation(self, measured: bool = False) -> float:
        """Largest relative deviation of a linearised norm from linear (bound, or measured on the test tokens)."""
        vals = [f.deviation_measured if measured else f.deviation_bound for f in self.norm_folds]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            cache_width=self.cache_width,
            engine_fast_geometry=self.engine_fast_geometry,
            verified=self.verified,
            max_norm_deviation_bound=self.max_deviation(),
            max_norm_deviation_measured=self.max_deviation(measured=True),
        )
        return data

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title=f"DeepSeek-V3 export → {self.path}", show_header=False)
        table.add_column("item", style="bold")
        table.add_column("value")
        for dt, err in self.verification.items():
            tol = self.tolerances.get(dt)
            ok = "ok" if tol is not None and err <= tol else "FAILED"
            table.add_row(f"round trip ({dt})", f"rel. logit error {err:.2e} (tolerance {tol:g}) {ok}")
        if not self.verification:
            table.add_row("round trip", "not verified (verify=False)")
        fast = "yes" if self.engine_fast_geometry else f"no: engines' fast MLA kernels expect {ENGINE_CACHE_WIDTH}"
        table.add_row(
            "cache / token / layer",
            f"{self.kv_lora_rank} + {self.qk_rope_head_dim} = {self.cache_width} (576 geometry: {fast})",
        )
        table.add_row("weights dtype", self.dtype)
        table.add_row("q_lora_rank", str(self.q_lora_rank))
        table.add_row("attention_bias", str(self.attention_bias))
        table.add_row("rope", json.dumps(self.rope_parameters) + ", interleaved")
        eps_text = f"{self.source_eps:g} → {self.export_eps:g}"
        if self.residual_scale != 1.0:
            eps_text += f", compensated exactly by residual scale s={self.residual_scale:.6g}"
        if self.naive_eps_change_error is not None:
            eps_text += f" (uncompensated it would cost {self.naive_eps_change_error:.2e} rel. logit error)"
        table.add_row("rms_norm_eps", eps_text)
        if self.norm_folds:
            lams = [f.lam for f in self.norm_folds]
            meas = self.max_deviation(measured=True)
            table.add_row(
                "linearised latent norms",
                f"{len(self.norm_folds)} folds, λ ∈ [{min(lams):.3g}, {max(lams):.3g}], deviation from linear ≤ "
                f"{self.max_deviation():.1e} (bound), {meas:.1e} (measured)",
            )
        for w in self.warnings:
            table.add_row("[yellow]warning[/yellow]", w)
        for loss in self.losses:
            table.add_row("[red]loss[/red]", loss)
        table.caption = f"{self.seconds:.1f} s"
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, file=io.StringIO())
        console.print(self)
        return console.file.getvalue()


# ============================================================================================== plan
@dataclass
class _Plan:
    """Everything decided (and validated) before a byte is written."""

    geometry: MLAGeometry
    dtype: torch.dtype
    bias_mode: BiasMode
    has_biases: bool
    attention_bias: bool
    q_lora_rank: int | None  # as exported (may be set to carry a q bias)
    q_bias_via_lora: bool
    rope_parameters: dict[str, Any]
    source_eps: float
    residual_scale: float
    warnings: list[str]


def _mla_blocks(model: nn.Module) -> list[MLAAttention]:
    layers = decoder_layers(model)
    blocks = [layer.self_attn for layer in layers]
    if not all(isinstance(b, MLAAttention) for b in blocks):
        kinds = sorted({type(b).__name__ for b in blocks})
        raise UnsupportedModelError(
            f"export_deepseek needs a model whose every layer was converted by convert_to_mla (found {kinds}); "
            "convert it first, or load a converted checkpoint with load_converted"
        )
    return blocks


def _decoder_norms(model: nn.Module) -> list[nn.Module]:
    layers = decoder_layers(model)
    return [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [model.model.norm]


def _norm_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None or getattr(norm, "weight", None) is None:
        raise UnsupportedModelError(f"{type(norm).__name__} is not an RMSNorm with a weight; cannot export")
    return float(eps)


def _source_eps(model: nn.Module) -> float:
    eps = {_norm_eps(n) for n in _decoder_norms(model)}
    if len(eps) != 1:
        raise UnsupportedModelError(f"decoder norms use different eps {sorted(eps)}; DeepSeek-V3 has one rms_norm_eps")
    return eps.pop()


def _resolve_dtype(model: nn.Module, dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        dtype = model.get_input_embeddings().weight.dtype
    given = dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"dtype {given!r} is not a torch dtype; allowed: {', '.join(EXPORT_DTYPES.values())}")
    if dtype == torch.float16:
        raise ConfigError(
            "dtype float16 is not supported: the linearised latent norm scales latents to ~1e-10, below float16's "
            "range (6e-8); allowed: float32, bfloat16 (same exponent range as float32), float64"
        )
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; allowed: {', '.join(EXPORT_DTYPES.values())}")
    return dtype


def _masked_channels(block: MLAAttention) -> int:
    """Latent channels a training-time ``latent_mask`` has switched off (0 if the block has no mask)."""
    mask = getattr(block, "latent_mask", None)
    return 0 if mask is None else int((mask == 0).sum())


def _check_mlp(model: nn.Module) -> None:
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        names = ("gate_proj", "up_proj", "down_proj")
        if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
            raise UnsupportedModelError(f"layer {i}: MLP is not gate_proj/up_proj/down_proj; cannot map to DeepSeek-V3")
        if any(getattr(mlp, n).bias is not None for n in names):
            raise UnsupportedModelError(f"layer {i}: MLP biases (mlp_bias=True) have no place in DeepSeek-V3's MLP")


def _sliding_window(config: Any) -> int | None:
    """The attention window the source applies, if any (``None``: full causal attention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def _rope_plan(model: nn.Module, issues: list[str]) -> dict[str, Any]:
    """The exported ``rope_parameters``; non-default types are an engine issue or refused outright."""
    info = host_rope_info(model)
    theta, rope_type = info["rope_theta"], info["rope_type"]
    if theta is None:
        raise UnsupportedModelError("the source config has no rope_theta; cannot write DeepSeek-V3 rope_parameters")
    if rope_type == "default":
        return {"rope_type": "default", "rope_theta": float(theta)}
    if rope_type not in FOLDABLE_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} depends on the rotary dimension, so the smaller DeepSeek RoPE "
            f"(qk_rope_head_dim) cannot reproduce it; exportable: 'default', and with on_unsupported='warn' "
            f"{', '.join(FOLDABLE_ROPE_TYPES)}"
        )
    issues.append(
        f"rope scaling {rope_type!r}: transformers' DeepSeek-V3 reproduces it exactly, but serving engines have no "
        "DeepSeek equivalent and coerce non-default rope types to DeepSeek-YaRN, so their outputs will differ"
    )
    params = {k: v for k, v in info["rope_parameters"].items() if k != "partial_rotary_factor"}
    params.update(rope_type=rope_type, rope_theta=float(theta))
    return params


def _bias_issue(g: MLAGeometry, q_via_lora: bool) -> str:
    where = []
    if g.q_bias:
        where.append("q bias (written on q_a_proj" + (" of a full-rank q_lora factorisation)" if q_via_lora else ")"))
    if g.kv_bias:
        where.append("k/v biases (kv_a_proj_with_mqa.bias: latent and rope key)")
    if g.o_bias:
        where.append("o_proj.bias")
    return (
        "attention biases: " + "; ".join(where) + ". transformers loads them (attention_bias: true) and is exact, "
        "but serving engines load no attention biases and skip them silently; pass biases='drop' for a "
        "checkpoint every loader computes identically (its loss is measured)"
    )


def _check_model(model: nn.Module) -> MLAGeometry:
    """The (shared) MLA geometry of a converted, exportable model, or raise saying what is wrong."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {getattr(config, 'model_type', None)!r}: exportable sources are {SUPPORTED_MODEL_TYPES}"
        )
    record = getattr(config, CONFIG_KEY, None)
    if not record or "geometry" not in record:
        raise UnsupportedModelError("model.config has no 'transmla' record: this is not a converted model")
    blocks = _mla_blocks(model)
    g = blocks[0].geometry
    if any(b.geometry != g for b in blocks):
        raise UnsupportedModelError("layers have different MLA geometries; DeepSeek-V3 has one per model")
    if g.latent_norm and abs(g.latent_norm_eps - EXPORT_EPS) > 1e-12:
        raise UnsupportedModelError(
            f"the model's latent RMSNorm uses eps {g.latent_norm_eps:g}; stock transformers hard-codes "
            f"{EXPORT_EPS:g} for kv_a_layernorm, so only latent_norm_eps={EXPORT_EPS:g} exports exactly"
        )
    _check_mlp(model)
    return g


def _window_issue(config: Any) -> list[str]:
    window = _sliding_window(config)
    if window is None or window >= int(config.max_position_embeddings):
        return []
    return [
        f"sliding-window attention (window {window} < max_position_embeddings {config.max_position_embeddings}): "
        "DeepSeek-V3 attends to the full context, so every loader's outputs differ from the converted model for "
        f"sequences longer than {window} tokens"
    ]


def _notes(model: nn.Module, g: MLAGeometry, q_via_lora: bool, q_lora_rank: int | None) -> list[str]:
    """What the report should say although it is no engine issue (correct everywhere)."""
    notes = []
    if g.cache_width != ENGINE_CACHE_WIDTH:
        notes.append(
            f"cache width kv_lora_rank + qk_rope_head_dim = {g.kv_lora_rank} + {g.qk_rope_head_dim} = "
            f"{g.cache_width}, not {ENGINE_CACHE_WIDTH} (512 + 64): correct everywhere, but engines' fast MLA kernels "
            "(FlashMLA, Triton MLA) will not be used: expect slower fallback kernels or a refusal"
        )
    masked = {i: n for i, b in enumerate(_mla_blocks(model)) if (n := _masked_channels(b))}
    if masked:
        notes.append(
            f"latent_mask switches off {sum(masked.values())} latent channels in layers {sorted(masked)}: folded "
            f"into kv_b_proj (exact), but the cache stays {g.kv_lora_rank} wide; truncate the rank first "
            "(rank.truncate_rank) to export a smaller cache"
        )
    if q_via_lora:
        notes.append(
            f"q_proj bias carried by q_a_proj: q_lora_rank set to {q_lora_rank} (exact full-rank factorisation, "
            f"{q_lora_rank * (g.hidden_size + g.num_heads * g.qk_head_dim)} query parameters per layer instead of "
            f"{g.hidden_size * g.num_heads * g.qk_head_dim})"
        )
    return notes


def _plan(
    model: nn.Module, dtype: torch.dtype | str | None, on_unsupported: OnUnsupported, biases: BiasMode
) -> _Plan:
    """Validate the model and the options and decide the export; raises before anything is written."""
    if on_unsupported not in ("error", "warn"):
        raise ConfigError(f"on_unsupported must be 'error' or 'warn', got {on_unsupported!r}")
    if biases not in ("keep", "drop"):
        raise ConfigError(f"biases must be 'keep' or 'drop', got {biases!r}")
    g = _check_model(model)
    export_dtype = _resolve_dtype(model, dtype)
    source_eps = _source_eps(model)

    issues: list[str] = []  # what stock serving engines would compute differently
    rope_parameters = _rope_plan(model, issues)
    issues += _window_issue(model.config)
    has_biases = g.q_bias or g.kv_bias or g.o_bias
    keep = has_biases and biases == "keep"
    q_via_lora = keep and g.q_bias and g.q_lora_rank is None  # stock q_proj has no bias: carry it on q_a_proj
    q_lora_rank = min(g.hidden_size + 1, g.num_heads * g.qk_head_dim) if q_via_lora else g.q_lora_rank
    if keep:
        issues.append(_bias_issue(g, q_via_lora))
    if issues and on_unsupported == "error":
        raise UnsupportedModelError(
            "the export would contain what stock serving engines compute differently:\n  - "
            + "\n  - ".join(issues)
            + "\nPass on_unsupported='warn' to export anyway (the report lists these)."
        )
    return _Plan(
        geometry=g,
        dtype=export_dtype,
        bias_mode=biases,
        has_biases=has_biases,
        attention_bias=keep,
        q_lora_rank=q_lora_rank,
        q_bias_via_lora=q_via_lora,
        rope_parameters=rope_parameters,
        source_eps=source_eps,
        residual_scale=math.sqrt(EXPORT_EPS / source_eps),
        warnings=issues + _notes(model, g, q_via_lora, q_lora_rank),
    )


# ============================================================================================== tensor maths
def interleave_permutation(rope_dim: int) -> torch.Tensor:
    """Index ``p`` with ``new = old[p]``: half layout (``k`` pairs ``k + d_rope/2``) → interleaved (``2i, 2i+1``)."""
    half = rope_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()


def interleave_query_rows(weight: torch.Tensor, num_heads: int, nope_dim: int, rope_dim: int) -> torch.Tensor:
    """Permute the rope rows of a per-head query projection ``[H·(d_nope + d_rope), *]`` (or a bias ``[H·(…)]``)."""
    shape = weight.shape
    w = weight.reshape(num_heads, nope_dim + rope_dim, -1)
    rope = w[:, nope_dim:][:, interleave_permutation(rope_dim)]
    return torch.cat([w[:, :nope_dim], rope], dim=1).reshape(shape)


def interleave_kv_rows(weight: torch.Tensor, kv_lora_rank: int, rope_dim: int) -> torch.Tensor:
    """Permute the last ``d_rope`` rows (the shared rope key) of ``kv_a_proj_with_mqa`` ``[r + d_rope, *]``."""
    return torch.cat([weight[:kv_lora_rank], weight[kv_lora_rank:][interleave_permutation(rope_dim)]])


def power_of_two_below(x: float) -> float:
    return 2.0 ** math.floor(math.log2(x))


@dataclass(frozen=True)
class LinearisedNorm:
    """Factors of one linearised RMSNorm fold (see the module docstring)."""

    lam: float
    norm_weight: float
    up_scale: float
    u_bound: float


def linearise_norm(
    down_aug: torch.Tensor, x_sq_bound: float, eps: float, target: float = LINEARITY_TARGET
) -> LinearisedNorm:
    """Choose ``λ`` (a power of two) so that ``λ²·mean(c²)/eps ≤ target`` for every ``c = down_aug · [x; 1]`` with
    ``‖x‖² ≤ x_sq_bound``; ``down_aug`` is the augmented down projection ``[r, D+1]`` (float64).

    ``mean(c²) = ‖c‖²/r ≤ σ_max(down_aug)²·(x_sq_bound + 1)/r``. The stock norm of ``λc`` with weight ``w`` is
    ``w·λc/sqrt(eps)/sqrt(1+u)``; ``w = 2^m`` nearest ``sqrt(eps)/λ`` and ``up_scale = sqrt(eps)/(λ·w)`` restore ``c``.
    """
    rank = down_aug.shape[0]
    sigma = float(torch.linalg.matrix_norm(down_aug.double(), ord=2))
    mean_sq_bound = sigma * sigma * (x_sq_bound + 1.0) / rank
    if mean_sq_bound <= 0.0:
        return LinearisedNorm(1.0, 2.0 ** round(math.log2(math.sqrt(eps))), 1.0, 0.0)  # an all-zero latent
    lam = power_of_two_below(math.sqrt(target * eps / mean_sq_bound))
    norm_weight = 2.0 ** round(math.log2(math.sqrt(eps) / lam))
    return LinearisedNorm(lam, norm_weight, math.sqrt(eps) / (lam * norm_weight), lam * lam * mean_sq_bound / eps)


def q_bias_factorisation(q_aug: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``q = W x + b`` as ``q_b · (q_a · [x; 1])`` with ``q_a`` orthonormal rows: ``[n_q, D+1]`` →
    ``(q_a [r, D+1], q_b [n_q, r])``, ``r = min(n_q, D+1)`` (thin SVD, float64)."""
    u, s, vh = torch.linalg.svd(q_aug.double(), full_matrices=False)
    return vh, u * s


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def _aug(linear: nn.Linear) -> torch.Tensor:
    """``[out, in + 1]`` float64: weight and bias (zeros if none) acting on ``[x; 1]``."""
    w = _f64(linear.weight)
    b = _f64(linear.bias) if linear.bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w, b[:, None]], dim=1)


def _latent_norm_weight(norm: nn.Module, width: int) -> torch.Tensor | None:
    """The weight of an existing latent RMSNorm, ``None`` if the block has none (an identity) — then we fold."""
    if isinstance(norm, nn.Identity):
        return None
    if isinstance(norm, RMSNorm):
        return _f64(norm.weight)
    raise UnsupportedModelError(f"latent norm {type(norm).__name__} of width {width} is neither Identity nor RMSNorm")


def _fold_down_up(
    down_aug: torch.Tensor, up: torch.Tensor, x_bound: float, layer: int, which: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, NormFold]:
    """Linearised norm between ``down_aug [r, D+1]`` and ``up [*, r]`` → scaled down, norm weight, scaled up."""
    fold = linearise_norm(down_aug, x_bound, EXPORT_EPS)
    norm_w = down_aug.new_full((down_aug.shape[0],), fold.norm_weight)
    record = NormFold(layer, which, fold.lam, fold.norm_weight, fold.up_scale, fold.u_bound)
    return down_aug * fold.lam, norm_w, up * fold.up_scale, record


_Tensors = dict[str, torch.Tensor]


def _split_aug(name: str, aug: torch.Tensor, bias: bool) -> _Tensors:
    """``{name.weight: [out, in]}`` (and ``name.bias: [out]`` if ``bias``) from an augmented ``[out, in + 1]``."""
    out = {f"{name}.weight": aug[:, :-1]}
    if bias:
        out[f"{name}.bias"] = aug[:, -1]
    return out


def _query_tensors(
    block: MLAAttention, layer: int, x_bound: float, plan: _Plan
) -> tuple[_Tensors, list[NormFold], _Tensors]:
    """``q_proj`` (``[H·(d_nope+d_rope), D]``, no bias: stock has none) or ``q_a_proj [r_q, D]`` (+ bias),
    ``q_a_layernorm [r_q]``, ``q_b_proj [H·(d_nope+d_rope), r_q]``; rope rows interleaved. Also the norm fold and
    the unscaled augmented ``q_a`` it linearises."""
    g, keep = block.geometry, plan.attention_bias

    def rows(t: torch.Tensor) -> torch.Tensor:
        return interleave_query_rows(t, g.num_heads, g.qk_nope_head_dim, g.qk_rope_head_dim)

    if g.q_lora_rank is None and not plan.q_bias_via_lora:
        return {"q_proj.weight": rows(_f64(block.q_proj.weight))}, [], {}
    if plan.q_bias_via_lora:
        q_a, q_b = q_bias_factorisation(_aug(block.q_proj))
    else:
        q_a, q_b = _aug(block.q_a_proj), _f64(block.q_b_proj.weight)
        if not keep:
            q_a[:, -1] = 0.0  # biases="drop"
    existing = _latent_norm_weight(getattr(block, "q_a_layernorm", nn.Identity()), q_a.shape[0])
    folds, downs = [], {}
    if existing is None:
        downs["q"] = q_a
        q_a, q_norm, q_b, rec = _fold_down_up(q_a, q_b, x_bound, layer, "q")
        folds.append(rec)
    else:
        q_norm = existing
    out = _split_aug("q_a_proj", q_a, keep)
    out.update({"q_a_layernorm.weight": q_norm, "q_b_proj.weight": rows(q_b)})
    return out, folds, downs


def _latent_tensors(
    block: MLAAttention, layer: int, x_bound: float, plan: _Plan
) -> tuple[_Tensors, list[NormFold], _Tensors]:
    """``kv_a_proj_with_mqa [r + d_rope, D]`` (+ bias; latent rows scaled by λ, rope rows interleaved),
    ``kv_a_layernorm [r]``, ``kv_b_proj [H·(d_nope+d_v), r]``; the norm fold and the unscaled latent rows."""
    g, keep, r = block.geometry, plan.attention_bias, block.geometry.kv_lora_rank
    kv_a = _aug(block.kv_a_proj_with_mqa)
    if not keep:
        kv_a[:, -1] = 0.0  # biases="drop"
    kv_b = _f64(block.kv_b_proj.weight)
    mask = getattr(block, "latent_mask", None)  # training-time channel mask applied after the latent norm
    if mask is not None:
        kv_b = kv_b * _f64(mask)[None, :]  # kv_b(norm(c)·m) = (kv_b·diag(m)) norm(c): exact for any norm
    existing = _latent_norm_weight(block.kv_a_layernorm, r)
    folds, downs = [], {}
    if existing is None:
        downs["kv"] = kv_a[:r].clone()
        latent, kv_norm, kv_b, rec = _fold_down_up(kv_a[:r], kv_b, x_bound, layer, "kv")
        kv_a = torch.cat([latent, kv_a[r:]])
        folds.append(rec)
    else:
        kv_norm = existing
    out = _split_aug("kv_a_proj_with_mqa", interleave_kv_rows(kv_a, r, g.qk_rope_head_dim), keep)
    out.update({"kv_a_layernorm.weight": kv_norm, "kv_b_proj.weight": kv_b})
    return out, folds, downs


def attention_tensors(
    block: MLAAttention, layer: int, x_bound: float, plan: _Plan
) -> tuple[_Tensors, list[NormFold], _Tensors]:
    """Float64 stock DeepSeek-V3 attention tensors of one block (names relative to ``self_attn.``), the norm folds,
    and the unscaled augmented down projections (``"kv"``, ``"q"``) the folds linearise (to measure ``u`` on real
    tokens). ``x_bound`` bounds ``‖x‖²`` of the block's input."""
    out, folds, downs = _query_tensors(block, layer, x_bound, plan)
    kv_out, kv_folds, kv_downs = _latent_tensors(block, layer, x_bound, plan)
    out.update(kv_out)
    # o_proj scales with the residual stream (see the eps compensation)
    out.update(_split_aug("o_proj", _aug(block.o_proj) * plan.residual_scale, plan.attention_bias))
    return out, folds + kv_folds, {**downs, **kv_downs}


def export_state_dict(model: nn.Module, plan: _Plan) -> tuple[dict[str, torch.Tensor], list[NormFold], list[dict]]:
    """The full stock DeepSeek-V3 state dict in ``plan.dtype`` (CPU), the norm folds, and per layer the unscaled
    down projections those folds linearise."""
    s = plan.residual_scale
    sd: dict[str, torch.Tensor] = {}
    folds: list[NormFold] = []
    downs: list[dict] = []

    def emit(name: str, t: torch.Tensor) -> None:
        sd[name] = t.to(plan.dtype).contiguous().clone()  # clone: never share storage (safetensors refuses)

    emit("model.embed_tokens.weight", _f64(model.get_input_embeddings().weight) * s)
    for i, layer in enumerate(decoder_layers(model)):
        pre = f"model.layers.{i}."
        bound = input_norm_bound(layer, plan.geometry.hidden_size)
        tensors, layer_folds, layer_downs = attention_tensors(layer.self_attn, i, bound, plan)
        for name, t in tensors.items():
            emit(pre + "self_attn." + name, t)
        folds += layer_folds
        downs.append(layer_downs)
        emit(pre + "mlp.gate_proj.weight", _f64(layer.mlp.gate_proj.weight))
        emit(pre + "mlp.up_proj.weight", _f64(layer.mlp.up_proj.weight))
        emit(pre + "mlp.down_proj.weight", _f64(layer.mlp.down_proj.weight) * s)
        emit(pre + "input_layernorm.weight", _f64(layer.input_layernorm.weight))
        emit(pre + "post_attention_layernorm.weight", _f64(layer.post_attention_layernorm.weight))
    emit("model.norm.weight", _f64(model.model.norm.weight))
    emit("lm_head.weight", _f64(model.get_output_embeddings().weight))  # explicit even when tied
    return sd, folds, downs


# ============================================================================================== config
def deepseek_config(model: nn.Module, plan: _Plan, folds: list[NormFold] | None = None) -> Any:
    """The stock ``DeepseekV3Config`` of the export (all layers dense)."""
    from transformers import DeepseekV3Config

    src, g = model.config, plan.geometry
    n_layers = len(decoder_layers(model))
    cfg = DeepseekV3Config(
        vocab_size=src.vocab_size,
        hidden_size=g.hidden_size,
        intermediate_size=decoder_layers(model)[0].mlp.gate_proj.out_features,
        moe_intermediate_size=decoder_layers(model)[0].mlp.gate_proj.out_features,  # unused: no MoE layer
        num_hidden_layers=n_layers,
        num_attention_heads=g.num_heads,
        num_key_value_heads=g.num_heads,
        n_shared_experts=1,
        n_routed_experts=1,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
        first_k_dense_replace=n_layers,
        moe_layer_freq=1,
        routed_scaling_factor=1.0,
        kv_lora_rank=g.kv_lora_rank,
        q_lora_rank=plan.q_lora_rank,
        qk_rope_head_dim=g.qk_rope_head_dim,
        qk_nope_head_dim=g.qk_nope_head_dim,
        v_head_dim=g.v_head_dim,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        initializer_range=getattr(src, "initializer_range", 0.02),
        rms_norm_eps=EXPORT_EPS,
        use_cache=True,
        pad_token_id=getattr(src, "pad_token_id", None),
        bos_token_id=getattr(src, "bos_token_id", None),
        eos_token_id=getattr(src, "eos_token_id", None),
        tie_word_embeddings=False,
        rope_parameters=dict(plan.rope_parameters),
        rope_interleave=True,
        attention_bias=plan.attention_bias,
        attention_dropout=0.0,
        num_nextn_predict_layers=0,
    )
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    cfg.dtype = plan.dtype
    setattr(
        cfg,
        EXPORT_CONFIG_KEY,
        {
            "format": 1,
            "source_model_type": src.model_type,
            "conversion": getattr(src, CONFIG_KEY, None),
            "source_rms_norm_eps": plan.source_eps,
            "residual_scale": plan.residual_scale,
            "biases": plan.bias_mode if plan.has_biases else None,
            "latent_norm_lambdas": [f.lam for f in folds or []],
        },
    )
    return cfg


def config_json(cfg: Any) -> dict[str, Any]:
    """``config.json`` contents: the stock serialisation plus legacy ``rope_theta`` for engines that run an older
    transformers (their DeepSeek config would otherwise default ``rope_theta`` to 10000)."""
    full = json.loads(cfg.to_json_string(use_diff=False))
    data = json.loads(cfg.to_json_string(use_diff=True))  # what save_pretrained writes: no generic noise keys
    data.update({k: full[k] for k in EXPLICIT_CONFIG_KEYS if k in full})  # engine-relevant even when default
    data["rope_theta"] = cfg.rope_parameters["rope_theta"]
    return data


# ============================================================================================== writing
def _save_safetensors(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or numbered shards and ``model.safetensors.index.json`` beyond ``max_shard_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _generation_config(model: nn.Module, cfg: Any) -> Any:
    from transformers import GenerationConfig

    source = getattr(model, "generation_config", None)
    if source is not None:
        gen = GenerationConfig.from_dict(source.to_dict())
    else:
        gen = GenerationConfig.from_model_config(cfg)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, key, None) is None:
            setattr(gen, key, getattr(cfg, key, None))
    return gen


def _write(tmp: Path, state: dict[str, torch.Tensor], cfg: Any, model: nn.Module, tokenizer: Any) -> None:
    """Everything but ``config.json``, which stays ``config.json.pending`` until verified: a half-written or
    unverified directory is never loadable as a checkpoint."""
    _save_safetensors(state, tmp)
    _generation_config(model, cfg).save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / _PENDING_CONFIG).write_text(json.dumps(config_json(cfg), indent=2, sort_keys=True) + "\n")


# ============================================================================================== verification
def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def verification_ids(vocab_size: int, n: int = VERIFY_SEQUENCES, t: int = VERIFY_TOKENS, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, t), generator=gen)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[n, t]`` ids → float64 CPU logits ``[n, t, vocab]``."""
    device = model.get_input_embeddings().weight.device
    with _eval_mode(model):
        out = model(input_ids=ids.to(device), use_cache=False).logits
    return out.detach().to("cpu", torch.float64)


@contextmanager
def _capture_attention_inputs(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Collect every layer's attention input ``x [*, D]`` (float64 CPU) during forwards inside the block."""
    layers = decoder_layers(model)
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        def hook(_mod: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            x = kwargs.get("hidden_states", args[0] if args else None)
            seen[i].append(x.detach().to("cpu", torch.float64).reshape(-1, x.shape[-1]))

        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _float32_compute(model: nn.Module) -> Iterator[None]:
    """Temporarily upcast half-precision parameters and buffers to float32 (bf16 → fp32 → bf16 is lossless, so
    restoring is exact and keeps every Parameter object): the reference is the in-memory weights in fp32 compute."""
    saved = []
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dtype in (torch.bfloat16, torch.float16):
            saved.append((t, t.data))
            t.data = t.data.float()
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


@contextmanager
def _attention_biases_zeroed(model: nn.Module) -> Iterator[None]:
    """Temporarily zero every attention bias of the MLA blocks (what a bias-free loader computes)."""
    saved = []
    for block in _mla_blocks(model):
        for mod in block.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                saved.append((mod.bias, mod.bias.detach().clone()))
    try:
        with torch.no_grad():
            for p, _ in saved:
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


@contextmanager
def _decoder_eps(model: nn.Module, eps: float) -> Iterator[None]:
    """Temporarily set every decoder RMSNorm's eps (to measure what an uncompensated eps change costs)."""
    norms = _decoder_norms(model)
    saved = [n.variance_epsilon for n in norms]
    try:
        for n in norms:
            n.variance_epsilon = eps
        yield
    finally:
        for n, e in zip(norms, saved):
            n.variance_epsilon = e


def _measure_folds(folds: list[NormFold], downs: list[dict], inputs: list[list[torch.Tensor]]) -> list[NormFold]:
    """Fill ``u_measured = λ²·max_token mean(c²)/eps`` from the captured attention inputs."""
    measured = []
    for f in folds:
        x = torch.cat(inputs[f.layer])
        x_aug = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        c = x_aug @ downs[f.layer][f.which].T
        u = f.lam**2 * float(c.pow(2).mean(-1).max()) / EXPORT_EPS
        measured.append(NormFold(f.layer, f.which, f.lam, f.norm_weight, f.up_scale, f.u_bound, u))
    return measured


def _load_stock(directory: Path, dtype: torch.dtype, config_file: Path | None = None) -> nn.Module:
    """Load through the stock Auto class (no remote code), insisting that every tensor was used and none missing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True, "use_safetensors": True,
                              "trust_remote_code": False}
    if config_file is not None:
        kwargs["config"] = AutoConfig.from_pretrained(str(config_file))
    model, info = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    if type(model).__name__ != "DeepseekV3ForCausalLM":
        raise ExportError(f"the stock loader built {type(model).__name__}, not DeepseekV3ForCausalLM")
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ExportError(f"the stock loader did not use the checkpoint cleanly: {bad}")
    return model.eval()


def verification_checks(dtype: torch.dtype) -> list[tuple[str, torch.dtype, float]]:
    """``(label, load dtype, tolerance)`` of each round-trip check of an export written in ``dtype``.

    The written weights are always checked in float32 compute against the in-memory weights in float32 compute:
    1e-4 for float32/float64 files, 2e-2 for bfloat16 files (bf16 rounding of every weight costs 0.6–0.8 % on
    SmolLM2). bfloat16 *compute* gets a guard only (0.3) against a bf16-specific breakdown (say, latents
    flushed to zero: relative errors near 1), because bf16 inference alone is noisy and chaotic: measured on
    SmolLM2 at 75 %, the unconverted model moves by 1.7–2.3 %, the converted in-memory model by 3.4–4.8 % and its
    export by 3.4–7.8 % (the spread is the same weights with rotary buffers cast differently), so no tight
    bf16-compute tolerance separates bugs from noise; the float32-compute checks do.
    """
    name = EXPORT_DTYPES[dtype]
    weights = (name, torch.float32, TOLERANCES[name]) if dtype != torch.bfloat16 else (
        "bfloat16 weights", torch.float32, TOLERANCES["bfloat16"])
    return [weights, ("bfloat16 compute", torch.bfloat16, BF16_COMPUTE_GUARD)]


def check_tokenizer(tokenizer: Any, model: nn.Module) -> None:
    """Refuse a tokenizer that cannot belong to ``model``: one that produces ids beyond the embedding table
    (``len(tokenizer) > vocab_size``). A smaller tokenizer is normal (embedding tables are often padded)."""
    if tokenizer is None:
        return
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and size is not None and int(size) > int(vocab):
        raise ConfigError(
            f"the tokenizer has {size} tokens but the model's vocab_size is {vocab}: ids >= {vocab} would index past "
            "the embedding table; is it the tokenizer of another model?"
        )


# ============================================================================================== placement
def _looks_like_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def _check_target(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it")
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it (the old one survives until "
                              "the new export is verified)")
    if not _looks_like_checkpoint(path) and any(path.iterdir()):
        raise FileExistsError(
            f"{path} is a non-empty directory without config.json, not an earlier export; refusing to replace it "
            "even with overwrite=True"
        )


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    system or file system cannot (then nothing was changed)."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _discard(old: Path) -> None:
    """Delete a replaced export: its ``config.json`` first, so a deletion cut short never leaves a directory that
    loads as a checkpoint."""
    try:
        (old / "config.json").unlink()
    except OSError:
        pass
    shutil.rmtree(old, ignore_errors=True)


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the verified ``tmp`` to ``path``. An earlier export there is swapped out in one atomic step where
    the system allows it (so ``path`` holds a complete export at every instant, whenever the process dies) and
    only then deleted; elsewhere it is first renamed aside (restored if the second rename fails)."""
    _check_target(path, overwrite)  # again: something may have appeared while we worked
    if not path.exists():
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        _discard(tmp)  # tmp now holds the earlier export
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    _discard(old)


# ============================================================================================== entry points
def export_deepseek(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    verify: bool = True,
    dtype: torch.dtype | str | None = None,
    on_unsupported: OnUnsupported = "error",
    biases: BiasMode = "keep",
) -> ExportReport:
    """Write ``model`` (converted by `convert_to_mla`) as a stock DeepSeek-V3 checkpoint at ``path``.

    Args:
        model: a converted Llama/Mistral/Qwen2 causal LM (every layer an `MLAAttention`), any float dtype except
            float16. Left as it was: verification temporarily zeroes its attention biases, changes its norm eps and
            upcasts half-precision tensors, and restores the very same tensors afterwards.
        path: target directory. Written as a hidden sibling, verified, then renamed into place.
        tokenizer: saved beside the weights if given.
        overwrite: replace an earlier export at ``path`` (only a directory with a ``config.json``, or an empty one).
        verify: reload through the stock ``AutoModelForCausalLM`` and compare logits on random sequences with the
            in-memory model (float32 compute: relative error ≤ 1e-4 for float32 weights, ≤ 2e-2 for bfloat16
            weights; bfloat16 compute: ≤ 0.3, a guard); fail and leave nothing behind otherwise.
        dtype: weights dtype (float32, bfloat16 or float64); ``None`` keeps the model's.
        on_unsupported: ``"error"`` refuses an export that stock serving engines would compute differently
            (kept attention biases, rope scaling, sliding windows); ``"warn"`` writes it and warns.
        biases: ``"keep"`` writes attention biases (``attention_bias: true``, exact in transformers);
            ``"drop"`` writes none, so every loader agrees; the change is measured and reported as a loss.

    Returns:
        An `ExportReport`.

    Raises:
        ConfigError, UnsupportedModelError, FileExistsError: before anything is written (a ``ConfigError`` also
            for a tokenizer with more tokens than the model's ``vocab_size``: it belongs to another model).
        ExportError: verification failed; ``path`` was left untouched and nothing was left beside it.
    """
    start = time.perf_counter()
    path = Path(path)
    _check_target(path, overwrite)
    plan = _plan(model, dtype, on_unsupported, biases)
    check_tokenizer(tokenizer, model)
    state, folds, downs = export_state_dict(model, plan)
    cfg = deepseek_config(model, plan, folds)
    g = plan.geometry
    report = ExportReport(
        path=str(path), dtype=EXPORT_DTYPES[plan.dtype], kv_lora_rank=g.kv_lora_rank,
        qk_rope_head_dim=g.qk_rope_head_dim, q_lora_rank=plan.q_lora_rank, attention_bias=plan.attention_bias,
        rope_parameters=dict(plan.rope_parameters), source_eps=plan.source_eps, residual_scale=plan.residual_scale,
        norm_folds=folds, warnings=list(plan.warnings),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "partial")
    tmp.mkdir()
    try:
        _write(tmp, state, cfg, model, tokenizer)
        del state
        if verify:
            _verify(model, tmp, plan, downs, report)
        os.replace(tmp / _PENDING_CONFIG, tmp / "config.json")
        _place(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - start
    for w in report.warnings + report.losses:
        warnings.warn(f"export_deepseek: {w}", UserWarning, stacklevel=2)
    return report


def _verify(model: nn.Module, tmp: Path, plan: _Plan, downs: list[dict], report: ExportReport) -> None:
    """Compare stock reloads of ``tmp`` with the in-memory model (computed in float32); fill the report; raise
    `ExportError` beyond tolerance."""
    ids = verification_ids(int(model.config.vocab_size))
    with _float32_compute(model):
        with _capture_attention_inputs(model) as inputs:
            true = _logits(model, ids)
        report.norm_folds = _measure_folds(report.norm_folds, downs, inputs)
        reference = _bias_reference(model, ids, true, plan, report)
        if plan.source_eps != EXPORT_EPS:
            with _decoder_eps(model, EXPORT_EPS):
                report.naive_eps_change_error = _rel_err(_logits(model, ids), true)
    failures = []
    for label, load_dtype, tol in verification_checks(plan.dtype):
        stock = _load_stock(tmp, load_dtype, tmp / _PENDING_CONFIG)
        err = _rel_err(_logits(stock, ids), reference)
        del stock
        report.verification[label] = err
        report.tolerances[label] = tol
        if not err <= tol:  # also catches NaN
            failures.append(f"{label}: relative logit error {err:.3e} > {tol:g}")
    if failures:
        raise ExportError(
            "the stock DeepseekV3ForCausalLM reload does not reproduce the converted model (" + "; ".join(failures)
            + "); the target path was left untouched"
        )


def _bias_reference(
    model: nn.Module, ids: torch.Tensor, true: torch.Tensor, plan: _Plan, report: ExportReport
) -> torch.Tensor:
    """The logits the export must reproduce: the model's, or with ``biases="drop"`` the bias-free model's.
    Also measures what removing the biases costs (what an engine does to a ``biases="keep"`` export)."""
    if not plan.has_biases:
        return true
    with _attention_biases_zeroed(model):
        no_bias = _logits(model, ids)
    err = report.engine_bias_drop_error = _rel_err(no_bias, true)
    if plan.bias_mode == "drop":
        report.losses.append(
            f"attention biases dropped (biases='drop'): logits differ from the converted model by {err:.2e} "
            "(relative, measured); only the k bias on position-free channels drops exactly (softmax-invariant)"
        )
        return no_bias
    report.warnings.append(
        f"an engine that drops the attention biases changes logits by {err:.2e} (relative, measured)"
    )
    return true


def load_exported(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` after checking that ``path`` is a DeepSeek-V3
    checkpoint (what `export_deepseek` writes); the stock class needs no remote code.

    Loads safetensors only and never remote code (``use_safetensors=True``, ``trust_remote_code=False``), so a
    ``pytorch_model.bin`` beside or instead of the weights is never unpickled.

    Raises:
        FileNotFoundError: ``path`` is not a local directory.
        ConfigError: ``trust_remote_code=True`` or ``use_safetensors=False`` was asked for.
        UnsupportedModelError: ``path`` is not a DeepSeek-V3 checkpoint.
        CheckpointError (a ValueError): a weight file is missing, truncated or corrupt (names the file).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import check_safetensors, safetensors_files

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (load_exported reads a local export_deepseek directory)")
    if kwargs.get("trust_remote_code") or kwargs.get("use_safetensors", True) is not True:
        raise ConfigError(
            "load_exported never runs code from a checkpoint nor unpickles weights: trust_remote_code=True and "
            "use_safetensors=False are refused"
        )
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    if getattr(config, "model_type", None) != "deepseek_v3":
        raise UnsupportedModelError(
            f"{directory} is a {getattr(config, 'model_type', None)!r} checkpoint, not an export_deepseek checkpoint "
            "(a converted model saved with save_pretrained loads with load_converted)"
        )
    check_safetensors(safetensors_files(directory))  # a truncated or corrupt file: CheckpointError naming it
    kwargs.update(trust_remote_code=False, use_safetensors=True)
    return AutoModelForCausalLM.from_pretrained(str(directory), config=config, **kwargs)
