"""Issue 7, reliability: bad input gets a clear error, failures leave nothing changed, loading runs no code.

Every bad input tried here (and in test_errors.py / test_export.py, which this file does not repeat) is listed
with its exception and message in docs/errors.md. Tiny random models, CPU, one thread; the one CUDA test is
skipped where there is no GPU.
"""

from __future__ import annotations

import ast
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import VOCAB, calibration, fail_factorization_at, rel_err, tiny_model
from transmla_surgery import (
    CalibrationError,
    ConfigError,
    ConversionError,
    MLAAttention,
    MLAConfig,
    UnsupportedModelError,
    convert_to_mla,
    export_deepseek,
    load_converted,
    load_exported,
)
from transmla_surgery import calibration as C
from transmla_surgery import export as E
from transmla_surgery import surgery
from transmla_surgery.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
CFG = MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8)

pytestmark = pytest.mark.filterwarnings("ignore:export_deepseek:UserWarning")


# ---------------------------------------------------------------------------------------------- helpers
def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def snapshot(model) -> dict:
    """Everything a failed conversion must leave as it was: blocks, parameter objects, values (bit for bit, NaN
    included), dtypes, training flags, hooks, and the absence of a conversion record."""
    return {
        "blocks": [layer.self_attn for layer in model.model.layers],
        "params": [id(p) for p in model.parameters()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "hooks": _hooks(model),
        "record": hasattr(model.config, "transmla"),
    }


def assert_untouched(model, snap: dict) -> None:
    assert [layer.self_attn for layer in model.model.layers] == snap["blocks"]
    assert [id(p) for p in model.parameters()] == snap["params"]
    now = model.state_dict()
    assert now.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert now[k].dtype == v.dtype, k
        torch.testing.assert_close(now[k], v, rtol=0, atol=0, equal_nan=True)
    assert [m.training for m in model.modules()] == snap["training"]
    assert _hooks(model) == snap["hooks"]
    assert hasattr(model.config, "transmla") == snap["record"]


def word_tokenizer(n: int):
    """A fast word-level tokenizer of ``n`` tokens ``t0 … t{n-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(n)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                                   eos_token="t2")


def ids(seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits.double()


def converted_model(seed: int = 0):
    model = tiny_model("llama", seed=seed)
    convert_to_mla(model, MLAConfig(kv_lora_rank=24, qk_rope_head_dim=8), calibration(), progress=False)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One converted model, its ``save_pretrained`` directory and its (unverified: test_export verifies) export,
    and a plain Hugging Face source directory with its tokenizer."""
    root = tmp_path_factory.mktemp("saved")
    model = converted_model()
    model.save_pretrained(root / "conv")
    export_deepseek(model, root / "exp", verify=False)
    source = tiny_model("llama", seed=3)
    source.save_pretrained(root / "source")
    word_tokenizer(VOCAB).save_pretrained(root / "source")
    return {"model": model, "root": root}


def copy_of(saved, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(saved["root"] / name, target)
    return target


def shard(directory: Path) -> list[str]:
    """Rewrite ``model.safetensors`` as two shards and an index (what large checkpoints look like)."""
    tensors = load_file(directory / "model.safetensors")
    names = sorted(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    files = [f"model-0000{k}-of-00002.safetensors" for k in (1, 2)]
    for fname, part in zip(files, parts):
        save_file({n: tensors[n] for n in part}, str(directory / fname), metadata={"format": "pt"})
    weight_map = {n: fname for fname, part in zip(files, parts) for n in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "model.safetensors").unlink()
    return files


# ============================================================================================== unsupported models
def _softcap(m):
    m.config.attn_logit_softcapping = 50.0


def _fused_qkv(m):
    del m.model.layers[0].self_attn.q_proj


def _scale(m):
    m.model.layers[1].self_attn.scaling = 0.1


def _no_rope(m):
    del m.model.rotary_emb


def _no_layers(m):
    m.model.layers = torch.nn.ModuleList()


def _mixed_geometry(m):
    attn = m.model.layers[1].self_attn
    attn.k_proj = torch.nn.Linear(48, 64, bias=False)
    attn.v_proj = torch.nn.Linear(48, 64, bias=False)


def _odd_head_dim(m):
    for layer in m.model.layers:
        layer.self_attn.head_dim = 1


def _int8_weights(m):
    attn = m.model.layers[1].self_attn
    attn.v_proj.weight = torch.nn.Parameter(attn.v_proj.weight.detach().round().to(torch.int8), requires_grad=False)


def _meta_weights(m):
    attn = m.model.layers[0].self_attn
    attn.o_proj.weight = torch.nn.Parameter(torch.empty_like(attn.o_proj.weight, device="meta"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_softcap, "attention logit soft-capping cannot be represented in MLA"),
        (_fused_qkv, r"layer 0 attention \(LlamaAttention\) lacks nn.Linear \['q_proj'\]"),
        (_scale, "layer 1: softmax scale 0.1 differs from 1/sqrt"),
        (_no_rope, "has no model.rotary_emb"),
        (_no_layers, "has no decoder layers at .model.layers"),
        (_mixed_geometry, "layer 1 geometry .* differs from layer 0"),
        (_odd_head_dim, "odd head_dim 1 cannot carry RoPE pairs"),
        (_int8_weights, r"layer 1 self_attn.v_proj.weight has dtype torch.int8: conversion needs floating-point"),
        (_meta_weights, r"layer 0 self_attn.o_proj.weight is on the 'meta' device"),
    ],
    ids=lambda v: v.__name__.lstrip("_") if callable(v) else "msg",
)
def test_unsupported_layer_variants_are_refused_before_the_model_is_touched(damage, message):
    """Beyond test_errors.py (qwen3, gpt2, per-head q/k norm, partial rotary, converting twice)."""
    model = tiny_model("llama")
    damage(model)
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=message):
        convert_to_mla(model, CFG, calibration(), progress=False)
    assert_untouched(model, snap)


def test_mixed_attention_types_refuse_the_activation_buffer():
    model = tiny_model("llama")
    model.config.layer_types = ["full_attention", "sliding_attention"]
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="keep_activations=True needs one attention type"):
        convert_to_mla(model, CFG, calibration(), keep_activations=True, progress=False)
    assert_untouched(model, snap)


def test_something_that_is_not_a_model_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"model_type None \(str\) is not supported"):
        convert_to_mla("meta-llama/Llama-3-8B", CFG, calibration(), progress=False)


# ============================================================================================== configs
@pytest.mark.parametrize(
    "data, message",
    [
        ({"kv_lora_rank": 8}, r"lacks required field\(s\) \['qk_rope_head_dim'\]"),
        ({"kv_lora_rank": 8, "qk_rope_head_dim": 8, "rank": 4}, r"unknown MLAConfig field\(s\) \['rank'\]"),
        ({"kv_lora_rank": "8", "qk_rope_head_dim": 8}, "kv_lora_rank must be an integer, got '8'"),
        ({"kv_lora_rank": 8, "qk_rope_head_dim": 8, "key_weight": float("inf")}, "key_weight must be a positive finite"),
        (None, "must be a mapping"),
        ([("kv_lora_rank", 8)], "must be a mapping"),
    ],
)
def test_mla_config_records_with_missing_unknown_or_wrong_fields(data, message):
    with pytest.raises(ConfigError, match=message):
        MLAConfig.from_dict(data)


@pytest.mark.parametrize(
    "config, keep, message",
    [
        (dict(refit_target="model"), False, "refit_target='model' needs keep_activations=True"),
        (dict(refit_target="model", calibration_inputs="original"), True,
         "refit_target='model' needs calibration_inputs='converted'"),
    ],
)
def test_option_combinations_that_cannot_work_are_refused_before_the_model_is_touched(config, keep, message):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ConfigError, match=message):
        convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8, **config), calibration(),
                       keep_activations=keep, progress=False)
    assert_untouched(model, snap)


def test_mla_config_round_trips_through_its_record():
    config = MLAConfig(kv_lora_rank=12, qk_rope_head_dim=4, freqfold=4, q_lora_rank=20, subspace="variance")
    assert MLAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ---------------------------------------------------------------------------------------------- property: limits
@st.composite
def geometry_and_bad_setting(draw):
    """A source geometry and one setting beyond one of its limits, with the number the message must name."""
    kv = draw(st.sampled_from([1, 2, 4]))
    rep = draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([8, 16, 32]))
    hidden = draw(st.sampled_from([16, 32, 48]))
    geom = dict(heads=kv * rep, kv_heads=kv, head_dim=d, hidden=hidden)
    good_rope = [x for x in range(2, d + 1, 2) if d % x == 0]
    kind = draw(st.sampled_from(["rank", "rope", "fold", "q_rank"]))
    dr = draw(st.sampled_from(good_rope))
    c = d // dr
    allowed = [m for m in range(c, d // 2 + 1, c) if (d // 2) % m == 0]
    if kind == "rank":
        limit = 2 * kv * d - dr
        kwargs = dict(kv_lora_rank=limit + draw(st.integers(1, 1000)), qk_rope_head_dim=dr)
        return geom, kwargs, ConfigError, rf"exceeds the layer's limit 2·G·d − d_rope = 2·{kv}·{d} − {dr} = {limit} "
    if kind == "rope":
        bad = draw(st.sampled_from([x for x in range(2, 2 * d + 3, 2) if x > d or d % x]))
        return geom, dict(kv_lora_rank=4, qk_rope_head_dim=bad), ConfigError, (
            rf"qk_rope_head_dim={bad} must divide the source head_dim={d} ")
    if kind == "fold":
        bad = draw(st.sampled_from([m for m in range(1, d + 1) if m not in allowed]))
        return geom, dict(kv_lora_rank=4, qk_rope_head_dim=dr, freqfold=bad), ConfigError, (
            rf"freqfold={bad} is invalid for head_dim={d} .*\(allowed: {re_list(allowed)}\)")
    q_max = min(hidden + 1, kv * rep * (d + dr))
    return geom, dict(kv_lora_rank=4, qk_rope_head_dim=dr, q_lora_rank=q_max + draw(st.integers(1, 100))), (
        ConfigError), rf"= {q_max}$"


def re_list(values: list[int]) -> str:
    return r"\[" + ", ".join(str(v) for v in values) + r"\]"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=geometry_and_bad_setting())
def test_any_setting_beyond_a_limit_names_the_limit_and_leaves_the_model_untouched(case):
    geom, kwargs, exc, message = case
    model = tiny_model("llama", layers=1, **geom)
    snap = snapshot(model)
    with pytest.raises(exc, match=message):
        convert_to_mla(model, MLAConfig(**kwargs), calibration(batches=1, batch=1, seq=4), progress=False)
    assert_untouched(model, snap)


@settings(max_examples=60, deadline=None)
@given(kv=st.sampled_from([1, 2, 4]), rep=st.sampled_from([1, 2]), d=st.sampled_from([8, 16, 32, 64]),
       data=st.data())
def test_the_named_limits_are_the_real_limits(kv, rep, d, data):
    """Settings exactly at each limit pass the geometry check (the limit in the message is tight)."""
    dr = data.draw(st.sampled_from([x for x in range(2, d + 1, 2) if d % x == 0]))
    c = d // dr
    fold = data.draw(st.sampled_from([m for m in range(c, d // 2 + 1, c) if (d // 2) % m == 0]))
    hidden = data.draw(st.integers(8, 80))
    q_max = min(hidden + 1, kv * rep * (d + dr))
    config = MLAConfig(kv_lora_rank=2 * kv * d - dr, qk_rope_head_dim=dr, freqfold=fold, q_lora_rank=q_max)
    config.check_against_geometry(num_kv_heads=kv, head_dim=d, num_heads=kv * rep, hidden_size=hidden)


# ============================================================================================== calibration
@pytest.mark.parametrize(
    "calib, message",
    [
        ([torch.ones(2, 8, dtype=torch.bool)], "must be integer token ids, got dtype torch.bool"),
        ([torch.ones(2, 8, dtype=torch.complex64)], "must be integer token ids"),
        ([torch.ones(2, 8, dtype=torch.long, device="meta")], "tensors on the 'meta' device hold no data"),
        ([{"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.full((2, 8), 0.5)}],
         "attention_mask must hold only 0 .padding. and 1 .token."),
        ([{"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.full((2, 8), 2)}],
         "attention_mask must hold only 0"),
        ([{"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": [[1] * 8] * 2}],
         "attention_mask must be a tensor"),
        ([torch.ones(2, 8, dtype=torch.long), torch.full((2, 8), -1)], r"item 1: token ids must lie in \[0, 97\)"),
        (iter([]), "calibration is empty"),
        ([torch.zeros(3, 0, dtype=torch.long)], r"must be \[batch, seq\] and non-empty, got \(3, 0\)"),
        (torch.zeros(0, dtype=torch.long), r"non-empty, got \(1, 0\)"),
    ],
    ids=["bool", "complex", "meta", "mask-0.5", "mask-2", "mask-list", "negative-id", "empty-iterator",
         "zero-length", "empty-tensor"],
)
def test_more_bad_calibration_is_refused_before_the_model_is_touched(calib, message):
    """Beyond test_errors.py (empty, None, text, float ids, out-of-vocabulary ids, dict without input_ids, mask of
    the wrong shape, all-masked, 3-D ids, lists)."""
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match=message):
        convert_to_mla(model, CFG, calib, progress=False)
    assert_untouched(model, snap)


@pytest.mark.parametrize("exc", [ValueError("bad shard in my dataset"), KeyboardInterrupt()])
def test_an_error_raised_by_the_calibration_iterable_propagates_and_nothing_changes(exc):
    def batches():
        yield from calibration(batches=2)
        raise exc

    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(type(exc)):
        convert_to_mla(model, CFG, batches(), progress=False)
    assert_untouched(model, snap)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_token_ids_of_any_width_give_the_same_conversion(dtype):
    """Token ids may come as any integer dtype (numpy/tokenizers often give int32): converted to int64, same bits."""
    states = []
    for cast in (torch.long, dtype):
        model = tiny_model("llama")
        convert_to_mla(model, CFG, [c.to(cast) for c in calibration()], progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ============================================================================================== non-finite values
def test_non_finite_norm_weight_and_bias_name_the_layer():
    """Beyond test_errors.py (NaN in a projection weight, Inf reaching a layer's input)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("inf")
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="layer 1 input_layernorm.weight holds NaN or Inf"):
        convert_to_mla(model, CFG, calibration(), progress=False)
    assert_untouched(model, snap)

    model = tiny_model("qwen2")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias[1] = float("-inf")
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="layer 0 self_attn.k_proj.bias holds NaN or Inf"):
        convert_to_mla(model, CFG, calibration(), progress=False)
    assert_untouched(model, snap)


@pytest.mark.parametrize("keep", [False, True])
def test_nan_in_an_embedding_row_the_calibration_reads_names_layer_0(keep):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 0] = float("nan")
    snap = snapshot(model)
    calib = calibration()
    calib[1][0, 3] = 5
    with pytest.raises(CalibrationError, match="non-finite activations .NaN/Inf. at the input of layer 0 attention"):
        convert_to_mla(model, CFG, calib, keep_activations=keep, progress=False)
    assert_untouched(model, snap)


# ============================================================================================== dtypes and devices
def test_float16_model_on_cpu_converts_with_float64_statistics():
    """float16 on the CPU is allowed: statistics are float64 whatever the model dtype; the converted float16 model
    is as close to the converted float32 model as the float16 source is to the float32 source. (Export refuses
    float16: test_export.py::test_float16_and_unconverted_models_refused_before_writing.)"""
    half, full = tiny_model("llama", dtype=torch.float16), tiny_model("llama")
    with torch.no_grad():
        source_gap = rel_err(half(ids()).logits, full(ids()).logits)
    for model in (half, full):
        convert_to_mla(model, MLAConfig(kv_lora_rank=24, qk_rope_head_dim=8), calibration(), progress=False)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    out = logits(half, ids())
    assert torch.isfinite(out).all()
    assert rel_err(out, logits(full, ids())) < 5 * source_gap + 1e-3


@pytest.mark.parametrize("dtype, message", [(torch.int8, "dtype torch.int8 is not supported"),
                                            ("float8", "dtype 'float8' is not a torch dtype"),
                                            ("int64", "dtype torch.int64 is not supported")])
def test_export_refuses_non_float_dtypes_before_writing(saved, tmp_path, dtype, message):
    with pytest.raises(ConfigError, match=message):
        export_deepseek(saved["model"], tmp_path / "e", dtype=dtype)
    assert list(tmp_path.iterdir()) == []


def test_load_converted_refuses_integer_dtypes(saved):
    with pytest.raises(ConfigError, match="dtype must be a floating-point torch.dtype, got torch.int32"):
        load_converted(saved["root"] / "conv", dtype=torch.int32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
@pytest.mark.parametrize("model_device, ids_device, mask_device",
                         [("cuda", "cpu", "cpu"), ("cpu", "cuda", "cuda"), ("cuda", "cpu", "cuda")])
def test_calibration_on_another_device_than_the_model_is_moved_not_refused(model_device, ids_device, mask_device):
    """Decision: token ids (8 bytes a token) are moved to the model's device batch by batch, never refused; the
    conversion is bit-identical to calibrating on the model's own device."""
    def calib(ids_dev, mask_dev):
        out = []
        for k, batch in enumerate(calibration()):
            mask = torch.ones_like(batch)
            mask[0, -k - 1 :] = 0
            out.append({"input_ids": batch.to(ids_dev), "attention_mask": mask.to(mask_dev)})
        return out

    states = []
    for ids_dev, mask_dev in ((model_device, model_device), (ids_device, mask_device)):
        model = tiny_model("llama").to(model_device)
        convert_to_mla(model, CFG, calib(ids_dev, mask_dev), keep_activations=True, progress=False)
        states.append({k: v.cpu() for k, v in model.state_dict().items()})
        model = tiny_model("llama").to(model_device)
        convert_to_mla(model, CFG, calib(ids_dev, mask_dev), progress=False)
        states.append({k: v.cpu() for k, v in model.state_dict().items()})
    for a, b in ((states[0], states[2]), (states[1], states[3])):
        assert all(torch.equal(a[k], b[k]) for k in a)


# ============================================================================================== tokenizers
def test_export_refuses_a_tokenizer_of_another_model_before_writing(saved, tmp_path):
    with pytest.raises(ConfigError, match=r"the tokenizer has 200 tokens but the model's vocab_size is 97"):
        export_deepseek(saved["model"], tmp_path / "e", word_tokenizer(200), verify=False)
    assert list(tmp_path.iterdir()) == []
    # a smaller tokenizer is normal (padded embedding tables) and is written
    export_deepseek(saved["model"], tmp_path / "e", word_tokenizer(90), verify=False)
    assert (tmp_path / "e" / "tokenizer.json").is_file()


def test_load_model_and_the_cli_refuse_a_tokenizer_of_another_model(saved, tmp_path, capsys):
    from transmla_surgery import cli
    from transmla_surgery.models import load_model

    source = copy_of(saved, "source", tmp_path)
    model, tok = load_model(source)
    assert len(tok) == model.config.vocab_size == VOCAB
    word_tokenizer(200).save_pretrained(source)
    with pytest.raises(ConfigError, match=rf"{source}: the tokenizer has 200 tokens but the model's vocab_size is 97"):
        load_model(source)
    assert cli.main(["convert", "--model", str(source), "--calib-seqs", "1", "--eval-seqs", "1"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "error: " in out and "the tokenizer has 200 tokens but the model's vocab_size is 97" in out


# ============================================================================================== damaged checkpoints
def _truncate_half(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _truncate_tail(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-1])


def _header_only(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:4])


def _empty(f: Path) -> None:
    f.write_bytes(b"")


def _garbage(f: Path) -> None:
    f.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
                  .numpy().tobytes())


def _bad_header(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))


DAMAGE = {"truncated-half": _truncate_half, "truncated-1-byte": _truncate_tail, "4-bytes": _header_only,
          "empty": _empty, "random-bytes": _garbage, "bad-header": _bad_header}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("kind", ["conv", "exp"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_corrupt_or_truncated_safetensors_raise_an_error_naming_the_file(saved, tmp_path, kind, damage, sharded):
    """load_converted / load_exported: a clear CheckpointError naming the damaged file, never a crash, never a
    model (nothing half-loaded is returned)."""
    directory = copy_of(saved, kind, tmp_path)
    load = load_converted if kind == "conv" else load_exported
    target = directory / (shard(directory)[1] if sharded else "model.safetensors")
    assert load(directory) is not None  # intact (sharded or not): loads
    DAMAGE[damage](target)
    with pytest.raises(CheckpointError, match=rf"{target} is not a readable safetensors file .*truncated or corrupt"):
        load(directory)


def _index_not_json(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text("{not json")


def _index_without_map(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))


def _index_names_missing_shard(d: Path) -> None:
    (d / "model-00002-of-00002.safetensors").unlink()


def _index_escapes_directory(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../../elsewhere.safetensors" for k in index["weight_map"]}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _no_weights(d: Path) -> None:
    for f in d.glob("model*.safetensors*"):
        f.unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_index_not_json, "is not a valid safetensors index"),
        (_index_without_map, r"is not a valid safetensors index \(KeyError"),
        (_index_names_missing_shard, "names model-00002-of-00002.safetensors, which is missing"),
        (_index_escapes_directory, r"names '../../elsewhere.safetensors', not a .safetensors file in"),
        (_no_weights, "holds neither model.safetensors nor model.safetensors.index.json"),
    ],
    ids=lambda v: v.__name__.lstrip("_") if callable(v) else "msg",
)
@pytest.mark.parametrize("kind", ["conv", "exp"])
def test_damaged_shard_index_or_missing_weights_raise_an_error_naming_the_file(saved, tmp_path, kind, damage, message):
    directory = copy_of(saved, kind, tmp_path)
    shard(directory)
    damage(directory)
    with pytest.raises(CheckpointError, match=message):
        (load_converted if kind == "conv" else load_exported)(directory)


def _edit_config(directory: Path, edit) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    edit(cfg)
    (directory / "config.json").write_text(json.dumps(cfg))


def _geometry(**change):
    def edit(cfg):
        cfg["transmla"]["geometry"].update(change)
    return edit


def _drop_geometry_field(name):
    def edit(cfg):
        del cfg["transmla"]["geometry"][name]
    return edit


@pytest.mark.parametrize(
    "edit, exc, message",
    [
        (lambda c: c.update(transmla="broken"), ConfigError, "'transmla' record must be a JSON object, got str"),
        (lambda c: c.update(transmla=[1, 2]), ConfigError, "'transmla' record must be a JSON object, got list"),
        (lambda c: c["transmla"].pop("geometry"), ConfigError, "lacks a 'geometry' object"),
        (lambda c: c["transmla"].update(format=2), ConfigError, "has format 2; this library reads format 1"),
        (_drop_geometry_field("kv_lora_rank"), ConfigError, r"geometry lacks required field\(s\) \['kv_lora_rank'\]"),
        (_geometry(foo=1), ConfigError, r"geometry has unknown field\(s\) \['foo'\]"),
        (_geometry(kv_lora_rank="24"), ConfigError, "geometry.kv_lora_rank = '24' is not valid"),
        (_geometry(kv_lora_rank=-1), ConfigError, "geometry.kv_lora_rank = -1 is not valid"),
        (_geometry(q_bias="no"), ConfigError, "geometry.q_bias = 'no' is not valid"),
        (_geometry(qk_rope_head_dim=7), ConfigError, "geometry.qk_rope_head_dim = 7 must be even"),
        (_geometry(hidden_size=64), ConfigError, "geometry.hidden_size = 64 does not match the model's hidden_size = 48"),
        (_geometry(kv_lora_rank=20), CheckpointError, "weights do not fit the recorded geometry"),
        (_geometry(q_lora_rank=16), CheckpointError, "weights do not fit the converted geometry .missing"),
        (lambda c: c.pop("transmla"), UnsupportedModelError, "has no 'transmla' record: not a converted model"),
        (lambda c: c.pop("model_type"), ValueError, "Should have a `model_type` key in its config.json"),
    ],
    ids=["record-str", "record-list", "no-geometry", "format-2", "missing-field", "unknown-field", "rank-str",
         "rank-negative", "bias-str", "rope-odd", "hidden-mismatch", "rank-mismatch", "q-lora-mismatch", "no-record",
         "no-model-type"],
)
def test_broken_config_of_a_converted_model_is_refused_naming_the_field(saved, tmp_path, edit, exc, message):
    directory = copy_of(saved, "conv", tmp_path)
    _edit_config(directory, edit)
    with pytest.raises(exc, match=message) as info:
        load_converted(directory)
    if exc is ConfigError:
        assert str(directory / "config.json") in str(info.value)


def test_config_json_that_is_not_json_is_refused_naming_the_file(saved, tmp_path):
    for kind, load in (("conv", load_converted), ("exp", load_exported)):
        directory = copy_of(saved, kind, tmp_path)
        (directory / "config.json").write_text('{"model_type": "llama", ')
        with pytest.raises(OSError, match=rf"config file at '{directory / 'config.json'}' is not a valid JSON file"):
            load(directory)


def test_paths_that_are_not_directories_are_refused(saved, tmp_path):
    for load in (load_converted, load_exported):
        with pytest.raises(FileNotFoundError, match="is not a directory"):
            load(tmp_path / "missing")
        with pytest.raises(FileNotFoundError, match="is not a directory"):
            load(saved["root"] / "conv" / "config.json")


def test_export_path_that_is_a_file_is_refused_and_left_alone(saved, tmp_path):
    """Beyond test_export.py (existing export without overwrite, non-empty non-export directory)."""
    target = tmp_path / "e"
    target.write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="exists and is not a directory"):
            export_deepseek(saved["model"], target, overwrite=overwrite)
    assert target.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_a_failed_atomic_swap_keeps_the_earlier_export(saved, tmp_path, monkeypatch):
    """The overwrite swaps old and new exports in one step (renameat2 RENAME_EXCHANGE); if that step fails, the
    earlier export is untouched and nothing is left beside it."""
    path = tmp_path / "e"
    export_deepseek(saved["model"], path, verify=False)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def refuse(a, b):
        raise OSError("exchange failed")

    monkeypatch.setattr(E, "_exchange", refuse)
    with pytest.raises(OSError, match="exchange failed"):
        export_deepseek(converted_model(seed=1), path, overwrite=True, verify=False)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_overwrite_without_an_atomic_swap_falls_back_to_two_renames(saved, tmp_path, monkeypatch):
    path = tmp_path / "e"
    export_deepseek(saved["model"], path, verify=False)
    monkeypatch.setattr(E, "_exchange", lambda a, b: False)
    export_deepseek(converted_model(seed=1), path, overwrite=True, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    torch.testing.assert_close(logits(load_exported(path), ids()), logits(converted_model(seed=1), ids()),
                               rtol=0, atol=1e-4)


# ============================================================================================== transactions
def _convert(model, keep: bool, **config):
    convert_to_mla(model, MLAConfig(kv_lora_rank=8, qk_rope_head_dim=8, **config), calibration(batches=2),
                   keep_activations=keep, progress=False)


@pytest.mark.parametrize("fail_at", [0, 1, 2])
@pytest.mark.parametrize("mode", ["converted", "original"])
def test_failure_at_any_layer_with_keep_activations_leaves_the_model_as_it_was(monkeypatch, fail_at, mode):
    """test_errors.py covers keep_activations=False; this is the buffered path (the CLI's default)."""
    model = tiny_model("llama", layers=3).train()
    snap = snapshot(model)
    fail_factorization_at(monkeypatch, fail_at)
    with pytest.raises(ConversionError, match=f"failed at layer {fail_at} .*injected failure.*restored unchanged"):
        _convert(model, True, calibration_inputs=mode)
    assert_untouched(model, snap)


INJECTION_POINTS = {
    "factorize": (surgery, "factorize_layer"),  # between calibration and the swap
    "gram": (C.GramAccumulator, "add"),  # inside a calibration forward pass, visit hooks registered
    "refit": (C.RegressionAccumulator, "add"),  # inside the o_proj refit, its hook registered
    "advance": (C.LayerInputBuffer, "advance"),  # moving the buffered states through a converted layer
}


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("point", list(INJECTION_POINTS))
@pytest.mark.parametrize("keep", [False, True])
def test_interrupt_or_failure_after_a_layer_was_swapped_restores_everything(monkeypatch, keep, point, exc):
    """A failure (or Ctrl-C) once layer 0 is already converted: every layer is put back, hooks removed, training
    flags restored; a KeyboardInterrupt is re-raised as it is, anything else becomes a ConversionError."""
    if point == "advance" and not keep:
        pytest.skip("the activation buffer exists only with keep_activations=True")
    model = tiny_model("llama", layers=3).train()
    snap = snapshot(model)
    owner, name = INJECTION_POINTS[point]
    real = getattr(owner, name)
    fired = []

    def injected(*args, **kwargs):
        if isinstance(model.model.layers[0].self_attn, MLAAttention):
            fired.append(point)
            raise exc("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, injected)
    expected = KeyboardInterrupt if exc is KeyboardInterrupt else ConversionError
    with pytest.raises(expected):
        _convert(model, keep)
    assert fired
    monkeypatch.undo()
    assert_untouched(model, snap)
    _convert(model, keep)  # and the model converts normally afterwards
    assert all(isinstance(layer.self_attn, MLAAttention) for layer in model.model.layers)


# ============================================================================================== determinism
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    heads_kv=st.sampled_from([(2, 1), (4, 2), (4, 4), (6, 2)]),
    head_dim=st.sampled_from([8, 16]),
    rope_div=st.sampled_from([1, 2, 4]),
    rank_frac=st.floats(0.1, 1.0),
    q_rank=st.sampled_from([None, 12]),
    keep=st.booleans(),
    mode=st.sampled_from(["converted", "original"]),
    family=st.sampled_from(["llama", "qwen2"]),
    seed=st.integers(0, 10_000),
)
def test_same_inputs_and_seed_give_bit_identical_weights(heads_kv, head_dim, rope_div, rank_frac, q_rank, keep, mode,
                                                         family, seed):
    """Over geometries and options: two conversions of the same model on the same calibration are bit-identical,
    whatever the global RNG state in between (test_surgery.py checks one geometry)."""
    heads, kv = heads_kv
    rope = head_dim // rope_div
    rank = max(1, int(rank_frac * (2 * kv * head_dim - rope)))
    config = MLAConfig(kv_lora_rank=rank, qk_rope_head_dim=rope, q_lora_rank=q_rank, calibration_inputs=mode)
    base = tiny_model(family, heads=heads, kv_heads=kv, head_dim=head_dim, hidden=48, seed=seed)
    states, reports = [], []
    for rng in (seed, seed + 1):
        torch.manual_seed(rng)
        model = copy.deepcopy(base)
        report = convert_to_mla(model, config, calibration(batches=2, seed=seed), keep_activations=keep,
                                progress=False)
        states.append(model.state_dict())
        reports.append([(r.rope_energy, r.latent_energy, r.alpha) for r in report.layers])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert reports[0] == reports[1]


# ============================================================================================== no code from checkpoints
PACKAGE_DIRS = ["transmla_surgery", "callbacks"]
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
              ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load"), ("marshal", "loads"),
              ("shelve", "open")}


def _is_false(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def unsafe_calls(directory: Path, root: Path = ROOT) -> list[str]:
    """``torch.load`` without ``weights_only=True``; ``trust_remote_code`` set to anything but a literal ``False`` (as
    a keyword, a dict entry or a subscript assignment); unpicklers; ``numpy.load(allow_pickle=...)``;
    ``eval``/``exec``: ``file:line what`` of each (code only: strings and comments do not count)."""
    found = []
    for file in sorted(directory.rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            where = f"{file.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not _is_false(value):
                        found.append(f"{where} trust_remote_code: {ast.unparse(value)}")
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if (isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)
                            and target.slice.value == "trust_remote_code" and not _is_false(node.value)):
                        found.append(f"{where} [trust_remote_code] = {ast.unparse(node.value)}")
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == "load" and owner == "torch":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    found.append(f"{where} torch.load without weights_only=True")
            if "trust_remote_code" in kw and not _is_false(kw["trust_remote_code"]):
                found.append(f"{where} trust_remote_code={ast.unparse(kw['trust_remote_code'])}")
            if (name == "setdefault" and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value == "trust_remote_code"):
                found.append(f"{where} setdefault('trust_remote_code', ...)")
            if (owner, name) in UNPICKLERS:
                found.append(f"{where} {owner}.{name}")
            if name == "load" and owner in ("np", "numpy") and "allow_pickle" in kw:
                found.append(f"{where} numpy.load(allow_pickle=...)")
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                found.append(f"{where} {func.id}()")
    return found


@pytest.mark.parametrize(
    "package",
    [
        "transmla_surgery",
        "callbacks",
    ],
)
def test_package_source_never_unpickles_or_runs_remote_code(package):
    assert unsafe_calls(ROOT / package) == []


def test_the_source_scan_finds_what_it_looks_for(tmp_path):
    lines = [
        "import torch, pickle",
        "torch.load('x')",  # 2
        "torch.load('x', weights_only=False)",  # 3
        "torch.load('x', weights_only=True)",
        "M.from_pretrained('x', trust_remote_code=True)",  # 5
        "M.from_pretrained('x', trust_remote_code=flag)",  # 6
        "M.from_pretrained('x', trust_remote_code=False)",
        "pickle.loads(b'')",  # 8
        "model.eval()",
        "eval('1')",  # 10
        "kw = {'trust_remote_code': True}",  # 11
        "kw['trust_remote_code'] = True",  # 12
        "'trust_remote_code=True, torch.load(x) in a string'",
        "# trust_remote_code=True in a comment",
    ]
    (tmp_path / "bad.py").write_text("\n".join(lines) + "\n")
    found = sorted(int(f.split(" ", 1)[0].split(":")[1]) for f in unsafe_calls(tmp_path, root=tmp_path))
    assert found == [2, 3, 5, 6, 8, 10, 11, 12]


class _Payload:
    """Unpickling this object creates the marker file: what a malicious ``pytorch_model.bin`` would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def no_torch_load(monkeypatch):
    calls = []
    real = torch.load

    def spy(f, *args, **kwargs):
        calls.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def plant(directory: Path, marker: Path, instead: bool) -> None:
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, directory / "pytorch_model.bin")
    if instead:
        for f in directory.glob("model*.safetensors*"):
            f.unlink()


def test_the_planted_pickle_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    plant(tmp_path, marker, instead=False)
    with pytest.raises(Exception):
        torch.load(tmp_path / "pytorch_model.bin", weights_only=True)  # the safe mode refuses it ...
    assert not marker.exists()
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)  # ... the unsafe one runs it
    assert marker.exists()


@pytest.mark.parametrize("instead", [False, True], ids=["beside-safetensors", "instead-of-safetensors"])
@pytest.mark.parametrize("kind", ["conv", "exp", "source"])
def test_a_malicious_pytorch_model_bin_is_never_unpickled(saved, tmp_path, no_torch_load, kind, instead):
    """load_converted / load_exported / load_model read safetensors only: a pickle beside them is ignored, a
    pickle instead of them is an error, and neither is ever opened by torch.load."""
    from transmla_surgery.models import load_model

    directory = copy_of(saved, kind, tmp_path)
    marker = tmp_path / "marker"
    plant(directory, marker, instead)
    load = {"conv": load_converted, "exp": load_exported, "source": lambda d: load_model(d)[0]}[kind]
    if instead:
        with pytest.raises((CheckpointError, OSError), match="model.safetensors"):
            load(directory)
    else:
        model = load(directory)
        assert torch.isfinite(logits(model, ids())).all()
    assert not marker.exists()
    assert no_torch_load == []


@pytest.mark.parametrize("kind", ["conv", "exp", "source"])
def test_remote_code_named_by_a_checkpoint_is_never_imported(saved, tmp_path, kind):
    """A config.json whose auto_map points at a modeling file in the directory: the stock class is used and the
    file is never imported."""
    from transmla_surgery.models import load_model

    directory = copy_of(saved, kind, tmp_path)
    marker = tmp_path / "marker"
    (directory / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (directory / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    _edit_config(directory, lambda c: c.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}))
    load = {"conv": load_converted, "exp": load_exported, "source": lambda d: load_model(d)[0]}[kind]
    try:
        load(directory)
    except (ValueError, OSError):
        pass  # refusing is fine too; running the code is not
    assert not marker.exists()


def test_load_exported_refuses_to_be_asked_for_remote_code_or_pickles(saved):
    for kwargs in ({"trust_remote_code": True}, {"use_safetensors": False}):
        with pytest.raises(ConfigError, match="never runs code from a checkpoint"):
            load_exported(saved["root"] / "exp", **kwargs)
