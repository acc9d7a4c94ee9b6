"""Tiny random source models shared by the tests (seeded, CPU, a few thousand parameters)."""

from __future__ import annotations

import pytest
import torch

VOCAB = 97

# Tiny models run fastest single-threaded (and do not fight other processes for the two CI cores);
# the real-model tests raise this again for themselves.
torch.set_num_threads(1)


def tiny_model(
    family: str = "llama",
    *,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    hidden: int = 48,
    layers: int = 2,
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A randomly initialised Llama/Mistral/Qwen2 causal LM; biases (when present) are made non-trivial."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(attention_bias=bias, **common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)  # non-trivial norms, so input-norm bounds are exercised
    return model.to(dtype).eval()


def fail_factorization_at(monkeypatch, fail_at: int) -> None:
    """Make `surgery.factorize_layer` raise on its ``fail_at``-th call (0-based): a failure injected part-way."""
    from transmla_surgery import surgery

    calls = {"n": 0}
    real = surgery.factorize_layer

    def flaky(*args, **kwargs):
        if calls["n"] == fail_at:
            raise RuntimeError("injected failure")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(surgery, "factorize_layer", flaky)


# One fork server serves every test module of a session (the first to start it sets what it preloads), so the
# interruption tests (a child process killed with SIGKILL) share this one, complete list.
FORKSERVER_PRELOAD = ["torch", "lightning.pytorch", "transformers", "transmla_surgery", "transmla_surgery.export",
                      "transmla_surgery.callbacks", "transformers.models.llama.modeling_llama",
                      "transformers.models.deepseek_v3.modeling_deepseek_v3", "conftest", "test_reliability_kill",
                      "test_reliability_resume"]


@pytest.fixture(scope="module")
def server():
    """A forkserver multiprocessing context with the heavy imports preloaded, started before any measured run."""
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    warm = ctx.Process(target=time.sleep, args=(0,))
    warm.start()
    warm.join(300)
    return ctx


def calibration(batches: int = 3, batch: int = 4, seq: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(batches)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(7))
