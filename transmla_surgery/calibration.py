"""Streaming calibration: running float64 Gram sums of attention inputs, padding masked out.

Nothing here stores activations: each attention block's input ``x`` (``[batch, seq, D]``) is folded into
``Σ += x̃ᵀ x̃`` (``x̃ = [x; 1]``, ``[D+1, D+1]`` float64) as soon as it is produced, so memory does not grow with
the amount of calibration data. Forward passes stop right after the last layer that is being measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import decoder_layers
from .errors import CalibrationError

Batch = tuple[torch.Tensor, torch.Tensor | None]


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
    """Running ``Σ x̃ x̃ᵀ`` (float64) over unmasked tokens, their count, and the largest ``‖x‖²`` seen."""

    dim: int
    device: torch.device | str = "cpu"
    total: torch.Tensor = field(init=False)
    count: int = field(init=False, default=0)
    max_sq_norm: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.dim + 1, self.dim + 1, dtype=torch.float64, device=self.device)

    def add(self, x: torch.Tensor, mask: torch.Tensor | None, where: str) -> None:
        """Fold ``x [B, T, D]`` (padding where ``mask [B, T] == 0``) into the sum."""
        x = x.detach().reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).to(x.device).bool()]
        x = x.to(device=self.total.device, dtype=torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(f"non-finite activations (NaN/Inf) at the input of {where}")
        aug = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        self.total += aug.T @ aug
        self.count += x.shape[0]
        if x.shape[0]:
            self.max_sq_norm = max(self.max_sq_norm, float(x.pow(2).sum(-1).max()))

    def second_moment(self) -> torch.Tensor:
        """``E[x̃ x̃ᵀ]``, ``[D+1, D+1]`` float64."""
        if self.count == 0:
            raise CalibrationError("calibration produced no unmasked tokens")
        return self.total / self.count


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
    values whatever the amount of data.
    """

    n_in: int
    n_out: int
    device: torch.device | str = "cpu"
    inputs: torch.Tensor = field(init=False)
    cross: torch.Tensor = field(init=False)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.inputs = torch.zeros(self.n_in + 1, self.n_in + 1, dtype=torch.float64, device=self.device)
        self.cross = torch.zeros(self.n_out, self.n_in + 1, dtype=torch.float64, device=self.device)

    def add(self, a: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        a = a.detach().reshape(-1, a.shape[-1])
        y = y.detach().reshape(-1, y.shape[-1])
        if mask is not None:
            keep = mask.reshape(-1).to(a.device).bool()
            a, y = a[keep], y[keep]
        a = a.to(self.inputs.device, torch.float64)
        y = y.to(self.inputs.device, torch.float64)
        aug = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
        self.inputs += aug.T @ aug
        self.cross += y.T @ aug
        self.count += a.shape[0]
class LayerInputBuffer:
    """The hidden states entering one decoder layer, for every calibration token, advanced layer by layer.

    The opt-in fast path of `convert_to_mla` (``keep_activations=True``): one layer-forward per layer instead of
    re-running the calibration stream through every earlier layer, at the price of ``tokens × D`` activations in
    memory (37 MB for SmolLM2-135M on 16K tokens in float32). Statistics are still running float64 sums.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Batch],
        device: torch.device | str | None = None,
        track_reference: bool = False,
    ) -> None:
        self.layers = decoder_layers(model)
        self.reference: list[torch.Tensor] | None = None
        self.masks = [mask for _, mask in batches]
        self.device = device
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
    ) -> "LayerInputBuffer":
        """A buffer over hidden states computed elsewhere (streaming conversion builds them from the embedding
        table alone): ``hidden[b]`` is ``[B, T, D]``, ``kwargs[b]`` what the decoder layer is called with."""
        self = cls.__new__(cls)
        self.layers, self.hidden, self.masks, self.kwargs, self.device = layers, hidden, masks, kwargs, None
        self.reference = [h.clone() for h in hidden] if track_reference else None
        return self

    @torch.no_grad()
    def visit(self, index: int, visitor: Visitor) -> None:
        """Hand layer ``index``'s attention input ``input_layernorm(h)`` for every buffered batch to ``visitor``."""
        layer = self.layers[index]
        device = next(layer.parameters()).device
        for h, mask, kw in zip(self.hidden, self.masks, self.kwargs):
            visitor(layer.input_layernorm(h.to(device)), mask, {k: kw[k] for k in _ATTENTION_KWARGS if k in kw})

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
        for h, ref, mask, kw in zip(self.hidden, self.reference, self.masks, self.kwargs):
            h, ref = h.to(device), ref.to(device)
            attn_kw = {k: kw[k] for k in _ATTENTION_KWARGS if k in kw}
            target = original_attention(hidden_states=layer.input_layernorm(ref), **attn_kw)[0] + (ref - h)
            visitor(layer.input_layernorm(h), mask, attn_kw, target=target)

    @torch.no_grad()
    def advance(self, index: int, reference_attention: nn.Module | None = None) -> None:
        """Replace the buffered states by the outputs of layer ``index`` as it is now; with
        ``reference_attention``, also advance the original stream through the layer with that attention block."""
        layer = self.layers[index]
        self._run(layer, self.hidden)
        if self.reference is not None and reference_attention is not None:
            current = layer.self_attn
            layer.self_attn = reference_attention
            try:
                self._run(layer, self.reference)
            finally:
                layer.self_attn = current

    def _run(self, layer: nn.Module, states: list[torch.Tensor]) -> None:
        was_training = layer.training
        layer.eval()
        device = next(layer.parameters()).device
        try:
            for b, (h, kw) in enumerate(zip(states, self.kwargs)):
                out = layer(h.to(device), **kw)
                out = out[0] if isinstance(out, tuple) else out
                states[b] = out.to(h.device)
        finally:
            layer.train(was_training)
