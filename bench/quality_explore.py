"""Quick exploration of conversion options on SmolLM2-135M (a cheaper protocol than quality_smollm2.py).

Protocol: WikiText-2 test tokenised whole without BOS; the first 10 non-overlapping 512-token windows are
evaluated; calibration = 16 sequences of 256 tokens from token offset 20480; float32, CPU. Each argument run
is one JSON list of `MLAConfig` keyword dicts; one line of output per config.

    python bench/quality_explore.py '[{"kv_lora_rank": 64, "qk_rope_head_dim": 32, "key_weight": 0.5}]'
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from transmla_surgery import MLAConfig, convert_to_mla
from transmla_surgery.data import batched, perplexity, tokenize, windows
from transmla_surgery.models import load_model

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.txt"


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model()
    stream = tokenize(tok, WIKITEXT.read_text(encoding="utf-8"))
    ev = windows(stream, 10, 512)
    calib = batched(windows(stream, 16, 256, offset=20480), 8)
    print("original", perplexity(model, ev), flush=True)
    for kw in json.loads(sys.argv[1]):
        m = copy.deepcopy(model)
        convert_to_mla(m, MLAConfig(**kw), calib, keep_activations=True, progress=False)
        print(json.dumps(kw), round(perplexity(m, ev), 2), flush=True)


if __name__ == "__main__":
    main()
