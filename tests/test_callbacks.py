"""Lightning callbacks on a tiny random Llama: surgery in setup, gradual rank reduction, distillation, export.

Everything runs on the CPU in float32 (one test in bf16-mixed), seeded, a few optimizer steps per fit.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from transmla_surgery import MLAAttention, MLAConfig
from transmla_surgery.callbacks import Distillation, GradualRankReduction, MLAExport, MLASurgery, find_model
from transmla_surgery.errors import ConfigError, UnsupportedModelError

VOCAB = 128
CONFIG = MLAConfig(kv_lora_rank=24, qk_rope_head_dim=8)  # 2·G·d = 64 → 32 cached values (50% smaller)

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def rows(n: int, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def calibration() -> list[torch.Tensor]:
    return list(rows(8, 32, seed=2).split(4))


class LM(L.LightningModule):
    """A user's plain LightningModule around a Hugging Face causal LM (never edited by the callbacks' users)."""

    def __init__(self, model: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            out = self.model(**batch, labels=labels)
        else:
            out = self.model(input_ids=batch, labels=batch)
        self.log("train/loss", out.loss)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class Record(Callback):
    """Keeps what was logged and what training_step returned, per step."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.losses.append(float(outputs["loss"]))


def loader(data, batch_size: int = 4):
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def trainer(callbacks, max_steps: int, **kw) -> L.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, **kw)


def attention_blocks(model: nn.Module) -> list[MLAAttention]:
    return [layer.self_attn for layer in model.model.layers]


# ---------------------------------------------------------------------------------------------- MLASurgery
def test_surgery_converts_in_setup_and_trains_only_attention():
    original = tiny_llama()
    module = LM(copy.deepcopy(original))
    trainer([MLASurgery(CONFIG, calibration(), train="attention")], max_steps=3).fit(module, loader(rows(12)))
    model = module.model
    assert all(isinstance(b, MLAAttention) for b in attention_blocks(model))
    before = dict(original.named_parameters())
    for name, p in model.named_parameters():
        if ".self_attn." in name:
            assert p.requires_grad
        else:  # frozen and untouched by three AdamW steps
            assert not p.requires_grad and torch.equal(p, before[name]), name
    assert model.config.transmla["geometry"]["kv_lora_rank"] == 24


def test_surgery_finds_the_model_or_says_why_not():
    class Two(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = tiny_llama(), tiny_llama(1)

    two = Two()
    with pytest.raises(UnsupportedModelError, match="model_attr"):
        find_model(two)
    assert find_model(two, "b") is two.b
    with pytest.raises(AttributeError, match="nope"):
        find_model(two, "nope")
    with pytest.raises(UnsupportedModelError, match="0 transformers models"):
        find_model(L.LightningModule())
    one = LM(tiny_llama())
    assert find_model(one) is one.model  # the inner LlamaModel is not a second candidate


def test_bad_configuration_fails_before_the_model_changes():
    module = LM(tiny_llama())
    too_big = MLAConfig(kv_lora_rank=60, qk_rope_head_dim=8)  # limit 2·2·16 − 8 = 56
    with pytest.raises(ConfigError, match="kv_lora_rank=60"):
        trainer([MLASurgery(too_big, calibration())], max_steps=1).fit(module, loader(rows(4)))
    assert hasattr(module.model.model.layers[0].self_attn, "k_proj")
    with pytest.raises(ConfigError, match="exceeds the converted kv_lora_rank"):
        trainer([GradualRankReduction(8, start_rank=30), MLASurgery(CONFIG, calibration())], max_steps=1).fit(
            module, loader(rows(4)))
    assert hasattr(module.model.model.layers[0].self_attn, "k_proj")
    with pytest.raises(ConfigError):
        GradualRankReduction(8, start_rank=4)
    with pytest.raises(ConfigError):
        GradualRankReduction(8, begin=0.5, end=0.5)
    with pytest.raises(ConfigError):
        Distillation(temperature=0)
    with pytest.raises(ConfigError, match="train"):
        MLASurgery(CONFIG, calibration(), train="mlp")


# ---------------------------------------------------------------------------------------------- rank reduction
def test_gradual_rank_reduction_follows_the_schedule_with_static_shapes():
    module = LM(tiny_llama())
    record = Record()
    grr = GradualRankReduction(8, schedule="linear", end=0.75, reorder=True)
    trainer([MLASurgery(CONFIG, calibration(), train="attention"), grr, record], max_steps=8).fit(
        module, loader(rows(32)))
    ranks = [m["mla/rank"] for m in record.metrics]
    # progress = step/8, reduction over progress 0..0.75: rank = 8 + ceil(16·(1 − p/0.75))
    assert ranks == [8 + math.ceil(16 * (1 - min(1, s / 8 / 0.75)) - 1e-9) for s in range(8)]
    assert ranks[0] == 24 and ranks[-1] == 8
    assert grr._moments.ready()  # energy re-ordering had running moments to work with
    assert record.metrics[-1]["mla/kv_compression"] == pytest.approx(1 - (8 + 8) / 64)
    for block in attention_blocks(module.model):
        assert block.kv_a_proj_with_mqa.weight.shape == (24 + 8, 64)  # shapes never change
        assert block.latent_mask.tolist() == [1.0] * 8 + [0.0] * 16
        assert not block.kv_a_proj_with_mqa.weight[8:24].any() and not block.kv_b_proj.weight[:, 8:].any()


def test_masked_rank_equals_truncated_rank_and_unmasked_weights():
    from transmla_surgery.rank import reduce_rank, truncate_rank
    from transmla_surgery.surgery import convert_to_mla

    model = tiny_llama().eval()
    convert_to_mla(model, CONFIG, calibration(), progress=False)
    ids = rows(2, 20, seed=5)
    reduce_rank(attention_blocks(model), 10)
    masked = model(ids).logits
    for b in attention_blocks(model):  # cut channels are zero in the weights: the mask alone is redundant
        b.latent_mask.fill_(1)
    assert torch.equal(model(ids).logits, masked)
    reduce_rank(attention_blocks(model), 10)
    with pytest.raises(ConfigError, match="exceeds the active latent rank"):
        truncate_rank(model, 12)
    truncate_rank(model, 10)
    assert attention_blocks(model)[0].kv_b_proj.weight.shape[1] == 10
    assert model.config.transmla["geometry"]["kv_lora_rank"] == 10
    torch.testing.assert_close(model(ids).logits, masked, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="kv_lora_rank=10"):
        truncate_rank(model, 12)


def test_energy_reordering_is_an_exact_rotation_with_the_optimizer_state():
    from transmla_surgery.rank import LatentMoments, active_rank, energy_rotation, reduce_rank, rotate_latent
    from transmla_surgery.surgery import convert_to_mla

    model = tiny_llama()
    convert_to_mla(model, CONFIG, calibration(), progress=False)
    blocks = attention_blocks(model)
    moments = LatentMoments(blocks, decay=0.5)
    moments.attach()
    opt = torch.optim.AdamW([p for b in blocks for p in b.parameters()], lr=1e-2)
    model.train()
    for ids in rows(8, 16, seed=3).split(4):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        moments.fold()
    model.eval()
    ids = rows(2, 20, seed=5)
    before = model(ids).logits
    block = blocks[0]
    q = energy_rotation(moments.moments[0])
    w_b = block.kv_b_proj.weight.detach().clone()
    m1 = opt.state[block.kv_b_proj.weight]["exp_avg"].clone()
    v1 = opt.state[block.kv_b_proj.weight]["exp_avg_sq"].clone()
    rotate_latent(block, q, opt)
    moments.rotate(0, q)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.kv_b_proj.weight.detach().double(), w_b.double() @ q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[block.kv_b_proj.weight]["exp_avg"].double(), m1.double() @ q, rtol=1e-5, atol=1e-8)
    assert bool((opt.state[block.kv_b_proj.weight]["exp_avg_sq"] >= 0).all())
    torch.testing.assert_close(opt.state[block.kv_b_proj.weight]["exp_avg_sq"].double(), v1.double() @ (q * q), rtol=1e-5, atol=1e-12)
    diag = moments.moments[0].diagonal()
    assert bool((diag[:-1] >= diag[1:] - 1e-9).all())  # now sorted by energy
    with pytest.raises(ConfigError, match="orthogonal"):
        rotate_latent(block, 2 * torch.eye(24))
    reduce_rank(blocks, 12, moments=moments, optimizers=opt)
    assert active_rank(block) == 12 and not opt.state[block.kv_b_proj.weight]["exp_avg"][:, 12:].any()


def test_schedules():
    from transmla_surgery.rank import schedule_fraction, scheduled_rank

    for kind in ("linear", "cosine", "steps"):
        fr = [schedule_fraction(p / 100, kind, begin=0.1, end=0.9, num_steps=4) for p in range(101)]
        assert fr[0] == 0 and fr[-1] == 1 and all(a <= b for a, b in zip(fr, fr[1:]))
    assert sorted({schedule_fraction(p / 100, "steps", num_steps=4) for p in range(101)}) == [0, 0.25, 0.5, 0.75, 1]
    assert scheduled_rank(0.0, 160, 64) == 160 and scheduled_rank(1.0, 160, 64) == 64
    assert scheduled_rank(0.5, 160, 64, multiple_of=16) == 112
    assert schedule_fraction(0.5, lambda p: p * p) == 0.25
    with pytest.raises(ConfigError):
        schedule_fraction(0.5, lambda p: 2.0)


# ---------------------------------------------------------------------------------------------- distillation
def test_distillation_loss_is_the_masked_token_mean_kl_in_chunks():
    from transmla_surgery.distill import distillation_loss

    torch.manual_seed(0)
    head_s, head_t = nn.Linear(16, 50), nn.Linear(16, 50)
    hs = torch.randn(37, 16, requires_grad=True)
    ht = torch.randn(37, 16)
    ref = nn.functional.kl_div(
        torch.log_softmax(head_s(hs) / 2, -1), torch.log_softmax(head_t(ht) / 2, -1), log_target=True,
        reduction="sum") * 4 / 37
    ref_grad = torch.autograd.grad(ref, hs)[0]
    seen = []
    out = distillation_loss(hs, ht, head_s, head_t, temperature=2.0, chunk_size=8,
                            observe=lambda zs, zt, tg: seen.append(zs.shape[0]))
    grad = torch.autograd.grad(out.loss, hs)[0]
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert seen == [8, 8, 8, 8, 5]  # observed once per chunk, not again in backward's recompute
    assert head_t.weight.grad is None  # the teacher head is never differentiated
    assert out.count == 37 and 0 <= float(out.agree) <= 37


def test_swap_teacher_is_the_original_model():
    from transmla_surgery.distill import AttentionSwapTeacher, base_model
    from transmla_surgery.surgery import convert_to_mla

    original = tiny_llama().eval()
    model = copy.deepcopy(original).train()
    teacher = AttentionSwapTeacher.capture(model)
    convert_to_mla(model, CONFIG, calibration(), progress=False)
    ids = rows(2, 20, seed=5)
    with torch.no_grad():
        want = base_model(original)(input_ids=ids).last_hidden_state
    got = teacher.hidden_states(model, {"input_ids": ids})
    assert torch.equal(got, want)
    assert model.training and all(isinstance(b, MLAAttention) and b.training for b in attention_blocks(model))
    assert not any(p.requires_grad for m in teacher.originals for p in m.parameters())


def test_distillation_from_an_identical_teacher_has_zero_kl_and_adds_to_the_loss():
    model = tiny_llama()
    module = LM(model)
    record = Record()
    data = [{"input_ids": r, "attention_mask": torch.tensor([1] * 12 + [0] * 4)} for r in rows(8)]
    trainer([Distillation(weight=0.5, loss_weight=1.0, chunk_size=7, teacher=copy.deepcopy(model)), record],
            max_steps=2).fit(module, loader(data))
    first = record.metrics[0]
    assert first["distill/kl"] == pytest.approx(0.0, abs=1e-6) and first["distill/top1"] == 1.0
    assert record.losses[0] == pytest.approx(first["train/loss"] + 0.5 * first["distill/loss"], rel=1e-6)
    # perplexity over the same non-padding next tokens as the user's loss
    assert first["distill/ppl"] == pytest.approx(math.exp(first["train/loss"]), rel=1e-4)
    assert record.metrics[1]["distill/kl"] > 0  # the student moved, the teacher did not
    assert "training_step" not in vars(module)  # the wrapper is gone after fit


def test_distillation_needs_a_teacher_and_automatic_optimization():
    module = LM(tiny_llama())
    with pytest.raises(ConfigError, match="no teacher"):
        trainer([Distillation()], max_steps=1).fit(module, loader(rows(4)))

    class Manual(LM):
        def __init__(self, model):
            super().__init__(model)
            self.automatic_optimization = False

    with pytest.raises(ConfigError, match="automatic optimization"):
        trainer([Distillation(teacher=tiny_llama())], max_steps=1).fit(Manual(tiny_llama()), loader(rows(4)))


# ---------------------------------------------------------------------------------------------- resume
def _four(tmp: Path, calibrate: bool = True, export: bool = False) -> list[Callback]:
    cbs = [
        MLASurgery(CONFIG, calibration() if calibrate else None, train="attention"),
        GradualRankReduction(8, schedule="cosine", end=0.75, reorder=True, energy_decay=0.5),
        Distillation(weight=1.0, loss_weight=0.5, chunk_size=16),
    ]
    return cbs + ([MLAExport(tmp / "export")] if export else [])


class StepLM(LM):
    """Takes its batch by global step: Lightning restarts a plain DataLoader from its first batch on resume
    (only stateful loaders are fast-forwarded), so this makes the data of step ``s`` the same in every run."""

    data = rows(32)

    def training_step(self, batch, batch_idx):
        s = self.global_step % 8
        return super().training_step(self.data[4 * s : 4 * s + 4], batch_idx)


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True  # an interruption: the trainer's configuration stays that of the full run


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    original = tiny_llama().eval()  # as from_pretrained returns it: the latent moments must still be collected
    data = loader(rows(64), batch_size=4)  # 16 batches: one epoch, stopped mid-epoch after 4 of 8 steps

    L.seed_everything(0)
    whole = StepLM(copy.deepcopy(original))
    trainer(_four(tmp_path), max_steps=8).fit(whole, data)

    L.seed_everything(0)
    first = StepLM(copy.deepcopy(original))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer(_four(tmp_path) + [StopAt(4), ckpt], max_steps=8, enable_checkpointing=True).fit(first, data)
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"

    saved = torch.load(path, weights_only=False)
    # The checkpoint holds no teacher: only the converted model's tensors, and optimizer state for attention only.
    assert not [k for k in saved["state_dict"] if any(s in k for s in ("k_proj", "v_proj", "teacher", "original"))]
    n_attention = sum(p.requires_grad for p in first.parameters())
    assert len(saved["optimizer_states"][0]["state"]) == n_attention
    states = saved["callbacks"]
    assert any(k.startswith("GradualRankReduction") and 8 < v["rank"] < 24 for k, v in states.items())
    assert all(set(v) <= {"mla_config"} for k, v in states.items() if k.startswith("MLASurgery"))
    assert all(v == {} for k, v in states.items() if k.startswith("Distillation"))

    for calibrate in (True, False):  # resume by re-converting, or by building the empty structure only
        L.seed_everything(0)
        resumed = StepLM(copy.deepcopy(original))
        trainer(_four(tmp_path, calibrate=calibrate), max_steps=8).fit(resumed, data, ckpt_path=path)
        want, got = whole.state_dict(), resumed.state_dict()
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), (calibrate, k, float((want[k] - got[k]).abs().max()))
        assert [int(b.latent_mask.sum()) for b in attention_blocks(resumed.model)] == [8, 8]


def test_structure_only_without_a_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="no checkpoint was loaded"):
        trainer([MLASurgery(CONFIG, None)], max_steps=1).fit(LM(tiny_llama()), loader(rows(4)))


# ---------------------------------------------------------------------------------------------- all four, export
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_all_four_callbacks_together(tmp_path, precision):
    module = LM(tiny_llama())
    record = Record()
    cbs = _four(tmp_path, export=True) + [record]
    trainer(cbs, max_steps=6, precision=precision).fit(module, loader(rows(24)))
    assert all(math.isfinite(x) for x in record.losses)
    assert {"mla/rank", "mla/kv_compression", "distill/kl", "distill/top1", "distill/ppl"} <= set(record.metrics[-1])
    blocks = attention_blocks(module.model)
    assert blocks[0].kv_lora_rank == 8 and blocks[0].kv_b_proj.weight.shape[1] == 8  # physically truncated
    report = cbs[3].reports["final"]
    assert report.kv_lora_rank == 8 and report.verified
    import json

    cfg = json.loads((tmp_path / "export" / "final" / "config.json").read_text())
    assert cfg["kv_lora_rank"] == 8 and cfg["model_type"] == "deepseek_v3"


def test_export_best_checkpoint_at_its_own_rank(tmp_path, monkeypatch):
    import transmla_surgery.callbacks.export as export_module

    calls = []
    monkeypatch.setattr(export_module, "_exporter", lambda: lambda model, path, tok, **kw: calls.append(
        (Path(path).name, attention_blocks(model)[0].kv_lora_rank, kw)) or "ok")
    module = LM(tiny_llama())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train/loss", mode="max", every_n_train_steps=1)
    cbs = [MLASurgery(CONFIG, calibration(), train="attention"), GradualRankReduction(8, end=0.5),
           MLAExport(tmp_path / "out", export_best=True, dtype="float32"), ckpt]
    trainer(cbs, max_steps=6, enable_checkpointing=True).fit(module, loader(rows(24)))
    best_rank = torch.load(ckpt.best_model_path, weights_only=False)["callbacks"][cbs[1].state_key]["rank"]
    assert calls == [("best", best_rank, {"overwrite": False, "dtype": "float32"}),
                     ("final", 8, {"overwrite": False, "dtype": "float32"})]
