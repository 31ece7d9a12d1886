"""A uint8 copy of a labelled volume, for carrying it where bandwidth or space is short (a GPU node).

    python benchmarks/quantise_volume.py ~/.cache/socseg/accuracy/data/socpristine .gpu/socpristine-u8 --split 0.6,0.1,0.3,8

The grey values go through the project's own normalisation (``socseg.data.normalise.Normaliser``:
percentile clip fitted on the *training slab only*, so no test intensities leak) and are then
rounded to 256 levels; labels and phase map are copied unchanged. A model trained on the copy
fits its own normaliser to the uint8 values, so it works on the copy, not on the raw volume:
score it on the copy too (``benchmarks/accuracy.py --train-volume COPY``). The percentiles and
the source volume's checksums are recorded in ``volume.json`` (``extra.quantised_from``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from socseg.params import load_params
from socseg.data.normalise import Normaliser
from socseg.data.split import slab_split
from socseg.data.volumes import Volume, VolumeMeta, load_volume, save_volume


def quantise(volume: Volume, train_slab: tuple[int, int], low_percentile: float, high_percentile: float) -> Volume:
    """``volume`` with its grey values normalised on ``train_slab`` (z range) and stored as uint8."""
    a, b = train_slab
    normaliser = Normaliser.fit([volume.image[a:b]], low_percentile, high_percentile)
    image = np.empty(volume.image.shape, np.uint8)
    for z in range(volume.image.shape[0]):  # slice by slice: no float32 copy of the whole volume
        image[z] = np.rint(normaliser.apply(volume.image[z]) * 255.0).astype(np.uint8)
    extra = {**volume.meta.extra, "quantised_from": {
        "name": volume.meta.name, "checksums": dict(volume.meta.checksums), "train_slab": [a, b],
        **normaliser.to_dict()}}
    meta = VolumeMeta(**{**volume.meta.__dict__, "name": f"{volume.meta.name}-u8", "image_dtype": "uint8",
                         "checksums": {}, "extra": extra})
    return Volume(image, volume.labels, meta)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="volume folder (socseg data import)")
    p.add_argument("target", type=Path, help="new volume folder (must not exist)")
    p.add_argument("--split", metavar="TRAIN,VAL,TEST,GAP",
                   help="slab split whose training slab the percentiles come from [default: params.yaml split]")
    p.add_argument("--percentiles", metavar="LOW,HIGH", help="[default: params.yaml normalise percentiles]")
    p.add_argument("--params", type=Path, help="params.yaml giving the defaults [default: the project's]")
    args = p.parse_args(argv)
    params = load_params(args.params)
    split = [params["split"][k] for k in ("train", "val", "test", "gap")]
    train, val, test, gap = (float(v) for v in args.split.split(",")) if args.split else split
    percentiles = [params["normalise"]["low_percentile"], params["normalise"]["high_percentile"]]
    low, high = (float(v) for v in args.percentiles.split(",")) if args.percentiles else percentiles
    volume = load_volume(args.source)
    slab = slab_split(volume.image.shape[0], train, val, test, int(gap)).train
    save_volume(quantise(volume, slab, low, high), args.target)
    print(f"wrote {args.target} (normalised on z {slab[0]}-{slab[1] - 1})")


if __name__ == "__main__":
    main()
