"""Layer-streaming conversion of a checkpoint directory equals whole-model conversion, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, calibration, tiny_model
from transmla_surgery import MLAConfig, convert_to_mla
from transmla_surgery.checkpoint import load_converted
from transmla_surgery.streaming import convert_checkpoint


def padded_calibration():
    batches = calibration(batches=2)
    mask = torch.ones_like(batches[0])
    mask[1, :7] = 0  # left padding
    mask[2, 15:] = 0  # right padding
    return [{"input_ids": batches[0], "attention_mask": mask}, batches[1]]


@pytest.mark.parametrize(
    "family, config, shard",
    [
        ("llama", MLAConfig(kv_lora_rank=20, qk_rope_head_dim=8), None),
        ("qwen2", MLAConfig(kv_lora_rank=24, qk_rope_head_dim=8, calibration_inputs="original", q_lora_rank=32), "40KB"),
        ("mistral", MLAConfig(kv_lora_rank=12, qk_rope_head_dim=4, refit_target="model"), "60KB"),
    ],
)
def test_streaming_conversion_equals_whole_model_conversion(tmp_path, family, config, shard):
    source = tiny_model(family, layers=3, bias=family == "qwen2")
    kw = {"max_shard_size": shard} if shard else {}
    source.save_pretrained(tmp_path / "src", **kw)
    calib = padded_calibration()

    whole = copy.deepcopy(source)
    whole_report = convert_to_mla(whole, config, calib, keep_activations=True, progress=False)
    report = convert_checkpoint(tmp_path / "src", tmp_path / "out", config, calib, device="cpu", progress=False)
    assert [r.latent_energy for r in report.layers] == [r.latent_energy for r in whole_report.layers]

    streamed = load_converted(tmp_path / "out")
    expected = whole.state_dict()
    got = streamed.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    ids = torch.randint(0, VOCAB, (2, 12))
    assert torch.equal(streamed(ids).logits, whole(ids).logits)
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


def test_streaming_refuses_an_existing_output_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out", MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8),
                           calibration(), device="cpu", progress=False)

    import transmla_surgery.streaming as streaming

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(streaming, "convert_buffered_layer", boom)
    with pytest.raises(RuntimeError, match="injected"):
        convert_checkpoint(tmp_path / "src", tmp_path / "new", MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8),
                           calibration(), device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    monkeypatch.undo()
    from transmla_surgery.errors import ConfigError

    for bad in (0, -4, 2.5, True):
        with pytest.raises(ConfigError, match="chunk_tokens must be a positive int"):
            convert_checkpoint(tmp_path / "src", tmp_path / "new", MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8),
                               calibration(), device="cpu", progress=False, chunk_tokens=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_streaming_with_small_chunks_equals_whole_model_with_the_same_chunks(tmp_path, monkeypatch):
    """Micro-batches of one sequence, MLP rows and accumulator rows split mid-sequence: both paths chunk alike, so
    they still agree bit for bit; and the chunked conversion is the unchunked one up to rounding."""
    import transmla_surgery.calibration as calibration_module

    config = MLAConfig(kv_lora_rank=20, qk_rope_head_dim=8)
    source = tiny_model("llama", layers=3)
    source.save_pretrained(tmp_path / "src")
    calib = padded_calibration()
    unchunked = copy.deepcopy(source)
    convert_to_mla(unchunked, config, calib, keep_activations=True, progress=False)

    monkeypatch.setattr(calibration_module, "CHUNK_TOKENS", 16)  # < seq 24: one sequence a forward, MLP split
    monkeypatch.setattr(calibration_module, "ACCUMULATE_ROWS", 7)
    whole = copy.deepcopy(source)
    convert_to_mla(whole, config, calib, keep_activations=True, progress=False)
    convert_checkpoint(tmp_path / "src", tmp_path / "out", config, calib, device="cpu", progress=False)
    streamed = load_converted(tmp_path / "out")
    expected, got = whole.state_dict(), streamed.state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected)

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = streamed(ids).logits, unchunked(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-5


def test_streaming_keeps_only_what_each_phase_needs_on_the_device(tmp_path, monkeypatch):
    """The memory bound rests on the phase order: while float64 statistics accumulate, the layer's MLP is not
    loaded; the Gram sum is gone before the refit sums exist; the source attention is dropped before the MLP
    runs (converted inputs; with original inputs the source block is what the advance runs)."""
    import transmla_surgery.calibration as C
    import transmla_surgery.streaming as streaming

    for mode in ("converted", "original"):
        config = MLAConfig(kv_lora_rank=12, qk_rope_head_dim=8, calibration_inputs=mode)
        tiny_model("llama", layers=3).save_pretrained(tmp_path / mode / "src")
        current: dict = {}
        grams: list[C.GramAccumulator] = []
        checks: list[str] = []
        real_convert, real_gram_add = streaming.convert_buffered_layer, C.GramAccumulator.add
        real_reg_add, real_advance = C.RegressionAccumulator.add, C.LayerInputBuffer.advance

        def convert(index, layer, original, *args, **kwargs):
            current.update(layer=layer, original=original)
            return real_convert(index, layer, original, *args, **kwargs)

        def gram_add(self, *args, **kwargs):
            assert current["layer"].mlp.gate_proj.weight.is_meta, "MLP loaded during the Gram"
            grams.append(self)
            checks.append("gram")
            return real_gram_add(self, *args, **kwargs)

        def reg_add(self, *args, **kwargs):
            assert current["layer"].mlp.gate_proj.weight.is_meta, "MLP loaded during the refit"
            assert all(g.total is None for g in grams), "a Gram sum outlives its factorisation"
            checks.append("refit")
            return real_reg_add(self, *args, **kwargs)

        def advance(self, index, *args, **kwargs):
            layer, original = current["layer"], current["original"]
            assert not layer.mlp.gate_proj.weight.is_meta
            assert not original.q_proj.weight.is_meta if mode == "original" else original.q_proj.weight.is_meta
            checks.append("advance")
            return real_advance(self, index, *args, **kwargs)

        monkeypatch.setattr(streaming, "convert_buffered_layer", convert)
        monkeypatch.setattr(C.GramAccumulator, "add", gram_add)
        monkeypatch.setattr(C.RegressionAccumulator, "add", reg_add)
        monkeypatch.setattr(C.LayerInputBuffer, "advance", advance)
        convert_checkpoint(tmp_path / mode / "src", tmp_path / mode / "out", config, calibration(), device="cpu",
                           progress=False)
        monkeypatch.undo()
        assert checks.count("advance") == 2 and {"gram", "refit"} <= set(checks)
        load_converted(tmp_path / mode / "out")  # the MLP of the last (never advanced) layer was written too


def test_weight_finiteness_is_checked_slice_by_slice_without_missing_any_element():
    from transmla_surgery.surgery import _all_finite

    t = torch.randn(7, 5)
    assert _all_finite(t, chunk=3)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in (0, 17, 34):  # first slice, a middle one, the last (partial) one
            u = t.clone()
            u.view(-1)[at] = bad
            assert not _all_finite(u, chunk=3)
