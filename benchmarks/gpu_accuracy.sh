#!/usr/bin/env bash
# benchmarks/accuracy.py on a GPU machine that has JAX but no TensorFlow (Keras 3, KERAS_BACKEND=jax).
#
#   bash benchmarks/gpu_accuracy.sh OUT_SUBDIR [accuracy.py arguments...]
#
# Needs, beside the repository: .whl/ with the wheels the machine lacks (keras, optree, namex,
# mlflow-skinny and its dependencies; see benchmarks/README.md) and .gpu/socpristine-u8.tar.xz, the
# uint8 copy of SOCPristine that benchmarks/quantise_volume.py writes (the raw uint16 volume is too
# big to carry). Tracking goes to a file store in /tmp (no database driver there); the tables land
# in $OUT/OUT_SUBDIR (or gpu-out/OUT_SUBDIR), written after every method, so a timeout keeps them.
set -uo pipefail
sub=$1; shift
out=${OUT:-$PWD/gpu-out}/$sub
mkdir -p "$out"
if [ ! -d /tmp/site/keras ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src KERAS_BACKEND=jax PYTHONUNBUFFERED=1 \
       MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=file:/tmp/mlruns TF_CPP_MIN_LOG_LEVEL=2
[ -d /tmp/socpristine-u8 ] || tar -C /tmp -xJf .gpu/socpristine-u8.tar.xz || exit 1
python3 -c "import jax, keras, mlflow; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, 'mlflow', mlflow.__version__)" || exit 1
python3 benchmarks/accuracy.py --train-volume /tmp/socpristine-u8 --out "$out" "$@" 2>&1 \
  | grep --line-buffered -v "Downloading artifacts\|python_model. causes it to be serialized" | tee "$out/log.txt"
