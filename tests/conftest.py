"""Test set-up: eight fake CPU devices, so mesh code is exercised without accelerators.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The float32 parity tests compare against float64 references and HF's float32 logits at
# 1e-4 to 1e-5. On GPU, XLA and Pallas/Triton run float32 dots as TF32 by default (about
# 1e-3 error, measured on an H100), so tests ask for full float32 there; on CPU this
# changes nothing.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
