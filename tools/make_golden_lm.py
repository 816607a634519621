"""Golden files for herd's Llama model: tiny Hugging Face LlamaForCausalLM models with
fixed seeds, their weights, input tokens/positions and float32 logits, and their greedy
generations.

    python tools/make_golden_lm.py [all|logits|generate]   # default all
        logits:   tests/golden/lm_<case>.npz
        generate: tests/golden/lm_generate_<case>.npz

Each file holds the HF state dict (keys prefixed ``hf/``, HF layout, float32), the
``tokens`` [B, T] and ``positions`` [B, T] fed to HF as ``position_ids``, the HF
``logits`` [B, T, vocab], ``config_json`` (the HF config) and ``torch_version`` /
``transformers_version`` (the versions that made the file, as 0-d string arrays: rerun this
tool after upgrading either and check the diff). tests/lm/test_model.py converts the weights
with ``herd.lm.convert.params_from_hf`` and compares logits without needing torch.

lm_generate_<case>.npz holds, for the same model (the weights stay in lm_<case>.npz; their
``weights_sha256`` is stored to tie the two files together), a batch of prompts of different
lengths (``gen_prompts`` [B, P] left-padded with 0, ``gen_lengths`` [B]) and the
``gen_tokens`` [B, 32] that HF ``generate(do_sample=False, max_new_tokens=32)`` produces for
the left-padded batch (attention mask on the padding, no EOS stop).
tests/lm/test_generate.py checks herd's greedy ``generate_tokens`` equals them token for
token. Needs torch + transformers (the ``peers`` extra).
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
GEN_LENGTHS = (3, 11, 7, 1)  # prompt lengths of the generation batch (left-padded in HF)
GEN_NEW = 32


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


def weights_sha256(state_dict: dict) -> str:
    """A fingerprint of a float32 state dict (names, shapes and bytes, in name order)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = np.ascontiguousarray(np.asarray(state_dict[k], np.float32))
        h.update(k.encode() + str(v.shape).encode() + v.tobytes())
    return h.hexdigest()


def gen_prompts(case: str, seed: int = 0):
    """([B, P] int32 prompts left-padded with 0, [B] lengths) for the generation files."""
    kwargs, _ = CASES[case]
    rng = np.random.default_rng(seed + 2)
    lengths = np.asarray(GEN_LENGTHS, np.int32)
    p = int(lengths.max())
    prompts = np.zeros((len(lengths), p), np.int32)
    for r, n in enumerate(lengths):
        prompts[r, p - n :] = rng.integers(1, kwargs["vocab_size"], n)
    return prompts, lengths


def hf_greedy(model, prompts, lengths, new_tokens: int = GEN_NEW):
    """HF generate(do_sample=False) on the left-padded batch: the new tokens [B, new]."""
    import torch

    p = prompts.shape[1]
    mask = (np.arange(p)[None, :] >= (p - lengths)[:, None]).astype(np.int64)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id = None, 0  # exactly `new_tokens`, no EOS stop
    gc.temperature = gc.top_p = gc.top_k = None
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(prompts.astype(np.int64)),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
    new = out[:, p:].numpy().astype(np.int32)
    assert new.shape == (len(lengths), new_tokens), new.shape
    return new


def versions() -> dict[str, str]:
    """The versions of the reference implementation, stored in every golden file."""
    import torch
    import transformers

    return {"torch_version": torch.__version__, "transformers_version": transformers.__version__}


def write_generate(case: str, made_by: dict) -> str:
    model, kwargs = build_hf(case)
    prompts, lengths = gen_prompts(case)
    new = hf_greedy(model, prompts, lengths)
    path = os.path.join(GOLDEN_DIR, f"lm_generate_{case}.npz")
    np.savez_compressed(
        path,
        gen_prompts=prompts,
        gen_lengths=lengths,
        gen_tokens=new,
        weights_sha256=np.array(weights_sha256(state_dict_np(model))),
        config_json=np.array(json.dumps(kwargs)),
        **made_by,
    )
    print(f"{path}: {os.path.getsize(path)} bytes, new tokens {new.shape}")
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    what = argv[0] if argv else "all"
    if what not in ("all", "logits", "generate") or len(argv) > 1:
        print("usage: python tools/make_golden_lm.py [all|logits|generate]", file=sys.stderr)
        return 2
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    made_by = {k: np.array(v) for k, v in versions().items()}
    for case in CASES:
        if what in ("all", "generate"):
            write_generate(case, made_by)
        if what == "generate":
            continue
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
