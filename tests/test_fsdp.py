"""All four callbacks under Lightning's FSDPStrategy: two CPU processes (gloo), a tiny Llama.

Lightning refuses FSDP without CUDA in two places, neither of which concerns the callbacks: its accelerator
connector (``The strategy `fsdp` requires a GPU accelerator``, checked only for ``type(strategy) is
FSDPStrategy``) and the ``device_id`` it passes to PyTorch FSDP (``root_device.index``: ``None`` on the CPU, and
PyTorch then raises ``FSDP needs a non-CPU accelerator device``). `cpu_fsdp_strategy` (in `callbacks/_fsdp.py`) is Lightning's
FSDPStrategy with ``device_id=cpu``: every other line that runs (wrapping, sharded training, full-state-dict
checkpoints, optimizer-state restore, the gather for the export) is Lightning's and PyTorch's own, except one
more CPU-only change: Lightning's full-state-dict checkpoints gather with ``offload_to_cpu=True``, which in
PyTorch 2.13 segfaults when the parameters are already on the CPU (in FSDP's ``_full_post_state_dict_hook``,
cloning a gathered tensor), so the shim gathers without the offload.

The FSDP processes run this file as a script (Lightning's launcher re-runs it for rank 1). The ranks take
different halves of each step's batch (by global step, so a resumed run sees the data of an uninterrupted one);
a single process on the whole batch is the reference: with SGD, the sharded run must end with its weights and
its export within float32 rounding.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_callbacks import CONFIG, LM, Record, StopAt, calibration, loader, rows, tiny_llama  # noqa: E402

from transmla_surgery.callbacks._fsdp import cpu_fsdp_strategy  # noqa: E402
from transmla_surgery.errors import ConfigError  # noqa: E402

STEPS = 6


class StepSGD(LM):
    """Step ``s`` trains on rows ``4s .. 4s+3``, split evenly over the processes; plain SGD with momentum (Adam's
    normalisation would amplify rounding differences of near-zero gradients)."""

    data = rows(32)

    def training_step(self, batch, batch_idx):
        s = self.global_step % 8
        per = 4 // self.trainer.world_size
        first = 4 * s + self.trainer.global_rank * per
        return super().training_step(self.data[first : first + per], batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def callbacks(out: Path | None, calibrate: bool = True) -> list:
    from transmla_surgery.callbacks import Distillation, GradualRankReduction, MLAExport, MLASurgery

    cbs = [
        MLASurgery(CONFIG, calibration() if calibrate else None, train="attention"),
        GradualRankReduction(8, schedule="linear", end=0.75),
        Distillation(weight=1.0, loss_weight=0.5),
    ]
    return cbs + ([MLAExport(out, dtype="float32")] if out is not None else []) + [Record()]


def fit(strategy, devices: int, cbs: list, ckpt_path=None, **kw):
    import lightning.pytorch as L

    L.seed_everything(0)
    module = StepSGD(tiny_llama())
    kw.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=cbs, **kw)
    trainer.fit(module, loader(rows(64)), ckpt_path=ckpt_path)
    return trainer, module


def _worker(out: Path, mode: str) -> None:
    """``mode``: the checkpoints' ``state_dict_type``, optionally ``+SHARDING_STRATEGY``."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    state_dict_type, _, sharding = mode.partition("+")
    kw = {"state_dict_type": state_dict_type, **({"sharding_strategy": sharding} if sharding else {})}
    results = {}
    # 1. uninterrupted, exported
    cbs = callbacks(out / "export_whole")
    trainer, module = fit(cpu_fsdp_strategy(**kw), 2, cbs)
    export = cbs[3]
    if trainer.is_global_zero:
        results["whole"] = {"state": export.model.state_dict(), "metrics": cbs[-1].metrics,
                            "verified": export.reports["final"].verified}
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        results["wrapped"] = sorted(type(u.module).__name__ for u in FSDP.fsdp_modules(trainer.strategy.model))
    # 2. interrupted after step 3, checkpointed
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1)
    cbs = callbacks(None)
    trainer, _ = fit(cpu_fsdp_strategy(**kw), 2, cbs + [StopAt(3), ckpt],
                     enable_checkpointing=True)
    if trainer.is_global_zero:
        results["first"] = {"metrics": cbs[-1].metrics}
    # 3. resumed in a new Trainer: MLASurgery builds the empty MLA structure, the checkpoint fills it
    cbs = callbacks(out / "export_resumed", calibrate=False)
    trainer, module = fit(cpu_fsdp_strategy(**kw), 2, cbs,
                          ckpt_path=out / "ckpt" / "epoch=0-step=3.ckpt")
    if trainer.is_global_zero:
        results["resumed"] = {"state": cbs[3].model.state_dict(), "metrics": cbs[-1].metrics,
                              "global_step": trainer.global_step}
    # 4. the recipes' CausalLM: gradient clipping by norm (Lightning's FSDP plugin refuses it; CausalLM clips
    # with FSDP's own clip_grad_norm_) and a plain FSDPStrategy the callbacks complete
    if mode == "full":
        import lightning.pytorch as L

        from transmla_surgery.callbacks import Distillation, MLASurgery
        from transmla_surgery.training import CausalLM

        from transmla_surgery.training import RunMonitor

        class Data(L.LightningDataModule):
            val_rows, batch_size = rows(4, seed=9), 2

            def train_dataloader(self):
                return loader(rows(16))

        L.seed_everything(0)
        lm = CausalLM.wrap(tiny_llama(), lr=1e-3, warmup=0)
        record, monitor = Record(), RunMonitor()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=cpu_fsdp_strategy(), max_steps=2, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            gradient_clip_val=0.05, callbacks=[monitor, MLASurgery(CONFIG, calibration(), train="attention"),
                                                               Distillation(loss_weight=0.0), record])
        trainer.fit(lm, datamodule=Data())
        if trainer.is_global_zero:
            results["causal_lm"] = {"losses": record.losses, "original_ppl": monitor.original_perplexity,
                                    "start_ppl": monitor.start_perplexity}
    if trainer.is_global_zero:
        torch.save(results, out / "results.pt")


def _run_worker(tmp_path: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), mode], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(tmp_path / "results.pt", weights_only=False)


def _single_reference(tmp_path: Path) -> tuple[dict, list]:
    cbs = callbacks(tmp_path / "export_single")
    _, module = fit("auto", 1, cbs)
    return module.model.state_dict(), cbs[-1].metrics


def _close(want: dict, got: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("mode", ["full", "sharded", "full+SHARD_GRAD_OP"])
def test_fsdp_fit_resume_and_export_match_one_process(tmp_path, mode):
    """``mode``: checkpoint ``state_dict_type`` [+ FSDP ``sharding_strategy``; SHARD_GRAD_OP keeps the gathered
    weights from forward to backward, so the rank cuts then meet unsharded views]."""
    from safetensors.torch import load_file

    state_dict_type = mode.partition("+")[0]
    res = _run_worker(tmp_path, mode)
    single_state, single_metrics = _single_reference(tmp_path)

    # wrapped as MLASurgery asked: each decoder layer and each MLA block an FSDP unit of its own
    assert res["wrapped"] == ["LlamaDecoderLayer"] * 2 + ["MLAAttention"] * 2 + ["StepSGD"]
    # sharded training = one process on the whole batch: the swapped-in teacher is the original model (same KL),
    # the rank schedule cut the sharded weights and optimizer state alike, the export gathered the full weights
    whole = res["whole"]
    assert whole["verified"]
    assert [m["mla/rank"] for m in whole["metrics"]] == [m["mla/rank"] for m in single_metrics]
    for key in ("distill/kl", "distill/top1", "distill/ppl"):  # synced over processes: the whole batch's value
        assert whole["metrics"][0][key] == pytest.approx(single_metrics[0][key], rel=1e-5), key
    _close(single_state, whole["state"])
    assert whole["state"]["model.layers.0.self_attn.kv_b_proj.weight"].shape[1] == 8
    a = load_file(tmp_path / "export_single" / "final" / "model.safetensors")
    b = load_file(tmp_path / "export_whole" / "final" / "model.safetensors")
    _close(a, b)
    cfg = json.loads((tmp_path / "export_whole" / "final" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["kv_lora_rank"] == 8

    # the checkpoint at step 3 holds no teacher and optimizer state for attention only
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    if state_dict_type == "full":
        saved = torch.load(ckpt, weights_only=False)
        assert not [k for k in saved["state_dict"] if any(s in k for s in ("k_proj", "v_proj", "teacher", "original"))]
        assert len(saved["optimizer_states"][0]["state"]) == 2 * 4  # q_proj, kv_a, kv_b, o_proj of 2 layers
        callbacks_state = saved["callbacks"]
    else:
        assert ckpt.is_dir()
        callbacks_state = torch.load(ckpt / "meta.pt", weights_only=False)["callbacks"]
    assert any(k.startswith("GradualRankReduction") and 8 < v["rank"] < 24 for k, v in callbacks_state.items())

    # resumed from it in a new Trainer: continues at step 3 and ends where the uninterrupted run ended. The weights
    # at the resume point are bit-identical; the CPU kernels of a new process can differ from the running one in
    # the last bits of a forward, hence float32 rounding after the three remaining steps, not bitwise equality.
    resumed = res["resumed"]
    assert resumed["global_step"] == STEPS and len(resumed["metrics"]) == STEPS - 3
    assert [m["mla/rank"] for m in resumed["metrics"]] == [m["mla/rank"] for m in whole["metrics"][3:]]
    assert [m["distill/kl"] for m in res["first"]["metrics"]] == [m["distill/kl"] for m in whole["metrics"][:3]]
    _close(whole["state"], resumed["state"])
    if mode == "full":  # CausalLM (clipping by norm) and RunMonitor (perplexity of the sharded model)
        lm = res["causal_lm"]
        assert len(lm["losses"]) == 2 and all(math.isfinite(x) for x in lm["losses"])
        from transmla_surgery.data import perplexity
        from transmla_surgery.surgery import convert_to_mla

        plain = tiny_llama()
        assert lm["original_ppl"] == pytest.approx(perplexity(plain, rows(4, seed=9), 2), rel=1e-5)
        convert_to_mla(plain, CONFIG, calibration(), progress=False)
        assert lm["start_ppl"] == pytest.approx(perplexity(plain, rows(4, seed=9), 2), rel=1e-4)


# ---------------------------------------------------------------------------------------------- refusals
def _fake_trainer(strategy, callbacks=()):
    return types.SimpleNamespace(strategy=strategy, callbacks=list(callbacks))


def test_fsdp_options_are_completed_or_refused_before_wrapping():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from transmla_surgery import MLAAttention
    from transmla_surgery.callbacks import GradualRankReduction, MLAExport
    from transmla_surgery.callbacks._fsdp import configure

    model = tiny_llama()
    strategy = FSDPStrategy(parallel_devices=[torch.device("cpu")])
    configure(_fake_trainer(strategy), model, train="attention")
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {LlamaDecoderLayer, MLAAttention}
    assert "sync_module_states" not in strategy.kwargs  # only on GPUs (FSDP broadcasts from an accelerator only)

    given = FSDPStrategy(parallel_devices=[torch.device("cpu")], auto_wrap_policy={LlamaDecoderLayer})
    configure(_fake_trainer(given), model, train="attention")
    assert given.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}  # the user's policy stays

    with pytest.raises(ConfigError, match="use_orig_params"):
        configure(_fake_trainer(FSDPStrategy(use_orig_params=False)), model, train="attention")
    # refused by MLASurgery before it converts: the model stays as it was
    from transmla_surgery.callbacks import MLASurgery

    fresh = tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    holder = LM(fresh)
    with pytest.raises(ConfigError, match="use_orig_params"):
        MLASurgery(CONFIG, calibration()).setup(_fake_trainer(FSDPStrategy(use_orig_params=False)), holder, "fit")
    assert not any(isinstance(layer.self_attn, MLAAttention) for layer in fresh.model.layers)
    after = fresh.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="reorder=True"):
        GradualRankReduction(8, reorder=True).setup(_fake_trainer(FSDPStrategy()), None, "fit")
    with pytest.raises(ConfigError, match="state_dict_type='full'"):
        MLAExport("x", export_best=True).setup(_fake_trainer(FSDPStrategy(state_dict_type="sharded")), None, "fit")


def test_swap_teacher_reaches_the_attention_inside_a_wrapper():
    """FSDP1 (and activation checkpointing) wrap a decoder layer in a module that holds it as its only child:
    the teacher must swap the wrapped layer's ``self_attn``, not register a second one on the wrapper."""
    import copy

    from torch import nn

    from transmla_surgery.distill import AttentionSwapTeacher, base_model
    from transmla_surgery.surgery import convert_to_mla

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._modules["inner"], name)

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    original = tiny_llama().eval()
    model = copy.deepcopy(original)
    teacher = AttentionSwapTeacher.capture(model)
    convert_to_mla(model, CONFIG, calibration(), progress=False)
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = Wrapper(layers[i])
    names = sorted(n for n, _ in model.named_parameters())
    ids = rows(2, 20, seed=5)
    with torch.no_grad():
        want = base_model(original)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(teacher.hidden_states(model, {"input_ids": ids}), want)
    assert sorted(n for n, _ in model.named_parameters()) == names  # nothing registered on the wrappers


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
