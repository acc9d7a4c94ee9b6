"""Text loading, tokenisation, packing, and perplexity, with an embedded default corpus.

The embedded default is the Python standard library's own documentation text (``pydoc_data.topics``): English
prose present on every machine, so the demo and tests need no download.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .errors import CalibrationError


def default_text() -> str:
    """The embedded default corpus: every topic of ``pydoc_data.topics``, in a fixed order (≈ 0.5 MB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def read_text(path: str | Path, field: str = "text") -> str:
    """Read a ``.txt`` file, or a ``.jsonl`` file's ``field`` of every line, as one string."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file {path} does not exist")
    if path.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if field not in row:
                    raise CalibrationError(f"{path}:{n}: no {field!r} field (keys: {sorted(row)})")
                parts.append(str(row[field]))
        return "\n\n".join(parts)
    if path.suffix not in (".txt", ".text", ".md", ""):
        raise CalibrationError(f"unsupported text file {path.name}: use .txt or .jsonl")
    return path.read_text(encoding="utf-8")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenise a whole text without BOS/EOS → 1-D int64 token stream."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, count: int, length: int, offset: int = 0) -> torch.Tensor:
    """``count`` consecutive non-overlapping windows of ``length`` tokens from ``offset`` → ``[count, length]``."""
    need = offset + count * length
    if stream.numel() < need:
        raise CalibrationError(
            f"text too short: {count} windows of {length} tokens from offset {offset} need {need} tokens, "
            f"the text has {stream.numel()}"
        )
    return stream[offset:need].view(count, length).clone()


def batched(rows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split ``[N, T]`` into a list of ``[≤batch_size, T]`` batches (calibration input for `convert_to_mla`)."""
    return [rows[i : i + batch_size] for i in range(0, rows.shape[0], batch_size)]


@torch.no_grad()
def perplexity(model: nn.Module, rows: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 4) -> float:
    """Perplexity over all predicted tokens of ``rows`` (``[N, T]``: each row predicts its last ``T-1`` tokens).

    Token losses are summed in float64, so the figure does not depend on batching.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = batched(rows, batch_size) if isinstance(rows, torch.Tensor) else list(rows)
    total, count = 0.0, 0
    try:
        for ids in batches:
            ids = ids.to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].double()
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
