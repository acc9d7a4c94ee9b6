"""Streaming calibration: running float64 Gram sums of attention inputs, padding masked out.

Nothing here stores activations: each attention block's input ``x`` (``[batch, seq, D]``) is folded into
``Σ += x̃ᵀ x̃`` (``x̃ = [x; 1]``, ``[D+1, D+1]`` float64) as soon as it is produced, so memory does not grow with
the amount of calibration data. Forward passes stop right after the last layer that is being measured.

Bounded transients: the accumulators cast and multiply at most ``ACCUMULATE_ROWS`` rows at a time, folding each
product into the running sum in place (``addmm_``), so no float64 copy of a whole batch and no second
``[D+1, D+1]`` product ever exists; `LayerInputBuffer` runs layers over micro-batches of whole sequences of about
``CHUNK_TOKENS`` tokens, and a layer's MLP over at most that many rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import decoder_layers
from .errors import CalibrationError, ConfigError

Batch = tuple[torch.Tensor, torch.Tensor | None]

# Rows cast to float64 and multiplied per step inside the accumulators: a [512, D+1] float64 chunk is 17 MB at
# D = 4096, against 134 MB for a 4096-token batch. The summation order depends on it (results stay deterministic).
ACCUMULATE_ROWS = 512
# Tokens per layer forward when `LayerInputBuffer` visits or advances its states: whole sequences (attention needs
# them), as many as fit, at least one; a layer's MLP then sees at most this many rows at a time (3 × 512 × 14336
# bf16 intermediates = 44 MB for Llama-3-8B).
CHUNK_TOKENS = 512


def _augmented(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[rows; 1]`` as one ``[n, d+1]`` float64 tensor on ``device`` (a single cast-copy, no concatenation)."""
    n, d = rows.shape
    out = torch.empty(n, d + 1, dtype=torch.float64, device=device)
    out[:, :d].copy_(rows)
    out[:, d] = 1.0
    return out


def iter_batches(calibration: Iterable, vocab_size: int | None = None) -> Iterator[Batch]:
    """Yield ``(input_ids [B, T] int64, attention_mask [B, T] or None)`` from tensors or dicts, validating each."""
    if calibration is None or isinstance(calibration, (str, bytes)):
        raise CalibrationError(
            "calibration must be an iterable of input_ids tensors [batch, seq] or of dicts with 'input_ids' "
            f"(and optional 'attention_mask'); got {type(calibration).__name__}"
        )
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    for i, item in enumerate(calibration):
        mask = None
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise CalibrationError(f"calibration item {i} is a dict without 'input_ids' (keys: {sorted(item)})")
            ids, mask = item["input_ids"], item.get("attention_mask")
        else:
            ids = item
        if not isinstance(ids, torch.Tensor):
            raise CalibrationError(f"calibration item {i}: input_ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise CalibrationError(f"calibration item {i}: input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.is_meta or (isinstance(mask, torch.Tensor) and mask.is_meta):
            raise CalibrationError(f"calibration item {i}: tensors on the 'meta' device hold no data")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0:
            raise CalibrationError(f"calibration item {i}: input_ids must be [batch, seq] and non-empty, got {tuple(ids.shape)}")
        if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise CalibrationError(
                f"calibration item {i}: token ids must lie in [0, {vocab_size}) (the model's vocabulary), got "
                f"[{int(ids.min())}, {int(ids.max())}]: was it tokenised for another model?"
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
                raise CalibrationError(
                    f"calibration item {i}: attention_mask must be a tensor of the input_ids shape {tuple(ids.shape)}"
                )
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise CalibrationError(f"calibration item {i}: attention_mask must hold only 0 (padding) and 1 (token)")
            if not bool(mask.bool().any()):
                raise CalibrationError(f"calibration item {i}: attention_mask masks out every token")
        yield ids.long(), (None if mask is None else mask.long())


def materialize(calibration: Iterable, vocab_size: int | None = None) -> list[Batch]:
    """Validate all of the calibration up front (so bad data fails before the model is touched) and keep the
    token ids, which are small (8 bytes a token) beside any activation, so the stream can be re-run per layer."""
    batches = list(iter_batches(calibration, vocab_size))
    if not batches:
        raise CalibrationError("calibration is empty: give at least one batch of input_ids")
    return batches


@dataclass
class GramAccumulator:
    """Running ``Σ x̃ x̃ᵀ`` (float64) over unmasked tokens, their count, and the largest ``‖x‖²`` seen.

    `add` folds at most ``chunk_rows`` rows at a time (cast to float64 on the sum's device, multiplied into the
    sum in place), so its transient memory is ``chunk_rows · (D+1)`` float64 values whatever the batch size.
    """

    dim: int
    device: torch.device | str = "cpu"
    chunk_rows: int | None = None  # None: ACCUMULATE_ROWS
    total: torch.Tensor = field(init=False)
    count: int = field(init=False, default=0)
    max_sq_norm: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.chunk_rows = _positive("chunk_rows", ACCUMULATE_ROWS if self.chunk_rows is None else self.chunk_rows)
        self.total = torch.zeros(self.dim + 1, self.dim + 1, dtype=torch.float64, device=self.device)

    def add(self, x: torch.Tensor, mask: torch.Tensor | None, where: str) -> None:
        """Fold ``x [B, T, D]`` (padding where ``mask [B, T] == 0``) into the sum."""
        x = x.detach().reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).to(x.device).bool()]
        if not bool(torch.isfinite(x).all()):  # float64 casts keep (non-)finiteness: checked before any fold
            raise CalibrationError(f"non-finite activations (NaN/Inf) at the input of {where}")
        d = x.shape[1]
        peak = None  # largest row norm, kept on the device: one host sync per call, not one per chunk
        for start in range(0, x.shape[0], self.chunk_rows):
            aug = _augmented(x[start : start + self.chunk_rows], self.total.device)
            self.total.addmm_(aug.T, aug)
            norm = torch.linalg.vector_norm(aug[:, :d], dim=-1).max()
            peak = norm if peak is None else torch.maximum(peak, norm)
        if peak is not None:
            norm = float(peak)
            self.max_sq_norm = max(self.max_sq_norm, norm * norm)
        self.count += x.shape[0]

    def second_moment(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``E[x̃ x̃ᵀ]``, ``[D+1, D+1]`` float64, on ``device`` (default: where the sum is)."""
        if self.count == 0:
            raise CalibrationError("calibration produced no unmasked tokens")
        total = self.total if device is None else self.total.to(device)
        return total / self.count

    def release(self) -> None:
        """Drop the running sum (its device memory) once the second moment has been taken; ``count`` stays."""
        self.total = None


class _StopForward(Exception):
    """Raised by a hook once every measured layer has been seen, to skip the rest of the forward pass."""


# A visitor receives one batch's attention input x [B, T, D], its padding mask [B, T] (or None) and the keyword
# arguments the decoder layer passes to its attention block (position_embeddings, attention_mask, ...).
Visitor = Callable[[torch.Tensor, "torch.Tensor | None", dict], None]

_ATTENTION_KWARGS = ("position_embeddings", "attention_mask", "position_ids")


@torch.no_grad()
def visit_attention_inputs(
    model: nn.Module, visitors: dict[int, Visitor], batches: Iterable[Batch], *, progress=None
) -> None:
    """Run the calibration stream through ``model`` as it is now and hand each visited layer's attention input
    to its visitor; the forward pass stops after the last visited layer."""
    layers = decoder_layers(model)
    last = max(visitors)
    device = next(model.parameters()).device
    state: dict = {"mask": None, "busy": False}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if state["busy"]:  # the visitor itself called this block: let that call through
                return
            x = kwargs.get("hidden_states", args[0] if args else None)
            state["busy"] = True
            try:
                visitors[i](x, state["mask"], {k: kwargs[k] for k in _ATTENTION_KWARGS if k in kwargs})
            finally:
                state["busy"] = False
            if i == last:
                raise _StopForward

        return hook

    handles = [layers[i].self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in visitors]
    was_training = model.training
    model.eval()
    try:
        for ids, mask in batches:
            state["mask"] = mask
            try:
                model(
                    input_ids=ids.to(device),
                    attention_mask=None if mask is None else mask.to(device),
                    use_cache=False,
                )
            except _StopForward:
                pass
            if progress is not None:
                progress()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def attention_input_grams(
    model: nn.Module, layer_indices: list[int], batches: Iterable[Batch], *, progress=None
) -> dict[int, GramAccumulator]:
    """One pass of the calibration stream, accumulating the Gram of each listed layer's attention input."""
    device = next(model.parameters()).device
    accs = {i: GramAccumulator(model.config.hidden_size, device) for i in sorted(set(layer_indices))}
    visit_attention_inputs(
        model,
        {i: (lambda x, mask, kw, i=i: accs[i].add(x, mask, f"layer {i} attention")) for i in accs},
        batches,
        progress=progress,
    )
    return accs


@dataclass
class RegressionAccumulator:
    """Running float64 sums for a least-squares fit ``y ≈ W [a; 1]``: ``Σ ã ãᵀ`` and ``Σ y ãᵀ``.

    ``a`` is ``[N, n_in]``, ``y`` ``[N, n_out]``; padding rows are dropped. Memory is ``(n_in+1)·(n_in+n_out+1)``
    values whatever the amount of data, plus ``chunk_rows · (n_in+n_out+1)`` float64 values while `add` runs
    (rows are cast and folded in, in place, at most ``chunk_rows`` at a time).
    """

    n_in: int
    n_out: int
    device: torch.device | str = "cpu"
    chunk_rows: int | None = None  # None: ACCUMULATE_ROWS
    inputs: torch.Tensor = field(init=False)
    cross: torch.Tensor = field(init=False)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.chunk_rows = _positive("chunk_rows", ACCUMULATE_ROWS if self.chunk_rows is None else self.chunk_rows)
        self.inputs = torch.zeros(self.n_in + 1, self.n_in + 1, dtype=torch.float64, device=self.device)
        self.cross = torch.zeros(self.n_out, self.n_in + 1, dtype=torch.float64, device=self.device)

    def add(self, a: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        a = a.detach().reshape(-1, a.shape[-1])
        y = y.detach().reshape(-1, y.shape[-1])
        if mask is not None:
            keep = mask.reshape(-1).to(a.device).bool()
            a, y = a[keep], y[keep.to(y.device)]
        device = self.inputs.device
        for start in range(0, a.shape[0], self.chunk_rows):
            aug = _augmented(a[start : start + self.chunk_rows], device)
            target = y[start : start + self.chunk_rows].to(device, torch.float64)
            self.inputs.addmm_(aug.T, aug)
            self.cross.addmm_(target.T, aug)
        self.count += a.shape[0]


class LayerInputBuffer:
    """The hidden states entering one decoder layer, for every calibration token, advanced layer by layer.

    The opt-in fast path of `convert_to_mla` (``keep_activations=True``): one layer-forward per layer instead of
    re-running the calibration stream through every earlier layer, at the price of ``tokens × D`` activations in
    memory (37 MB for SmolLM2-135M on 16K tokens in float32). Statistics are still running float64 sums.

    Layers run over micro-batches of whole sequences of about ``chunk_tokens`` tokens (default `CHUNK_TOKENS`;
    at least one sequence),
    and a layer's MLP over at most ``chunk_tokens`` rows at a time, so what a visit or an advance allocates
    beyond the buffer itself does not grow with the size of the stored batches. Advancing overwrites the
    buffered states in place, micro-batch by micro-batch.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Batch],
        device: torch.device | str | None = None,
        track_reference: bool = False,
        chunk_tokens: int | None = None,
    ) -> None:
        self.layers = decoder_layers(model)
        self.reference: list[torch.Tensor] | None = None
        self.masks = [mask for _, mask in batches]
        self.device = device
        self.chunk_tokens = _positive("chunk_tokens", CHUNK_TOKENS if chunk_tokens is None else chunk_tokens)
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict] = []
        first = self.layers[0]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = kwargs.pop("hidden_states", None)
            h = args[0] if h is None else h
            self.hidden.append(h.detach().to(self.device) if self.device is not None else h.detach())
            self.kwargs.append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")})
            raise _StopForward

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        was_training = model.training
        model.eval()
        param_device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for ids, mask in batches:
                    try:
                        model(input_ids=ids.to(param_device), attention_mask=None if mask is None else mask.to(param_device), use_cache=False)
                    except _StopForward:
                        pass
        finally:
            handle.remove()
            model.train(was_training)
        if track_reference:  # the original model's stream, advanced with the original layers
            self.reference = [h.clone() for h in self.hidden]

    @classmethod
    def from_states(
        cls,
        layers: nn.ModuleList,
        hidden: list[torch.Tensor],
        masks: list[torch.Tensor | None],
        kwargs: list[dict],
        track_reference: bool = False,
        chunk_tokens: int | None = None,
    ) -> "LayerInputBuffer":
        """A buffer over hidden states computed elsewhere (streaming conversion builds them from the embedding
        table alone): ``hidden[b]`` is ``[B, T, D]``, ``kwargs[b]`` what the decoder layer is called with."""
        self = cls.__new__(cls)
        self.layers, self.hidden, self.masks, self.kwargs, self.device = layers, hidden, masks, kwargs, None
        self.chunk_tokens = _positive("chunk_tokens", CHUNK_TOKENS if chunk_tokens is None else chunk_tokens)
        self.reference = [h.clone() for h in hidden] if track_reference else None
        return self

    def micro_batches(self, b: int) -> list[tuple[slice, torch.Tensor | None, dict]]:
        """Stored batch ``b`` as micro-batches ``(rows, mask, layer kwargs)`` of whole sequences, about
        ``chunk_tokens`` tokens each (one micro-batch when the kwargs cannot be split by sequence)."""
        return _micro_batches(self.hidden[b].shape, self.masks[b], self.kwargs[b], self.chunk_tokens)

    @torch.no_grad()
    def visit(self, index: int, visitor: Visitor) -> None:
        """Hand layer ``index``'s attention input ``input_layernorm(h)`` for every buffered batch to ``visitor``
        (one call per micro-batch)."""
        layer = self.layers[index]
        device = next(layer.parameters()).device
        for b, h in enumerate(self.hidden):
            for rows, mask, kw in self.micro_batches(b):
                attn_kw = {k: kw[k] for k in _ATTENTION_KWARGS if k in kw}
                visitor(layer.input_layernorm(h[rows].to(device)), mask, attn_kw)

    def attention_gram(self, index: int) -> GramAccumulator:
        """Gram of layer ``index``'s attention input over the buffered states."""
        acc = GramAccumulator(self.hidden[0].shape[-1], next(self.layers[index].parameters()).device)
        self.visit(index, lambda x, mask, kw: acc.add(x, mask, f"layer {index} attention"))
        return acc

    @torch.no_grad()
    def visit_with_reference(self, index: int, original_attention: nn.Module, visitor: Callable) -> None:
        """Like `visit`, adding ``target``: what layer ``index``'s attention would have to output for the
        converted stream to rejoin the original one, ``attn_orig(norm(h_ref)) + (h_ref − h)``."""
        if self.reference is None:
            raise ValueError("this buffer does not track the original stream (track_reference=False)")
        layer = self.layers[index]
        device = next(layer.parameters()).device
        for b, (h, ref) in enumerate(zip(self.hidden, self.reference)):
            for rows, mask, kw in self.micro_batches(b):
                hb, rb = h[rows].to(device), ref[rows].to(device)
                attn_kw = {k: kw[k] for k in _ATTENTION_KWARGS if k in kw}
                target = original_attention(hidden_states=layer.input_layernorm(rb), **attn_kw)[0] + (rb - hb)
                visitor(layer.input_layernorm(hb), mask, attn_kw, target=target)

    @torch.no_grad()
    def advance(
        self, index: int, reference_attention: nn.Module | None = None, attention: nn.Module | None = None
    ) -> None:
        """Replace the buffered states by the outputs of layer ``index`` as it is now (with ``attention``: with
        that attention block swapped in for the pass); with ``reference_attention``, also advance the original
        stream through the layer with that attention block."""
        layer = self.layers[index]
        with _swapped_attention(layer, attention):
            self._run(layer, self.hidden)
        if self.reference is not None and reference_attention is not None:
            with _swapped_attention(layer, reference_attention):
                self._run(layer, self.reference)

    def _run(self, layer: nn.Module, states: list[torch.Tensor]) -> None:
        was_training = layer.training
        layer.eval()
        device = next(layer.parameters()).device
        try:
            with _row_chunked_mlp(layer, self.chunk_tokens):
                for b, h in enumerate(states):
                    dest = h
                    for rows, _, kw in self.micro_batches(b):
                        out = layer(h[rows].to(device), **kw)
                        out = out[0] if isinstance(out, tuple) else out
                        if dest is h and out.dtype != h.dtype:  # keep the layer's output dtype, as before
                            dest = torch.empty(h.shape[:-1] + out.shape[-1:], dtype=out.dtype, device=h.device)
                        dest[rows].copy_(out)  # sequences of a micro-batch are read before they are overwritten
                        del out
                    states[b] = dest
        finally:
            layer.train(was_training)


def _positive(name: str, value: int) -> int:
    """``value`` if it is a positive int, else a `ConfigError` (a ``ValueError``) naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


# Layer kwargs that carry a batch dimension (size B, or 1 when broadcast); anything else passes unchanged.
_BATCHED_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


def _batch_sliceable(value: object, batch: int) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return value.dim() >= 1 and value.shape[0] in (1, batch)
    if isinstance(value, (tuple, list)):
        return all(_batch_sliceable(v, batch) for v in value)
    return False


def _batch_slice(value: object, rows: slice, batch: int) -> object:
    if isinstance(value, torch.Tensor):
        return value[rows] if value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_slice(v, rows, batch) for v in value)
    return value


def _micro_batches(
    shape: torch.Size, mask: torch.Tensor | None, kwargs: dict, chunk_tokens: int
) -> list[tuple[slice, torch.Tensor | None, dict]]:
    batch, seq = shape[0], shape[1]
    per = max(1, chunk_tokens // max(1, seq))
    splittable = all(_batch_sliceable(kwargs[k], batch) for k in _BATCHED_KWARGS if k in kwargs) and not any(
        isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch
        for k, v in kwargs.items() if k not in _BATCHED_KWARGS
    )  # an unknown kwarg with a batch-sized first dimension: do not guess, run the stored batch whole
    if per >= batch or not splittable:
        return [(slice(0, batch), mask, kwargs)]
    out = []
    for start in range(0, batch, per):
        rows = slice(start, min(start + per, batch))
        kw = {k: (_batch_slice(v, rows, batch) if k in _BATCHED_KWARGS else v) for k, v in kwargs.items()}
        out.append((rows, None if mask is None else mask[rows], kw))
    return out


@contextmanager
def _swapped_attention(layer: nn.Module, attention: nn.Module | None) -> Iterator[None]:
    if attention is None or attention is layer.self_attn:
        yield
        return
    current = layer.self_attn
    layer.self_attn = attention
    try:
        yield
    finally:
        layer.self_attn = current


@contextmanager
def _row_chunked_mlp(layer: nn.Module, rows: int) -> Iterator[None]:
    """Run ``layer.mlp`` (a per-token map) over at most ``rows`` rows at a time while the block is active, so
    its ``[rows, intermediate]`` activations stay bounded even for sequences longer than ``rows``."""
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module) or "forward" in vars(mlp):
        yield
        return
    forward = mlp.forward

    def chunked(x: torch.Tensor, *args, **kwargs):
        flat = x.reshape(-1, x.shape[-1])
        if args or kwargs or flat.shape[0] <= rows:
            return forward(x, *args, **kwargs)
        out = None
        for start in range(0, flat.shape[0], rows):
            y = forward(flat[start : start + rows])
            if out is None:
                out = y.new_empty((flat.shape[0],) + tuple(y.shape[1:]))
            out[start : start + rows] = y
            del y
        return out.reshape(*x.shape[:-1], *out.shape[1:])

    mlp.forward = chunked
    try:
        yield
    finally:
        del mlp.forward
