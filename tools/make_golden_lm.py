"""Golden files for herd's Llama model: tiny Hugging Face LlamaForCausalLM models with
fixed seeds, their weights, input tokens/positions and float32 logits.

    python tools/make_golden_lm.py            # writes tests/golden/lm_<case>.npz

Each file holds the HF state dict (keys prefixed ``hf/``, HF layout, float32), the
``tokens`` [B, T] and ``positions`` [B, T] fed to HF as ``position_ids``, the HF
``logits`` [B, T, vocab], ``config_json`` (the HF config) and ``torch_version`` /
``transformers_version`` (the versions that made the file, as 0-d string arrays: rerun this
tool after upgrading either and check the diff). tests/lm/test_model.py converts the weights
with ``herd.lm.convert.params_from_hf`` and compares logits without needing torch. Needs
torch + transformers (the ``peers`` extra).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")

_BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
)
# name -> (HF config kwargs, position offset)
CASES = {
    "mha": (dict(_BASE), 0),
    "gqa": (
        dict(
            _BASE,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        ),
        0,
    ),
    # head_dim 16, theta 5e5: wavelengths 6.3 .. 118k tokens, so with an original context
    # of 256 the three bands (kept, interpolated, divided by the factor) all occur.
    "rope_scaling": (
        dict(
            _BASE,
            num_key_value_heads=1,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        ),
        1000,
    ),
    "tied": (dict(_BASE, num_key_value_heads=2, tie_word_embeddings=True), 0),
}
BATCH, SEQ = 2, 24


def build_hf(case: str, seed: int = 0):
    """(HF model in float32 eval mode, its config dict) with random non-trivial weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs, _ = CASES[case]
    cfg = LlamaConfig(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model, kwargs


def inputs(case: str, seed: int = 0):
    kwargs, offset = CASES[case]
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, kwargs["vocab_size"], size=(BATCH, SEQ)).astype(np.int32)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32) + offset, (BATCH, SEQ)).copy()
    return tokens, positions


def hf_logits(model, tokens, positions):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
        )
    return out.logits.float().numpy()


def state_dict_np(model):
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as the embedding
    return sd


def versions() -> dict[str, str]:
    """The versions of the reference implementation, stored in every golden file."""
    import torch
    import transformers

    return {"torch_version": torch.__version__, "transformers_version": transformers.__version__}


def main():
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    made_by = {k: np.array(v) for k, v in versions().items()}
    for case in CASES:
        model, kwargs = build_hf(case)
        tokens, positions = inputs(case)
        logits = hf_logits(model, tokens, positions)
        arrays = {f"hf/{k}": v for k, v in state_dict_np(model).items()}
        path = os.path.join(GOLDEN_DIR, f"lm_{case}.npz")
        np.savez_compressed(
            path,
            tokens=tokens,
            positions=positions,
            logits=logits.astype(np.float32),
            config_json=np.array(json.dumps(kwargs)),
            **made_by,
            **arrays,
        )
        made = ", ".join(f"{k} {v}" for k, v in versions().items())
        print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB, logits {logits.shape} ({made})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
