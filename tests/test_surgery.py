"""`convert_to_mla` on whole (tiny, random) models: exactness, lossy steps only, generation, saving."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import VOCAB, calibration, rel_err, tiny_model
from transmla_surgery import MLAAttention, MLAConfig, convert_to_mla
from transmla_surgery.architectures import check_supported, source_weights
from transmla_surgery.calibration import GramAccumulator
from transmla_surgery.factorize import augment, factorize_layer, gram_of, merged_query_gram, rope_rotation
from transmla_surgery.surgery import apply_mla_structure, build_mla_block, mla_geometry


@settings(max_examples=12, deadline=None)
@given(
    family=st.sampled_from(["llama", "qwen2", "mistral"]),
    heads=st.sampled_from([1, 2, 4, 6]),
    head_dim=st.sampled_from([8, 16, 32]),
    bias=st.booleans(),
    rope_selection=st.sampled_from(["attention", "variance"]),
    subspace=st.sampled_from(["attention", "variance"]),
    seed=st.integers(0, 1000),
)
def test_mqa_full_rank_fold_one_reproduces_the_original_logits(family, heads, head_dim, bias, rope_selection, subspace, seed):
    """MQA source, qk_rope_head_dim = head_dim, fold 1, full rank: every step is exact (rel. error < 1e-5, fp32)."""
    model = tiny_model(family, heads=heads, kv_heads=1, head_dim=head_dim, bias=bias, seed=seed)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(seed))
    ref = model(ids).logits
    config = MLAConfig(kv_lora_rank=head_dim, qk_rope_head_dim=head_dim, freqfold=1,
                       rope_selection=rope_selection, subspace=subspace)
    convert_to_mla(model, config, calibration(seed=seed), progress=False)
    assert all(isinstance(layer.self_attn, MLAAttention) for layer in model.model.layers)
    assert rel_err(model(ids).logits, ref) < 1e-5


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE of ``x [..., T, n]`` at frequencies ``base^(-2k/n)``, float64."""
    n = x.shape[-1]
    ang = positions.double()[:, None] * base ** (-torch.arange(0, n, 2, dtype=torch.float64) / n)[None]
    cos, sin = ang.cos(), ang.sin()
    re, im = x[..., : n // 2], x[..., n // 2 :]
    return torch.cat([re * cos - im * sin, re * sin + im * cos], dim=-1)


def partial_rope_reference(x, src, w, rotation, base):
    """The partial-RoPE model (RoRoPE + FreqFold + partial RoPE, no low rank), in float64 from source weights.

    ``x [T, D]`` → attention output ``[T, D]``: rope on the first ``d_rope`` rotated key channels at a
    ``d_rope``-dim RoPE of the same base, every other channel position-free, source softmax scale.
    """
    t, d = x.shape[0], src.head_dim
    xt = torch.cat([x, torch.ones(t, 1, dtype=x.dtype)], dim=1)
    k = xt @ augment(w.w_k, w.b_k).T
    v = xt @ augment(w.w_v, w.b_v).T
    q = xt @ augment(w.w_q, w.b_q).T
    kp = k @ rotation.matrix.T
    k_rope = _rope(kp[:, : rotation.rope_dim], torch.arange(t), base)
    k_nope = kp[:, rotation.rope_dim :]
    outs = []
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for h in range(src.num_heads):
        blk = slice((h // src.n_rep) * d, (h // src.n_rep + 1) * d)
        q_h = q[:, h * d : (h + 1) * d]
        q_rope = _rope(q_h @ rotation.rope_inv[blk], torch.arange(t), base)
        s = q_rope @ k_rope.T + q_h @ (k_nope @ rotation.nope_inv[blk].T).T
        p = torch.softmax((s / math.sqrt(d)).masked_fill(~causal, float("-inf")), dim=-1)
        outs.append(p @ v[:, blk])
    out = torch.cat(outs, dim=1) @ w.w_o.T
    return out if w.b_o is None else out + w.b_o


@settings(max_examples=12, deadline=None)
@given(
    heads_kv=st.sampled_from([(4, 2), (6, 3), (8, 2), (4, 4), (6, 2)]),
    head_dim=st.sampled_from([8, 16]),
    rope_div=st.sampled_from([2, 4]),
    fold_mult=st.sampled_from([1, 2]),
    bias=st.booleans(),
    rope_selection=st.sampled_from(["attention", "variance"]),
    seed=st.integers(0, 1000),
)
def test_gqa_full_rank_equals_the_partial_rope_model(heads_kv, head_dim, rope_div, fold_mult, bias, rope_selection, seed):
    """For GQA sources the only change at full rank is partial RoPE: the MLA block equals the float64
    partial-RoPE reference built from the source weights and the same change of basis."""
    heads, kv = heads_kv
    rope_dim = head_dim // rope_div
    fold = rope_div * fold_mult
    if (head_dim // 2) % fold:
        fold = rope_div
    model = tiny_model("llama", heads=heads, kv_heads=kv, head_dim=head_dim, bias=bias, layers=1, seed=seed).double()
    src = check_supported(model)
    attn = model.model.layers[0].self_attn
    w = source_weights(attn)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, src.hidden_size, generator=gen, dtype=torch.float64) * 1.5
    acc = GramAccumulator(src.hidden_size)
    acc.add(torch.randn(4, 32, src.hidden_size, generator=gen, dtype=torch.float64), None, "test")
    sigma = acc.second_moment()
    config = MLAConfig(kv_lora_rank=2 * kv * head_dim - rope_dim, qk_rope_head_dim=rope_dim, freqfold=fold,
                       rope_selection=rope_selection)
    weights = factorize_layer(sigma, src, w, kv_lora_rank=config.kv_lora_rank, rope_dim=rope_dim, fold=fold,
                              rope_selection=rope_selection)
    block = build_mla_block(mla_geometry(src, config), 0, model.config, weights.tensors, dtype=torch.float64)
    cos_sin = model.model.rotary_emb(x[None], torch.arange(16)[None])
    out = block(x[None], position_embeddings=tuple(c.double() for c in cos_sin), attention_mask=None)[0][0]

    query_gram = merged_query_gram(sigma, src, w) if rope_selection == "attention" else None
    rotation = rope_rotation(gram_of(augment(w.w_k, w.b_k), sigma), kv, head_dim, rope_dim, fold, 0.01, query_gram)
    ref = partial_rope_reference(x, src, w, rotation, model.config.rope_parameters["rope_theta"])
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_conversion_runs_generates_and_reports(family, ids):
    model = tiny_model(family, heads=4, kv_heads=2, head_dim=16, bias=family == "qwen2")
    report = convert_to_mla(model, MLAConfig(kv_lora_rank=24, qk_rope_head_dim=8), calibration(), progress=False)
    assert len(report.layers) == 2
    assert report.kv_before == 2 * (2 * 2 * 16) and report.kv_after == 2 * (24 + 8)
    assert math.isclose(report.compression, 1 - 32 / 64)
    for row in report.layers:
        assert 0 < row.rope_energy <= 1 and 0 < row.latent_energy < 1 and row.alpha > 0
        assert row.calibration_tokens == 3 * 4 * 24
    text = str(report)
    assert "latent energy" in text and "128 → 64" in text
    out = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 11)
    assert model.config.transmla["geometry"]["kv_lora_rank"] == 24


def test_cached_generation_equals_uncached_greedy(ids):
    model = tiny_model("llama")
    convert_to_mla(model, MLAConfig(kv_lora_rank=20, qk_rope_head_dim=8), calibration(), progress=False)
    cached = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, use_cache=True)
    plain = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_save_pretrained_and_reload_gives_the_same_logits(tmp_path, ids):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model("qwen2", bias=True)
    convert_to_mla(model, MLAConfig(kv_lora_rank=30, qk_rope_head_dim=8, q_lora_rank=40), calibration(), progress=False)
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.transmla["geometry"]["q_lora_rank"] == 40
    fresh = apply_mla_structure(AutoModelForCausalLM.from_config(config)).eval()
    state = load_file(tmp_path / "model.safetensors")
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # tied lm_head is not stored twice
    fresh.tie_weights()
    assert torch.equal(fresh(ids).logits, ref)


def test_padding_is_masked_out_of_every_statistic():
    """Right-padded positions filled with different garbage give bit-identical conversions."""
    base = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, 12:] = 0
    mask[2, 5:] = 0
    other = ids.clone()
    other[mask == 0] = torch.randint(0, VOCAB, (int((mask == 0).sum()),), generator=g)
    models = []
    for tokens in (ids, other):
        m = copy.deepcopy(base)
        convert_to_mla(m, MLAConfig(kv_lora_rank=20, qk_rope_head_dim=8),
                       [{"input_ids": tokens, "attention_mask": mask}], progress=False)
        models.append(m.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_conversion_is_deterministic_and_both_activation_modes_agree():
    base = tiny_model("llama", layers=3)
    states = []
    for keep in (False, False, True):
        m = copy.deepcopy(base)
        convert_to_mla(m, MLAConfig(kv_lora_rank=20, qk_rope_head_dim=8), calibration(), keep_activations=keep,
                       progress=False)
        states.append(m.state_dict())
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])


def test_converted_calibration_differs_from_original_calibration():
    """Layer k > 0 sees converted earlier layers in 'converted' mode; layer 0 sees the same input either way."""
    base = tiny_model("llama", layers=2)
    out = {}
    for mode in ("converted", "original"):
        m = copy.deepcopy(base)
        convert_to_mla(m, MLAConfig(kv_lora_rank=12, qk_rope_head_dim=8, calibration_inputs=mode), calibration(),
                       progress=False)
        out[mode] = m.state_dict()
    l0 = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    l1 = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert torch.equal(out["converted"][l0], out["original"][l0])
    assert not torch.equal(out["converted"][l1], out["original"][l1])


def test_calibration_memory_does_not_hold_activations(monkeypatch):
    """Streaming: no activation of an earlier batch is alive when the next one is folded into the Gram sum."""
    import gc
    import weakref

    seen: list[weakref.ref] = []
    original_add = GramAccumulator.add

    def add(self, x, mask, where):
        gc.collect()
        assert all(r() is None for r in seen), "an earlier batch's activations are still referenced"
        original_add(self, x, mask, where)
        seen.append(weakref.ref(x))

    monkeypatch.setattr(GramAccumulator, "add", add)
    model = tiny_model("llama")
    convert_to_mla(model, MLAConfig(kv_lora_rank=12, qk_rope_head_dim=8), calibration(batches=5), progress=False)
    assert len(seen) == 2 * 5  # one fold per batch per layer


@pytest.mark.parametrize("keep", [False, True])
def test_output_refit_never_increases_the_calibration_output_error(keep):
    """The refit minimises ‖y − W a‖² + λ‖W − W_O‖², and W_O itself is feasible: on the calibration inputs the
    refitted block's output error cannot exceed that of the unrefitted one."""
    base = tiny_model("llama", heads=8, kv_heads=2, head_dim=16, layers=1)
    calib = calibration(batches=4)
    x = [base.model.layers[0].input_layernorm(base.model.embed_tokens(ids)) for ids in calib]
    pos = base.model.rotary_emb(x[0], torch.arange(x[0].shape[1])[None])
    original = base.model.layers[0].self_attn
    targets = [original(hidden_states=xi, position_embeddings=pos, attention_mask=None)[0] for xi in x]
    errors = {}
    for refit in (False, True):
        m = copy.deepcopy(base)
        convert_to_mla(m, MLAConfig(kv_lora_rank=10, qk_rope_head_dim=8, refit_output=refit), calib,
                       keep_activations=keep, progress=False)
        block = m.model.layers[0].self_attn
        with torch.no_grad():
            errors[refit] = sum(
                float((block(hidden_states=xi, position_embeddings=pos, attention_mask=None)[0] - t).pow(2).sum())
                for xi, t in zip(x, targets)
            )
    assert errors[True] < errors[False]
