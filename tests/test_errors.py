"""Bad input gets a clear error naming the limit, raised before the model is touched; failures roll back."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, calibration, fail_factorization_at, tiny_model
from transmla_surgery import (
    CalibrationError,
    ConfigError,
    ConversionError,
    MLAConfig,
    UnsupportedModelError,
    convert_to_mla,
)


def snapshot(model):
    return [layer.self_attn for layer in model.model.layers], {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, snap):
    modules, state = snap
    assert [layer.self_attn for layer in model.model.layers] == modules
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:  # bit-for-bit, NaN included
        torch.testing.assert_close(now[k], state[k], rtol=0, atol=0, equal_nan=True)
    assert not hasattr(model.config, "transmla")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_lora_rank=0, qk_rope_head_dim=8), "kv_lora_rank must be >= 1"),
        (dict(kv_lora_rank=8.0, qk_rope_head_dim=8), "kv_lora_rank must be an integer"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=7), "must be even"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, freqfold=0), "freqfold must be >= 1"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, subspace="pca"), "subspace must be"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, calibration_inputs="x"), "calibration_inputs must be"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, damping=2.0), "damping must be"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, balance_kv="yes"), "balance_kv must be"),
    ],
)
def test_config_is_validated_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MLAConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # G=2, d=16: 2·G·d − d_rope = 64 − 8 = 56
        (dict(kv_lora_rank=57, qk_rope_head_dim=8), r"exceeds the layer's limit 2·G·d − d_rope = 2·2·16 − 8 = 56"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=6), "must divide the source head_dim=16"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=32), "must divide the source head_dim=16"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, freqfold=3), r"freqfold=3 is invalid .*allowed: \[2, 4, 8\]"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=4, freqfold=2), r"multiple of d/d_rope=4"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, q_lora_rank=10_000), "q_lora_rank=10000 exceeds"),
    ],
)
def test_impossible_settings_are_refused_before_the_model_is_touched(kwargs, message):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ConfigError, match=message):
        convert_to_mla(model, MLAConfig(**kwargs), calibration(), progress=False)
    assert_untouched(model, snap)


@pytest.mark.parametrize(
    "calib, message",
    [
        ([], "calibration is empty"),
        (None, "calibration must be an iterable"),
        ("some text", "calibration must be an iterable"),
        ([torch.rand(2, 8)], "must be integer token ids"),
        ([torch.randint(0, VOCAB + 5, (2, 8)) + VOCAB], r"token ids must lie in \[0, 97\)"),
        ([{"tokens": torch.zeros(2, 3, dtype=torch.long)}], "without 'input_ids'"),
        ([{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 5)}], "attention_mask must be"),
        ([{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4)}], "masks out every token"),
        ([torch.ones(2, 3, 4, dtype=torch.long)], r"must be \[batch, seq\]"),
        ([[1, 2, 3]], "must be a torch.Tensor"),
    ],
)
def test_bad_calibration_is_refused_before_the_model_is_touched(calib, message):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match=message):
        convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8), calib, progress=False)
    assert_untouched(model, snap)


def test_non_finite_weights_name_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 2] = float("nan")
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"layer 1 self_attn.k_proj.weight holds NaN"):
        convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8), calibration(), progress=False)
    assert_untouched(model, snap)


@pytest.mark.parametrize("keep", [False, True])
def test_non_finite_activations_name_the_layer_and_roll_back(keep):
    """An Inf in the MLP of layer 0 poisons layer 1's input: the error names layer 1, layer 0 is restored."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match="non-finite activations .* layer 1 attention"):
        convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8), calibration(), keep_activations=keep,
                       progress=False)
    assert_untouched(model, snap)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))


@pytest.mark.parametrize(
    "build, message",
    [
        (_qwen3, "model_type 'qwen3'"),
        (_gpt2, "model_type 'gpt2'"),
    ],
)
def test_unsupported_architectures_are_refused(build, message):
    model = build()
    with pytest.raises(UnsupportedModelError, match=message):
        convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8), calibration(), progress=False)


def test_per_head_qk_norm_is_refused_even_in_a_supported_family():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.k_norm = torch.nn.LayerNorm(16)
    with pytest.raises(UnsupportedModelError, match="layer 1 attention has a per-head k_norm"):
        convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8), calibration(), progress=False)


def test_partial_rotary_is_refused():
    model = tiny_model("llama")
    model.config.partial_rotary_factor = 0.5
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor=0.5"):
        convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8), calibration(), progress=False)


def test_converting_twice_is_refused():
    model = tiny_model("llama")
    convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8), calibration(), progress=False)
    with pytest.raises(UnsupportedModelError, match="already converted"):
        convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8), calibration(), progress=False)


@pytest.mark.parametrize("fail_at", [0, 1, 2])
@pytest.mark.parametrize("mode", ["converted", "original"])
def test_failure_at_any_layer_leaves_the_model_bit_for_bit_as_it_was(monkeypatch, fail_at, mode):
    model = tiny_model("llama", layers=3)
    snap = snapshot(model)
    fail_factorization_at(monkeypatch, fail_at)
    with pytest.raises(ConversionError, match=f"failed at layer {fail_at} .*injected failure.*restored unchanged"):
        convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8, calibration_inputs=mode), calibration(),
                       progress=False)
    assert_untouched(model, snap)


def test_config_must_be_an_mla_config():
    with pytest.raises(TypeError, match="config must be an MLAConfig"):
        convert_to_mla(tiny_model("llama"), {"kv_lora_rank": 8}, calibration(), progress=False)
