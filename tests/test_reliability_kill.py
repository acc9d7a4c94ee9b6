"""Issue 7, interrupted exports: an ``export_deepseek(overwrite=True)`` over an earlier export, SIGKILLed at random
moments and at every step boundary, never damages the earlier export and never leaves a half-written directory
that loads as a checkpoint.

The exporting process is a fork of a clean single-threaded fork server (``multiprocessing`` ``forkserver``,
torch and transformers preloaded), so each kill costs a fork, not a fresh interpreter. After each kill:

* ``path`` loads with ``load_exported`` and computes either the earlier model or the new one (the latter only
  once the new export was verified and swapped in), to 1e-4;
* every other directory beside it (hidden leftovers of the killed run) either refuses to load or is one of those
  two complete exports: nothing half-written ever loads.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, calibration, tiny_model

OLD, NEW = (0, 24), (1, 12)  # (seed, kv_lora_rank) of the earlier and the new export
TOL = 1e-4
RANDOM_KILLS = 10
SEED = 20240607


def build(seed: int, rank: int):
    """A converted tiny Llama; conversion is deterministic (test_reliability.py), so every process builds the
    very same weights from the same arguments."""
    from transmla_surgery import MLAConfig, convert_to_mla

    model = tiny_model("llama", seed=seed)
    convert_to_mla(model, MLAConfig(kv_lora_rank=rank, qk_rope_head_dim=8), calibration(), progress=False)
    return model


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str | None) -> None:
    """In the child: SIGKILL ourselves at ``point`` of the export."""
    from transmla_surgery import export as E

    if point is None:
        return
    if point == "fallback-between-renames":
        E._exchange = lambda a, b: False
        real_rename = os.rename
        calls = []

        def rename(src, dst):
            real_rename(src, dst)
            calls.append(src)
            if len(calls) == 1:  # the earlier export has just been moved aside
                _die()

        E.os.rename = rename
        return
    if point in ("weights-half-written", "weights-written"):
        real_save = E._save_safetensors

        def save(state, directory, *args, **kwargs):
            real_save(state, directory, *args, **kwargs)
            if point == "weights-half-written":
                f = directory / "model.safetensors"
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            _die()

        E._save_safetensors = save
        return
    if point == "after-swap":
        real_exchange = E._exchange

        def exchange(a, b):
            done = real_exchange(a, b)
            _die()
            return done

        E._exchange = exchange
        return
    if point == "discarding":  # config.json of the replaced export already gone, the rest not yet
        E.shutil.rmtree = lambda *a, **k: _die()
        return
    target = {"verifying": "_load_stock", "verified": "_place", "before-swap": "_exchange"}[point]
    setattr(E, target, lambda *a, **k: _die())


def export_child(path: str, point: str | None, verify: bool, ready) -> None:
    torch.set_num_threads(1)
    import warnings

    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    from transmla_surgery import export_deepseek

    hf_logging.disable_progress_bar()  # tqdm's bars take a multiprocessing lock a SIGKILL would leak
    model = build(*NEW)
    _arm(point)
    ready.send(True)  # the clock of a random kill starts at the export itself
    ready.close()
    export_deepseek(model, path, overwrite=True, verify=verify)


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    """A pristine earlier export, and the two reference models' logits."""
    from transmla_surgery import export_deepseek

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("arena")
    old, new = build(*OLD), build(*NEW)
    with pytest.warns(UserWarning, match="not 576"):
        export_deepseek(old, root / "pristine" / "e", verify=True)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        refs = {"old": old(x).logits.double(), "new": new(x).logits.double()}
    return {"root": root, "ids": x, "refs": refs}


def reset(arena) -> Path:
    """A fresh directory holding only a copy of the earlier export, at ``<dir>/e``."""
    work = arena["root"] / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.copytree(arena["root"] / "pristine" / "e", work / "e")
    return work / "e"


def which(arena, directory: Path) -> str | None:
    """``"old"`` or ``"new"`` if ``directory`` loads as a checkpoint computing that model, ``None`` if it refuses to
    load; raises if it loads but computes anything else (a half-written export that loads)."""
    from transmla_surgery import load_exported

    try:
        model = load_exported(directory)
    except Exception:
        return None
    with torch.no_grad():
        out = model(arena["ids"]).logits.double()
    for name, ref in arena["refs"].items():
        if float((out - ref).norm() / ref.norm()) < TOL:
            return name
    raise AssertionError(f"{directory} loads but computes neither the earlier nor the new model")


def check(arena, path: Path, allowed: set[str]) -> str:
    """The invariants after a kill; returns what ``path`` holds."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        held = which(arena, path)
        assert held in allowed, f"{path} holds {held}, expected one of {allowed}"
        for other in path.parent.iterdir():
            if other != path:
                which(arena, other)  # loads as a complete export, or not at all
    return held


def run_child(server, path: Path, point: str | None = None, *, verify: bool = True, kill_after: float | None = None,
              timeout: float = 120.0) -> tuple[bool, float]:
    """Run an export in a forked child; SIGKILL it ``kill_after`` seconds after its export started. Returns
    (killed, seconds the export ran)."""
    receive, send = server.Pipe(duplex=False)
    proc = server.Process(target=export_child, args=(str(path), point, verify, send))
    proc.start()
    send.close()
    assert receive.poll(timeout), "the export child never got ready"
    receive.recv()
    start = time.perf_counter()
    proc.join(kill_after if kill_after is not None else timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join(30)
        assert kill_after is not None, f"the export child hung for {timeout} s"
    seconds = time.perf_counter() - start
    receive.close()
    assert proc.exitcode in (0, -signal.SIGKILL), f"export child failed with exit code {proc.exitcode}"
    return proc.exitcode == -signal.SIGKILL, seconds


# ---------------------------------------------------------------------------------------------- step boundaries
BEFORE_SWAP = ["weights-half-written", "weights-written", "verifying", "verified", "before-swap"]
AFTER_SWAP = ["after-swap", "discarding"]


@pytest.mark.parametrize("point", BEFORE_SWAP + AFTER_SWAP)
def test_export_killed_at_each_step_keeps_a_complete_export_at_the_path(server, arena, point):
    """Killed before the atomic swap: the earlier export is at ``path``, bit for bit; after it: the new, verified
    one. Leftovers are hidden and either refuse to load or are a complete export."""
    path = reset(arena)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    killed, _ = run_child(server, path, point)
    assert killed
    held = check(arena, path, {"old"} if point in BEFORE_SWAP else {"new"})
    if held == "old":
        assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert all(p.name.startswith(".e.") for p in path.parent.iterdir() if p != path)


def test_without_an_atomic_swap_a_kill_between_the_renames_loses_nothing(server, arena):
    """Where renameat2(RENAME_EXCHANGE) is unavailable the overwrite falls back to two renames; a kill between them
    leaves no export at ``path`` (the one window that fallback has), but the earlier export is whole, beside it."""
    path = reset(arena)
    killed, _ = run_child(server, path, "fallback-between-renames")
    assert killed and not path.exists()
    aside = [p for p in path.parent.iterdir() if p.name.startswith(".e.old-")]
    assert len(aside) == 1 and which(arena, aside[0]) == "old"
    check_others = [p for p in path.parent.iterdir() if p not in aside]
    assert all(which(arena, p) in (None, "new") for p in check_others)


# ---------------------------------------------------------------------------------------------- random kills
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_export_killed_at_random_moments_never_damages_the_earlier_export(server, arena, verify):
    """Seeded random delays over the whole duration of an export (measured first, uninterrupted), up to 20 %
    past it; without verification the kills land in writing and placing, with it mostly in verifying."""
    durations = []
    for _ in range(2):  # the shorter of two, so that a load spike on a shared machine cannot make every kill late
        path = reset(arena)
        killed, seconds = run_child(server, path, verify=verify)
        assert not killed and check(arena, path, {"new"}) == "new"
        durations.append(seconds)
    duration = min(durations)

    rng = random.Random(SEED + verify)
    outcomes = []
    for _ in range(RANDOM_KILLS):
        path = reset(arena)
        delay = rng.uniform(0.0, 1.2 * duration)
        killed, _ = run_child(server, path, verify=verify, kill_after=delay)
        held = check(arena, path, {"old", "new"})
        assert held == "new" or killed
        outcomes.append((round(delay, 3), killed, stage(path), held))
    print(f"\nuninterrupted: {duration:.3f} s; (delay, killed, stage reached, path holds):", outcomes)
    assert any(killed for _, killed, _, _ in outcomes)


def stage(path: Path) -> str:
    """How far a killed export got, read from what it left: nothing, a partial directory, one awaiting
    verification (config.json.pending), a verified one not yet swapped in, or done."""
    hidden = [p for p in path.parent.iterdir() if p.name.startswith(".e.partial-")]
    if not hidden:
        return "placed" if (path / "config.json").is_file() and which_rank(path) == NEW[1] else "not started"
    files = {f.name for f in hidden[0].iterdir()}
    if "config.json" in files:
        return "verified" if which_rank(hidden[0]) == NEW[1] else "swapped, discarding old"
    return "verifying" if "config.json.pending" in files else "writing"


def which_rank(directory: Path) -> int | None:
    import json

    try:
        return json.loads((directory / "config.json").read_text())["kv_lora_rank"]
    except (OSError, ValueError, KeyError):
        return None
