#!/usr/bin/env bash
# benchmarks/gpu_throughput.py on a GPU machine that has JAX but no TensorFlow (Keras 3, KERAS_BACKEND=jax).
#
#   bash benchmarks/gpu_throughput.sh [gpu_throughput.py arguments...]
#
# Needs, beside the repository, .whl/ with the wheels the machine lacks (keras, optree, namex;
# `pip download --no-deps -d .whl keras==3.15.1 optree namex`). No data: the tiles are random.
# Writes benchmarks/results/gpu_throughput/throughput.{json,md} (copy them back with $OUT).
set -uo pipefail
if [ ! -d /tmp/site/keras ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" || exit 1
python3 benchmarks/gpu_throughput.py "$@" 2>&1 | tee /tmp/gpu_throughput.log
[ -n "${OUT:-}" ] && cp -r benchmarks/results/gpu_throughput "$OUT/" 2>/dev/null
exit 0
