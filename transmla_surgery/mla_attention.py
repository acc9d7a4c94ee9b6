"""The MLA attention block that replaces a GQA attention block in place.

It holds DeepSeek-V3 parameters under DeepSeek-V3 names and computes what a stock DeepSeek-V3 attention layer
computes, with three differences kept for exactness against the source (the export removes or folds them):

* RoPE is not computed here: the block reuses the ``(cos, sin)`` that the host model's rotary embedding passes
  to every layer (shape ``[batch, seq, d]`` for the source head dim ``d``) and picks the channels of the kept
  frequencies (every ``c``-th, ``c = d / d_rope``). Any rope scaling the source uses is therefore kept. The
  rope channels are stored in Hugging Face "rotate-half" layout; export interleaves them.
* ``kv_a_layernorm`` (and ``q_a_layernorm``) are identities when the source had no norm on the latent
  (``latent_norm=False``), so that training sees well-scaled weights; export folds a linearised RMSNorm in.
* Optional biases on ``q_proj``/``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` carry a Qwen2-style
  source's biases exactly.

Prefill and training up-project the latent to per-head keys and values and run SDPA (or whichever attention
implementation the host model's config selects). The cache, when given, stores only the normalised latent
``[batch, 1, seq, kv_lora_rank]`` and the rotated shared rope key ``[batch, 1, seq, qk_rope_head_dim]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .absorbed import DEFAULT_ABSORB_MAX_QUERY, absorbed_attention, can_absorb
from .errors import UnsupportedModelError
from .kernels import apply_rope


@dataclass(frozen=True)
class MLAGeometry:
    """Shapes of one converted layer (everything needed to rebuild it empty, e.g. before loading weights)."""

    hidden_size: int
    num_heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    kv_lora_rank: int
    source_head_dim: int
    q_lora_rank: int | None = None
    q_bias: bool = False
    kv_bias: bool = False
    o_bias: bool = False
    latent_norm: bool = False
    latent_norm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token per layer: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    """DeepSeek-V3's RMSNorm (float32 statistics, weight applied in the input dtype)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        # `x · rsqrt(mean(x²) + eps)` in float32, as DeepSeek-V3's; `F.rms_norm` is one fused kernel on CUDA
        # where the spelled-out form is five (this runs in every layer of every decode step)
        h = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.variance_epsilon)
        return self.weight * h.to(dtype)


def rope_channel_index(source_head_dim: int, rope_dim: int) -> torch.Tensor:
    """Channels of the source's ``cos``/``sin`` (width ``d``, half layout) that a ``d_rope`` RoPE uses.

    Kept frequency ``k < d_rope/2`` is source frequency ``k·c`` with ``c = d / d_rope``: with the same base,
    ``base^(-2kc/d) = base^(-2k/d_rope)``, so the kept set is exactly a ``d_rope``-dimensional RoPE.
    """
    c = source_head_dim // rope_dim
    half = torch.arange(rope_dim // 2) * c
    return torch.cat([half, half + source_head_dim // 2])


class MLAAttention(nn.Module):
    """DeepSeek-V3 multi-head latent attention with the host model's forward signature.

    Shapes (``B`` batch, ``T`` new tokens, ``S`` cached + new tokens, ``H`` heads):
        hidden_states ``[B, T, hidden]`` → output ``[B, T, hidden]``; queries ``[B, H, T, d_nope + d_rope]``;
        keys ``[B, H, S, d_nope + d_rope]``; values ``[B, H, S, d_v]``; latent cache ``[B, 1, S, r_kv]`` and
        ``[B, 1, S, d_rope]``.
    """

    absorb_max_query: int = DEFAULT_ABSORB_MAX_QUERY  # cached forwards of at most this many tokens absorb

    def __init__(self, geometry: MLAGeometry, layer_idx: int, host_config: Any = None) -> None:
        super().__init__()
        g = geometry
        self.geometry = g
        self.config = host_config  # the host model's config: attention implementation, dropout
        self.layer_idx = layer_idx
        self.num_heads = g.num_heads
        self.num_key_value_groups = 1  # keys/values are already per head after up-projection
        self.qk_nope_head_dim = g.qk_nope_head_dim
        self.qk_rope_head_dim = g.qk_rope_head_dim
        self.qk_head_dim = g.qk_head_dim
        self.v_head_dim = g.v_head_dim
        self.kv_lora_rank = g.kv_lora_rank
        self.q_lora_rank = g.q_lora_rank
        self.scaling = g.qk_head_dim**-0.5  # DeepSeek's scale; conversion folds the source's into q_proj
        self.is_causal = True
        self.attention_dropout = float(getattr(host_config, "attention_dropout", 0.0) or 0.0)
        self.sliding_window = None

        q_out = g.num_heads * g.qk_head_dim
        if g.q_lora_rank is None:
            self.q_proj = nn.Linear(g.hidden_size, q_out, bias=g.q_bias)
        else:
            self.q_a_proj = nn.Linear(g.hidden_size, g.q_lora_rank, bias=g.q_bias)
            self.q_a_layernorm = RMSNorm(g.q_lora_rank, g.latent_norm_eps) if g.latent_norm else nn.Identity()
            self.q_b_proj = nn.Linear(g.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(g.hidden_size, g.kv_lora_rank + g.qk_rope_head_dim, bias=g.kv_bias)
        self.kv_a_layernorm = RMSNorm(g.kv_lora_rank, g.latent_norm_eps) if g.latent_norm else nn.Identity()
        self.kv_b_proj = nn.Linear(g.kv_lora_rank, g.num_heads * (g.qk_nope_head_dim + g.v_head_dim), bias=False)
        self.o_proj = nn.Linear(g.num_heads * g.v_head_dim, g.hidden_size, bias=g.o_bias)
        index = rope_channel_index(g.source_head_dim, g.qk_rope_head_dim)
        self.register_buffer("rope_index", index, persistent=False)
        # The kept channels are every c-th one (c = d / d_rope) when d_rope divides d: then a strided view
        # selects them, with no gather kernel in every layer of every decode step.
        step = g.source_head_dim // g.qk_rope_head_dim
        strided = torch.arange(0, step * g.qk_rope_head_dim, step)
        self.rope_step = step if torch.equal(index, strided) else None
        # Multiplied into the latent (rank reduction during training: zeros switch channels off with static
        # shapes). Not persistent: checkpoints keep the DeepSeek-V3 tensor names only; the rank lives in the
        # training callback's state, and `transmla_surgery.rank.truncate_rank` makes it physical.
        self.register_buffer("latent_mask", torch.ones(g.kv_lora_rank), persistent=False)
        self._mask_seen: torch.Tensor | None = None  # the mask tensor and version `_mask_is_ones` last checked
        self._mask_version = -1
        self._mask_ones = False

    # ------------------------------------------------------------------ pieces
    def _input_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The two projections that read the hidden states: ``q_proj`` (or ``q_a_proj``) and ``kv_a_proj_with_mqa``."""
        return (self.q_proj if self.q_lora_rank is None else self.q_a_proj), self.kv_a_proj_with_mqa

    def fuse_input_projections(self) -> bool:
        """Store the weights (and biases) of the two projections that read the hidden states side by side in one
        buffer, so that inference computes both with one product (`_fused_input_weight`) instead of two.

        The parameters stay what they were (same objects, names, values and shapes; each is now a view of its
        half of the buffer), so training, checkpoints and export are unaffected; whatever re-allocates one of them
        (``.to(dtype)``, loading with ``assign=True``) quietly returns the block to two products, and so does a
        projection that is not a plain ``nn.Linear`` or has hooks (an adapter, a quantised layer, a probe): its
        own forward runs. Returns ``False`` (and changes nothing) when only one of the two has a bias."""
        first, second = self._input_projections()
        if (first.bias is None) != (second.bias is None):
            return False
        with torch.no_grad():
            for name in ("weight", "bias"):
                a, b = getattr(first, name), getattr(second, name)
                if a is None:
                    continue
                buffer = torch.cat([a, b])  # on the parameters' device, in their dtype
                a.data, b.data = buffer[: a.shape[0]], buffer[a.shape[0] :]
        return True

    def _fused_input_weight(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight [n_q + n_kv, hidden], bias or None)`` spanning both input projections when they lie side by
        side in memory (`fuse_input_projections`) and no gradient is needed; ``None`` otherwise."""
        first, second = self._input_projections()
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and (hidden_states.requires_grad or first.weight.requires_grad or second.weight.requires_grad)
        ):
            return None  # the product over both halves has no gradient for the second one: two products there
        if any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in (first, second)):
            return None  # a wrapped or hooked projection (an adapter, a quantised layer) must run its own forward
        fused = []
        for a, b in ((first.weight, second.weight), (first.bias, second.bias)):
            if a is None and b is None:
                fused.append(None)
                continue
            if (a is None or b is None or a.dtype != b.dtype or a.device != b.device or a.device.type == "meta"
                    or not (a.is_contiguous() and b.is_contiguous())
                    or b.data_ptr() != a.data_ptr() + a.numel() * a.element_size()
                    # adjacent is not enough: two allocations may abut; the view may only span one storage
                    or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()):
                return None
            rows = a.shape[0] + b.shape[0]
            fused.append(a.as_strided((rows, *a.shape[1:]), a.stride()))
        return fused[0], fused[1]

    def _project_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, hidden]`` → the first query projection's output (``q_proj``'s, or ``q_a_proj``'s) and
        ``kv_a_proj_with_mqa``'s ``[B, T, r_kv + d_rope]``: one product when the two are fused."""
        first, second = self._input_projections()
        fused = self._fused_input_weight(hidden_states)
        if fused is None:
            return first(hidden_states), second(hidden_states)
        both = F.linear(hidden_states, *fused)
        return torch.split(both, [first.out_features, second.out_features], dim=-1)

    def project_query(self, hidden_states: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, hidden]`` → per-head queries ``[B, H, T, d_nope + d_rope]`` (rope part not yet rotated).
        ``first``: ``q_proj``'s (or ``q_a_proj``'s) output, when already computed."""
        b, t, _ = hidden_states.shape
        if first is None:
            first = self._input_projections()[0](hidden_states)
        q = first if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(first))
        return q.view(b, t, self.num_heads, self.qk_head_dim).transpose(1, 2)

    def project_latent(self, hidden_states: torch.Tensor, kv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, hidden]`` → normalised latent ``[B, 1, T, r_kv]`` and rope key ``[B, 1, T, d_rope]``.
        ``kv``: ``kv_a_proj_with_mqa``'s output, when already computed."""
        b, t, _ = hidden_states.shape
        if kv is None:
            kv = self.kv_a_proj_with_mqa(hidden_states)
        latent, k_rope = torch.split(kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        if not self._mask_is_ones():  # multiplying by ones is the identity: one kernel less per decode step
            latent = latent * self.latent_mask.to(latent.dtype)
        return latent.view(b, 1, t, self.kv_lora_rank), k_rope.view(b, 1, t, self.qk_rope_head_dim)

    def _mask_is_ones(self) -> bool:
        """Whether `latent_mask` is all ones. Checked again (one device synchronisation) only when the mask has
        changed since the last check: another tensor, or an in-place write (its version counter). Under
        torch.compile and during CUDA-graph capture, where no check may synchronise, a changed mask counts as
        not all ones (the multiply is then kept, which is exact either way)."""
        mask = self.latent_mask
        if torch.compiler.is_compiling():
            return False
        if mask is not self._mask_seen or mask._version != self._mask_version:
            if mask.is_cuda and torch.cuda.is_current_stream_capturing():
                return False
            # holding the checked tensor keeps its id from being reused by a new one
            self._mask_seen, self._mask_version, self._mask_ones = mask, mask._version, bool((mask == 1).all())
        return self._mask_ones

    def rope_cos_sin(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Select the kept frequencies from the host's ``cos, sin`` ``[B, T, d]`` → ``[B, 1, T, d_rope]``."""
        cos, sin = position_embeddings
        if self.rope_step is not None:
            return cos[..., :: self.rope_step].unsqueeze(1), sin[..., :: self.rope_step].unsqueeze(1)
        idx = self.rope_index.to(cos.device)
        return cos.index_select(-1, idx).unsqueeze(1), sin.index_select(-1, idx).unsqueeze(1)

    def expand_latent(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Up-project the cached latent: ``[B, 1, S, r]``, ``[B, 1, S, d_rope]`` → keys ``[B, H, S, d_qk]``,
        values ``[B, H, S, d_v]``."""
        b, _, s, _ = latent.shape
        kv = self.kv_b_proj(latent.squeeze(1)).view(b, s, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, value = torch.split(kv.transpose(1, 2), [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat([k_nope, k_rope.expand(b, self.num_heads, s, self.qk_rope_head_dim)], dim=-1)
        return key, value

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if position_embeddings is None:
            raise ValueError("MLAAttention needs the host model's position_embeddings (cos, sin)")
        cache = cache if cache is not None else past_key_values  # transformers < 5.24 calls it past_key_values
        b, t, _ = hidden_states.shape

        first, kv = self._project_inputs(hidden_states)
        q = self.project_query(hidden_states, first)
        q_nope, q_rope = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.project_latent(hidden_states, kv)

        cos, sin = self.rope_cos_sin(position_embeddings)
        if cache is not None and hasattr(cache, "rotate_and_update"):
            # `MLAStaticCache`: the rotation and the cache write in one launch on CUDA at inference
            q_rope, latent, k_rope = cache.rotate_and_update(q_rope, latent, k_rope, cos, sin, self.layer_idx)
        else:
            q_rope, k_rope = apply_rope(q_rope, k_rope, cos, sin)  # one launch on CUDA at inference
            if cache is not None:
                latent, k_rope = cache.update(latent, k_rope, self.layer_idx)

        if cache is not None:
            if can_absorb(self, t, attention_mask, kwargs):  # decode: attend on the latent cache directly
                out = absorbed_attention(self, q_nope, q_rope, latent, k_rope, attention_mask, cache)
                return self.o_proj(out), None

        key, value = self.expand_latent(latent, k_rope)
        query = torch.cat([q_nope, q_rope], dim=-1)
        attn_output, attn_weights = self._attention_interface()(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **{k: v for k, v in kwargs.items() if k in ("sliding_window", "output_attentions")},
        )
        attn_output = attn_output.reshape(b, t, self.num_heads * self.v_head_dim).contiguous()
        return self.o_proj(attn_output), attn_weights

    def _attention_interface(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if impl == "eager":
            return _eager_attention
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if impl in ALL_ATTENTION_FUNCTIONS:
            return ALL_ATTENTION_FUNCTIONS[impl]
        return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention (the reference the SDPA path is tested against)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    elif query.shape[-2] > 1:
        t, s = query.shape[-2], key.shape[-2]
        causal = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def fuse_input_projections(model: nn.Module) -> int:
    """`MLAAttention.fuse_input_projections` on every converted block of ``model``: each block's two projections
    of the hidden states then run as one product at inference (one GEMM less per layer and decode step: at batch
    191 of the Llama-3-8B shape on an H200, 21.8 µs for both against 29.9 µs as two, bench/results/decode.md).
    Values, parameter names and training are unchanged. Returns the number of blocks fused."""
    blocks = [m for m in model.modules() if isinstance(m, MLAAttention)]
    if not blocks:
        raise UnsupportedModelError(f"{type(model).__name__} has no MLAAttention blocks: convert it first (convert_to_mla)")
    return sum(block.fuse_input_projections() for block in blocks)
