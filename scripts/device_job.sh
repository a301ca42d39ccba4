#!/usr/bin/env bash
# The one prepared accelerator job: solver benchmark, segmentation training (#4) and inverse
# model training (#5), each under its own wall-clock budget, results under $OUT.
#
#   bash scripts/device_job.sh smoke   # tiny settings: every stage end to end in ~2 min
#   bash scripts/device_job.sh full    # the real run (~9 min)
#
# Needs, in the repository root (both git-ignored, named in the device call's `carry`):
#   .whl/      nibabel and nilearn wheels (py3-none-any), .whl/pins/ flax/orbax/diffrax
#   .devdata/  brats2015/ and tcga/ cases, the layout of ../shared/data
# Set PINS=1 to install the pinned flax/orbax/diffrax wheels over the machine's own.
set -u
MODE=${1:-smoke}
OUT=${OUT:-/tmp/rtjax_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
exec > >(tee -a "$OUT/log.txt") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
if [ "${PINS:-0}" = 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/pins/*.whl || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import importlib.metadata as md, jax
print("jax", jax.__version__, jax.devices())
for name in ("flax", "orbax-checkpoint", "optax", "diffrax", "equinox", "nibabel", "nilearn", "numpy", "scipy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s) $(date -u +%T)"
    timeout --kill-after=10 "$limit" "$@"
    echo "=== $name rc=$? in $((SECONDS - start))s"
}

if [ "$MODE" = smoke ]; then
    stage solver 60 python3 -m rtjax.cli benchmark --quick --jax-steps 200 --numpy-steps 2
    stage seg 100 python3 scripts/device_seg.py --tiny --budget-s 70 --data .devdata --out "$OUT"
    stage inverse 80 python3 scripts/device_inverse.py --tiny --budget-s 60 --out "$OUT"
else
    stage solver 75 python3 -m rtjax.cli benchmark --jax-steps 2000 --numpy-steps 3
    stage seg "$((${SEG_S:-250} + 30))" python3 scripts/device_seg.py --budget-s "${SEG_S:-250}" \
        --data .devdata --out "$OUT"
    stage inverse "$((${INV_S:-190} + 30))" python3 scripts/device_inverse.py \
        --budget-s "${INV_S:-190}" --out "$OUT"
fi

# At most 8 files come back: pack anything beyond the expected ones.
cd "$OUT" || exit 1
extras=$(ls | grep -v -E '^(log\.txt|seg_weights\.tar\.gz|seg_metrics\.json|inverse_weights\.tar\.gz|inverse_metrics\.json)$')
if [ -n "$extras" ]; then tar czf extras.tar.gz $extras && rm -rf $extras; fi
ls -la "$OUT"
