"""End to end through the `transmla` entry point on a tiny model: every subcommand and every shipped recipe.

The tiny model is a random 2-layer Llama saved with ``save_pretrained`` beside a word-level tokenizer trained
offline on the test text (no download). Most runs call ``cli.main([...])`` in this process (the same function the
``transmla`` console script calls); a few go through the installed console script in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (binds Lightning's log handler to the session's stderr, not one test's capsys)
import pytest
import torch

from transmla_surgery import cli

torch.set_num_threads(1)

WORDS = (
    "the a an of to in is was for on with as by at from that this it be are were has have had not but or model "
    "attention cache latent rank head key value query token layer weight matrix vector train loss small large "
    "fast slow good bad new old first last next each every one two three four five"
).split()
TINY = ["--model.model", "{model}", "--data.text", "{text}", "--data.seq_len", "32", "--data.batch_size", "2",
        "--data.calib_seqs", "4", "--data.calib_batch_size", "2", "--data.val_seqs", "2",
        "--surgery.config.kv_lora_rank", "24", "--surgery.config.qk_rope_head_dim", "8",
        "--trainer.accelerator", "cpu", "--export.dtype", "float32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + " ." for _ in range(400)]
    text = root / "corpus.txt"
    text.write_text("\n".join(sentences))
    jsonl = root / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": s}) for s in sentences))
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(vocab_size=100, special_tokens=["[UNK]", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"root": root, "model": model_dir, "text": text, "jsonl": jsonl}


def run(capsys, *args) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def tiny_args(tiny, **extra) -> list[str]:
    args = [a.format(model=tiny["model"], text=tiny["text"]) for a in TINY]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


def summary(root: Path) -> dict:
    return json.loads((root / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------- recipes
def test_progressive_recipe(tiny, tmp_path, capsys):
    out = tmp_path / "progressive"
    code, text = run(capsys, "train", "--config", "progressive", *tiny_args(
        tiny, **{"rank_reduction.target_rank": 8, "trainer.max_steps": 6, "trainer.val_check_interval": 2,
                 "trainer.default_root_dir": out}))
    assert code == 0, text
    s = summary(out)
    assert s["recipe"] == "progressive" and s["steps"] == 6
    assert s["ranks"] == {"qk_rope_head_dim": 8, "converted_kv_lora_rank": 24, "start_rank": 24, "target_rank": 8,
                          "final_kv_lora_rank": 8}
    # 2 layers × 2·G·d = 2 × 64 values before; 2 × (8 + 8) after, float32
    kv = s["kv_cache_per_token"]
    assert (kv["values_before"], kv["values_after"], kv["bytes_before"], kv["bytes_after"]) == (128, 32, 512, 128)
    ranks = [row["mla/rank"] for row in s["history"]["steps"]]
    assert ranks[0] == 24 and ranks[-1] == 8 and ranks == sorted(ranks, reverse=True)
    assert [v["step"] for v in s["history"]["validations"]] == [2, 4, 6]
    ppl = s["perplexity"]
    assert all(math.isfinite(ppl[k]) for k in ("original", "converted_at_fit_start", "after_training", "export_reloaded"))
    assert ppl["export_reloaded"] == pytest.approx(ppl["after_training"], rel=1e-4)  # stock reload = trained model
    assert s["export"]["verified"] and Path(s["export"]["path"]) == out / "export" / "final"
    cfg = json.loads((out / "export" / "final" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["kv_lora_rank"] == 8
    for name in ("loss.png", "perplexity.png", "rank.png", "summary.md"):
        assert (out / name).stat().st_size > 1000, name
    assert "transmla train --config progressive" in (out / "summary.md").read_text()
    assert "KV cache / token" in text and "export check" in text and "verified" in text


def test_recover_recipe_and_resume(tiny, tmp_path, capsys):
    out = tmp_path / "recover"
    args = ["train", "--config", "recover", *tiny_args(tiny, **{"trainer.default_root_dir": out,
                                                                "trainer.val_check_interval": 3})]
    code, text = run(capsys, *args, "--trainer.max_steps", "3")
    assert code == 0, text
    s = summary(out)
    assert s["ranks"]["target_rank"] is None and s["ranks"]["final_kv_lora_rank"] == 24
    assert {"distill/kl", "train/loss"} <= set(s["history"]["steps"][-1])
    ckpt = next((out / "lightning_logs").glob("version_*/checkpoints/last.ckpt"))
    # resume: the converted weights come from the checkpoint (no calibration), training continues at step 3
    code, text = run(capsys, *args, "--trainer.max_steps", "5", "--ckpt_path", ckpt, "--export.overwrite", "true")
    assert code == 0, text
    s = summary(out)
    assert s["steps"] == 5 and s["steps_this_run"] == 2 and s["export"]["verified"]


def test_oneshot_recipe_agrees_with_convert_eval_export(tiny, tmp_path, capsys):
    """oneshot = convert + export: the same windows give the same perplexity through every subcommand."""
    out = tmp_path / "oneshot"
    code, text = run(capsys, "train", "--config", "oneshot", *tiny_args(tiny, **{"trainer.default_root_dir": out}))
    assert code == 0, text
    s = summary(out)
    assert s["steps"] == 0 and s["export"]["verified"] and s["ranks"]["final_kv_lora_rank"] == 24
    after = s["perplexity"]["after_training"]
    assert s["perplexity"]["converted_at_fit_start"] == pytest.approx(after, rel=1e-9)

    window = ["--seq-len", "32", "--text", tiny["text"]]
    converted = tmp_path / "converted"
    code, text = run(capsys, "convert", "--model", tiny["model"], *window, "--calib-seqs", "4", "--eval-seqs", "2",
                     "--batch-size", "2", "--kv-lora-rank", "24", "--qk-rope-head-dim", "8", "--output", converted)
    assert code == 0, text
    assert f"{after:.2f}" in text  # convert's "after" perplexity, on the same held-out windows

    def evaluate(model, name):
        js = tmp_path / f"{name}.json"
        code, text = run(capsys, "eval", "--model", model, *window, "--eval-seqs", "2", "--offset", 4 * 32, "--json", js)
        assert code == 0, text
        return json.loads(js.read_text())

    original, conv = evaluate(tiny["model"], "original"), evaluate(converted, "converted")
    assert original["kind"] == "Hugging Face model" and original["kv_values_per_token"] == 128
    assert original["perplexity"] == pytest.approx(s["perplexity"]["original"], rel=1e-9)
    assert conv["kind"].startswith("converted checkpoint") and conv["kv_values_per_token"] == 64
    assert conv["perplexity"] == pytest.approx(after, rel=1e-6)

    export = tmp_path / "export"
    code, text = run(capsys, "export", "--model", converted, "--output", export, "--rank", "16")
    assert code == 0 and "verified" in text, text
    exported = evaluate(export, "export")
    assert exported["kind"].startswith("DeepSeek-V3 export") and exported["kv_values_per_token"] == 2 * (16 + 8)
    assert exported["kv_bytes_per_token"] == 4 * 48
    assert json.loads((export / "config.json").read_text())["kv_lora_rank"] == 16
    assert json.loads((export / "export_report.json").read_text())["verified"]


def test_jsonl_text_and_datasets_directory(tiny, tmp_path, capsys):
    code, text = run(capsys, "eval", "--model", tiny["model"], "--text", tiny["jsonl"], "--seq-len", "16",
                     "--eval-seqs", "2", "--offset", "0")
    assert code == 0 and "held-out perplexity" in text, text
    directory = tmp_path / "ds"
    try:
        import datasets
    except ImportError:  # a directory needs the `datasets` package: a clear error without it
        directory.mkdir()
        code, text = run(capsys, "eval", "--model", tiny["model"], "--text", directory)
        assert code == 2 and "pip install datasets" in text, text
        return
    datasets.Dataset.from_dict({"text": tiny["text"].read_text().splitlines()}).save_to_disk(str(directory))
    code, text = run(capsys, "eval", "--model", tiny["model"], "--text", directory, "--seq-len", "16",
                     "--eval-seqs", "2", "--offset", "0")
    assert code == 0, text


def test_recipes_are_shipped_and_documented():
    assert cli.recipe_names() == ["oneshot", "progressive", "recover"]
    for name in cli.recipe_names():
        text = Path(cli.resolve_recipe(name)).read_text()
        header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        for word in ("What it does", "Budget", "7B", "ONE GPU", "SEVERAL GPUs", "precision"):
            assert word in header, (name, word)


def test_print_config_shows_the_resolved_recipe(tiny, capsys):
    code, text = run(capsys, "train", "--trainer.max_steps", "7", "--config", "progressive", "--print_config")
    assert code == 0
    assert "max_steps: 7" in text  # the override wins although --config came after it
    assert "target_rank: 64" in text and "kv_lora_rank: 160" in text


def test_help_for_newcomers(capsys):
    code, text = run(capsys, "--help")
    assert code == 0 and all(c in text for c in ("convert", "eval", "export", "train"))
    code, text = run(capsys, "train", "--help")
    assert code == 0
    for word in ("--config progressive", "oneshot, progressive, recover", "--trainer.max_steps", "--data.text",
                 "--surgery.help Surgery", "summary.json"):
        assert word in text, word
    code, text = run(capsys, "train", "--surgery.help", "Surgery")
    assert code == 0 and "--surgery.config.kv_lora_rank" in text
    code, text = run(capsys, "eval", "--help")
    assert code == 0 and "converted checkpoint" in text and ".gguf" in text
    code, text = run(capsys, "export", "--help")
    assert code == 0 and "DeepSeek-V3" in text and "--rank" in text


# ---------------------------------------------------------------------------------------------- user errors
ERRORS = [
    (["train", "--config", "nope"], "unknown recipe 'nope': shipped recipes are oneshot, progressive, recover"),
    (["train", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["train"], "give a recipe"),
    (["train", "--config", "oneshot", "--surgery.train", "mlp"], "surgery.train: Expected a Literal['all', 'attention']"),
    (["train", "--config", "oneshot", "--data.seq_len", "ten"], "data.seq_len: Expected a <class 'int'>"),
    (["train", "--config", "oneshot", "--surgery.bogus", "1"], "surgery: Option 'bogus' is not accepted"),
    ("tiny:train --config oneshot --surgery.config.qk_rope_head_dim 7", "qk_rope_head_dim must be even"),
    (["train", "--config", "oneshot", "--model.model", "/nonexistent/model"], "model path /nonexistent/model does not exist"),
    ("tiny:train --config oneshot --surgery.config.kv_lora_rank 500", "kv_lora_rank=500 exceeds the layer's limit"),
    ("tiny:train --config progressive --rank_reduction.target_rank 40",
     "rank_reduction.target_rank=40 / start_rank=None exceed surgery.config.kv_lora_rank=24"),
    ("tiny:train --config oneshot --data.text /nonexistent.txt", "text file /nonexistent.txt does not exist"),
    ("tiny:train --config oneshot --ckpt_path /nonexistent.ckpt", "checkpoint /nonexistent.ckpt does not exist"),
    ("tiny:train --config progressive --data.calib_seqs 900 --rank_reduction.target_rank 8", "text too short"),
    (["eval", "--model", "/nonexistent/model"], "model path /nonexistent/model does not exist"),
    (["eval", "--text", "/nonexistent.txt"], "text file /nonexistent.txt does not exist"),
    (["export", "--model", "/nonexistent", "--output", "x"], "converted checkpoint /nonexistent does not exist"),
    ("tiny:export --model {model} --output {root}/never", "has no 'transmla' record: not a converted model"),
]


@pytest.mark.parametrize("args, message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_user_errors_print_one_line_and_exit_2(tiny, tmp_path, capsys, args, message):
    if isinstance(args, str):
        command = args.removeprefix("tiny:").format(model=tiny["model"], root=tmp_path).split()
        if command[0] == "train":  # the tiny model's settings, then this case's (later arguments win)
            command = command[:3] + tiny_args(tiny, **{"trainer.default_root_dir": tmp_path / "run"}) + command[3:]
        args = command
    code, text = run(capsys, *args)
    assert code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], text
    assert "Traceback" not in text


def test_existing_export_is_refused_before_training(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "export" / "final").mkdir(parents=True)
    (out / "export" / "final" / "config.json").write_text("{}")
    code, text = run(capsys, "train", "--config", "oneshot", *tiny_args(tiny, **{"trainer.default_root_dir": out}))
    assert code == 2 and "already exists" in text and "export.overwrite true" in text
    assert not (out / "summary.json").exists()


def test_export_rank_out_of_range(tiny, tmp_path, capsys):
    converted = tmp_path / "converted"
    code, text = run(capsys, "convert", "--model", tiny["model"], "--text", tiny["text"], "--seq-len", "32",
                     "--calib-seqs", "4", "--eval-seqs", "2", "--kv-lora-rank", "24", "--qk-rope-head-dim", "8",
                     "--output", converted)
    assert code == 0, text
    code, text = run(capsys, "export", "--model", converted, "--output", tmp_path / "e", "--rank", "30")
    assert code == 2 and "--rank 30 exceeds the checkpoint's latent rank 24 (allowed: 1..24)" in text
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------------- console script
def _script() -> list[str]:
    exe = shutil.which("transmla", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "transmla_surgery.cli"]


def test_console_script_user_error_and_help():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_script() + ["train", "--config", "nope"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == [
        "error: unknown recipe 'nope': shipped recipes are oneshot, progressive, recover (or give a YAML file)"]
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(_script() + ["train", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "transmla train --config progressive" in proc.stdout


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_eval_of_the_default_gguf_model(tmp_path, capsys):
    pytest.importorskip("gguf")
    js = tmp_path / "eval.json"
    code, text = run(capsys, "eval", "--eval-seqs", "2", "--json", js)
    assert code == 0, text
    result = json.loads(js.read_text())
    assert result["kind"] == "SmolLM2-135M (default GGUF)"
    assert result["kv_values_per_token"] == 30 * 2 * 3 * 64  # 30 layers, 3 KV heads of 64
    assert 5 < result["perplexity"] < 60
