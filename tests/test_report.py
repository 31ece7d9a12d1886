"""`socseg report`: one self-contained HTML page per volume, from a phantom written by socseg's own writers."""

from __future__ import annotations

import base64
import html.parser
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from socseg.analysis.intervals import MetricInterval
from socseg.analysis.microstructure import measure
from socseg.analysis.report import (
    LabelInput,
    OrthogonalPlanes,
    ReportMetrics,
    SlicePlanes,
    evaluation_report,
    open_labels,
    open_probabilities,
    render_html,
    uncertainty_source,
)
from socseg.analysis.uncertainty import normalised_entropy, quantise
from socseg.cli import main
from socseg.data.chunked import ChunkedLabels
from socseg.data.stacks import LabelStackWriter, load_labels
from socseg.data.synth import synth_volume
from socseg.data.volumes import load_volume, save_volume
from socseg.inference.segment import SegmentOutputs, segment_stream

PHASE_MAP = {0: "pore", 128: "ysz", 255: "ni"}
GREY = {"pore": 2000.0, "ysz": 30000.0, "ni": 50000.0}
SHAPE = (10, 36, 40)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def threshold_probabilities(grey: np.ndarray) -> np.ndarray:
    """A stand-in model: class probabilities from the distance of each grey value to the phases' levels."""
    levels = np.array([GREY[PHASE_MAP[v]] for v in sorted(PHASE_MAP)], dtype=np.float32)
    distance = (grey.astype(np.float32)[..., np.newaxis] - levels) / 12000.0
    weights = np.exp(-distance**2)
    return weights / weights.sum(axis=-1, keepdims=True)


def to_label_values(probabilities: np.ndarray) -> np.ndarray:
    return np.array(sorted(PHASE_MAP), dtype=np.uint8)[probabilities.argmax(axis=-1)]


def write_phantom(root: Path) -> dict[str, Path]:
    """A labelled volume directory (the truth) and its 'segmentation' as socseg segment writes it:
    a .tif label stack with probability and uncertainty .tif files, and a .zarr store with both inside."""
    volume = synth_volume("phantom", shape=SHAPE, seed=3, fractions={"pore": 0.3, "ysz": 0.35, "ni": 0.35},
                          grain_size=4.0, grey_levels=GREY, blur_sigma=1.0, noise_sigma=4000.0, phase_map=PHASE_MAP)
    volume.meta.voxel_size_nm = 50.0
    truth_dir = save_volume(volume, root / "phantom")
    record = {"phase_map": {str(k): v for k, v in PHASE_MAP.items()}, "task": "phases",
              "model_uri": "models:/socseg-phases@champion", "source": str(truth_dir)}
    outputs = SegmentOutputs.check(truth_dir, root / "labels.tif", root / "probabilities.tif", root / "uncertainty.tif")

    def predict(stack: np.ndarray, before: int, after: int):
        probabilities = threshold_probabilities(stack)
        return to_label_values(probabilities), probabilities

    segment_stream(predict, truth_dir, outputs, context=0, slice_batch=4, metadata=record,
                   class_names=["pore", "ysz", "ni"], progress=False)
    store = ChunkedLabels.create_or_resume(root / "labels.zarr", SHAPE, 4, {"model_uri": "test"}, record,
                                           voxel_size_nm=50.0, n_classes=3)
    probabilities = threshold_probabilities(volume.image)
    for index in range(store.n_chunks):
        start, stop = store.chunk(index)
        part = probabilities[start:stop]
        store.write(index, to_label_values(part), quantise(part), quantise(normalised_entropy(part)))
    return {"truth": truth_dir, "labels": root / "labels.tif", "probabilities": root / "probabilities.tif",
            "uncertainty": root / "uncertainty.tif", "store": root / "labels.zarr"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict[str, Path]:
    return write_phantom(tmp_path_factory.mktemp("report"))


def run_report(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["report", *map(str, args)])
    return result.exit_code, result.output


class Page(html.parser.HTMLParser):
    """The parts of a report page the tests look at; fails on mismatched tags (well-formedness)."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, text: str):
        super().__init__()
        self.stack: list[str] = []
        self.images: dict[str, str] = {}  # figure id -> img src
        self.figure: str | None = None
        self.headers: dict[str, list[str]] = {}  # table id -> column names
        self.rows: dict[str, list[tuple[str | None, list[str]]]] = {}  # table id -> (data-metric, cell texts)
        self.table: str | None = None
        self.phases: list[str] = []  # data-phase of the per-phase table's row groups
        self.urls: list[str] = []
        self.cell: list[str] | None = None
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed tags {self.stack}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "figure":
            self.figure = attrs.get("id")
        elif tag == "img" and self.figure:
            self.images[self.figure] = attrs["src"]
        elif tag == "table":
            self.table = attrs["id"]
            self.rows[self.table] = []
        elif tag == "tbody" and self.table == "phase-metrics":
            self.phases.append(attrs["data-phase"])
        elif tag == "tr" and self.table is not None:
            self.rows[self.table].append((attrs.get("data-metric"), []))
        elif tag in ("td", "th") and self.table is not None:
            self.cell = []

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag in ("td", "th") and self.cell is not None and self.table is not None:
            self.rows[self.table][-1][1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "thead" and self.table is not None:
            self.headers[self.table] = self.rows[self.table].pop()[1]
        elif tag == "table":
            self.table = None
        elif tag == "figure":
            self.figure = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def row(self, table: str, metric: str) -> dict[str, str]:
        """The cells of ``metric``'s row by column name (aligned from the end: a row group's first
        row has one cell more, its phase)."""
        header = self.headers[table]
        for key, cells in self.rows[table]:
            if key == metric:
                return dict(zip(header[len(header) - len(cells):], cells))
        raise AssertionError(f"no row {metric!r} in {table}")


def assert_embedded_png(src: str) -> None:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    assert base64.b64decode(src[len(prefix):])[:8] == PNG_MAGIC


def assert_offline(text: str, page: Page) -> None:
    assert not re.search(r"https?://", text), re.findall(r".{40}https?://.{40}", text)
    assert all(url.startswith("data:") for url in page.urls), page.urls
    assert "<script" not in text and "<link" not in text


def read_page(out: Path) -> tuple[str, Page]:
    """The page written to ``out``: well-formed, self-contained, with the three orthogonal figures."""
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    assert_offline(text, page)
    for axis in "zyx":
        assert_embedded_png(page.images[f"slice-{axis}"])
    return text, page


def identity_of(page: Page) -> dict[str, str]:
    return dict(cells for _, cells in page.rows["volume-identity"])


def test_a_tif_segmentation_with_probabilities_and_truth(phantom, tmp_path):
    out = tmp_path / "report.html"
    code, output = run_report(phantom["labels"], out, "--truth", phantom["truth"], "--probabilities",
                              phantom["probabilities"], "--uncertainty", phantom["uncertainty"], "--samples", 6)
    assert code == 0, output
    _, page = read_page(out)
    assert page.phases == ["pore", "ysz", "ni"]
    assert page.headers["phase-metrics"][-6:] == ["value", "interval low", "interval high", "truth", "rel. error",
                                                  "truth in interval"]
    identity = identity_of(page)
    assert identity["model"] == "models:/socseg-phases@champion" and identity["task"] == "phases"
    assert identity["voxel size"].startswith("50 nm")  # from the volume.json of the volume it segmented
    assert identity["grey image"].startswith(str(phantom["truth"]))  # the source recorded in the labels
    assert identity["uncertainty"] == str(phantom["uncertainty"].resolve())
    assert "size-distributions" in page.images and "tortuosity-factors" not in page.images  # no tortuosity measured

    # the values, truths and errors are those of the two volumes' metrics, in um
    predicted = measure(load_labels(phantom["labels"], None, PHASE_MAP).labels, PHASE_MAP, voxel_size=0.05, unit="um")
    true = measure(load_labels(phantom["truth"], None, PHASE_MAP).labels, PHASE_MAP, voxel_size=0.05, unit="um")
    for phase in ("pore", "ysz", "ni"):
        row = page.row("phase-metrics", f"vf.{phase}")
        assert float(row["value"]) == pytest.approx(predicted.volume_fraction[phase], rel=1e-3)
        assert float(row["truth"]) == pytest.approx(true.volume_fraction[phase], rel=1e-3)
        expected = 100 * (predicted.volume_fraction[phase] / true.volume_fraction[phase] - 1)
        assert float(row["rel. error"].removesuffix(" %")) == pytest.approx(expected, abs=0.01)
        low, high = float(row["interval low"]), float(row["interval high"])
        assert low <= float(row["value"]) <= high and low < high  # uncertain probabilities: a real interval
        assert row["truth in interval"] == ("yes" if low <= float(row["truth"]) <= high else "no")
    row = page.row("volume-metrics", "tpb.density")
    assert row["unit"] == "um^-2" and float(row["value"]) == pytest.approx(predicted.tpb.density, rel=1e-3)
    assert float(page.row("phase-metrics", "size.ni.d50")["value"]) == pytest.approx(predicted.sizes["ni"].d50, rel=1e-3)


def test_a_zarr_store_brings_its_probabilities_and_uncertainty(phantom, tmp_path):
    out = tmp_path / "store.html"
    code, output = run_report(phantom["store"], out, "--samples", 6)
    assert code == 0, output
    _, page = read_page(out)
    identity = identity_of(page)
    assert identity["kind"] == "Zarr store of socseg segment"
    assert identity["probabilities"] == identity["uncertainty"] == "in the store"
    assert identity["voxel size"] == "50 nm (from the store's OME scale)"
    assert {"interval low", "interval high"} <= set(page.headers["phase-metrics"])
    assert "truth" not in page.headers["phase-metrics"] and "rel. error" not in page.headers["phase-metrics"]
    # the uncertainty drawn is the store's, and from probabilities alone it is their normalised entropy
    labels = open_labels(str(phantom["store"]), None, PHASE_MAP)
    _, planes, _ = open_probabilities(labels, None)
    drawn, _ = uncertainty_source(labels, None, planes)
    stored = np.asarray(labels.store.uncertainty[SHAPE[0] // 2]) / 255.0
    np.testing.assert_allclose(drawn.z, stored, atol=1e-6)
    from_probabilities, origin = uncertainty_source(LabelInput(**{**vars(labels), "store": None}), None, planes)
    assert origin == "entropy of the probabilities"
    np.testing.assert_allclose(from_probabilities.z, stored, atol=0.02)  # entropy of uint8 P x 255 vs of P


def test_a_volume_directory_alone_gives_values_only(phantom, tmp_path):
    out = tmp_path / "volume.html"
    code, output = run_report(phantom["truth"], out, "--size-phases", "none")
    assert code == 0, output
    _, page = read_page(out)
    assert page.phases == ["pore", "ysz", "ni"]
    assert page.headers["phase-metrics"] == ["phase", "metric", "unit", "value"]  # no intervals, no truth
    assert identity_of(page)["grey image"].endswith("(the volume directory)")
    assert identity_of(page)["model"] == "not recorded"
    assert "size-distributions" not in page.images  # no phase sized
    assert not list(tmp_path.glob(".*partial*"))  # written through a partial file, renamed


def test_the_evaluate_stage_page_compares_the_test_slab_with_its_labels(phantom):
    volume = load_volume(phantom["truth"])
    truth = volume.class_index()
    predicted = np.argmax(threshold_probabilities(volume.image), axis=-1).astype(np.uint8)
    names = volume.class_names
    results = measure(predicted, dict(enumerate(names))), measure(truth, dict(enumerate(names)))
    text = evaluation_report(volume.image, predicted, truth, names, *results, model_uri="runs:/abc/segmenter",
                             slab="phantom, slices 0:10")
    page = Page(text)
    assert_offline(text, page)
    assert {"slice-z", "slice-y", "slice-x"} <= set(page.images)
    assert page.phases == names and page.headers["phase-metrics"][-3:] == ["value", "truth", "rel. error"]
    assert identity_of(page)["model"] == "runs:/abc/segmenter"
    row = page.row("phase-metrics", "vf.ni")
    assert row["unit"] == "" and float(row["truth"]) == pytest.approx(results[1].volume_fraction["ni"], rel=1e-3)


def test_orthogonal_planes_streamed_equal_the_array_s():
    volume = np.arange(7 * 5 * 6).reshape(7, 5, 6)
    streamed = OrthogonalPlanes.streamed(lambda a, b: volume[a:b], volume.shape, batch=2)
    whole = OrthogonalPlanes.of_array(volume)
    assert streamed.centre == whole.centre == (3, 2, 3)
    for axis in "zyx":
        np.testing.assert_array_equal(streamed.plane(axis), whole.plane(axis))
    np.testing.assert_array_equal(whole.y, volume[:, 2, :])


@pytest.mark.parametrize("case, message", [
    ("exists", "already exists (use --overwrite"),
    ("not_html", "name it .html"),
    ("inside_input", "lies inside, the input"),
    ("probabilities_as_volume", "holds class probabilities, not labels"),
    ("uncertainty_as_volume", "holds the uncertainty, not labels"),
    ("labels_as_probabilities", "--probabilities"),
    ("labels_as_uncertainty", "not an uncertainty map"),
    ("store_with_probabilities", "keeps its probabilities inside"),
    ("truth_shape", "truth labels of shape"),
    ("image_shape", "a grey image of shape"),
    ("unfinished_store", "is not finished"),
    ("phase_map_contradiction", "contradicts the phase map recorded"),
    ("unknown_voxel_size", "pass --voxel-size NM for lengths in um, or --unit voxel"),
    ("voxel_size_and_voxel_unit", "contradict each other"),
    ("samples_without_probabilities", "need the class probabilities"),
    ("too_few_samples", "cannot sweep 3 classes"),
])
def test_bad_inputs_are_refused_with_a_clear_error_and_nothing_written(phantom, tmp_path, case, message):
    out = tmp_path / "report.html"
    labels = phantom["labels"]
    args: list = [labels, out]
    if case == "exists":
        out.write_text("mine")
    elif case == "not_html":
        args = [labels, tmp_path / "report.pdf"]
    elif case == "inside_input":
        args = [phantom["truth"], phantom["truth"] / "report.html"]
    elif case == "probabilities_as_volume":
        args = [phantom["probabilities"], out]
    elif case == "uncertainty_as_volume":
        args = [phantom["uncertainty"], out]
    elif case == "labels_as_probabilities":
        args += ["--probabilities", labels]
    elif case == "labels_as_uncertainty":
        args += ["--uncertainty", labels]
    elif case == "store_with_probabilities":
        args = [phantom["store"], out, "--probabilities", phantom["probabilities"]]
    elif case in ("truth_shape", "image_shape"):
        other = tmp_path / "small.tif"
        tifffile.imwrite(other, np.zeros((6, 36, 40), np.uint8), photometric="minisblack")
        args += ["--truth" if case == "truth_shape" else "--image", other]
    elif case == "unfinished_store":
        store = ChunkedLabels.create_or_resume(tmp_path / "half.zarr", SHAPE, 4, {"model_uri": "t"},
                                               {"phase_map": {"0": "pore", "128": "ysz", "255": "ni"}})
        store.write(0, np.zeros((4, *SHAPE[1:]), np.uint8))
        args = [tmp_path / "half.zarr", out]
    elif case == "phase_map_contradiction":
        args += ["--phase-map", "0=rest,255=ni"]
    elif case == "unknown_voxel_size":
        args[0] = write_bare_labels(tmp_path, labels)
    elif case == "voxel_size_and_voxel_unit":
        args += ["--voxel-size", 50, "--unit", "voxel"]
    elif case == "samples_without_probabilities":
        args += ["--samples", 6]
    elif case == "too_few_samples":
        args += ["--probabilities", phantom["probabilities"], "--samples", 3]
    code, output = run_report(*args)
    assert code == 2, output
    assert output.startswith("error: ") and message in output, output
    assert len(output.strip().splitlines()) == 1  # one line, no traceback
    assert not (tmp_path / "report.pdf").exists() and not (phantom["truth"] / "report.html").exists()
    assert out.read_text() == "mine" if case == "exists" else not out.exists()


def write_bare_labels(folder: Path, like: Path) -> Path:
    """``like``'s labels as socseg segment writes them from an input that is gone: no voxel size anywhere."""
    labels = load_labels(like, None, PHASE_MAP).labels
    path = folder / "bare.tif"
    with LabelStackWriter(path, labels.shape, {"phase_map": {str(k): v for k, v in PHASE_MAP.items()},
                                               "source": str(folder / "gone")}) as writer:
        writer.write(labels)
    return path


def test_voxel_units_when_asked_for(phantom, tmp_path):
    out = tmp_path / "voxels.html"
    code, output = run_report(write_bare_labels(tmp_path, phantom["labels"]), out, "--unit", "voxel", "--size-phases", "none")
    assert code == 0, output
    _, page = read_page(out)
    identity = identity_of(page)
    assert identity["voxel size"] == "lengths in voxels (--unit voxel)"
    assert identity["grey image"].startswith("none: the recorded source") and "pass --image" in identity["grey image"]
    assert page.row("volume-metrics", "tpb.density")["unit"] == "voxel^-2"


def test_overwrite_replaces_an_existing_page(phantom, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("old")
    code, output = run_report(phantom["truth"], out, "--size-phases", "none", "--overwrite")
    assert code == 0, output
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_tortuosity_appears_when_measured_with_unbounded_intervals_as_such(phantom):
    """The tortuosity section and rows come from the ``tau.*``/``deff.*`` metrics alone: absent
    without them; with them a figure, and a phase that may not percolate reads as such."""
    volume = load_volume(phantom["truth"])
    classes = volume.class_index()
    names = volume.class_names
    result = measure(classes, dict(enumerate(names)), size_phases=[])
    planes = SlicePlanes(OrthogonalPlanes.of_array(classes), names)
    assert "tortuosity" not in render_html("t", [], planes, ReportMetrics(result))
    metrics = ReportMetrics(result, intervals={"tau.ni.z": MetricInterval(1.8, 1.5, math.inf),
                                               "vf.ni": MetricInterval(0.35, 0.3, 0.4)})
    metrics.flat.update({"tau.ni.z": 1.8, "deff.ni.z": 0.19, "deff.ysz.z": 0.0})  # ysz: no tau, does not percolate
    page = Page(render_html("t", [], planes, metrics))
    assert_embedded_png(page.images["tortuosity-factors"])
    assert page.row("phase-metrics", "tau.ni.z")["interval high"] == "unbounded"
    assert page.row("phase-metrics", "tau.ysz.z")["value"] == "not percolating"
    assert page.row("phase-metrics", "deff.ysz.z")["value"] == "0"
