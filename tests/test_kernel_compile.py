"""The Triton decode kernels compiled for Hopper (sm_90) without a GPU: Triton's own compiler and the ``ptxas``
shipped in its wheel run on the CPU. Catches what the interpreter cannot (type rules of the compiler, a loop
the software pipeliner no longer pipelines, shared memory past the 227 KiB a Hopper block may use) before a
GPU run does.

The compilation runs in a child interpreter without ``TRITON_INTERPRET``: Triton binds its language functions to
the interpreter or the compiler once, when first imported, and other test modules import it interpreted."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HOPPER_SMEM_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90


def _build(kernel, consts: dict, ptrs: dict, stages: int, warps: int = 4, source=None,
           aligned_strides: bool = True) -> dict:
    """Compile ``kernel`` for sm_90 as a launch from PyTorch would (``source``: Triton's `ASTSource`, or Gluon's
    for a Gluon kernel) and report shared memory and what its PTX holds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    names = list(inspect.signature(fn).parameters)
    consts = {"PDL": False, **consts} if "PDL" in names else consts
    for flag in ("TABLE", "COUNTS"):  # the split schedule unless asked
        if flag in names:
            consts.setdefault(flag, False)
    ptrs = {"Segments": "*i32", "Counts": "*i32", "Prefix": "*i32", **ptrs}
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = ptrs[n]
        elif n == "sm_scale_log2":
            sig[n] = "fp32"
        else:
            sig[n] = "i64" if n.startswith("stride") else "i32"
    # what a launch from PyTorch specialises: 16-byte aligned pointers, strides that are multiples of 16
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if sig[n].startswith("*") or (aligned_strides and n.startswith("stride")
                                             and n not in ("stride_lb", "stride_lsem"))}
    k = triton.compile((source or ASTSource)(kernel, sig, consts, aligned), target=GPUTarget("cuda", 90, 64),
                       options={"num_warps": warps, "num_stages": stages})
    ptx = k.asm["ptx"]
    # instructions only (no debug lines, labels, braces): for the mbarrier waits that follow a CTA-wide bar.sync
    ins = [ln.strip() for ln in ptx.splitlines()
           if ln.strip() and not ln.strip().startswith(("//", ".loc", "$", "{", "}", ".reg", "waitLoop", "@!complete"))]
    synced_waits = sum(1 for i, ln in enumerate(ins) if "mbarrier.try_wait" in ln
                       and any("bar.sync" in x for x in ins[max(0, i - 3):i]))
    return {"shared": k.metadata.shared, "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "mma": ptx.count("mma.sync") + ptx.count("wgmma.mma_async"), "wgmma": ptx.count("wgmma.mma_async"),
            "tma": ptx.count("cp.async.bulk.tensor"), "setmaxnreg": ptx.count("setmaxnreg"),
            "globaltimer": ptx.count("globaltimer"), "gdc_wait": ptx.count("griddepcontrol.wait"),
            "gdc_launch": ptx.count("griddepcontrol.launch_dependents"), "bar_sync": ptx.count("bar.sync"),
            "synced_waits": synced_waits, "waits": ptx.count("mbarrier.try_wait")}


def _compile_all() -> dict:
    """Child side: compile each variant, report shared memory and pipelining evidence from the PTX."""
    from transmla_surgery.kernels import mla_decode as md

    stage1, stage2, prefix = md._kernels(False)

    build = _build

    out = {}
    for dtype in ("bf16", "fp16"):
        for stages in (2, 3):
            for mask_mode, has_len in ((0, True), (1, True), (2, False)):
                consts = dict(DL=512, DR=64, BLOCK_DL=512, BLOCK_DR=64, BLOCK_H=32, BLOCK_N=64, MASK_MODE=mask_mode,
                              HAS_LEN=has_len, IEEE=False)
                ptrs = dict(QL=f"*{dtype}", QR=f"*{dtype}", C=f"*{dtype}", KR=f"*{dtype}",
                            Mask="*u8" if mask_mode == 1 else f"*{dtype}", Len="*i64",
                            O_part="*fp32", Lse="*fp32")
                key = f"stage1 {dtype} stages={stages} mask={mask_mode} len={has_len}"
                out[key] = build(stage1, consts, ptrs, stages)
        # the merge as launched (Triton's default 3 stages): 2 to 64 splits, the chunk min(BLOCK_S, 16)
        for block_s in (2, 16, 64):
            out[f"stage2 {dtype} splits={block_s}"] = build(
                stage2, dict(DL=512, BLOCK_DL=512, BLOCK_S=block_s, CHUNK_S=min(block_s, 16)),
                dict(O_part="*fp32", Lse="*fp32", Out=f"*{dtype}"), 3)

    # decode with a bool mask: the left-padding pass (no mask read) and the pass for the other rows, and the
    # launch that classifies the rows
    for mask_mode, pass_ in ((3, 1), (1, 2)):
        consts = dict(DL=512, DR=64, BLOCK_DL=512, BLOCK_DR=64, BLOCK_H=32, BLOCK_N=64, MASK_MODE=mask_mode,
                      HAS_LEN=True, IEEE=False, PREFIX=pass_)
        ptrs = dict(QL="*bf16", QR="*bf16", C="*bf16", KR="*bf16", Mask="*u8", Len="*i64", O_part="*fp32",
                    Lse="*fp32", Prefix="*i32")
        out[f"prefix-pass stage1 bf16 stages=3 mask={mask_mode} pass={pass_}"] = build(stage1, consts, ptrs, 3)
    out["prefix classify"] = build(prefix, dict(HAS_LEN=True, BLOCK=1024), dict(Mask="*u8", Len="*i64", Out="*i32"), 1)

    # the streamed schedule: segment bounds read from a table, as the two-blocks-per-SM configuration launches it,
    # and the merge reading each row's number of partials
    for mask_mode, has_len in ((0, False), (1, True)):
        consts = dict(DL=512, DR=64, BLOCK_DL=512, BLOCK_DR=64, BLOCK_H=32, BLOCK_N=64, MASK_MODE=mask_mode,
                      HAS_LEN=has_len, IEEE=False, TABLE=True)
        ptrs = dict(QL="*bf16", QR="*bf16", C="*bf16", KR="*bf16", Mask="*u8" if mask_mode == 1 else "*bf16",
                    Len="*i64", O_part="*fp32", Lse="*fp32")
        out[f"streamed stage1 bf16 stages=2 mask={mask_mode} len={has_len}"] = build(stage1, consts, ptrs, 2)
    out["streamed stage2 bf16 splits=4"] = build(stage2, dict(DL=512, BLOCK_DL=512, BLOCK_S=4, CHUNK_S=4, COUNTS=True),
                                                 dict(O_part="*fp32", Lse="*fp32", Out="*bf16"), 3)

    # programmatic dependent launch: the `griddepcontrol` instructions appear only with PDL=True
    consts = dict(DL=512, DR=64, BLOCK_DL=512, BLOCK_DR=64, BLOCK_H=32, BLOCK_N=64, MASK_MODE=0, HAS_LEN=True,
                  IEEE=False, PDL=True)
    ptrs = dict(QL="*bf16", QR="*bf16", C="*bf16", KR="*bf16", Mask="*bf16", Len="*i64", O_part="*fp32", Lse="*fp32")
    out["pdl stage1 bf16 stages=3 mask=0 len=True"] = build(stage1, consts, ptrs, 3)
    out["pdl stage2 bf16 splits=64"] = build(stage2, dict(DL=512, BLOCK_DL=512, BLOCK_S=64, CHUNK_S=16, PDL=True),
                                             dict(O_part="*fp32", Lse="*fp32", Out="*bf16"), 3)

    # A launch compiles every integer argument equal to 1 as a constant unless the kernel opts out
    # (`do_not_specialize`); tiny shapes (one tile, one head block, one query token, per-batch lengths) do that.
    names = list(inspect.signature(stage1.fn).parameters)
    kept = {names[i] if isinstance(i, int) else i for i in stage1.do_not_specialize}
    ones = [n for n in ("T", "H", "M", "S", "split_len", "stride_lb", "stride_ms", "stride_mt", "stride_lsem")
            if n in names and n not in kept]
    small = dict(DL=32, DR=8, BLOCK_DL=32, BLOCK_DR=16, BLOCK_H=16, BLOCK_N=64, MASK_MODE=1, HAS_LEN=True, IEEE=False)
    ptrs = dict(QL="*bf16", QR="*bf16", C="*bf16", KR="*bf16", Mask="*u8", Len="*i64", O_part="*fp32", Lse="*fp32")
    for n in ones:
        out[f"ones {n}"] = build(stage1, {**small, n: 1}, ptrs, 3)
    out["ones all"] = build(stage1, {**small, **{n: 1 for n in ones}}, ptrs, 3)
    out.update(_compile_ws())
    return out


def _compile_ws() -> dict:
    """The warp-specialised Gluon stage 1 (`mla_decode_ws`) as a launch compiles it: both 16-bit dtypes, each mask
    mode with and without a length, one and several query tokens; PDL and the timing diagnostic once each."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    from transmla_surgery.kernels import mla_decode_ws as ws

    if not ws.available():
        return {}
    from triton.experimental.gluon._runtime import GluonASTSource

    def build(dtype: str, consts: dict) -> dict:
        tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        host = torch.zeros(128, 576, dtype=tdtype)
        desc = ws.TensorDescriptor(host[:, :512], [128, 512], [576, 1], [64, 64], ws.nvmma_layout(tdtype))
        desc_type = native_specialize_impl(CUDABackend, desc, False, True, True)[0]  # what a launch passes
        qhost = torch.zeros(4, 1, 32, 512, dtype=tdtype)
        q_type = native_specialize_impl(CUDABackend, ws.q_descriptors(qhost, qhost[..., :64])[0], False, True, True)[0]
        ptrs = {"QL": f"*{dtype}", "QR": f"*{dtype}", "c_desc": desc_type, "r_desc": desc_type,
                "Mask": "*u8" if consts["MASK_MODE"] == 1 else f"*{dtype}", "O_part": "*fp32", "Lse": "*fp32",
                "Len": "*i64", "Timing": "*i64", "ql_desc": q_type, "qr_desc": q_type}
        # the queries by TMA for one query token (as a launch takes them when their strides allow), else loads
        consts = {"NBUF": ws.DEFAULT_NBUF, "TIMING": False, "Q_TMA": consts["ONE_TOKEN"], **consts}
        return _build(ws._stage1_ws, consts, ptrs, 3, source=GluonASTSource, aligned_strides=False)

    out = {}
    for dtype in ("bf16", "fp16"):
        for mask_mode, has_len, one in ((0, False, True), (0, True, True), (1, True, True), (1, False, False),
                                        (2, True, False)):
            key = f"ws stage1 {dtype} mask={mask_mode} len={has_len} one_token={one}"
            out[key] = build(dtype, dict(MASK_MODE=mask_mode, HAS_LEN=has_len, ONE_TOKEN=one))
    out["pdl ws stage1 bf16"] = build("bf16", dict(MASK_MODE=0, HAS_LEN=False, ONE_TOKEN=True, PDL=True))
    out["ws timing stage1 bf16"] = build("bf16", dict(MASK_MODE=0, HAS_LEN=False, ONE_TOKEN=True, TIMING=True))
    # one query token whose rows TMA cannot address (strides not 16-byte aligned): the queries by loads
    out["ws queries-by-loads stage1 bf16"] = build("bf16", dict(MASK_MODE=1, HAS_LEN=True, ONE_TOKEN=True, Q_TMA=False))
    return out


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_variant_compiles_for_hopper_within_its_shared_memory(compiled):
    """Every dtype, stage count and mask mode, and tiny shapes whose sizes of 1 a launch compiles
    as constants (a tile count of 1 crashed Triton 3.6's layout pass on an H200 in the balanced-schedule kernel
    of commit 1980ec3)."""
    assert len([k for k in compiled if k.startswith("stage1")]) == 2 * 2 * 3
    assert len([k for k in compiled if k.startswith("stage2")]) == 2 * 3
    assert "ones all" in compiled
    for key, info in compiled.items():
        assert info["shared"] <= HOPPER_SMEM_BYTES, (key, info)
        if "stage1" in key:
            assert info["mma"] > 0, key  # both products on tensor cores


def test_the_warp_specialised_stage1_compiles_for_hopper(compiled):
    """The Gluon stage 1 in every mask mode, with and without a length: within a block's shared memory (its ring
    of 18 slots, the queries, the probabilities), its products on warpgroup MMA, its cache tiles fetched by TMA,
    the loader warp's registers handed to the multiplying warpgroup (``setmaxnreg``), and no timer read unless
    the timing diagnostic is on."""
    pytest.importorskip("triton.experimental.gluon")
    ws = {k: v for k, v in compiled.items() if "ws" in k}
    assert len([k for k in ws if k.startswith("ws stage1")]) == 2 * 5
    for key, info in ws.items():
        assert 180 * 1024 < info["shared"] <= HOPPER_SMEM_BYTES, (key, info)
        assert info["wgmma"] > 0 and info["tma"] > 0 and info["setmaxnreg"] > 0, (key, info)
        assert (info["globaltimer"] > 0) == ("timing" in key), (key, info)
    # the cache's 9 copies per tile, and with one query token the queries' 9 (rope chunk and 8 latent chunks)
    assert ws["ws stage1 bf16 mask=0 len=True one_token=True"]["tma"] == 18
    assert ws["ws queries-by-loads stage1 bf16"]["tma"] == ws["ws stage1 bf16 mask=1 len=False one_token=False"]["tma"] == 9


def test_the_warp_specialised_stage1_waits_without_cta_barriers(compiled):
    """Each of a tile's 9 chunk positions has its own ready-barrier array, and a tile's chunks are released in 3
    groups: Triton's shared-memory barrier pass then puts no ``bar.sync`` between the multiplying warpgroup's
    waits. With one array for the whole ring (commit 32a2255) 10 of the 19 waits followed a ``bar.sync`` and the
    kernel had 61 of them; now at most 2 (the queries' wait and the loop's first) and 29-36, 3-7% faster on an
    H200 (decode.md, run 13)."""
    pytest.importorskip("triton.experimental.gluon")
    ws = {k: v for k, v in compiled.items() if k.startswith(("ws stage1", "pdl ws", "ws queries"))}
    assert ws
    for key, info in ws.items():
        assert info["waits"] >= 18 and info["synced_waits"] <= 2, (key, info)
        assert info["bar_sync"] <= 40, (key, info)


def test_pdl_emits_grid_dependency_control_only_when_on(compiled):
    """PDL=True: each kernel waits for the previous grid, then lets the next launch; PDL=False (every other
    variant): not one `griddepcontrol` instruction, so the kernels compile as before the flag existed."""
    for key in ("pdl stage1 bf16 stages=3 mask=0 len=True", "pdl stage2 bf16 splits=64", "pdl ws stage1 bf16"):
        assert compiled[key]["gdc_wait"] > 0 and compiled[key]["gdc_launch"] > 0, key
    off = [k for k in compiled if not k.startswith("pdl")]
    assert off
    for key in off:
        assert compiled[key]["gdc_wait"] == 0 and compiled[key]["gdc_launch"] == 0, key


def test_the_cache_loop_is_software_pipelined(compiled):
    """A pipelined tile loop shows as asynchronous copies whose shared memory grows with the stage count."""
    for dtype in ("bf16", "fp16"):
        two = compiled[f"stage1 {dtype} stages=2 mask=0 len=True"]
        three = compiled[f"stage1 {dtype} stages=3 mask=0 len=True"]
        assert two["cp_async"] > 0 and three["cp_async"] > 0
        assert three["shared"] > two["shared"]
    # the streamed schedule's tile loop is pipelined the same way, in the same shared memory
    for mask in (0, 1):
        key = next(k for k in compiled if k.startswith(f"streamed stage1 bf16 stages=2 mask={mask}"))
        split = compiled[f"stage1 bf16 stages=2 mask={mask} len=True"]
        assert compiled[key]["cp_async"] == split["cp_async"] > 0 and compiled[key]["shared"] == split["shared"], key


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(_compile_all()))
