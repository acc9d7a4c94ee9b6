"""The conversion's mathematics: tensors in, tensors out, no modules, everything in float64.

Notation of ``../shared/design/method.md``: hidden size ``D``, ``H`` query heads, ``G`` KV heads, head dim ``d``,
``d_rope`` kept rope channels, ``c = d / d_rope``, fold ``M``, latent rank ``r``. Every statistic enters as the
uncentred second moment ``Σ = E[x̃ x̃ᵀ]`` of the augmented attention input ``x̃ = [x; 1]`` (``[D+1, D+1]``):
every quantity the method needs is a linear map of ``x̃`` (biases are the last column of an augmented weight),
so its Gram matrix is ``W̃ Σ W̃ᵀ`` and one running sum per layer suffices.

Steps (each a function below):
1. GQA merge: the keys of the ``G`` groups form one ``G·d`` latent; head ``h`` reads block ``g(h) = h // n_rep``.
2. RoRoPE + FreqFold (`rope_rotation`): one change of basis ``A`` (``[G·d, G·d]``) built per group of ``M``
   frequencies, applied identically to the real and imaginary halves (orthogonal PCA of the keys in the
   reference's recipe; by default chosen by score energy, with queries moving by ``A⁻ᵀ``). Its first ``d_rope``
   rows are the kept rope channels (half layout); the rest become position-free.
3. BKV + joint low-rank PCA (`joint_latent`): the latent of ``[k_nope/α ; v]``.
4. Query absorption and the softmax-scale fold (`query_weights`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .architectures import SourceAttention, SourceWeights


# ---------------------------------------------------------------------------------------------- helpers
def augment(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[out, D]`` weight and optional ``[out]`` bias → augmented ``[out, D+1]`` acting on ``[x; 1]``."""
    col = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    if bias is not None:
        col = bias.reshape(-1, 1).to(weight)
    return torch.cat([weight, col], dim=1)


def gram_of(aug_weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Second moment ``E[(W̃x̃)(W̃x̃)ᵀ] = W̃ Σ W̃ᵀ`` of a linear map's outputs, ``[out, out]``."""
    return aug_weight @ sigma @ aug_weight.T


def sorted_eigh(matrix: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric PSD matrix, eigenvalues descending, with a deterministic sign per vector.

    ``damping`` (fraction of the mean diagonal) is added to the diagonal first, so that directions without
    calibration energy get a well-defined, arbitrary-but-deterministic basis.
    """
    m = 0.5 * (matrix + matrix.T)
    n = m.shape[0]
    if n == 0:
        return m.new_zeros(0), m.new_zeros(0, 0)
    scale = float(m.diagonal().mean().clamp_min(0.0))
    if damping > 0 and scale > 0:
        m = m + damping * scale * torch.eye(n, dtype=m.dtype, device=m.device)
    vals, vecs = torch.linalg.eigh(m)
    order = torch.argsort(vals, descending=True, stable=True)
    vals, vecs = vals[order], vecs[:, order]
    # Make the largest-magnitude entry of each eigenvector positive: conversion is then reproducible
    # across LAPACK builds and devices, not only across runs.
    pivot = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[pivot, torch.arange(n, device=vecs.device)])
    signs[signs == 0] = 1
    return vals, vecs * signs


def psd_sqrt(matrix: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M^{1/2}, M^{-1/2})`` of a symmetric PSD matrix, damped so the inverse exists."""
    vals, vecs = sorted_eigh(matrix, damping)
    vals = vals.clamp_min(vals.max().clamp_min(1e-300) * 1e-12)
    root = vals.sqrt()
    return (vecs * root) @ vecs.T, (vecs / root) @ vecs.T


def group_block(d: int, g: int) -> slice:
    return slice(g * d, (g + 1) * d)


# ---------------------------------------------------------------------------------------------- RoRoPE
@dataclass(frozen=True)
class RopeRotation:
    """The invertible change of basis of the merged keys, ``k' = A k`` (``A``: ``[G·d, G·d]``).

    Queries move the other way (``q' = A⁻ᵀ q``), so every score ``qᵀk = q'ᵀk'`` is unchanged. ``A`` acts
    identically on the real and imaginary halves of each frequency group and only mixes coordinates of the same
    group, so it commutes with RoPE while frequencies are not mixed (fold 1). Rows ``0 … d_rope-1`` of ``A`` are
    the kept rope channels in half layout (row ``k`` the real and row ``k + d_rope/2`` the imaginary part of rope
    frequency ``k``, i.e. source frequency ``k·c``); the other ``G·d − d_rope`` rows are position-free, as
    (real, imaginary) pairs of consecutive rows. With ``selection="variance"`` ``A`` is orthogonal (the
    reference's RoRoPE).
    """

    matrix: torch.Tensor
    inverse: torch.Tensor
    rope_dim: int
    rope_energy: float  # fraction of the selection criterion's energy held by the rope rows

    @property
    def rope(self) -> torch.Tensor:
        """Rope rows of ``A``, ``[d_rope, G·d]``."""
        return self.matrix[: self.rope_dim]

    @property
    def nope(self) -> torch.Tensor:
        """Position-free rows of ``A``, ``[G·d − d_rope, G·d]``."""
        return self.matrix[self.rope_dim :]

    @property
    def rope_inv(self) -> torch.Tensor:
        """Columns of ``A⁻¹`` that rebuild keys from the rope channels, ``[G·d, d_rope]``."""
        return self.inverse[:, : self.rope_dim]

    @property
    def nope_inv(self) -> torch.Tensor:
        """Columns of ``A⁻¹`` that rebuild keys from the position-free channels, ``[G·d, G·d − d_rope]``."""
        return self.inverse[:, self.rope_dim :]


def frequency_groups(num_kv_heads: int, head_dim: int, fold: int) -> list[tuple[list[int], list[int]]]:
    """For each group of ``fold`` adjacent frequencies: the merged-key indices of its real and imaginary parts.

    Real coordinate of KV head ``g`` at frequency ``j`` is ``g·d + j``; the imaginary one is ``g·d + j + d/2``
    (Hugging Face rotate-half layout). Order inside a group: head-major, then frequency.
    """
    half = head_dim // 2
    groups = []
    for i in range(half // fold):
        freqs = range(i * fold, (i + 1) * fold)
        real = [g * head_dim + j for g in range(num_kv_heads) for j in freqs]
        groups.append((real, [r + half for r in real]))
    return groups


def _group_basis(
    key_gram: torch.Tensor, query_gram: torch.Tensor | None, keep: int, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis ``B`` (``[n, n]``, rows = new coordinates) of one frequency group and each row's criterion energy.

    ``variance``: eigenvectors of the pooled key Gram (orthogonal). ``attention`` (``query_gram`` given): the
    first ``keep`` rows maximise the score energy ``E[(q'_a k'_a)²] = E[q'_a²]·E[k'_a²]`` they carry (eigenvectors
    of ``C_K^{1/2} C_Q C_K^{1/2}``, mapped back through ``C_K^{-1/2}`` and rescaled so ``q'_a`` and ``k'_a`` have
    equal size); the remaining rows are an orthonormal basis of the orthogonal complement of those.
    """
    if query_gram is None:
        vals, vecs = sorted_eigh(key_gram, damping)
        return vecs.T, vals
    root, inv_root = psd_sqrt(key_gram, damping)
    vals, vecs = sorted_eigh(root @ query_gram @ root, damping)
    top = vecs[:, :keep].T @ inv_root  # rows with unit key variance
    top = top * vals[:keep].clamp_min(1e-300).pow(0.25)[:, None]
    # Orthonormal complement of the kept rows' span: eigenvectors of I − Π with eigenvalue 1.
    q, _ = torch.linalg.qr(top.T)
    _, comp = sorted_eigh(torch.eye(top.shape[1], dtype=top.dtype, device=top.device) - q @ q.T, 0.0)
    return torch.cat([top, comp[:, : top.shape[1] - keep].T]), vals


def rope_rotation(
    key_gram: torch.Tensor,
    num_kv_heads: int,
    head_dim: int,
    rope_dim: int,
    fold: int,
    damping: float,
    query_gram: torch.Tensor | None = None,
) -> RopeRotation:
    """RoRoPE with FreqFold: one basis per group of ``fold`` frequencies, shared by real and imaginary halves.

    Args:
        key_gram: ``E[k kᵀ]`` of the merged keys ``k = W̃_K x̃``, ``[G·d, G·d]``.
        fold: ``M``, a multiple of ``c = d / d_rope`` dividing ``d / 2``. With ``M = 1`` (and so ``c = 1``)
            every rotated component keeps its own frequency and the change of basis is exact.
        query_gram: optional ``Σ_h E_hᵀ E[q_h q_hᵀ] E_h`` (``[G·d, G·d]``, queries in merged-key coordinates):
            when given, rope is kept on the components that carry the most score energy rather than key energy.
    """
    gd = num_kv_heads * head_dim
    per = fold // (head_dim // rope_dim)  # kept rope components per frequency group
    matrix = key_gram.new_zeros(gd, gd)
    nope_row = rope_dim
    kept = total = 0.0
    for i, (real, imag) in enumerate(frequency_groups(num_kv_heads, head_dim, fold)):
        pooled_k = key_gram[real][:, real] + key_gram[imag][:, imag]
        pooled_q = None if query_gram is None else query_gram[real][:, real] + query_gram[imag][:, imag]
        basis, energy = _group_basis(pooled_k, pooled_q, per, damping)
        kept += float(energy[:per].clamp_min(0).sum())
        total += float(energy.clamp_min(0).sum())
        for a in range(basis.shape[0]):
            if a < per:
                k = i * per + a  # rope frequency k of the d_rope RoPE == source frequency k·c
                re_row, im_row = k, k + rope_dim // 2
            else:
                re_row, im_row = nope_row, nope_row + 1
                nope_row += 2
            matrix[re_row, real] = basis[a]
            matrix[im_row, imag] = basis[a]
    inverse = torch.linalg.inv(matrix)
    return RopeRotation(matrix, inverse, rope_dim, kept / total if total > 0 else 1.0)


def merged_query_gram(sigma: torch.Tensor, src: SourceAttention, w: SourceWeights) -> torch.Tensor:
    """``Σ_h E_hᵀ E[q_h q_hᵀ] E_h``: the query second moment seen from the merged keys, ``[G·d, G·d]``."""
    d = src.head_dim
    aug_q = augment(w.w_q, w.b_q)
    out = sigma.new_zeros(src.num_kv_heads * d, src.num_kv_heads * d)
    for h in range(src.num_heads):
        blk = group_block(d, h // src.n_rep)
        out[blk, blk] += gram_of(aug_q[h * d : (h + 1) * d], sigma)
    return out


# ---------------------------------------------------------------------------------------------- latent
@dataclass(frozen=True)
class JointLatent:
    """The joint low-rank factorisation of ``z = [k_nope/α ; v]`` (``n_z = G·d − d_rope + G·d`` features).

    ``down``: ``[r, D+1]`` augmented latent projection (``c = down · x̃``);
    ``up``: ``[n_z, r]`` reconstruction (``ẑ = up · c``); ``alpha`` the BKV factor; ``energy`` the fraction of
    (metric-weighted) energy the kept rank holds; ``spectrum`` all eigenvalues, descending.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    energy: float
    spectrum: torch.Tensor


def joint_latent(
    sigma: torch.Tensor,
    aug_k_nope: torch.Tensor,
    aug_v: torch.Tensor,
    rank: int,
    *,
    balance_kv: bool,
    damping: float,
    key_weight: float = 1.0,
    key_metric: torch.Tensor | None = None,
    value_metric: torch.Tensor | None = None,
) -> JointLatent:
    """BKV and the joint PCA of ``[k_nope/α ; v]`` (step 5 and 6 of the method).

    Args:
        sigma: ``Σ = E[x̃ x̃ᵀ]``, ``[D+1, D+1]``.
        aug_k_nope: position-free rotated keys ``A_nope W̃_K``, ``[n_k, D+1]``.
        aug_v: values ``W̃_V``, ``[G·d, D+1]``.
        key_weight: relative weight of key against value reconstruction error (1 keeps BKV's balance).
        key_metric, value_metric: optional PSD metrics (``[n_k, n_k]``, ``[G·d, G·d]``) saying how much an error
            in each direction costs downstream. When given, the kept subspace minimises the metric-weighted
            reconstruction error instead of the plain one; each metric is first normalised so that it leaves
            its block's total energy unchanged, so isotropic metrics reproduce the plain PCA.
    """
    n_k = aug_k_nope.shape[0]
    energy_k = float(gram_of(aug_k_nope, sigma).trace()) if n_k else 0.0
    energy_v = float(gram_of(aug_v, sigma).trace())
    alpha = math.sqrt(energy_k / energy_v) if (balance_kv and n_k and energy_k > 0 and energy_v > 0) else 1.0
    # key_weight scales the keys' share of the PCA objective (1 = the balance BKV sets); exact like BKV itself.
    alpha /= math.sqrt(key_weight)
    aug_z = torch.cat([aug_k_nope / alpha, aug_v])
    gram_z = gram_of(aug_z, sigma)
    if key_metric is None and value_metric is None:
        vals, vecs = sorted_eigh(gram_z, damping)
        down = vecs[:, :rank].T @ aug_z
        up = vecs[:, :rank]
    else:
        blocks = []
        for metric, sl, n in ((key_metric, slice(0, n_k), n_k), (value_metric, slice(n_k, None), aug_v.shape[0])):
            if n == 0:
                continue
            metric = torch.eye(n, dtype=sigma.dtype, device=sigma.device) if metric is None else metric
            g_block = gram_z[sl, sl]
            norm = float((metric * g_block).sum()) / max(float(g_block.trace()), 1e-300)
            blocks.append(metric / norm if norm > 0 else metric)
        metric = torch.block_diag(*blocks)
        root, inv_root = psd_sqrt(metric, damping)
        vals, vecs = sorted_eigh(root @ gram_z @ root, damping)
        down = vecs[:, :rank].T @ root @ aug_z
        up = inv_root @ vecs[:, :rank]
    vals = vals.clamp_min(0)
    energy = float(vals[:rank].sum() / vals.sum()) if float(vals.sum()) > 0 else 1.0
    return JointLatent(down=down, up=up, alpha=alpha, energy=energy, spectrum=vals)


def attention_metrics(
    sigma: torch.Tensor, src: SourceAttention, w: SourceWeights, rotation: RopeRotation
) -> tuple[torch.Tensor, torch.Tensor]:
    """Downstream costs of latent errors: keys weighted by the queries that read them, values by ``o_proj``.

    A key error ``e`` in the rotated position-free coordinates changes head ``h``'s score by
    ``q_hᵀ (A⁻¹)_g(h),nope e``, so its mean squared cost is ``eᵀ (Σ_h (A⁻¹)ᵀ E[q_h q_hᵀ] (A⁻¹)) e``.
    A value error ``e`` (merged ``G·d`` coordinates) moves the output by at most ``Σ_h W_O,h e_g(h)``.
    Returns ``(key_metric [G·d − d_rope, G·d − d_rope], value_metric [G·d, G·d])``.
    """
    d, n_rep = src.head_dim, src.n_rep
    aug_q = augment(w.w_q, w.b_q)
    nope_inv = rotation.nope_inv
    key_metric = sigma.new_zeros(nope_inv.shape[1], nope_inv.shape[1])
    value_metric = sigma.new_zeros(src.num_kv_heads * d, src.num_kv_heads * d)
    for h in range(src.num_heads):
        g = h // n_rep
        q_h = aug_q[h * d : (h + 1) * d]
        back = nope_inv[group_block(d, g)]  # [d, G·d − d_rope]: key error → head h's key
        key_metric += back.T @ gram_of(q_h, sigma) @ back
        o_h = w.w_o[:, h * d : (h + 1) * d]
        value_metric[group_block(d, g), group_block(d, g)] += o_h.T @ o_h
    return key_metric, value_metric


# ---------------------------------------------------------------------------------------------- assembly
@dataclass(frozen=True)
class MLAWeights:
    """Float64 weights of one `MLAAttention` (DeepSeek-V3 names, rope channels in half layout) and its report."""

    tensors: dict[str, torch.Tensor]
    rope_energy: float
    latent_energy: float
    alpha: float


def query_weights(
    src: SourceAttention, w: SourceWeights, rotation: RopeRotation
) -> torch.Tensor:
    """Augmented ``q_proj`` ``[H·(d + d_rope), D+1]``: per head ``[W̃_Q,h ; (A⁻¹)ᵀ_rope,g(h) W̃_Q,h]``, scaled by
    ``sqrt((d + d_rope)/d)`` so DeepSeek's softmax scale ``1/sqrt(d + d_rope)`` reproduces the source's ``1/sqrt(d)``."""
    d = src.head_dim
    aug_q = augment(w.w_q, w.b_q)
    scale = math.sqrt((d + rotation.rope_dim) / d)
    rows = []
    for h in range(src.num_heads):
        q_h = aug_q[h * d : (h + 1) * d]
        rows += [q_h, rotation.rope_inv[group_block(d, h // src.n_rep)].T @ q_h]
    return torch.cat(rows) * scale


def factorize_layer(
    sigma: torch.Tensor,
    src: SourceAttention,
    w: SourceWeights,
    *,
    kv_lora_rank: int,
    rope_dim: int,
    fold: int,
    balance_kv: bool = True,
    key_weight: float = 1.0,
    subspace: str = "attention",
    rope_selection: str = "attention",
    q_lora_rank: int | None = None,
    damping: float = 0.01,
) -> MLAWeights:
    """All steps for one layer: float64 source weights and input Gram → float64 MLA weights.

    Args:
        sigma: ``E[x̃ x̃ᵀ]`` of the layer's attention input, ``[D+1, D+1]``, float64.
    """
    d, g_heads = src.head_dim, src.num_kv_heads
    aug_k = augment(w.w_k, w.b_k)
    aug_v = augment(w.w_v, w.b_v)
    query_gram = merged_query_gram(sigma, src, w) if rope_selection == "attention" else None
    rotation = rope_rotation(gram_of(aug_k, sigma), g_heads, d, rope_dim, fold, damping, query_gram)
    aug_k_nope = rotation.nope @ aug_k
    metrics = attention_metrics(sigma, src, w, rotation) if subspace == "attention" else (None, None)
    latent = joint_latent(
        sigma, aug_k_nope, aug_v, kv_lora_rank, balance_kv=balance_kv, damping=damping, key_weight=key_weight,
        key_metric=metrics[0], value_metric=metrics[1],
    )
    n_k = aug_k_nope.shape[0]
    up_k, up_v = latent.up[:n_k] * latent.alpha, latent.up[n_k:]

    # kv_b_proj: per head rows [k_nope,h (d) ; v_h (d)], k_nope,h = (A⁻¹)_g(h),nope up_k c, v_h = up_v[g(h)] c.
    kv_b = []
    for h in range(src.num_heads):
        blk = group_block(d, h // src.n_rep)
        kv_b += [rotation.nope_inv[blk] @ up_k, up_v[blk]]
    kv_b = torch.cat(kv_b)

    kv_a = torch.cat([latent.down, rotation.rope @ aug_k])  # [r + d_rope, D+1]
    q = query_weights(src, w, rotation)
    tensors: dict[str, torch.Tensor] = {
        "kv_a_proj_with_mqa.weight": kv_a[:, :-1],
        "kv_b_proj.weight": kv_b,
        "o_proj.weight": w.w_o,
    }
    if src.k_bias or src.v_bias:
        tensors["kv_a_proj_with_mqa.bias"] = kv_a[:, -1]
    if src.o_bias:
        tensors["o_proj.bias"] = w.b_o
    if q_lora_rank is None:
        tensors["q_proj.weight"] = q[:, :-1]
        if src.q_bias:
            tensors["q_proj.bias"] = q[:, -1]
    else:
        _, s = sorted_eigh(gram_of(q, sigma), damping)
        s = s[:, :q_lora_rank]
        q_a = s.T @ q
        tensors["q_a_proj.weight"] = q_a[:, :-1]
        if src.q_bias:
            tensors["q_a_proj.bias"] = q_a[:, -1]
        tensors["q_b_proj.weight"] = s
    return MLAWeights(tensors, rotation.rope_energy, latent.energy, latent.alpha)


def least_squares_map(
    inputs: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, *, bias: bool, ridge: float
) -> torch.Tensor:
    """Solve ``min_W Σ ‖y − W ã‖² + λ‖W − W₀‖²`` from running sums ``Σ ã ãᵀ`` (``[n+1, n+1]``) and
    ``Σ y ãᵀ`` (``[m, n+1]``).

    The ridge pulls towards the prior ``W₀`` (``[m, n+1]`` with bias, else ``[m, n]``) rather than towards zero,
    so directions the calibration data does not determine keep their prior value, and an exact fit
    (``y = W₀ ã``) returns ``W₀`` for any ``λ``. ``λ`` is ``ridge`` times the mean diagonal of ``Σ ã ãᵀ``.
    Returns ``[m, n+1]`` (last column the bias) when ``bias``, else ``[m, n]`` fitted without an intercept.
    """
    if not bias:
        inputs, cross = inputs[:-1, :-1], cross[:, :-1]
    n = inputs.shape[0]
    lam = ridge * float(inputs.diagonal().mean().clamp_min(1e-300))
    a = inputs + lam * torch.eye(n, dtype=inputs.dtype, device=inputs.device)
    return torch.linalg.solve(a, (cross + lam * prior).T).T  # a is symmetric
