"""All four callbacks under DDP: two CPU processes (gloo), ``strategy="ddp"``.

Lightning's DDP launcher re-runs the launching script for rank 1, so the training runs in a child Python process
(this file run as a script), never inside the pytest process. The ranks see different data (distributed
sampler): they must still end with identical weights, which needs the energy re-ordering's moments to be the
same on both ranks (they are summed across processes every batch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _worker(out: Path) -> None:
    import warnings

    import lightning.pytorch as L
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from test_callbacks import CONFIG, LM, Record, attention_blocks, calibration, loader, rows, tiny_llama

    from transmla_surgery.callbacks import Distillation, GradualRankReduction, MLAExport, MLASurgery

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = LM(tiny_llama())
    record = Record()
    cbs = [
        MLASurgery(CONFIG, calibration(), train="attention"),
        GradualRankReduction(8, schedule="linear", end=0.75, reorder=True),
        Distillation(weight=1.0, loss_weight=0.5),
        MLAExport(out / "export"),
        record,
    ]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=cbs)
    trainer.fit(module, loader(rows(48)))
    rank = trainer.global_rank
    torch.save({"state": module.model.state_dict(), "metrics": record.metrics, "losses": record.losses,
                "kv_lora_rank": attention_blocks(module.model)[0].kv_lora_rank}, out / f"rank{rank}.pt")


def test_four_callbacks_under_ddp_keep_the_ranks_identical(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import torch

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["kv_lora_rank"] == r1["kv_lora_rank"] == 8
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    ranks = [m["mla/rank"] for m in r0["metrics"]]
    assert ranks[0] == 24 and ranks[-1] == 8
    assert {"distill/kl", "distill/top1", "distill/ppl"} <= set(r0["metrics"][-1])
    assert (tmp_path / "export" / "final" / "config.json").exists()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
