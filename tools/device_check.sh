#!/usr/bin/env bash
# The prepared check for a lent GPU machine (see /work/.library/device): one short run that
#   1. installs the wheels that machine lacks (carried in .whl/gpu, made by
#      `pip download --python-version 3.12 ... -d .whl/gpu grain ml-collections tensorboardX
#      tqdm pytest array_record`),
#   2. runs the GPU-only tests (cuDNN attention; the Pallas/Triton kernel compiled for real,
#      not interpreted) and the logits golden-file parity on the GPU,
#   3. runs tools/bench_lm.py's accel section (bf16 MFU of Llama-3-8B-shaped layers) for
#      each GPU attention backend,
#   4. tools/bench_lm.py's accel_decode section (Llama-3-8B-shaped decode, bf16, batch 1/64),
#   5. tools/bench_vision.py --accel (ViT-B/16, ViT-L/16 bf16 training MFU, batch 256),
#   6. times herd's Lloyd and k-means++ at the CPU benchmark's shape on the GPU.
# Results go to $OUT (logs and JSON). Each step has its own time limit so that one slow
# step cannot eat the others' device time.
set -u
OUT=${OUT:-/tmp/herd_device_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

{ nvidia-smi; python --version; python -c "import jax; print(jax.__version__, jax.devices())"; } \
  >"$OUT/machine.txt" 2>&1
# Install only what is missing, wheel by wheel without dependency resolution: that
# machine's own numpy/protobuf/absl must stay as they are.
for pair in grain:grain- ml_collections:ml_collections- tensorboardX:tensorboardx- tqdm:tqdm- \
    pytest:pytest- array_record:array_record- cloudpickle:cloudpickle- etils:etils- \
    portpicker:portpicker- yaml:pyyaml- absl:absl_py- fsspec:fsspec- zipp:zipp-; do
  mod=${pair%%:*} whl=${pair#*:}
  python -c "import $mod" 2>/dev/null ||
    python -m pip install -q --no-deps --no-index .whl/gpu/${whl}*.whl >>"$OUT/pip.txt" 2>&1
done
python -c "import grain, ml_collections, tensorboardX, tqdm, pytest" >>"$OUT/pip.txt" 2>&1
echo "setup done at $(elapsed)s" | tee "$OUT/progress.txt"

JAX_PLATFORMS=cuda timeout 120 python -m pytest -q -p no:cacheprovider tests/lm/test_attention.py \
  tests/lm/test_model.py -k "cudnn or pallas_gpu or golden or bf16 or packed_documents or chunked" \
  >"$OUT/tests_gpu.txt" 2>&1
echo "tests rc=$? at $(elapsed)s" | tee -a "$OUT/progress.txt"

timeout "${ACCEL_TIMEOUT:-240}" python tools/bench_lm.py --sections accel \
  --gpu-attention "${ACCEL_IMPLS:-cudnn,xla_chunked,pallas_gpu}" --q-chunk 1024 \
  --steps 5 --warmup 2 --json "$OUT/accel.json" >"$OUT/accel.txt" 2>&1
echo "accel rc=$? at $(elapsed)s" | tee -a "$OUT/progress.txt"

# The fastest backend without rematerialisation (4 layers fit; a full 8B would not).
timeout 90 python tools/bench_lm.py --sections accel --gpu-attention cudnn --accel-remat none \
  --steps 5 --warmup 2 --json "$OUT/accel_remat_none.json" >"$OUT/accel_remat_none.txt" 2>&1
echo "accel remat none rc=$? at $(elapsed)s" | tee -a "$OUT/progress.txt"

# Issue 12: decode tok/s of a Llama-3-8B-shaped model (all 32 layers, bf16) at batch 1 and
# 64, and the fraction of the HBM read bandwidth measured in the same run.
timeout 240 python tools/bench_lm.py --sections accel_decode --decode-rounds 3 \
  --json "$OUT/accel_decode.json" >"$OUT/accel_decode.txt" 2>&1
echo "accel decode rc=$? at $(elapsed)s" | tee -a "$OUT/progress.txt"

# Issue 13: ViT-B/16 and ViT-L/16 bf16 training MFU at batch 256 (DeiT III step, LAMB).
timeout 240 python tools/bench_vision.py --accel --json "$OUT/vision_accel.json" \
  >"$OUT/vision_accel.txt" 2>&1
echo "vision accel rc=$? at $(elapsed)s" | tee -a "$OUT/progress.txt"

timeout 100 python - >"$OUT/kmeans_gpu.txt" 2>&1 <<'EOF'
import json, time
import numpy as np
import jax
from herd.curation.kmeans import kmeans, kmeans_plusplus
import importlib.util, sys
spec = importlib.util.spec_from_file_location("bc", "tools/bench_curation.py")
bc = importlib.util.module_from_spec(spec); spec.loader.exec_module(bc)
n, d, k, iters = 1_000_000, 128, 1024, 20
x = bc.make_data(n, d)
c0 = x[np.random.default_rng(0).choice(n, k, replace=False)]
from herd.curation.kmeans import default_tile
out = {"device": jax.devices()[0].device_kind, "default_tile": default_tile(jax.devices()[0].platform, k, 4)}
for tile in (512, None):  # rows per tile of the nearest-centroid search (None: default)
    ts = []
    for rep in range(2):  # the first includes compilation
        t = time.perf_counter()
        c, a = kmeans(x, k, n_iters=iters, init=c0, tile=tile)
        ts.append(time.perf_counter() - t)
    s = ts[1] / (iters + 1)
    out[f"tile{tile}"] = dict(first_s=ts[0], s_per_iter=s, tflops=2 * n * d * k / s / 1e12,
                              inertia=bc.inertia_of(x, c))
for rep in range(2):
    t = time.perf_counter()
    kmeans_plusplus(x, k, seed=0)
    out[f"kpp_s_rep{rep}"] = time.perf_counter() - t
print(json.dumps(out))
EOF
echo "kmeans rc=$? at $(elapsed)s" | tee -a "$OUT/progress.txt"
