"""`MLAConfig`: what a conversion should produce, validated at construction.

Geometry-dependent limits (a rank larger than the layer can hold, a rope dim that does not divide the head
dim, a fold that does not fit) are checked against the model in `check_against_geometry`, before anything in
the model is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Literal

from .errors import ConfigError

CalibrationInputs = Literal["converted", "original"]
Subspace = Literal["attention", "variance"]


@dataclass(frozen=True)
class MLAConfig:
    """Target geometry and method options of a GQA → MLA conversion.

    Attributes:
        kv_lora_rank: width ``r_kv`` of the cached latent, per token and layer.
        qk_rope_head_dim: width ``d_rope`` of the shared rope key (also cached). Must divide the source head dim
            ``d`` and be even.
        freqfold: FreqFold factor ``M``: adjacent RoPE frequencies pooled into one PCA. ``None`` picks
            ``2 * d / d_rope`` capped to what the head dim allows (the best measured on SmolLM2, see
            ``bench/results/quality_smollm2.md``). Must be a multiple of ``c = d / d_rope`` that divides ``d / 2``.
        q_lora_rank: if set, the query goes through ``q_a_proj → q_a_layernorm → q_b_proj`` of this rank (PCA
            of the query outputs); ``None`` keeps a full ``q_proj``.
        balance_kv: divide position-free keys by ``α = rms(k_nope) / rms(v)`` before the joint PCA (exact; only
            changes which subspace is kept).
        key_weight: weight of key against value reconstruction error in the joint PCA (1.0 keeps the balance
            BKV sets; exact for any value, it only changes which subspace is kept). 0.5 measured best on SmolLM2.
        calibration_inputs: ``"converted"`` calibrates layer ``k`` on the outputs of layers ``< k`` as the
            conversion leaves them (the calibration stream is re-run for every layer; memory stays constant);
            ``"original"`` calibrates every layer on the original model's activations in a single pass.
        rope_selection: ``"variance"`` (default) is the reference's RoRoPE (orthogonal PCA of the keys alone);
            ``"attention"`` keeps RoPE on the rotated key components that carry the most score energy
            ``E[q'²]·E[k'²]`` (an exact non-orthogonal change of basis, queries moving by the inverse transpose).
            Measured worse on SmolLM2 (bench/results/quality_smollm2.md), kept as an option.
        subspace: ``"attention"`` chooses the kept latent by the error it causes in attention scores and
            outputs (keys weighted by the query second moment, values by ``o_proj``); ``"variance"`` is the
            reference's plain PCA of ``[k_nope/α ; v]``.
        refit_output: refit ``o_proj`` by least squares so each converted block's output matches the source
            block's on the calibration inputs (compensates what partial RoPE and the latent truncation change).
        refit_target: ``"layer"`` fits the source block's output on the same input; ``"model"`` fits what would
            bring the converted residual stream back to the original model's (needs ``keep_activations=True``;
            twice the activation memory).
        damping: added to every Gram matrix before an eigendecomposition, as a fraction of its mean diagonal.
        latent_norm_eps: ``eps`` of ``kv_a_layernorm`` / ``q_a_layernorm`` in exports (1e-6 is what both
            transformers and serving engines use when ``rms_norm_eps`` is 1e-6).
    """

    kv_lora_rank: int
    qk_rope_head_dim: int
    freqfold: int | None = None
    q_lora_rank: int | None = None
    balance_kv: bool = True
    key_weight: float = 0.5
    calibration_inputs: CalibrationInputs = "converted"
    rope_selection: Subspace = "variance"
    subspace: Subspace = "attention"
    refit_output: bool = True
    refit_target: Literal["layer", "model"] = "layer"
    damping: float = 0.01
    latent_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        def _int(name: str, value: Any, minimum: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"MLAConfig.{name} must be an integer, got {value!r} ({type(value).__name__})")
            if value < minimum:
                raise ConfigError(f"MLAConfig.{name} must be >= {minimum}, got {value}")

        _int("kv_lora_rank", self.kv_lora_rank, 1)
        _int("qk_rope_head_dim", self.qk_rope_head_dim, 2)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"MLAConfig.qk_rope_head_dim must be even (RoPE turns channel pairs), got {self.qk_rope_head_dim}"
            )
        if self.freqfold is not None:
            _int("freqfold", self.freqfold, 1)
        if self.q_lora_rank is not None:
            _int("q_lora_rank", self.q_lora_rank, 1)
        if not isinstance(self.balance_kv, bool):
            raise ConfigError(f"MLAConfig.balance_kv must be True or False, got {self.balance_kv!r}")
        if (
            isinstance(self.key_weight, bool)
            or not isinstance(self.key_weight, (int, float))
            or not 0 < self.key_weight < float("inf")
        ):
            raise ConfigError(f"MLAConfig.key_weight must be a positive finite number, got {self.key_weight!r}")
        if self.calibration_inputs not in ("converted", "original"):
            raise ConfigError(
                f"MLAConfig.calibration_inputs must be 'converted' or 'original', got {self.calibration_inputs!r}"
            )
        for name in ("subspace", "rope_selection"):
            if getattr(self, name) not in ("attention", "variance"):
                raise ConfigError(f"MLAConfig.{name} must be 'attention' or 'variance', got {getattr(self, name)!r}")
        if not isinstance(self.refit_output, bool):
            raise ConfigError(f"MLAConfig.refit_output must be True or False, got {self.refit_output!r}")
        if self.refit_target not in ("layer", "model"):
            raise ConfigError(f"MLAConfig.refit_target must be 'layer' or 'model', got {self.refit_target!r}")
        if not isinstance(self.damping, (int, float)) or not (0.0 <= float(self.damping) < 1.0):
            raise ConfigError(f"MLAConfig.damping must be a number in [0, 1), got {self.damping!r}")
        if not isinstance(self.latent_norm_eps, (int, float)) or not (0.0 < float(self.latent_norm_eps) < 1.0):
            raise ConfigError(f"MLAConfig.latent_norm_eps must be in (0, 1), got {self.latent_norm_eps!r}")

    # ------------------------------------------------------------------ geometry
    def collapse(self, head_dim: int) -> int:
        """``c = d / d_rope``: how many source frequencies stand behind one kept rope frequency."""
        return head_dim // self.qk_rope_head_dim

    def resolved_freqfold(self, head_dim: int) -> int:
        """The fold ``M`` actually used for a source head dim ``d`` (resolves ``None``)."""
        if self.freqfold is not None:
            return self.freqfold
        c = self.collapse(head_dim)
        fold = 2 * c
        while fold > c and (head_dim // 2) % fold:
            fold -= c
        return fold

    def check_against_geometry(self, *, num_kv_heads: int, head_dim: int, num_heads: int, hidden_size: int) -> None:
        """Raise `ConfigError` naming the limit if this config cannot be applied to a layer of this geometry."""
        d, dr, g = head_dim, self.qk_rope_head_dim, num_kv_heads
        if dr > d or d % dr:
            raise ConfigError(
                f"qk_rope_head_dim={dr} must divide the source head_dim={d} (allowed: even divisors of {d}, "
                f"e.g. {', '.join(str(x) for x in _even_divisors(d))})"
            )
        c = d // dr
        fold = self.resolved_freqfold(d)
        if fold % c or (d // 2) % fold:
            allowed = [m for m in range(c, d // 2 + 1, c) if (d // 2) % m == 0]
            raise ConfigError(
                f"freqfold={fold} is invalid for head_dim={d} and qk_rope_head_dim={dr}: it must be a multiple of "
                f"d/d_rope={c} that divides d/2={d // 2} (allowed: {allowed})"
            )
        max_rank = 2 * g * d - dr
        if self.kv_lora_rank > max_rank:
            raise ConfigError(
                f"kv_lora_rank={self.kv_lora_rank} exceeds the layer's limit 2·G·d − d_rope = 2·{g}·{d} − {dr} = "
                f"{max_rank} (G={g} KV heads, head_dim d={d})"
            )
        if self.q_lora_rank is not None:
            q_max = min(hidden_size + 1, num_heads * (d + dr))
            if self.q_lora_rank > q_max:
                raise ConfigError(
                    f"q_lora_rank={self.q_lora_rank} exceeds min(hidden_size + 1, H·(d + d_rope)) = {q_max}"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MLAConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"an MLAConfig record must be a mapping of field names to values, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MLAConfig field(s) {unknown}; allowed: {sorted(known)}")
        required = sorted(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(f"MLAConfig record lacks required field(s) {missing}")
        return cls(**data)


def _even_divisors(n: int) -> list[int]:
    return [k for k in range(2, n + 1, 2) if n % k == 0]
