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
