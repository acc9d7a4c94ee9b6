"""Bounded transients of the calibration statistics and of the buffered layer passes (issue 8).

Streaming conversion meets its device-memory bound only if no step allocates memory that grows with the size of a
calibration batch: the accumulators must never hold a float64 copy of more than a row chunk (nor a second
full-size product), and `LayerInputBuffer` must run layers over micro-batches of whole sequences and its MLP over
bounded rows. These tests check that on the CPU, where no device-memory counter exists, by recording what the
steps allocate.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import calibration, tiny_model
from transmla_surgery.calibration import GramAccumulator, LayerInputBuffer, RegressionAccumulator, materialize


class NewFloat64(TorchDispatchMode):
    """Records the element count of every float64 tensor an op allocates (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            self.sizes += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype == torch.float64]
        return out


def _activations(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def _mask() -> torch.Tensor:
    mask = torch.ones(5, 30, dtype=torch.long)
    mask[1, :11] = 0
    mask[3, 17:] = 0
    return mask


def test_gram_accumulator_folds_row_chunks_in_place_and_matches_the_unchunked_sum():
    d, rows = 40, 8
    x, mask = _activations(0, (5, 30, d)), _mask()
    chunked, whole = GramAccumulator(d, chunk_rows=rows), GramAccumulator(d, chunk_rows=10**9)
    storage = chunked.total.data_ptr()
    with NewFloat64() as seen:
        chunked.add(x, mask, "test")
    assert max(seen.sizes) <= rows * (d + 1)  # no whole-batch float64 cast, no [D+1, D+1] product
    assert chunked.total.data_ptr() == storage  # folded into the running sum in place
    with NewFloat64() as seen_whole:
        whole.add(x, mask, "test")
    assert max(seen_whole.sizes) > rows * (d + 1)  # the recorder does see a whole-batch cast when there is one

    kept = x.reshape(-1, d)[mask.reshape(-1).bool()].double()
    aug = torch.cat([kept, torch.ones(len(kept), 1, dtype=torch.float64)], dim=1)
    assert chunked.count == whole.count == len(kept)
    torch.testing.assert_close(chunked.total, aug.T @ aug, rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(chunked.total, whole.total, rtol=1e-13, atol=1e-10)
    assert chunked.max_sq_norm == pytest.approx(float(kept.pow(2).sum(-1).max()), rel=1e-12)
    torch.testing.assert_close(chunked.second_moment("cpu"), chunked.total / chunked.count, rtol=0, atol=0)
    chunked.release()
    assert chunked.total is None and chunked.count == len(kept)


def test_regression_accumulator_folds_row_chunks_in_place_and_matches_the_unchunked_sums():
    n_in, n_out, rows = 40, 24, 8
    a, y, mask = _activations(1, (5, 30, n_in)), _activations(2, (5, 30, n_out)), _mask()
    chunked, whole = RegressionAccumulator(n_in, n_out, chunk_rows=rows), RegressionAccumulator(n_in, n_out, chunk_rows=10**9)
    storages = (chunked.inputs.data_ptr(), chunked.cross.data_ptr())
    with NewFloat64() as seen:
        chunked.add(a, y, mask)
    assert max(seen.sizes) <= rows * (max(n_in, n_out) + 1)
    assert (chunked.inputs.data_ptr(), chunked.cross.data_ptr()) == storages
    whole.add(a, y, mask)

    keep = mask.reshape(-1).bool()
    ka, ky = a.reshape(-1, n_in)[keep].double(), y.reshape(-1, n_out)[keep].double()
    aug = torch.cat([ka, torch.ones(len(ka), 1, dtype=torch.float64)], dim=1)
    assert chunked.count == len(ka)
    torch.testing.assert_close(chunked.inputs, aug.T @ aug, rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(chunked.cross, ky.T @ aug, rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(chunked.inputs, whole.inputs, rtol=1e-13, atol=1e-10)


@pytest.mark.parametrize("chunk_tokens", [1, 16, 48, 10**6])
def test_buffer_runs_layers_on_bounded_micro_batches_of_whole_sequences_in_place(chunk_tokens):
    """Visits and advances see whole sequences, at most ``max(chunk_tokens, seq)`` tokens a call; the MLP at most
    ``chunk_tokens`` rows; the stored states are overwritten in place; the result matches the unchunked one."""
    model = tiny_model("llama", layers=2)
    mask = torch.ones(4, 24, dtype=torch.long)
    mask[2, :9] = 0  # padding: the 4-D attention mask is split with the sequences
    batches = materialize([{"input_ids": calibration()[0], "attention_mask": mask}, calibration()[1]])
    buffer = LayerInputBuffer(model, batches, chunk_tokens=chunk_tokens)
    reference = LayerInputBuffer(model, batches, chunk_tokens=10**6)
    layer = model.model.layers[0]

    calls: dict[str, list[tuple[int, ...]]] = {"layer": [], "mlp": []}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, kw: calls["layer"].append(tuple((args or (kw["hidden_states"],))[0].shape)), with_kwargs=True),
        layer.mlp.gate_proj.register_forward_pre_hook(lambda m, args: calls["mlp"].append(tuple(args[0].shape))),
    ]
    counted = []
    buffer.visit(0, lambda x, m, kw: counted.append((tuple(x.shape), None if m is None else int(m.sum()))))
    storages = [h.data_ptr() for h in buffer.hidden]
    try:
        buffer.advance(0)
    finally:
        for h in hooks:
            h.remove()
    reference.advance(0)

    rows = lambda shape: shape[0] * (shape[1] if len(shape) == 3 else 1)  # noqa: E731
    assert all(shape[1] == 24 for shape in calls["layer"])  # whole sequences only
    assert max(rows(shape) for shape in calls["layer"]) == min(4, max(1, chunk_tokens // 24)) * 24  # 4 sequences a stored batch
    assert sum(shape[0] for shape in calls["layer"]) == 8
    assert max(rows(shape) for shape in calls["mlp"]) <= chunk_tokens
    assert sum(rows(shape) for shape in calls["mlp"]) == 8 * 24
    assert sum(shape[0] for shape, _ in counted) == 8  # every sequence visited once
    assert sum(n for _, n in counted if n is not None) == 4 * 24 - 9  # the mask travels with its sequences
    assert [h.data_ptr() for h in buffer.hidden] == storages
    for got, want in zip(buffer.hidden, reference.hidden):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert layer.mlp.forward.__func__ is type(layer.mlp).forward  # the row-chunking wrapper is gone


def test_chunk_sizes_must_be_positive_ints():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        LayerInputBuffer(model, materialize(calibration()), chunk_tokens=0)
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        GramAccumulator(8, chunk_rows=0)
