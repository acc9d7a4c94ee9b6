"""Layer-wise residual-stream distillation (`Distillation(hidden_weight=...)`, `hidden_state_loss`)."""

from __future__ import annotations

import copy

import pytest
import torch

from test_callbacks import CONFIG, LM, Record, calibration, loader, rows, tiny_llama, trainer
from transmla_surgery import convert_to_mla
from transmla_surgery.callbacks import Distillation, MLASurgery
from transmla_surgery.distill import hidden_state_loss
from transmla_surgery.errors import ConfigError


def _reference(student, teacher, valid) -> float:
    """float64: mean over layers of Σ‖s − t‖² / Σ‖t‖² over valid tokens."""
    terms = []
    for s, t in zip(student, teacher):
        s, t = s.double()[valid], t.double()[valid]
        terms.append(float((s - t).pow(2).sum() / t.pow(2).sum()))
    return sum(terms) / len(terms)


def test_hidden_state_loss_matches_a_float64_reference_and_masks_padding():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(3, 7, 16, generator=g) * (1 + i) for i in range(4)]
    student = [t + 0.1 * torch.randn(t.shape, generator=g) for t in teacher]
    valid = torch.rand(3, 7, generator=g) > 0.3
    got = hidden_state_loss(student, teacher, valid)
    assert float(got) == pytest.approx(_reference(student, teacher, valid), rel=1e-5)
    # padding positions do not count: changing them changes nothing
    moved = [s.masked_fill(~valid[..., None], 1e3) for s in student]
    assert float(hidden_state_loss(moved, teacher, valid)) == pytest.approx(float(got), rel=1e-6)
    assert float(hidden_state_loss(teacher, teacher, valid)) == 0.0
    with pytest.raises(ValueError, match="one teacher state per student layer"):
        hidden_state_loss(student, teacher[:2], valid)


def test_hidden_loss_with_the_swap_in_teacher_is_the_gap_between_converted_and_original_layers():
    original = tiny_llama()
    model = copy.deepcopy(original)
    record = Record()
    batch = rows(4, seed=7)
    module = LM(model, lr=0.0)  # lr 0: step 1's logged value is the conversion's own gap
    trainer([MLASurgery(CONFIG, calibration(), train="attention"), Distillation(weight=1.0, loss_weight=0.0, hidden_weight=2.0),
             record], max_steps=1).fit(module, loader([batch[i] for i in range(4)]))
    first = record.metrics[0]
    # the decoder-layer outputs of both models on the same batch (the hooks see them before the final norm)
    converted = copy.deepcopy(original)
    convert_to_mla(converted, CONFIG, calibration(), progress=False)
    hooks, outs = [], {"s": [], "t": []}
    for key, net in (("s", converted), ("t", original)):
        hooks += [layer.register_forward_hook(lambda m, a, o, key=key: outs[key].append(o[0] if isinstance(o, tuple) else o))
                  for layer in net.model.layers]
        with torch.no_grad():
            net(input_ids=batch)
    for h in hooks:
        h.remove()
    want = _reference(outs["s"], outs["t"], torch.ones(batch.shape, dtype=torch.bool))
    assert want > 1e-4  # rank 24 of 64 loses something: the test can fail
    assert first["distill/hidden"] == pytest.approx(want, rel=1e-4)
    assert record.losses[0] == pytest.approx(first["distill/loss"] + 2.0 * first["distill/hidden"], rel=1e-5)


def test_hidden_loss_is_zero_for_an_identical_copied_teacher_and_training_on_it_lowers_it():
    model = tiny_llama()
    record = Record()
    # a separate copy (ModelTeacher): its own layers are hooked for the teacher pass
    trainer([Distillation(weight=0.0, loss_weight=0.0, hidden_weight=1.0, teacher=copy.deepcopy(model)), record],
            max_steps=1).fit(LM(copy.deepcopy(model)), loader(rows(4)))
    assert record.metrics[0]["distill/hidden"] == 0.0

    original = tiny_llama()
    record = Record()
    data = rows(4, seed=3)
    module = LM(copy.deepcopy(original), lr=3e-3)
    trainer([MLASurgery(CONFIG, calibration(), train="attention"),
             Distillation(weight=0.0, loss_weight=0.0, hidden_weight=1.0), record],
            max_steps=12).fit(module, loader([data[i] for i in range(4)], batch_size=4))
    curve = [m["distill/hidden"] for m in record.metrics]
    assert curve[-1] < 0.7 * curve[0], curve


def test_hidden_weight_must_be_a_non_negative_number():
    with pytest.raises(ConfigError, match="hidden_weight"):
        Distillation(hidden_weight=-1.0)


@pytest.mark.parametrize("reentrant", [True, False])
def test_hidden_loss_under_activation_checkpointing_equals_the_plain_run(reentrant):
    """Checkpointed layers re-run their forward in backward: only the training forward's outputs are recorded."""
    losses = {}
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        record = Record()
        trainer([MLASurgery(CONFIG, calibration(), train="attention"),
                 Distillation(weight=1.0, loss_weight=0.0, hidden_weight=1.0), record],
                max_steps=3).fit(LM(model), loader(rows(12)))
        losses[checkpointing] = [m["distill/hidden"] for m in record.metrics]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[True][-1] != losses[True][0]  # it trained
