"""Exactness of the factorisation's exact steps, property-tested over random geometries in float64."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transmla_surgery.architectures import SourceAttention, SourceWeights
from transmla_surgery.factorize import augment, gram_of, joint_latent, merged_query_gram, rope_rotation, sorted_eigh

SETTINGS = settings(max_examples=25, deadline=None)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """``[T, d/2]`` angles ``t·θ_j`` with ``θ_j = base^(-2j/d)``."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return positions.double()[:, None] * inv[None]


def rope_half(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x [T, d]`` by per-pair ``angles [T, d/2]``."""
    half = x.shape[-1] // 2
    cos, sin = angles.cos(), angles.sin()
    re, im = x[..., :half], x[..., half:]
    return torch.cat([re * cos - im * sin, re * sin + im * cos], dim=-1)


@st.composite
def geometries(draw):
    g = draw(st.sampled_from([1, 2, 3, 4]))
    n_rep = draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([4, 8, 16]))
    hidden = draw(st.sampled_from([12, 24, 40]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 10_000))
    return g, n_rep, d, hidden, bias, seed


def random_source(g, n_rep, d, hidden, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    h = g * n_rep

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    src = SourceAttention(hidden, h, g, d, bias, bias, bias, False)
    w = SourceWeights(r(h * d, hidden), r(g * d, hidden), r(g * d, hidden), r(hidden, h * d),
                      r(h * d) if bias else None, r(g * d) if bias else None, r(g * d) if bias else None, None)
    x = r(64, hidden) * torch.linspace(0.2, 3.0, hidden, dtype=torch.float64)  # anisotropic inputs
    aug_x = torch.cat([x, torch.ones(64, 1, dtype=torch.float64)], dim=1)
    sigma = aug_x.T @ aug_x / 64
    return src, w, x, sigma


@SETTINGS
@given(geometries(), st.sampled_from(["variance", "attention"]))
def test_rorope_rotation_leaves_scores_unchanged(geom, selection):
    """With fold 1 every rotated component keeps its own frequency: RoPE scores are exactly the source's,
    for the reference's orthogonal RoRoPE and for the score-energy (non-orthogonal) selection alike."""
    g, n_rep, d, hidden, bias, seed = geom
    src, w, x, sigma = random_source(*geom)
    aug_k = augment(w.w_k, w.b_k)
    query_gram = merged_query_gram(sigma, src, w) if selection == "attention" else None
    rotation = rope_rotation(gram_of(aug_k, sigma), g, d, rope_dim=d, fold=1, damping=0.01, query_gram=query_gram)
    p = rotation.matrix
    eye = torch.eye(g * d, dtype=torch.float64)
    assert torch.allclose(p @ rotation.inverse, eye, atol=1e-9)
    if selection == "variance":
        assert torch.allclose(p @ p.T, eye, atol=1e-12)

    t = x.shape[0]
    angles = rope_angles(torch.arange(t), d)
    aug_x = torch.cat([x, torch.ones(t, 1, dtype=torch.float64)], dim=1)
    k = aug_x @ aug_k.T  # [T, G·d]
    q = aug_x @ augment(w.w_q, w.b_q).T  # [T, H·d]
    # Each row of P lives on one frequency j (fold 1); its pair partner is the matching imaginary row.
    half = d // 2
    support = p.abs().argmax(dim=1) % d
    pairs = [(i, i + d // 2) for i in range(d // 2)]  # rope rows
    pairs += [(d + 2 * m, d + 2 * m + 1) for m in range((g * d - d) // 2)]  # position-free rows
    for h in range(src.num_heads):
        blk = slice((h // n_rep) * d, (h // n_rep + 1) * d)
        ref = rope_half(q[:, h * d : (h + 1) * d], angles) @ rope_half(k[:, blk], angles).T
        qr, kr = q[:, h * d : (h + 1) * d] @ rotation.inverse[blk], k @ p.T  # q' = A⁻ᵀq, k' = Ak, [T, G·d]
        scores = torch.zeros_like(ref)
        for re, im in pairs:
            j = int(support[re])
            assert j < half and int(support[im]) == j + half
            a = angles[:, j]
            qre, qim = qr[:, re] * a.cos() - qr[:, im] * a.sin(), qr[:, re] * a.sin() + qr[:, im] * a.cos()
            kre, kim = kr[:, re] * a.cos() - kr[:, im] * a.sin(), kr[:, re] * a.sin() + kr[:, im] * a.cos()
            scores += qre[:, None] * kre[None] + qim[:, None] * kim[None]
        assert torch.allclose(scores, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


@SETTINGS
@given(geometries(), st.sampled_from(["variance", "attention"]), st.booleans())
def test_bkv_and_full_rank_joint_latent_are_exact(geom, subspace, balance):
    """At full rank the latent reconstructs k_nope and v exactly, whatever α and metric."""
    g, n_rep, d, hidden, bias, seed = geom
    src, w, x, sigma = random_source(*geom)
    aug_k, aug_v = augment(w.w_k, w.b_k), augment(w.w_v, w.b_v)
    rotation = rope_rotation(gram_of(aug_k, sigma), g, d, rope_dim=2, fold=d // 2, damping=0.01)
    aug_k_nope = rotation.nope @ aug_k
    n_k = aug_k_nope.shape[0]
    metrics = {}
    if subspace == "attention":
        gen = torch.Generator().manual_seed(seed + 1)
        a = torch.randn(n_k, n_k, generator=gen, dtype=torch.float64)
        b = torch.randn(g * d, g * d, generator=gen, dtype=torch.float64)
        metrics = dict(key_metric=a @ a.T, value_metric=b @ b.T)
    full = n_k + g * d
    lat = joint_latent(sigma, aug_k_nope, aug_v, full, balance_kv=balance, damping=0.01, **metrics)
    recon = lat.up @ lat.down
    assert torch.allclose(recon[:n_k] * lat.alpha, aug_k_nope, atol=1e-8 * float(aug_k_nope.abs().max()))
    assert torch.allclose(recon[n_k:], aug_v, atol=1e-8 * float(aug_v.abs().max()))
    if balance:
        rms_k = math.sqrt(float(gram_of(aug_k_nope, sigma).trace()))
        rms_v = math.sqrt(float(gram_of(aug_v, sigma).trace()))
        assert math.isclose(lat.alpha, rms_k / rms_v, rel_tol=1e-12)
    else:
        assert lat.alpha == 1.0


def test_latent_is_ordered_by_energy_so_truncation_is_the_smaller_rank():
    src, w, x, sigma = random_source(2, 2, 8, 24, False, 3)
    aug_k, aug_v = augment(w.w_k, w.b_k), augment(w.w_v, w.b_v)
    rotation = rope_rotation(gram_of(aug_k, sigma), 2, 8, rope_dim=4, fold=2, damping=0.01)
    nope = rotation.nope @ aug_k
    big = joint_latent(sigma, nope, aug_v, 12, balance_kv=True, damping=0.01)
    small = joint_latent(sigma, nope, aug_v, 5, balance_kv=True, damping=0.01)
    assert torch.allclose(big.down[:5], small.down) and torch.allclose(big.up[:, :5], small.up)
    assert big.energy > small.energy and torch.all(big.spectrum[:-1] >= big.spectrum[1:])


def test_sorted_eigh_is_descending_and_sign_deterministic():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    m = a @ a.T
    vals, vecs = sorted_eigh(m, 0.0)
    assert torch.all(vals[:-1] >= vals[1:])
    assert torch.allclose(vecs @ torch.diag(vals) @ vecs.T, m, atol=1e-10)
    vals2, vecs2 = sorted_eigh(m.clone(), 0.0)
    assert torch.equal(vecs, vecs2)
    pivot = vecs.abs().argmax(dim=0)
    assert torch.all(vecs[pivot, torch.arange(10)] > 0)
