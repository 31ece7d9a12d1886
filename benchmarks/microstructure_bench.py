"""Time and peak memory of ``socseg.analysis.microstructure.measure`` on a blurred-noise 3-phase phantom.

    python benchmarks/microstructure_bench.py [--size 500] [--sigma 3] [--no-sizes]

The phantom: Gaussian-filtered white noise (float32, in place) cut at the 29 % and 72 %
quantiles into pore / YSZ / Ni (fractions like SOCPristine). Peak RSS is the process
maximum (``ru_maxrss``), so it is printed once for the phantom and once after measuring;
the phantom's float32 field is freed before measuring.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
from scipy import ndimage as ndi

from socseg.analysis.microstructure import flatten_metrics, measure


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def phantom(size: int, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = rng.standard_normal((size, size, size), dtype=np.float32)
    ndi.gaussian_filter(field, sigma, output=field)
    low, high = np.quantile(field[::4, ::4, ::4], [0.29, 0.72])
    labels = np.full(field.shape, 128, dtype=np.uint8)
    labels[field < low] = 0
    labels[field >= high] = 255
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--sigma", type=float, default=3.0)
    parser.add_argument("--no-sizes", action="store_true", help="skip the local thickness")
    args = parser.parse_args()

    start = time.perf_counter()
    labels = phantom(args.size, args.sigma)
    print(f"phantom {labels.shape}: {time.perf_counter() - start:.1f} s, peak RSS so far {_rss_gib():.2f} GiB")

    start = time.perf_counter()
    result = measure(labels, {0: "pore", 128: "ysz", 255: "ni"}, size_phases=[] if args.no_sizes else None)
    elapsed = time.perf_counter() - start
    print(f"measure: {elapsed:.1f} s, peak RSS {_rss_gib():.2f} GiB (labels alone {labels.nbytes / 2**30:.2f} GiB)")
    print(json.dumps({k: round(v, 5) for k, v in flatten_metrics(result).items()}, indent=1))


if __name__ == "__main__":
    main()
