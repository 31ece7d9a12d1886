"""``socseg suggest-slices``: the slices of a segmented volume worth labelling next."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from socseg.analysis.uncertainty import rank_slices


@click.command("suggest-slices")
@click.argument("store", metavar="LABELS.zarr|UNCERTAINTY.tif")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="How many slices to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking as JSON.")
def suggest_slices(store: str, top: int, as_json: bool) -> None:
    """Rank the slices of a segmented volume by the model's mean uncertainty, most uncertain
    first: where labelling helps fine-tuning most.

    LABELS.zarr: a store written by `socseg segment MODEL INPUT LABELS.zarr --uncertainty` (or
    --probabilities). UNCERTAINTY.tif: the map written by `socseg segment MODEL INPUT LABELS.tif
    --uncertainty UNCERTAINTY.tif`.
    """
    ranked = rank_slices(store)[:top]
    if as_json:
        click.echo(json.dumps([asdict(s) for s in ranked], indent=2))
        return
    click.echo("  z  mean uncertainty  pixels > 0.5")
    for s in ranked:
        click.echo(f"{s.z:4d}  {s.mean:16.3f}  {s.uncertain_fraction:12.1%}")
