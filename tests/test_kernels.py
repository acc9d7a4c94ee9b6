"""The Triton absorbed-decode kernel, run by Triton's CPU interpreter (``TRITON_INTERPRET=1``), against the
float64 PyTorch reference. Small shapes; skipped when triton is not installed.

The interpreter computes bfloat16 ``tl.dot`` wrongly (Triton 3.6), so bf16 is left to ``bench/decode.py`` on
the GPU; float32 and float16 are checked here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the kernel runs in Triton's interpreter. Triton decorates its own library functions (tl.max,
# tl.sum, ...) when it is first imported, compiled or interpreted by the variable at that moment; importing
# transformers' models imports triton. If another test module did that first, this file's tests run in a
# fresh child process instead (`test_kernels_in_a_fresh_interpreter`).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IN_PROCESS = DEVICE == "cuda" or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
if DEVICE == "cpu" and IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
in_process = pytest.mark.skipif(not IN_PROCESS, reason="run in a child process by test_kernels_in_a_fresh_interpreter")


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-x"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

from transmla_surgery.kernels import decode_attention_reference, set_decode_backend  # noqa: E402
from transmla_surgery.kernels.mla_decode import KernelConfig, choose_num_splits, decode_attention_triton  # noqa: E402

SMALL = KernelConfig(block_n=16, block_h=16, num_warps=4, num_stages=1)
# two pipeline stages with a tile loop of several iterations: the configuration family of the GPU default
SMALL_2 = KernelConfig(block_n=16, block_h=16, num_warps=4, num_stages=2)
CONFIGS = [SMALL, SMALL_2]
CONFIG_IDS = ["one_stage", "two_stages"]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _inputs(b, t, h, r, dr, s, dtype, seed=0):
    """Random queries and one ``[B, S, r + d_rope]`` buffer whose two column ranges are the latent and rope key."""
    g = torch.Generator().manual_seed(seed)
    q_lat = torch.randn(b, t, h, r, generator=g).to(DEVICE, dtype)
    q_rope = torch.randn(b, t, h, dr, generator=g).to(DEVICE, dtype)
    buf = torch.randn(b, s, r + dr, generator=g).to(DEVICE, dtype)
    return q_lat, q_rope, buf[..., :r], buf[..., r:], buf


def _ref(q_lat, q_rope, lat, kr, scale, mask=None):
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask.double()).cpu()
    args = (x.detach().cpu().double() for x in (q_lat, q_rope, lat, kr))
    return decode_attention_reference(*args, scale, m)


def _err(out, ref) -> float:
    assert torch.isfinite(out).all(), "non-finite output (an element not written, or a poisoned value read)"
    return float((out.cpu().double() - ref).norm() / ref.norm())


@in_process
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3, None])
def test_single_token_no_mask(dtype, splits, cfg):
    q_lat, q_rope, lat, kr, _ = _inputs(2, 1, 4, 32, 16, 45, dtype)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.15, num_splits=splits, config=cfg)
    assert _err(out, _ref(q_lat, q_rope, lat, kr, 0.15)) < TOL[dtype]


@in_process
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_several_tokens_causal_odd_sizes(cfg):
    """T = 3 query tokens (causal, aligned at the end), 5 heads (15 rows: a partial head block), r = 24 and
    d_rope = 8 (not powers of two: padded blocks with masked channels)."""
    q_lat, q_rope, lat, kr, _ = _inputs(2, 3, 5, 24, 8, 37, torch.float32, seed=1)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.2, num_splits=2, config=cfg)
    assert _err(out, _ref(q_lat, q_rope, lat, kr, 0.2)) < 1e-5


@in_process
def test_many_heads_span_several_head_blocks():
    q_lat, q_rope, lat, kr, _ = _inputs(1, 1, 20, 32, 16, 40, torch.float32, seed=2)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, num_splits=2, config=SMALL)
    assert _err(out, _ref(q_lat, q_rope, lat, kr, 0.1)) < 1e-5


@in_process
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("t", [1, 2], ids=["one_token", "two_tokens"])
def test_padding_masks(kind, cfg, t):
    """Left padding and holes, per batch row and query token; masks broadcast over heads."""
    b, s = 3, 41
    q_lat, q_rope, lat, kr, _ = _inputs(b, t, 4, 32, 16, s, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    keep = torch.rand(b, t, s, generator=g) > 0.3
    keep[0, :, :9] = False  # left padding
    keep[..., -1] = True  # every row sees at least one key
    mask = keep if kind == "bool" else torch.zeros(b, t, s).masked_fill(~keep, torch.finfo(torch.float32).min)
    mask = mask.to(DEVICE)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, mask, num_splits=3, config=cfg)
    assert _err(out, _ref(q_lat, q_rope, lat, kr, 0.1, mask)) < 1e-5


@in_process
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("per_row", [False, True], ids=["one_length", "per_row_lengths"])
def test_length_bound_never_reads_past_the_filled_part(cfg, per_row):
    """A static cache: positions at and past each row's filled length hold NaN and are masked; the kernel,
    bounded by the length tensor (one for all rows, or one per row), must not read them (0 · NaN would poison
    the output)."""
    b, s = 2, 64
    filled = torch.tensor([37, 37] if per_row else 37, device=DEVICE)
    q_lat, q_rope, lat, kr, buf = _inputs(b, 1, 4, 32, 16, s, torch.float32, seed=5)
    buf[:, 37:] = float("nan")
    mask = torch.zeros(b, 1, s, dtype=torch.bool, device=DEVICE)
    mask[:, :, :37] = True
    mask[1, :, :5] = False
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, mask, filled, num_splits=4, config=cfg)
    ref = _ref(q_lat, q_rope, lat[:, :37], kr[:, :37], 0.1, mask[..., :37])
    assert _err(out, ref) < 1e-5


@in_process
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_decode_masks_read_only_where_rows_are_not_left_padding(cfg, monkeypatch):
    """One query token and a bool mask, as `generate` passes them: a launch classifies each row (left padding up
    to its first attended position, or anything else) and the left-padded rows run without reading the mask.
    Rows: left padding, none, holes after the padding, nothing attended, padding past the length; the result is
    the reference's either way."""
    launches = _spy_launches(monkeypatch)
    b, s = 5, 90
    q_lat, q_rope, lat, kr, buf = _inputs(b, 1, 4, 32, 16, s, torch.float32, seed=21)
    filled = torch.tensor([80, 90, 70, 60, 50], device=DEVICE)
    keep = torch.arange(s)[None, :] < filled.cpu()[:, None]
    keep[0, :37] = False  # left padding, more than two 16-token tiles
    keep[2, :5] = False
    keep[2, 40:44] = False  # a hole: this row needs its mask
    keep[3] = False  # nothing attended (zeros)
    keep[4, :50] = False  # padding up to the length: nothing attended either
    buf[1, 90:] = 0.0
    for row, n in enumerate(filled.tolist()):
        buf[row, n:] = float("nan")  # past each row's length: never read
    mask = keep[:, None, :].to(DEVICE)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, mask, filled, num_splits=3, config=cfg)
    ref = _ref(q_lat, q_rope, lat.nan_to_num(), kr.nan_to_num(), 0.1, mask)
    assert _err(out[:3], ref[:3]) < 1e-5
    assert torch.count_nonzero(out[3:]) == 0
    classify = [grid for stage, grid, _ in launches if stage == 0]
    passes = [(kw["PREFIX"], kw["MASK_MODE"]) for stage, _, kw in launches if stage == 1]
    assert classify == [(b,)] and passes == [(1, 3), (2, 1)]


@in_process
def test_fully_masked_rows_give_zeros():
    q_lat, q_rope, lat, kr, _ = _inputs(2, 1, 4, 32, 16, 20, torch.float32, seed=6)
    mask = torch.ones(2, 1, 20, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, mask, num_splits=2, config=SMALL)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    assert _err(out[:1], _ref(q_lat[:1], q_rope[:1], lat[:1], kr[:1], 0.1)) < 1e-5


def _spy_launches(monkeypatch):
    """Wrap both kernels so each launch records ``(stage, grid, kwargs)``; returns the list."""
    from transmla_surgery.kernels import mla_decode as md

    real = md._kernels(md._interpreting())
    launches = []

    class Spy:
        def __init__(self, stage, kernel):
            self.stage, self.kernel = stage, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.stage, grid, dict(kwargs)))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(md, "_kernels", lambda interpret: (Spy(1, real[0]), Spy(2, real[1]), Spy(0, real[2])))
    return launches


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_splits_merged_in_chunks(dtype, monkeypatch):
    """37 splits: stage 2 merges them 16 at a time (two whole chunks and a partial one of 5, masked past the
    split count); the last split is a partial tile. Two query tokens (rows of different causal limits)."""
    launches = _spy_launches(monkeypatch)
    q_lat, q_rope, lat, kr, _ = _inputs(1, 2, 3, 32, 16, 590, dtype, seed=12)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, num_splits=37, config=SMALL)
    assert [(st, grid) for st, grid, _ in launches] == [(1, (1, 37, 1)), (2, (6, 1))]
    assert (launches[1][2]["BLOCK_S"], launches[1][2]["CHUNK_S"]) == (64, 16)
    assert _err(out, _ref(q_lat, q_rope, lat, kr, 0.1)) < TOL[dtype]


@in_process
def test_many_splits_with_empty_splits_and_fully_masked_rows():
    """37 splits, most of them without a visible key (log-sum-exp -inf), among them whole 16-split chunks; batch
    row 1's second query token sees no key at all (zeros), batch row 0 only a few keys in splits 3 and 30."""
    b, t, s = 2, 2, 590
    q_lat, q_rope, lat, kr, _ = _inputs(b, t, 4, 32, 16, s, torch.float32, seed=13)
    keep = torch.zeros(b, t, s, dtype=torch.bool)
    keep[0, :, 50:53] = True  # split 3
    keep[0, 1, 485] = True  # split 30: only the second token
    keep[1, 0, ::7] = True
    mask = keep.to(DEVICE)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, mask, num_splits=37, config=SMALL)
    assert torch.equal(out[1, 1].cpu(), torch.zeros_like(out[1, 1].cpu()))
    ref = _ref(q_lat, q_rope, lat, kr, 0.1, mask)
    assert _err(out[0], ref[0]) < 1e-5
    assert _err(out[1, :1], ref[1, :1]) < 1e-5


@in_process
def test_pdl_is_off_in_the_interpreter(monkeypatch):
    """`pdl=True` on the CPU: the interpreter cannot run `griddepcontrol`, so both kernels get PDL=False and no
    `launch_pdl`; the result is unchanged."""
    launches = _spy_launches(monkeypatch)
    q_lat, q_rope, lat, kr, _ = _inputs(1, 1, 4, 32, 16, 40, torch.float32, seed=14)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, num_splits=2,
                                  config=KernelConfig(block_n=16, block_h=16, num_stages=1, pdl=True))
    assert [st for st, _, _ in launches] == [1, 2]
    for _, _, kwargs in launches:
        assert kwargs["PDL"] is False and "launch_pdl" not in kwargs
    assert _err(out, _ref(q_lat, q_rope, lat, kr, 0.1)) < 1e-5


@in_process
def test_choose_num_splits_fills_the_machine():
    # few programs: split the sequence; many: one split; never more splits than tiles
    assert choose_num_splits(batch=1, head_blocks=1, seq_len=8192, block_n=32, slots=132) > 16
    assert choose_num_splits(batch=264, head_blocks=1, seq_len=8192, block_n=32, slots=132) == 1
    assert choose_num_splits(batch=1, head_blocks=1, seq_len=40, block_n=32, slots=132) <= 2


def _tiny_converted(length: int, pad_row: int, pads: int, seed: int):
    """A tiny converted Llama on the test device, two random sequences of ``length`` tokens (``pads`` of them
    left padding in row ``pad_row``) and the name of the forward's cache argument."""
    import inspect

    from transformers import LlamaForCausalLM

    from conftest import calibration, tiny_model
    from transmla_surgery import MLAConfig, convert_to_mla

    model = tiny_model()
    convert_to_mla(model, MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8), calibration(1, 2, 16), progress=False)
    model.to(DEVICE)
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[pad_row, :pads] = 0
    cache_kw = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    return model, ids, mask, cache_kw


def _each_backend_with_small_tiles():
    """Yields ``"torch"`` then ``"triton"``, each set as the decode backend, with small default tiles (fast in the
    interpreter); restores both afterwards."""
    from transmla_surgery.kernels import mla_decode

    old = mla_decode.DEFAULT_CONFIG
    mla_decode.DEFAULT_CONFIG = SMALL
    try:
        for backend in ("torch", "triton"):
            set_decode_backend(backend)
            yield backend
    finally:
        set_decode_backend("auto")
        mla_decode.DEFAULT_CONFIG = old


@in_process
def test_triton_backend_inside_a_converted_model():
    """A decode step of a tiny converted model with the kernel (interpreted) equals the PyTorch path."""
    from transformers import DynamicCache

    from conftest import rel_err

    model, ids, mask, cache_kw = _tiny_converted(length=12, pad_row=0, pads=3, seed=8)
    logits = {}
    for backend in _each_backend_with_small_tiles():
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids[:, :11], attention_mask=mask[:, :11], use_cache=True, **{cache_kw: cache})
            step = model(input_ids=ids[:, 11:], attention_mask=mask, use_cache=True, **{cache_kw: cache})
            logits[backend] = step.logits
    assert rel_err(logits["triton"], logits["torch"]) < 1e-5


@in_process
def test_out_of_shared_memory_falls_back_one_stage_at_a_time(monkeypatch):
    """The default's third stage needs ~221 KiB of shared memory (Hopper); a GPU with less must get the same tiles
    with two stages, not jump to the small fallback tiles."""
    from triton.runtime.errors import OutOfResources

    from transmla_surgery.kernels import mla_decode as md

    real = md._kernels(md._interpreting())
    launched = []

    class Limited:  # a stage-1 kernel whose launches need more than 2 stages' worth of shared memory fail
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((kwargs["BLOCK_N"], kwargs["num_stages"]))
                if kwargs["num_stages"] > 2:
                    raise OutOfResources(232448, 232448, "shared memory")
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(md, "_kernels", lambda interpret: (Limited(real[0]), *real[1:]))
    q_lat, q_rope, lat, kr, _ = _inputs(1, 1, 4, 32, 16, 70, torch.float16, seed=8)
    cfg = KernelConfig(block_n=32, block_h=16, num_warps=4, num_stages=4)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, num_splits=2, config=cfg)
    assert launched == [(32, 4), (32, 3), (32, 2)]
    assert _err(out, _ref(q_lat, q_rope, lat, kr, 0.1)) < TOL[torch.float16]


@in_process
def test_out_of_resources_everywhere_raises_with_pdl(monkeypatch):
    """The fallback keeps `pdl` (it needs no resources) and still ends at the small tiles: when even those fail,
    the error is raised instead of recursing forever."""
    from triton.runtime.errors import OutOfResources

    from transmla_surgery.kernels import mla_decode as md

    real = md._kernels(md._interpreting())
    launched = []

    class Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((kwargs["BLOCK_N"], kwargs["num_stages"]))
                raise OutOfResources(232448, 232448, "shared memory")
            return launch

    monkeypatch.setattr(md, "_kernels", lambda interpret: (Failing(), *real[1:]))
    q_lat, q_rope, lat, kr, _ = _inputs(1, 1, 4, 32, 16, 70, torch.float16, seed=15)
    with pytest.raises(OutOfResources):
        decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, num_splits=2,
                                config=KernelConfig(block_n=32, num_stages=3, pdl=True))
    assert launched == [(32, 3), (32, 2), (md.SAFE_CONFIG.block_n, md.SAFE_CONFIG.num_stages)]


@in_process
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_strided_query_views_are_read_in_place(cfg):
    """Queries that are column slices of wider tensors (row stride != width): the kernel reads both parts through
    their own strides (no concatenated copy) and must not mix their rows up."""
    b, t, h, r, dr, s = 2, 2, 3, 32, 16, 33
    g = torch.Generator().manual_seed(9)
    wide_l = torch.randn(b, t, h, r + 5, generator=g).to(DEVICE)
    wide_r = torch.randn(b, t, h, dr + 3, generator=g).to(DEVICE)
    q_lat, q_rope = wide_l[..., 2:2 + r], wide_r[..., :dr]
    _, _, lat, kr, _ = _inputs(b, t, h, r, dr, s, torch.float32, seed=10)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, num_splits=2, config=cfg)
    assert _err(out, _ref(q_lat, q_rope, lat, kr, 0.1)) < 1e-5


@in_process
def test_custom_op_fake_matches_the_kernel():
    """The `torch.compile` route (`transmla::mla_decode`): its fake implementation must give the real output's
    shape, dtype and strides (head-major storage), or inductor would plan the wrong layout."""
    from transmla_surgery.kernels.mla_decode import mla_decode_op

    if mla_decode_op is None:
        pytest.skip("torch.library.custom_op unavailable")
    q_lat, q_rope, lat, kr, _ = _inputs(2, 1, 4, 32, 16, 24, torch.float32, seed=11)
    torch.library.opcheck(mla_decode_op, (q_lat, q_rope, lat, kr, 0.1, None, None),
                          test_utils=("test_schema", "test_faketensor"))
    out = mla_decode_op(q_lat, q_rope, lat, kr, 0.1, None, None)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mla_decode_op(*(mode.from_tensor(x) for x in (q_lat, q_rope, lat, kr)), 0.1, None, None)
    assert fake.shape == out.shape and fake.stride() == out.stride() and fake.dtype == out.dtype


# ------------------------------------------------------------------------------------------------ fused RoPE
def _rope_inputs(b, h, t, d, dtype, seed=1):
    """Strided views as `MLAAttention` passes them: the query's rope channels inside ``[B, T, H, d_nope + d]``, the
    key's inside ``[B, T, r + d]``, ``cos``/``sin`` every second channel of a ``[B, T, 2d]`` table."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, 24 + d, generator=g).to(DEVICE, dtype)
    kv = torch.randn(b, t, 40 + d, generator=g).to(DEVICE, dtype)
    ang = torch.rand(b, t, 2 * d, generator=g) * 6.0
    cos, sin = ang.cos().to(DEVICE, dtype), ang.sin().to(DEVICE, dtype)
    q_rope = q.transpose(1, 2)[..., 24:]
    k_rope = kv[..., 40:].view(b, 1, t, d)
    return q_rope, k_rope, cos[..., ::2].unsqueeze(1), sin[..., ::2].unsqueeze(1)


@in_process
@pytest.mark.parametrize("dtype", DTYPES)  # bf16 on the GPU only: the interpreter's bf16 rounding is not the GPU's
@pytest.mark.parametrize("shape", [(3, 4, 1, 16), (2, 5, 3, 8), (1, 32, 2, 64)], ids=["decode", "odd_heads", "wide"])
def test_fused_rope_is_bitwise_the_torch_formula(dtype, shape):
    """One launch for query and key, each product rounded as PyTorch rounds it: the same bits, so prefill
    (which may take either path) and decode agree exactly."""
    from transmla_surgery.kernels.reference import apply_rope_torch
    from transmla_surgery.kernels.rope import apply_rope_triton, fused_rope_supported

    b, h, t, d = shape
    q_rope, k_rope, cos, sin = _rope_inputs(b, h, t, d, dtype)
    assert fused_rope_supported(q_rope, k_rope, cos, sin)
    q_out, k_out = apply_rope_triton(q_rope, k_rope, cos, sin)
    assert q_out.shape == (b, h, t, d) and k_out.shape == (b, 1, t, d) and q_out.is_contiguous()
    assert torch.equal(q_out, apply_rope_torch(q_rope, cos, sin))
    assert torch.equal(k_out, apply_rope_torch(k_rope, cos, sin))
    # and it is RoPE: against a float64 rotation of each (first, second) half pair
    x = q_rope.double()
    c, s = cos.double(), sin.double()
    half = d // 2
    ref = torch.cat([x[..., :half] * c[..., :half] - x[..., half:] * s[..., :half],
                     x[..., half:] * c[..., half:] + x[..., :half] * s[..., half:]], -1)
    assert float((q_out.double() - ref).abs().max()) < {torch.float32: 1e-5}.get(dtype, 0.05)


@in_process
def test_fused_rope_shared_cos_sin_and_fallbacks():
    """``cos``/``sin`` with batch 1 broadcast; unsupported inputs (odd width, mixed dtypes, autograd) take the
    formula through `apply_rope` instead of failing."""
    from transmla_surgery.kernels import apply_rope
    from transmla_surgery.kernels.reference import apply_rope_torch
    from transmla_surgery.kernels.rope import apply_rope_triton, fused_rope_supported

    q_rope, k_rope, cos, sin = _rope_inputs(3, 4, 2, 16, torch.float32)
    q_out, k_out = apply_rope_triton(q_rope, k_rope, cos[:1], sin[:1])
    assert torch.equal(q_out, apply_rope_torch(q_rope, cos[:1], sin[:1]))
    assert torch.equal(k_out, apply_rope_torch(k_rope, cos[:1], sin[:1]))
    assert not fused_rope_supported(q_rope[..., :6], k_rope[..., :6], cos[..., :6], sin[..., :6])  # width 6
    assert not fused_rope_supported(q_rope, k_rope, cos.double(), sin)
    set_decode_backend("triton")
    try:
        w = q_rope.clone().requires_grad_(True)
        q_out, _ = apply_rope(w, k_rope, cos, sin)  # autograd: the formula, with a gradient
        q_out.sum().backward()
        assert w.grad is not None and torch.isfinite(w.grad).all()
        with torch.no_grad():
            q2, k2 = apply_rope(q_rope, k_rope, cos, sin)
        assert torch.equal(q2, apply_rope_torch(q_rope, cos, sin)) and torch.equal(k2, apply_rope_torch(k_rope, cos, sin))
    finally:
        set_decode_backend("auto")



@in_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 3])
def test_rope_into_cache_is_bitwise_rope_then_static_update(dtype, t):
    """One launch rotates query and key and does what transformers' ``StaticLayer.update`` does (write the latent
    and the rotated key at the filled length, advance the length): the same bits, nothing else touched, and the
    finished-program count re-armed so that the next call works too."""
    from transmla_surgery.kernels.reference import apply_rope_torch
    from transmla_surgery.kernels.rope import rope_into_cache_supported, rope_into_cache_triton

    b, h, d, r, cap = 3, 4, 16, 40, 11
    g = torch.Generator().manual_seed(21)
    cache_lat = torch.randn(b, 1, cap, r, generator=g).to(DEVICE, dtype)
    cache_rope = torch.randn(b, 1, cap, d, generator=g).to(DEVICE, dtype)
    length = torch.tensor(2, device=DEVICE)
    ticket = torch.zeros((), dtype=torch.int32, device=DEVICE)
    want_lat, want_rope, want_len = cache_lat.clone(), cache_rope.clone(), 2
    for call in range(2):
        q_rope, k_rope, cos, sin = _rope_inputs(b, h, t, d, dtype, seed=30 + call)
        kv = torch.randn(b, t, r + 8, generator=g).to(DEVICE, dtype)
        latent = kv[..., :r].unsqueeze(1)  # a strided view, as the projection's output is split
        args = (q_rope, k_rope, cos, sin, latent, cache_lat, cache_rope, length, ticket)
        assert rope_into_cache_supported(*args)
        q_out = rope_into_cache_triton(*args)
        assert torch.equal(q_out, apply_rope_torch(q_rope, cos, sin))
        pos = torch.arange(want_len, want_len + t, device=DEVICE)
        want_lat.index_copy_(2, pos, latent)
        want_rope.index_copy_(2, pos, apply_rope_torch(k_rope, cos, sin))
        want_len += t
        assert torch.equal(cache_lat, want_lat) and torch.equal(cache_rope, want_rope)
        assert int(length) == want_len and int(ticket) == 0


@in_process
def test_rope_into_cache_stops_at_the_buffer_end_and_declines_what_it_cannot_take():
    from transmla_surgery.kernels import rope_into_cache
    from transmla_surgery.kernels.rope import rope_into_cache_supported, rope_into_cache_triton

    b, h, t, d, r, cap = 2, 4, 3, 16, 32, 6
    q_rope, k_rope, cos, sin = _rope_inputs(b, h, t, d, torch.float32, seed=40)
    latent = torch.randn(b, 1, t, r, generator=torch.Generator().manual_seed(41)).to(DEVICE)
    cache_lat = torch.randn(b, 1, cap, r, generator=torch.Generator().manual_seed(42)).to(DEVICE)
    cache_rope = torch.randn(b, 1, cap, d, generator=torch.Generator().manual_seed(43)).to(DEVICE)
    before_lat, before_rope = cache_lat.clone(), cache_rope.clone()
    length, ticket = torch.tensor(4, device=DEVICE), torch.zeros((), dtype=torch.int32, device=DEVICE)
    rope_into_cache_triton(q_rope, k_rope, cos, sin, latent, cache_lat, cache_rope, length, ticket)
    # positions 4 and 5 written, position 6 would be past the end: no write out of bounds
    assert torch.equal(cache_lat[:, :, 4:], latent[:, :, :2]) and torch.equal(cache_lat[:, :, :4], before_lat[:, :, :4])
    assert torch.equal(cache_rope[:, :, :4], before_rope[:, :, :4])
    assert int(length) == 7 and int(ticket) == 0
    # inputs it does not take: the caller is told (None) and nothing changes
    args = (q_rope, k_rope, cos, sin, latent, cache_lat, cache_rope, length, ticket)
    assert not rope_into_cache_supported(q_rope, k_rope, cos, sin, latent.double(), *args[5:])
    assert not rope_into_cache_supported(q_rope, k_rope, cos, sin, latent, cache_lat[:, :, :, :8], *args[6:])
    assert not rope_into_cache_supported(*args[:7], length.float(), ticket)
    snapshot = cache_lat.clone()
    set_decode_backend("torch")
    try:
        assert rope_into_cache(*args) is None
    finally:
        set_decode_backend("auto")
    w = q_rope.clone().requires_grad_(True)
    set_decode_backend("triton")
    try:
        assert rope_into_cache(w, *args[1:]) is None  # autograd: the separate, differentiable path
    finally:
        set_decode_backend("auto")
    assert torch.equal(cache_lat, snapshot) and int(length) == 7


@in_process
def test_static_cache_decode_with_the_fused_update_equals_the_separate_steps():
    """A converted model with `MLAStaticCache`: prefill and two decode steps with the Triton backend (the fused
    rope-and-write launch, interpreted) fill the first layer's cache with exactly the PyTorch path's bits, the
    others and the logits to float32 rounding."""
    from conftest import rel_err
    from transmla_surgery.cache import MLAStaticCache

    model, ids, mask, cache_kw = _tiny_converted(length=13, pad_row=1, pads=2, seed=9)
    runs = {}
    for backend in _each_backend_with_small_tiles():
        cache = MLAStaticCache.for_model(model, batch_size=2, max_cache_len=16)
        logits = []
        with torch.no_grad():
            for lo, hi in ((0, 11), (11, 12), (12, 13)):
                out = model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], use_cache=True, **{cache_kw: cache})
                logits.append(out.logits)
        runs[backend] = (logits, cache)
    (ref_logits, ref_cache), (logits, cache) = runs["torch"], runs["triton"]
    for i, (a, b) in enumerate(zip(cache.layers, ref_cache.layers)):
        if i == 0:  # the first layer's inputs are the embeddings on both paths: the same bits
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        else:  # later layers see the attention kernel's rounding, not the PyTorch path's (and, at the padding,
            # the kernel's zeros for a query that sees no key where the reference averages): real tokens only
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                assert rel_err(x[0], y[0]) < 1e-5 and rel_err(x[1, :, 2:], y[1, :, 2:]) < 1e-5
        assert int(a.cumulative_length) == int(b.cumulative_length) == 13 and int(a.ticket) == 0
    assert rel_err(logits[0][0], ref_logits[0][0]) < 1e-5 and rel_err(logits[0][1, 2:], ref_logits[0][1, 2:]) < 1e-5
    for a, b in zip(logits[1:], ref_logits[1:]):  # the decode steps
        assert rel_err(a, b) < 1e-5


# ------------------------------------------------------------------------------------------------ configuration choice
@in_process
def test_large_calls_take_the_two_blocks_per_sm_configuration(monkeypatch):
    """``config=None``: the default (one block per SM, three stages) below `LARGE_WORK_TILES` tiles of work, the
    two-blocks-per-SM configuration from there on, with its split count chosen for twice the slots; the
    results are the same either way."""
    from transmla_surgery.kernels import mla_decode as md

    assert md.auto_config(16, 1, 8192) is md.DEFAULT_CONFIG  # the attention goal's shapes: 2K and 8K tiles
    assert md.auto_config(64, 1, 8192) is md.DEFAULT_CONFIG
    assert md.auto_config(191, 1, 8320) is md.LARGE_WORK_CONFIG  # Llama-3-8B shape at 8K, its largest batch
    assert md.auto_config(64, 1, 32768) is md.LARGE_WORK_CONFIG
    assert md.LARGE_WORK_CONFIG.ctas_per_sm == 2 and md.DEFAULT_CONFIG.ctas_per_sm == 1
    assert md.LARGE_WORK_CONFIG.streamed and not md.DEFAULT_CONFIG.streamed

    small, large = KernelConfig(block_n=16, block_h=16, num_stages=1), KernelConfig(block_n=16, block_h=16, num_stages=2, ctas_per_sm=2)
    monkeypatch.setattr(md, "DEFAULT_CONFIG", small)
    monkeypatch.setattr(md, "LARGE_WORK_CONFIG", large)
    monkeypatch.setattr(md, "LARGE_WORK_TILES", 40)  # 16-token tiles: batch 3 × 100 tokens = 21 tiles, × 2 = 42
    launches = _spy_launches(monkeypatch)
    outs = []
    for b in (3, 6):
        q_lat, q_rope, lat, kr, _ = _inputs(b, 1, 4, 32, 16, 100, torch.float32, seed=b)
        outs.append((decode_attention_triton(q_lat, q_rope, lat, kr, 0.15), _ref(q_lat, q_rope, lat, kr, 0.15)))
    stage1 = [(grid, kw["num_stages"]) for stage, grid, kw in launches if stage == 1]
    splits = [choose_num_splits(b, 1, 100, 16, 132 * occ) for b, occ in ((3, 1), (6, 2))]
    assert stage1 == [((1, splits[0], 3), 1), ((1, splits[1], 6), 2)]
    for out, ref in outs:
        assert _err(out, ref) < TOL[torch.float32]


# ------------------------------------------------------------------------------------------------ streamed schedule
STREAMED = KernelConfig(block_n=16, block_h=16, num_warps=4, num_stages=2, streamed=True)


def test_streamed_segments_cover_every_tile_once_in_equal_ranges():
    """The segment table: every tile of every row exactly once, split indices 0..count-1 per row, at most two
    segments per block slot (its range) and the second segments longest first."""
    from transmla_surgery.kernels import mla_decode as md

    for batch, tiles, programs in ((3, 7, 3), (3, 7, 4), (3, 7, 20), (191, 130, 264), (64, 512, 264), (5, 1, 5)):
        if not batch <= programs < batch * tiles:
            continue
        table, counts, most = md._build_segments(batch, tiles, programs, torch.device("cpu"))
        seen = torch.zeros(batch, tiles, dtype=torch.int64)
        splits = [set() for _ in range(batch)]
        for row, t0, t1, split in table.tolist():
            assert 0 <= t0 < t1 <= tiles
            seen[row, t0:t1] += 1
            splits[row].add(split)
        assert torch.equal(seen, torch.ones_like(seen))
        assert [sorted(s_) for s_ in splits] == [list(range(c)) for c in counts.tolist()] and most == int(counts.max())
        lengths = (table[:, 2] - table[:, 1]).tolist()
        assert len(table) <= 2 * programs and max(lengths[:programs]) <= -(-batch * tiles // programs)
        assert lengths[programs:] == sorted(lengths[programs:], reverse=True)


@in_process
@pytest.mark.parametrize("slots", [3, 4, 7, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_streamed_schedule_matches_the_reference(slots, dtype, monkeypatch):
    """3 rows of 7 tiles over 3 block slots (each exactly a row), 4 and 7 (ranges holding the end of one row and
    the start of the next), 20 (one or two tiles each)."""
    from transmla_surgery.kernels import mla_decode as md

    launches = _spy_launches(monkeypatch)
    monkeypatch.setattr(md, "CPU_SLOTS", slots)
    q_lat, q_rope, lat, kr, _ = _inputs(3, 1, 4, 32, 16, 7 * 16 - 5, dtype)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.15, config=STREAMED)
    assert _err(out, _ref(q_lat, q_rope, lat, kr, 0.15)) < TOL[dtype]
    table, _, _ = md._streamed_segments(3, 7, slots, torch.device(DEVICE))
    assert launches[0][1] == (1, table.shape[0]) and launches[0][2]["TABLE"] and launches[1][2]["COUNTS"]


@in_process
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("t", [1, 2], ids=["one_token", "two_tokens"])
def test_streamed_schedule_with_masks_and_several_tokens(kind, t, monkeypatch):
    """Padding masks whose rows end inside another slot's range, a row shorter than one range, one query token
    (a bool mask: the padding classification's two launches) or two (causal); with the same masks and the
    lengths, the split schedule (which the streamed one loses to when there is a length) and the same result."""
    from transmla_surgery.kernels import mla_decode as md

    launches = _spy_launches(monkeypatch)
    monkeypatch.setattr(md, "CPU_SLOTS", 6)
    b, s = 4, 70
    q_lat, q_rope, lat, kr, _ = _inputs(b, t, 3, 32, 16, s, torch.float32, seed=3)
    lengths = torch.tensor([70, 9, 33, 1])
    keep = (torch.arange(s)[None, :] < lengths[:, None])[:, None, :].expand(b, t, s).clone()
    if t == 2:
        keep[torch.arange(b), 0, lengths - 1] = False  # causal: the first of the two new tokens does not see the last
    keep[1, :, :3] = False  # left padding
    keep[3] = False  # a row with no key at all
    mask = keep if kind == "bool" else torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    ref = _ref(q_lat, q_rope, lat, kr, 0.2, mask)
    for bound in (None, lengths.to(DEVICE)):
        launches.clear()
        out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.2, mask.to(DEVICE), bound, config=STREAMED)
        assert _err(out[:3], ref[:3]) < TOL[torch.float32]
        if kind == "bool":  # no key at all: zeros
            assert torch.count_nonzero(out[3]) == 0
        stage1 = [kw for stage, _, kw in launches if stage == 1]
        assert all(kw["TABLE"] == (bound is None) for kw in stage1)
        assert len(stage1) == (2 if kind == "bool" and t == 1 else 1)


@in_process
def test_streamed_schedule_falls_back_to_splits_when_rows_outnumber_slots(monkeypatch):
    """More rows than block slots (a range would span three rows or more): the split schedule, same result."""
    from transmla_surgery.kernels import mla_decode as md

    launches = _spy_launches(monkeypatch)
    monkeypatch.setattr(md, "CPU_SLOTS", 2)
    q_lat, q_rope, lat, kr, _ = _inputs(3, 1, 4, 32, 16, 40, torch.float32)
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.15, config=STREAMED)
    assert _err(out, _ref(q_lat, q_rope, lat, kr, 0.15)) < TOL[torch.float32]
    assert not launches[0][2]["TABLE"] and len(launches[0][1]) == 3


def test_kernel_config_refuses_a_ring_of_part_tiles():
    """The warp-specialised stage 1 keeps each of a tile's 9 chunk positions in its own sub-ring: a ring of 9 or
    18 slots. Any other count is refused when the configuration is made, naming what is allowed."""
    from transmla_surgery.kernels import mla_decode_ws as ws

    assert KernelConfig(ring_slots=18).ring_slots == ws.DEFAULT_NBUF == 18
    assert KernelConfig(ring_slots=9).ring_slots == 9
    for bad in (20, 22, 27, 1):
        with pytest.raises(ValueError, match=r"ring_slots must be 0 .* \(9, 18\).* not %d" % bad):
            KernelConfig(ring_slots=bad)


def _emulated_ws_stage1(calls):
    """A PyTorch stand-in for `mla_decode_ws.launch_stage1` (the Gluon kernel needs a Hopper GPU), written from
    its contract: per batch row and split ``[j·split_len, (j+1)·split_len)`` within the row's length, each query
    row's normalised partial output and base-2 log-sum-exp, the mask or the causal rule deciding which keys count."""

    def launch(ql, qr, latent, k_rope, o_part, lse, t, h, m_rows, split_len, num_splits, sm_scale_log2, *,
               mask_mode=0, mask_t=None, mask_strides=(0, 0, 0), len_t=None, len_stride=0, nbuf, pdl):
        calls.append(dict(split_len=split_len, num_splits=num_splits, mask_mode=mask_mode, mask=mask_t,
                          kv_len=len_t, nbuf=nbuf))
        bsz, s = latent.shape[:2]
        for b in range(bsz):
            n = s if len_t is None else min(int(len_t[b * len_stride]), s)
            q = torch.cat([ql[b], qr[b]], -1).double().reshape(m_rows, -1)  # rows token-major, head-minor
            t_row = torch.arange(m_rows) // h
            for j in range(num_splits):
                lo, hi = j * split_len, min((j + 1) * split_len, n)
                pos = torch.arange(lo, max(lo, hi))
                k = torch.cat([latent[b, lo:hi], k_rope[b, lo:hi]], -1).double()
                logits = q @ k.T * sm_scale_log2
                if mask_mode == 0:
                    keep = pos[None, :] < (n - t + t_row + 1)[:, None]
                else:
                    mrow = mask_t[b if mask_strides[0] else 0][t_row if mask_strides[1] else 0 * t_row][:, lo:hi]
                    keep = mrow != 0 if mask_mode == 1 else torch.ones_like(logits, dtype=torch.bool)
                    if mask_mode == 2:
                        logits = logits + mrow.double().clamp_min(-1e30) * 1.4426950408889634
                logits = logits.masked_fill(~keep, float("-inf"))
                mx = logits.amax(-1, keepdim=True) if logits.shape[1] else torch.full((m_rows, 1), float("-inf"))
                p = torch.exp2(logits - mx.nan_to_num(neginf=0.0))
                l = p.sum(-1, keepdim=True)
                o_part[b, :, j] = (p @ latent[b, lo:hi].double() / l.clamp_min(1e-300)).float()
                lse[b, :, j] = torch.where(l[:, 0] > 0, mx[:, 0] + torch.log2(l[:, 0]), float("-inf")).float()

    return launch


@in_process
@pytest.mark.parametrize("case", ["bare", "length", "bool_mask", "float_mask_two_tokens"])
def test_warp_specialised_stage1_gets_the_splits_mask_and_length(case, monkeypatch):
    """Where the Gluon stage 1 applies, `decode_attention_triton` hands it the split schedule, the mask and the
    length, launches no Triton stage 1 (not even the row classification of a bool mask) and merges its partials
    with the same stage 2: with a PyTorch stand-in for the Gluon kernel the result is the reference's."""
    from transmla_surgery.kernels import mla_decode as md

    calls = []
    monkeypatch.setattr(md, "_ws_applies", lambda *a: True)
    monkeypatch.setattr(md._ws, "launch_stage1", _emulated_ws_stage1(calls))
    launches = _spy_launches(monkeypatch)
    t = 2 if case == "float_mask_two_tokens" else 1
    b, s = 3, 300
    q_lat, q_rope, lat, kr, buf = _inputs(b, t, 4, 32, 16, s, torch.float32, seed=21)
    mask = kv_len = None
    ref_lat, ref_kr = lat, kr
    if case == "length":
        kv_len = torch.tensor([300, 170, 77])
    if case == "bool_mask":
        keep = torch.rand(b, 1, s, generator=torch.Generator().manual_seed(3)) > 0.3
        keep[..., -1] = True
        mask = keep
    if case == "float_mask_two_tokens":
        bias = torch.randn(b, t, s, generator=torch.Generator().manual_seed(4))
        bias[:, :, ::5] = torch.finfo(torch.float32).min
        mask = bias
    out = decode_attention_triton(q_lat, q_rope, lat, kr, 0.1, mask, kv_len, num_splits=4,
                                  config=KernelConfig(block_n=16, block_h=16, num_stages=1, ring_slots=18))
    # 4 splits of 300 tokens asked: 75 rounded up to the Gluon kernel's 64-token tiles is 128, so 3 splits
    assert len(calls) == 1 and calls[0]["nbuf"] == 18
    assert (calls[0]["split_len"], calls[0]["num_splits"]) == (128, 3)
    assert calls[0]["mask_mode"] == (0 if mask is None else 1 if mask.dtype == torch.bool else 2)
    assert (calls[0]["mask"] is None) == (mask is None) and (calls[0]["kv_len"] is None) == (kv_len is None)
    assert [st for st, _, _ in launches] == [2]  # the merge only
    if case == "length":
        refs = [_ref(q_lat[i:i + 1], q_rope[i:i + 1], lat[i:i + 1, :n], kr[i:i + 1, :n], 0.1)
                for i, n in enumerate(kv_len.tolist())]
        ref = torch.cat(refs)
    else:
        ref = _ref(q_lat, q_rope, ref_lat, ref_kr, 0.1, mask)
    assert _err(out, ref) < 1e-5
