"""The `transmla` entry point: user errors print one clear line and exit non-zero, without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "--kv-lora-rank", "0"], "kv_lora_rank must be >= 1"),
        (["convert", "--qk-rope-head-dim", "7"], "must be even"),
        (["convert", "--model", "/nonexistent/model"], "model path /nonexistent/model does not exist"),
        (["convert", "--text", "/nonexistent/text.txt"], "text file /nonexistent/text.txt does not exist"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "transmla_surgery.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    out = " ".join(proc.stdout.split())
    assert message in out
    assert "Traceback" not in proc.stdout + proc.stderr


def test_help_describes_the_defaults():
    proc = subprocess.run([sys.executable, "-m", "transmla_surgery.cli", "convert", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    assert "SmolLM2-135M" in proc.stdout and "--kv-lora-rank" in proc.stdout
