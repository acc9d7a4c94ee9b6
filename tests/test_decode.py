"""Decode of converted models: latent caches, absorbed attention against the expanded path, generation.

References are float64 models on random (never zero) inputs, seeded.
"""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from conftest import VOCAB, calibration, rel_err, tiny_model
from transmla_surgery import MLAAttention, MLAConfig, convert_to_mla
from transmla_surgery import absorbed as absorbed_mod
from transmla_surgery.cache import MLAStaticCache
from transmla_surgery.kernels import decode_attention_reference, set_decode_backend
from transmla_surgery.surgery import build_mla_block, mla_geometry
from transmla_surgery.architectures import check_supported

R, DR = 24, 8  # kv_lora_rank, qk_rope_head_dim of the tiny conversions
# transformers 5.24 renamed the cache argument of forward/generate (5.17, on the GPU machine: past_key_values)
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@pytest.fixture(autouse=True)
def _torch_backend():
    set_decode_backend("torch")  # CPU: the PyTorch path (the Triton kernel has its own tests)
    yield
    set_decode_backend("auto")


@functools.lru_cache(maxsize=1)
def _converted_once() -> torch.nn.Module:
    model = tiny_model(dtype=torch.float32)
    convert_to_mla(model, MLAConfig(kv_lora_rank=R, qk_rope_head_dim=DR), calibration(2, 2, 16), progress=False)
    return model


def converted(dtype: torch.dtype = torch.float64, attn: str = "sdpa") -> torch.nn.Module:
    """A fresh copy of one tiny converted Llama (4 heads, 2 KV heads, 2 layers), in ``dtype``."""
    model = copy.deepcopy(_converted_once())
    model.config._attn_implementation = attn
    return model.to(dtype).eval()


def padded_batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 9 tokens, two of them left-padded (3 and 1 pad tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------- caches
def test_dynamic_cache_holds_only_latent_and_rope_key():
    model = converted()
    ids, mask = padded_batch()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE: cache})
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == (3, 1, 9, R)
        assert tuple(layer.values.shape) == (3, 1, 9, DR)
    per_token_layer = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers) / (3 * 9 * len(cache.layers))
    assert per_token_layer == (R + DR) * 8  # float64


def test_static_cache_bytes_per_token_match_formula():
    model = converted(torch.float32)
    cache = MLAStaticCache.for_model(model, batch_size=2, max_cache_len=40, dtype=torch.bfloat16)
    allocated = sum(l.keys.untyped_storage().nbytes() + l.values.untyped_storage().nbytes() for l in cache.layers)
    assert allocated / (2 * 40 * len(cache.layers)) == (R + DR) * 2 == cache.bytes_per_token_per_layer
    for l in cache.layers:  # separate tensors: under torch.compile shared storage would defeat CUDA graphs
        assert l.keys.untyped_storage().data_ptr() != l.values.untyped_storage().data_ptr()


def test_static_cache_reorder_keeps_addresses():
    """Beam search reorders in place: CUDA graphs captured on the buffers stay valid."""
    cache = MLAStaticCache(num_layers=1, batch_size=3, max_cache_len=5, kv_lora_rank=R, qk_rope_head_dim=DR, dtype=torch.float64)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(2)
    layer.keys.copy_(torch.randn(layer.keys.shape, generator=g, dtype=torch.float64))
    layer.values.copy_(torch.randn(layer.values.shape, generator=g, dtype=torch.float64))
    before = (layer.keys.clone(), layer.values.clone(), layer.keys.data_ptr(), layer.values.data_ptr())
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.keys, before[0][[2, 0, 0]]) and torch.equal(layer.values, before[1][[2, 0, 0]])
    assert (layer.keys.data_ptr(), layer.values.data_ptr()) == before[2:]


def test_static_cache_rejects_a_different_geometry():
    model = converted()
    cache = MLAStaticCache(num_layers=2, batch_size=3, max_cache_len=20, kv_lora_rank=R + 1, qk_rope_head_dim=DR, dtype=torch.float64)
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="MLAStaticCache holds"):
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE: cache})


# ------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_greedy_generation_cached_equals_uncached(cache_kind):
    model = converted()
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    extra = {}
    if cache_kind == "static":
        extra[CACHE] = MLAStaticCache.for_model(model, batch_size=3, max_cache_len=9 + 8)
    out = model.generate(input_ids=ids, attention_mask=mask, **extra, **kw)
    assert torch.equal(out, ref)


def test_sampled_generation_cached_equals_uncached():
    model = converted()
    ids, mask = padded_batch(5)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=1.3, pad_token_id=0)
    torch.manual_seed(11)
    ref = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    torch.manual_seed(11)
    out = model.generate(input_ids=ids, attention_mask=mask, **{CACHE: MLAStaticCache.for_model(model, 3, 15)}, **kw)
    assert torch.equal(out, ref)


def test_static_cache_reset_and_reuse():
    model = converted()
    ids, mask = padded_batch()
    cache = MLAStaticCache.for_model(model, batch_size=3, max_cache_len=15)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    first = model.generate(input_ids=ids, attention_mask=mask, **{CACHE: cache}, **kw)
    cache.reset()
    again = model.generate(input_ids=ids, attention_mask=mask, **{CACHE: cache}, **kw)
    assert torch.equal(first, again)


def test_generation_uses_the_absorbed_path(monkeypatch):
    model = converted()
    calls = []
    original = absorbed_mod.absorbed_attention

    def spy(module, q_nope, *args, **kwargs):
        calls.append(q_nope.shape[2])
        return original(module, q_nope, *args, **kwargs)

    monkeypatch.setattr("transmla_surgery.mla_attention.absorbed_attention", spy)
    ids, mask = padded_batch()
    MLAAttention.absorb_max_query = 4  # the 9-token prefill takes the expanded path, decode absorbs
    try:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        MLAAttention.absorb_max_query = absorbed_mod.DEFAULT_ABSORB_MAX_QUERY
    assert calls and set(calls) == {1}
    assert len(calls) == 2 * model.config.num_hidden_layers  # 2 decode steps after the prefill


# ------------------------------------------------------------------------------------------- one block
def _block(dtype: torch.dtype = torch.float64, attn: str = "eager", heads: int = 4) -> MLAAttention:
    model = tiny_model(heads=heads, kv_heads=2, dtype=torch.float64)
    src = check_supported(model)
    geometry = mla_geometry(src, MLAConfig(kv_lora_rank=R, qk_rope_head_dim=DR))
    model.config._attn_implementation = attn
    block = build_mla_block(geometry, 0, model.config, dtype=torch.float64)
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.shape[-1] ** -0.5)
    return block.to(dtype).eval()


def _rope(batch: int, positions: torch.Tensor, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = positions[..., None].double() * inv
    emb = torch.cat([ang, ang], dim=-1).expand(batch, -1, -1)
    return emb.cos(), emb.sin()


def _run(block: MLAAttention, absorb: bool, t: int, past: int, mask_kind: str, seed: int = 0):
    """Feed ``past`` tokens, then ``t`` tokens, through ``block`` with a DynamicCache; return the second output."""
    dtype = block.kv_b_proj.weight.dtype
    g = torch.Generator().manual_seed(seed)
    b, d = 3, block.geometry.hidden_size
    x_past = torch.randn(b, past, d, generator=g, dtype=torch.float64).to(dtype)
    x_new = torch.randn(b, t, d, generator=g, dtype=torch.float64).to(dtype)
    s = past + t
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[0, :4] = False  # left padding
    keep[2, :1] = False
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    full = keep[:, None, None, :] & causal[None, None]  # [B, 1, S, S]

    def mask_for(rows: slice) -> torch.Tensor | None:
        if mask_kind == "none":
            return None
        m = full[:, :, rows, :]
        m = m[..., : rows.stop]
        if mask_kind == "float":
            return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, torch.finfo(dtype).min)
        return m

    cache = DynamicCache()
    block.absorb_max_query = 64 if absorb else 0
    with torch.no_grad():
        pos = torch.arange(s)
        cos, sin = _rope(b, pos)
        block(x_past, position_embeddings=(cos[:, :past].to(dtype), sin[:, :past].to(dtype)),
              attention_mask=mask_for(slice(0, past)), cache=cache)
        # the first call absorbs too when absorb (past <= 64): both calls then go through the absorbed path
        out, _ = block(x_new, position_embeddings=(cos[:, past:].to(dtype), sin[:, past:].to(dtype)),
                       attention_mask=mask_for(slice(past, s)), cache=cache)
    return out


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("t", [1, 3])
def test_absorbed_equals_expanded_float64(mask_kind, t):
    # SDPA is float64 throughout on the CPU. Eager attention takes its softmax in float32 (as transformers'
    # does), so it is used, with a float32 tolerance, only where SDPA cannot stand in: no mask with T > 1
    # (SDPA's is_causal aligns the causal mask at the top left; transformers never passes that case).
    eager = mask_kind == "none" and t > 1
    block = _block(attn="eager" if eager else "sdpa")
    out_abs = _run(block, True, t, 11, mask_kind)
    out_exp = _run(block, False, t, 11, mask_kind)
    assert rel_err(out_abs, out_exp) < (1e-6 if eager else 1e-12)


def test_absorbed_equals_expanded_sdpa_float32():
    ref = _run(_block(attn="sdpa"), False, 1, 13, "bool")
    block32 = _block(torch.float32, attn="sdpa")
    assert rel_err(_run(block32, True, 1, 13, "bool"), ref) < 1e-5
    assert rel_err(_run(block32, False, 1, 13, "bool"), ref) < 1e-5


def test_kernel_reference_equals_expanded_attention():
    """`decode_attention_reference` on absorbed inputs == SDPA on up-projected keys and values (float64)."""
    block = _block()
    g = torch.Generator().manual_seed(5)
    b, h, t, s = 2, block.num_heads, 2, 10
    q_nope = torch.randn(b, h, t, block.qk_nope_head_dim, generator=g, dtype=torch.float64)
    q_rope = torch.randn(b, h, t, DR, generator=g, dtype=torch.float64)
    latent = torch.randn(b, 1, s, R, generator=g, dtype=torch.float64)
    k_rope = torch.randn(b, 1, s, DR, generator=g, dtype=torch.float64)
    mask = torch.rand(b, 1, t, s, generator=g) > 0.3
    mask[..., -1] = True
    key, value = block.expand_latent(latent, k_rope)
    query = torch.cat([q_nope, q_rope], -1)
    ref = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=block.scaling)
    ref = ref.transpose(1, 2).reshape(b, t, h * block.v_head_dim)
    q_lat = absorbed_mod.absorb_query(block, q_nope)
    o_lat = decode_attention_reference(q_lat, q_rope.transpose(1, 2), latent[:, 0], k_rope[:, 0], block.scaling, mask[:, 0])
    assert rel_err(absorbed_mod.expand_output(block, o_lat), ref) < 1e-12


def test_absorbed_weights_follow_weight_updates():
    """Nothing stale: after an in-place update of kv_b_proj both paths still agree."""
    block = _block(attn="sdpa")
    before = _run(block, True, 1, 7, "bool")
    with torch.no_grad():
        block.kv_b_proj.weight.mul_(1.5).add_(0.01)
    after_abs = _run(block, True, 1, 7, "bool")
    after_exp = _run(block, False, 1, 7, "bool")
    assert rel_err(after_abs, after_exp) < 1e-12
    assert rel_err(after_abs, before) > 1e-3


def test_training_with_grad_takes_the_expanded_path():
    block = _block()
    block.train()
    assert not absorbed_mod.can_absorb(block, 1, None, {})
    with torch.no_grad():
        assert absorbed_mod.can_absorb(block, 1, None, {})
    block.eval()
    assert absorbed_mod.can_absorb(block, 1, None, {})
    assert not absorbed_mod.can_absorb(block, 1, None, {"output_attentions": True})
    assert not absorbed_mod.can_absorb(block, block.absorb_max_query + 1, None, {})


@pytest.mark.parametrize("rope_dim", [8, 6], ids=["divides_head_dim", "does_not_divide"])
def test_rope_channels_by_strided_view_equal_the_gather(rope_dim):
    """The kept rope channels (`rope_channel_index`) are every c-th channel when d_rope divides d: then the block
    selects them with a strided view instead of a gather kernel per layer and step. Either way the selected
    ``cos``/``sin`` must be exactly the indexed ones; a d_rope that does not divide d keeps the gather."""
    model = tiny_model(heads=4, kv_heads=2, dtype=torch.float64)
    src = check_supported(model)
    block = build_mla_block(mla_geometry(src, MLAConfig(kv_lora_rank=R, qk_rope_head_dim=rope_dim)), 0, model.config,
                            dtype=torch.float64)
    assert (block.rope_step is not None) == (src.head_dim % rope_dim == 0)
    cos, sin = _rope(3, torch.arange(5), dim=src.head_dim)
    g = torch.Generator().manual_seed(5)
    cos = cos + 0.01 * torch.randn(cos.shape, generator=g, dtype=cos.dtype)  # halves no longer duplicated
    sin = sin + 0.01 * torch.randn(sin.shape, generator=g, dtype=sin.dtype)
    got = block.rope_cos_sin((cos, sin))
    idx = block.rope_index
    assert torch.equal(got[0], cos.index_select(-1, idx).unsqueeze(1))
    assert torch.equal(got[1], sin.index_select(-1, idx).unsqueeze(1))


def test_output_projection_with_gradients_equals_the_copy_free_one():
    """`expand_output` writes its products straight into `o_proj`'s layout (`bmm(out=)`), which autograd refuses:
    with gradients needed it must take the plain product instead, with the same values and working gradients."""
    block = _block().double()
    g = torch.Generator().manual_seed(11)
    o_lat = torch.randn(3, 2, block.num_heads, R, generator=g, dtype=torch.float64)
    with torch.no_grad():
        plain = absorbed_mod.expand_output(block, o_lat)
    o_grad = o_lat.clone().requires_grad_(True)
    with_grad = absorbed_mod.expand_output(block, o_grad)
    assert torch.equal(with_grad.detach(), plain)
    with_grad.square().sum().backward()
    assert o_grad.grad is not None and torch.isfinite(o_grad.grad).all() and o_grad.grad.abs().sum() > 0
    assert block.kv_b_proj.weight.grad is not None


def test_latent_rms_norm_equals_the_float64_formula():
    """The latent's RMSNorm (one fused `F.rms_norm` in float32) against ``w · x / sqrt(mean(x²) + eps)`` in float64,
    on random inputs and weights, for float32 and bfloat16 activations."""
    from transmla_surgery.mla_attention import RMSNorm

    g = torch.Generator().manual_seed(12)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g))
    x = torch.randn(4, 7, 48, generator=g) * 3.0
    x64 = x.double()
    ref = norm.weight.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert rel_err(norm(x).double(), ref) < 1e-6
    xb = x.to(torch.bfloat16)
    refb = norm.weight.double() * (xb.double() / torch.sqrt(xb.double().pow(2).mean(-1, keepdim=True) + 1e-5))
    assert rel_err(norm.to(torch.bfloat16)(xb).double(), refb) < 1e-2


def test_latent_mask_follows_every_change_without_multiplying_by_ones():
    """An all-ones `latent_mask` is not multiplied in (one kernel less per decode step); every way the library
    changes it (in place, as the rank schedule does; a new tensor, as `truncate_rank` does) is seen at the next
    call, and the result always equals the explicit product."""
    block = _block(torch.float64)
    x = torch.randn(2, 5, block.kv_a_proj_with_mqa.in_features, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def explicit() -> torch.Tensor:
        kv = block.kv_a_proj_with_mqa(x)[..., : block.kv_lora_rank]
        return (block.kv_a_layernorm(kv) * block.latent_mask).view(2, 1, 5, -1)

    calls = []
    real_mul = torch.Tensor.__mul__

    def counting_mul(a, b):
        calls.append(tuple(b.shape) if isinstance(b, torch.Tensor) else None)
        return real_mul(a, b)

    with torch.no_grad():
        for change in ("none", "in place", "new tensor", "ones again"):
            if change == "in place":
                block.latent_mask[block.kv_lora_rank // 2:] = 0
            elif change == "new tensor":
                block.latent_mask = torch.cat([torch.zeros(3), torch.ones(block.kv_lora_rank - 3)]).double()
            elif change == "ones again":
                block.latent_mask.fill_(1)
            calls.clear()
            torch.Tensor.__mul__ = counting_mul
            try:
                latent, _ = block.project_latent(x)
            finally:
                torch.Tensor.__mul__ = real_mul
            assert torch.equal(latent, explicit()), change
            masked = change in ("in place", "new tensor")
            assert ((block.kv_lora_rank,) in calls) == masked, (change, calls)


# ------------------------------------------------------------------------------------------- fused input projections
def _logits(model, ids, mask, cache=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=cache is not None, **({CACHE: cache} if cache is not None else {})).logits


@pytest.mark.parametrize("family,bias", [("llama", False), ("qwen2", True)])
def test_fused_input_projections_compute_the_same_model(family, bias):
    """After `fuse_input_projections` the two projections of the hidden states share one buffer and inference runs
    them as one product: same parameters (names, values, objects), same logits, cached decoding included."""
    from transmla_surgery import fuse_input_projections

    model = tiny_model(family, bias=bias, dtype=torch.float64)
    convert_to_mla(model, MLAConfig(kv_lora_rank=R, qk_rope_head_dim=DR), calibration(2, 2, 16), progress=False)
    ids, mask = padded_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    ref = _logits(model, ids, mask)
    ref_cache = MLAStaticCache.for_model(model, batch_size=3, max_cache_len=12)
    _logits(model, ids, mask, ref_cache)
    ref_step = _logits(model, ids[:, -1:], torch.cat([mask, mask[:, -1:]], 1), ref_cache)

    assert fuse_input_projections(model) == model.config.num_hidden_layers
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[k] for k, p in model.named_parameters())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    block = model.model.layers[0].self_attn
    assert block.q_proj.weight.untyped_storage().data_ptr() == block.kv_a_proj_with_mqa.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        weight, b = block._fused_input_weight(torch.zeros(1, 1, block.geometry.hidden_size, dtype=torch.float64))
    assert torch.equal(weight, torch.cat([block.q_proj.weight, block.kv_a_proj_with_mqa.weight]))
    assert (b is None) == (not bias)
    if bias:
        assert torch.equal(b, torch.cat([block.q_proj.bias, block.kv_a_proj_with_mqa.bias]))
    assert rel_err(_logits(model, ids, mask), ref) < 1e-12
    with torch.no_grad():  # one product: both outputs are views of its result
        first, kv = block._project_inputs(torch.randn(2, 3, block.geometry.hidden_size, dtype=torch.float64))
    assert first.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
    # a hooked projection (an adapter, a probe) runs its own forward: the hook sees every call, the logits agree
    calls = []
    hooks = [m.self_attn.kv_a_proj_with_mqa.register_forward_hook(lambda *a: calls.append(1)) for m in model.model.layers]
    assert rel_err(_logits(model, ids, mask), ref) < 1e-12
    assert len(calls) == model.config.num_hidden_layers
    for h in hooks:
        h.remove()
    cache = MLAStaticCache.for_model(model, batch_size=3, max_cache_len=12)
    _logits(model, ids, mask, cache)
    step = _logits(model, ids[:, -1:], torch.cat([mask, mask[:, -1:]], 1), cache)
    assert rel_err(step, ref_step) < 1e-12
    # the latent is a column range of the one product's output: a dynamic cache must not keep that whole output
    dynamic = DynamicCache(config=model.config)
    _logits(model, ids, mask, dynamic)
    for layer in dynamic.layers:
        for x in (layer.keys, layer.values):
            assert x.untyped_storage().nbytes() == x.numel() * x.element_size()


def test_fused_input_projections_train_save_and_come_undone_safely(tmp_path):
    """Gradients flow through the two separate products (the fused one has none for its second half), equal to an
    unfused copy's; ``save_pretrained`` writes both tensors and `load_converted` reads the same model back; a dtype
    change re-allocates the parameters and the block quietly returns to two products."""
    from transmla_surgery import fuse_input_projections, load_converted

    model = converted(torch.float64)
    twin = copy.deepcopy(model)
    fuse_input_projections(model)
    ids, mask = padded_batch()
    for m in (model, twin):
        m.train()
        m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None and rel_err(p.grad, q.grad) < 1e-10, name
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_converted(tmp_path / "m", dtype=torch.float64)
    assert rel_err(_logits(loaded, ids, mask), _logits(model, ids, mask)) < 1e-12
    block = model.model.layers[1].self_attn
    model.to(torch.float32)
    assert block._fused_input_weight(torch.zeros(1, 1, block.geometry.hidden_size)) is None
    assert rel_err(_logits(model, ids, mask).double(), _logits(twin.eval(), ids, mask)) < 1e-4


def test_fuse_input_projections_refuses_a_model_without_mla_blocks():
    from transmla_surgery import UnsupportedModelError, fuse_input_projections

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="has no MLAAttention blocks: convert it first"):
        fuse_input_projections(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
