"""What the warp-specialised Gluon stage 1 (`kernels.mla_decode_ws`) takes. Its numerics need a Hopper GPU
(`bench/decode.py` checks them against the reference); its compilation for sm_90a is checked on the CPU by
`test_kernel_compile.py`. Here: which calls it accepts, decided without a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from transmla_surgery.kernels import mla_decode_ws as ws  # noqa: E402


def _call(b=3, t=1, h=32, s=200, r=512, dr=64, dtype=torch.bfloat16, views=True):
    g = torch.Generator().manual_seed(0)
    q_lat = torch.randn(b, t, h, r, generator=g).to(dtype)
    if views:  # what MLAStaticCache hands over: two column ranges of one [B, S, r + d_rope] buffer
        buf = torch.randn(b, s, r + dr, generator=g).to(dtype)
        return q_lat, buf[..., :r], buf[..., r:]
    return q_lat, torch.randn(b, s, r, generator=g).to(dtype), torch.randn(b, s, dr, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("views", [True, False])
def test_the_deepseek_geometry_in_16_bit_is_taken(dtype, views):
    assert ws.geometry_supported(*_call(dtype=dtype, views=views))
    assert ws.geometry_supported(*_call(t=2, h=16, dtype=dtype, views=views))  # 32 query rows
    assert ws.geometry_supported(*_call(b=1, s=1, dtype=dtype, views=views))


def test_what_the_kernel_cannot_address_is_declined():
    assert not ws.geometry_supported(*_call(dtype=torch.float32))  # 32-bit tiles: the Triton stage 1
    assert not ws.geometry_supported(*_call(r=256))  # the TMA boxes and the 8 accumulators assume r = 512
    assert not ws.geometry_supported(*_call(dr=32))
    assert not ws.geometry_supported(*_call(t=2, h=32))  # 64 query rows: more than one warpgroup MMA's N
    q_lat, latent, k_rope = _call(s=300)
    # a cache sliced along the sequence: batch rows are no longer one after the other in a [B·S, 576] view
    assert not ws.geometry_supported(q_lat, latent[:, :250], k_rope[:, :250])
    assert ws.geometry_supported(q_lat[:1], latent[:1, :250], k_rope[:1, :250])  # one row is still addressable
    lat_t = torch.randn(3, 512, 300, dtype=torch.bfloat16).transpose(1, 2)  # channels not contiguous
    assert not ws.geometry_supported(q_lat, lat_t, k_rope)


def test_never_on_the_cpu():
    q_lat, latent, k_rope = _call()
    assert not ws.supported(q_lat, q_lat[..., :64], latent, k_rope, None, None)


def test_one_query_tokens_rows_are_described_for_tma_through_their_strides():
    """The loader fetches one query token's rows by TMA: a ``[B, H, channels]`` descriptor over the batch and head
    strides, for the absorbed path's head-major products and for contiguous queries alike, with ``[1, 32, 64]``
    boxes (heads past ``H`` lie outside the tensor and arrive as zeros). Rows TMA cannot address (a stride or base
    not 16-byte aligned) get no descriptor, and the kernel loads them instead."""
    pytest.importorskip("triton.experimental.gluon")
    b, h = 3, 16
    head_major = torch.randn(h, b, 1, 576, dtype=torch.bfloat16).permute(1, 2, 0, 3)  # [B, 1, H, 576] view
    for q in (head_major, torch.randn(b, 1, h, 576, dtype=torch.bfloat16)):
        ql, qr = q[..., :512], q[..., 512:]
        d_lat, d_rope = ws.q_descriptors(ql, qr)
        assert list(d_lat.shape) == [b, h, 512] and list(d_rope.shape) == [b, h, 64]
        assert list(d_lat.strides) == [ql.stride(0), ql.stride(2), 1]
        assert list(d_rope.strides) == [qr.stride(0), qr.stride(2), 1]
        assert list(d_lat.block_shape) == list(d_rope.block_shape) == [1, ws.ROW_BLOCK, 64]
    odd = torch.randn(b, 1, h, 516, dtype=torch.bfloat16)[..., :512]  # heads 1032 bytes apart: not 16-aligned
    assert ws.q_descriptors(odd, torch.randn(b, 1, h, 64, dtype=torch.bfloat16)) is None
