"""Latent KV caches for converted models.

What a converted layer caches per token is the normalised latent ``c`` (``kv_lora_rank`` values) and the rotated
shared rope key (``qk_rope_head_dim`` values). `MLAAttention` hands them to ``cache.update(latent, k_rope, i)``
as the "keys" ``[B, 1, T, r]`` and "values" ``[B, 1, T, d_rope]`` of a one-head layer, so:

* transformers' ``DynamicCache`` already stores exactly that (it concatenates whatever it is given along the
  sequence): ``(r + d_rope)`` values per token per layer, and ``generate``'s default cache needs nothing from us.
* `MLAStaticCache` (here) preallocates the same values, ``[B, 1, max_len, r]`` and ``[B, 1, max_len, d_rope]``
  per layer, up front, with fixed addresses: usable with ``generate(past_key_values=cache)``, with CUDA graphs
  and with ``torch.compile``. It is a transformers ``Cache`` of ``StaticLayer`` subclasses, so masks,
  ``get_seq_length`` and cropping behave as for ``StaticCache``. Call ``reset()`` before reusing it for a new
  batch of prompts.

  The two are separate tensors, not two column ranges of one ``[B, max_len, r + d_rope]`` buffer: under
  ``torch.compile`` two mutated inputs that share storage become one "synthetic base" input, which is not a
  static address, and inductor then skips CUDA graphs (seen on the H200 with the shared buffer). The decode
  kernel takes either layout.

transformers' own ``StaticCache`` also works when it allocates lazily (5.17), but 5.24's ``generate`` eagerly
allocates it from ``num_key_value_heads``/``head_dim`` of the config, which a converted model's cache does not
have: use `MLAStaticCache` there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer

from .kernels import apply_rope, rope_into_cache
from .mla_attention import MLAAttention


class MLAStaticLayer(StaticLayer):
    """One layer's preallocated latent cache: ``keys [B, 1, max_len, r]`` (normalised latent) and
    ``values [B, 1, max_len, d_rope]`` (rotated rope key), as `MLAAttention` writes and reads them."""

    def __init__(
        self,
        max_cache_len: int,
        batch_size: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size, self.num_heads = batch_size, 1
        self.k_head_dim, self.v_head_dim = kv_lora_rank, qk_rope_head_dim
        self.keys = torch.zeros(batch_size, 1, max_cache_len, kv_lora_rank, dtype=dtype, device=self.device)
        self.values = torch.zeros(batch_size, 1, max_cache_len, qk_rope_head_dim, dtype=dtype, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        # the fused update's count of finished programs (`kernels.rope_into_cache`), zero between calls
        self.ticket = torch.zeros((), dtype=torch.int32, device=self.device)
        # Fixed addresses: compiled graphs and CUDA graphs may capture these tensors (transformers does the same)
        for t in (self.keys, self.values, self.cumulative_length):
            torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Already allocated; only check that the model's latent matches."""
        self._check(key_states, value_states)

    def _check(self, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        if latent.shape[-1] != self.k_head_dim or k_rope.shape[-1] != self.v_head_dim or latent.shape[0] != self.batch_size:
            raise ValueError(
                f"MLAStaticCache holds batch {self.batch_size} × (latent {self.k_head_dim} + rope {self.v_head_dim}); "
                f"got latent {tuple(latent.shape)} and rope key {tuple(k_rope.shape)}"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Write ``latent [B, 1, T, r]`` / ``k_rope [B, 1, T, d_rope]`` at the filled length; return the whole
        buffer views (the attention mask hides the unfilled part)."""
        if not torch.compiler.is_compiling():
            self._check(key_states, value_states)
        return super().update(key_states, value_states, *args, **kwargs)

    def rotate_and_update(
        self, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE on ``q_rope [B, H, T, d]`` and ``k_rope [B, 1, T, d]``, then `update` with the latent
        ``[B, 1, T, r]`` and the rotated key: returns the rotated query and the whole buffers. On CUDA at
        inference this is one kernel instead of six (the rope launch, a range, two additions, two indexed
        copies), with the same numbers; elsewhere it is exactly those steps."""
        if not torch.compiler.is_compiling():
            self._check(latent, k_rope)
        q_rot = rope_into_cache(q_rope, k_rope, cos, sin, latent, self.keys, self.values, self.cumulative_length, self.ticket)
        if q_rot is not None:
            return q_rot, self.keys, self.values
        q_rot, k_rot = apply_rope(q_rope, k_rope, cos, sin)
        keys, values = super().update(latent, k_rot)  # checked above
        return q_rot, keys, values

    # Beam search and batch selection must keep the buffer's address: copy in place.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        idx = beam_idx.to(self.device)
        self.keys.copy_(self.keys.index_select(0, idx))
        self.values.copy_(self.values.index_select(0, idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("MLAStaticCache has a fixed batch size; build a new cache for another batch")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("MLAStaticCache has a fixed batch size; build it with the expanded batch size")

    def offload(self) -> None:  # the buffer must stay where it was captured
        pass

    def prefetch(self) -> None:
        pass


class MLAStaticCache(Cache):
    """Preallocated latent cache for every layer of a converted model (see the module docstring).

    Example::

        cache = MLAStaticCache.for_model(model, batch_size=8, max_cache_len=prompt_len + 128)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=128)
        cache.reset()  # before the next batch
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        max_cache_len: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        layers = [
            MLAStaticLayer(max_cache_len, batch_size, kv_lora_rank, qk_rope_head_dim, dtype, device)
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)

    @property
    def max_cache_len(self) -> int:
        return self.layers[0].max_cache_len

    @property
    def max_batch_size(self) -> int:
        return self.layers[0].batch_size

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        batch_size: int,
        max_cache_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "MLAStaticCache":
        """A cache sized for a converted model (geometry read off its `MLAAttention` blocks; dtype and device
        those of the blocks' weights unless given)."""
        blocks = [m for m in model.modules() if isinstance(m, MLAAttention)]
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no MLAAttention blocks: convert it first (convert_to_mla)")
        ref = blocks[0].kv_a_proj_with_mqa.weight
        return cls(
            num_layers=len(blocks),
            batch_size=batch_size,
            max_cache_len=max_cache_len,
            kv_lora_rank=blocks[0].kv_lora_rank,
            qk_rope_head_dim=blocks[0].qk_rope_head_dim,
            dtype=dtype or ref.dtype,
            device=device or ref.device,
        )

    def rotate_and_update(
        self,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer_idx: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`MLAStaticLayer.rotate_and_update` of layer ``layer_idx``: the rotated query, the layer's latent and
        rope-key buffers."""
        return self.layers[layer_idx].rotate_and_update(q_rope, latent, k_rope, cos, sin)

    @property
    def bytes_per_token_per_layer(self) -> int:
        """``(kv_lora_rank + qk_rope_head_dim) × bytes per element``: what one cached token costs in one layer."""
        layer = self.layers[0]
        return (layer.keys.shape[-1] + layer.values.shape[-1]) * layer.keys.element_size()

    def reset(self) -> None:
        """Forget every cached token (fills with zeros, keeps the buffers and their addresses)."""
        for layer in self.layers:
            layer.keys.zero_()
            layer.values.zero_()
            layer.cumulative_length.zero_()
            layer.ticket.zero_()
