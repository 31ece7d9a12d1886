"""The documentation is rendered from the result files: benchmarks/render.py, its --check and lint,
the generated configuration page, and the MkDocs site (issue 23)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import render
finally:
    sys.path.remove(str(REPO / "benchmarks"))


def results_tree(tmp_path: Path, files: dict[str, str]) -> render.Results:
    """A repository root under tmp_path with the given files (paths relative to the root)."""
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return render.Results(tmp_path)


def copy_repo_docs(tmp_path: Path, docs: list[str]) -> Path:
    """The result files, params.yaml, the generated files and ``docs`` copied into a temporary root."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "benchmarks" / "results", root / "benchmarks" / "results")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for rel in [*docs, *render.generated_names()]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, root / rel)
    return root


SAMPLE_JSON = {"command": "python benchmarks/x_bench.py", "date": "2026-12-01 10:00", "git_commit": "abc1234",
               "git_dirty": True, "hardware": {"model": "Some CPU", "cores": 4, "flags": {"avx2": True, "avx512f": False}},
               "settings": {"note": "quiet"}, "figures": {"speed": 12.345},
               "rows": [{"v": 1.0}, {"v": 2.5, "name": "b"}, {"v": 0.0}]}
SAMPLE_CSV = "method,iou_ni,train_s\nforest,0.977881,48.2\nU-Net,0.980287,476.8\n"


# --------------------------------------------------------------------------- the marker parser


def test_fig_markers_read_json_paths_csv_cells_ratios_and_record_facts(tmp_path):
    results = results_tree(tmp_path, {"benchmarks/results/x/x.json": json.dumps(SAMPLE_JSON),
                                      "benchmarks/results/a/accuracy.csv": SAMPLE_CSV,
                                      "benchmarks/results/a/accuracy.md": "- **date / commit**: 2026-11-26 17:55 / 912576a\n"
                                      "- **hardware**: AMD EPYC (avx512_bf16); CPU (x86_64, 2 cores)\n"})
    text = ("a <!-- fig:x/x.json#rows.1.v|.2f -->?<!-- /fig --> b <!-- fig:x/x.json#figures.speed|.1f -->?<!-- /fig -->\n"
            "c <!-- fig:a/accuracy.csv#1.iou_ni|.4f -->?<!-- /fig --> d <!-- fig:a/accuracy.csv#0.train_s|d -->?<!-- /fig -->\n"
            "e <!-- fig:a/accuracy.csv#1.iou_ni|.1% -->?<!-- /fig --> f <!-- fig:x/x.json#rows.1.name| -->?<!-- /fig -->\n"
            "g <!-- fig:x/x.json#rows.1.v/x/x.json#rows.0.v|.1f -->?<!-- /fig -->x\n"
            "h <!-- fig:x/x.json#@cpu_class| -->?<!-- /fig --> i <!-- fig:x/x.json#@dirty| -->?<!-- /fig -->"
            " j <!-- fig:a/accuracy.csv#@cpu_class| -->?<!-- /fig --> k <!-- fig:a/accuracy.csv#@commit| -->?<!-- /fig -->\n")
    new, stale = render.render_figures(text, results, "doc.md")
    values = [m["value"] for m in render.FIG_RE.finditer(new)]
    assert values == ["2.50", "12.3", "0.9803", "48", "98.0%", "b", "2.5", "AVX2", "yes", "AVX-512 + bf16", "912576a"]
    assert len(stale) == len(values) and stale[0].line == 1 and stale[2].line == 2
    again, none = render.render_figures(new, results, "doc.md")
    assert again == new and none == []  # rendering is idempotent: a fresh document is not stale


def test_a_missing_key_names_the_document_the_file_and_the_key(tmp_path):
    results = results_tree(tmp_path, {"benchmarks/results/x/x.json": json.dumps(SAMPLE_JSON)})
    cases = {
        "x/x.json#rows.1.slices_per_s": ["doc.md:3", "benchmarks/results/x/x.json", "'rows.1.slices_per_s'",
                                         "'slices_per_s'", "there: v, name"],
        "x/x.json#rows.7.v": ["doc.md:3", "x/x.json", "index 7 out of range (3 items)"],
        "x/x.json#rows.first.v": ["is a list", "'first' is not an index"],
        "y/missing.json#rows.0.v": ["doc.md:3", "result file not found", "y/missing.json"],
        "derived#no_such_sum": ["doc.md:3", "no derived figure 'no_such_sum'"],
        "x/x.json": ["doc.md:3", "is not REL#KEY"],
    }
    for src, expected in cases.items():
        with pytest.raises(render.RenderError) as error:
            render.render_figures(f"\n\nsee <!-- fig:{src}|.2f -->?<!-- /fig -->\n", results, "doc.md")
        for part in expected:
            assert part in str(error.value), (src, str(error.value))
    with pytest.raises(render.RenderError, match="the denominator is 0"):
        render.render_figures("<!-- fig:x/x.json#rows.0.v/x/x.json#rows.2.v|.1f -->?<!-- /fig -->", results, "d")


def test_blocks_render_between_their_markers_and_an_unclosed_block_is_an_error(tmp_path):
    results = results_tree(tmp_path, {"benchmarks/results/x/x.json": json.dumps(SAMPLE_JSON)})
    render.RENDERERS["test_block"] = lambda r: f"| a |\n|---|\n| {r.data('x/x.json')['figures']['speed']:.1f} |"
    try:
        text = "# t\n\n<!-- render:test_block -->\nold\n<!-- /render:test_block -->\n"
        new, stale = render.render_blocks(text, results, "doc.md")
        assert new == "# t\n\n<!-- render:test_block -->\n\n| a |\n|---|\n| 12.3 |\n\n<!-- /render:test_block -->\n"
        assert [(s.doc, s.line, s.what) for s in stale] == [("doc.md", 3, "block test_block")]
        with pytest.raises(render.RenderError, match=r"doc.md:1: block 'test_block' has no '<!-- /render:test_block -->'"):
            render.render_blocks("<!-- render:test_block -->\nno end\n", results, "doc.md")
    finally:
        del render.RENDERERS["test_block"]
    # a folder that is not there yet renders as "not measured yet", so its arrival makes --check fail
    assert "Not measured yet" in render.render_block(results, "inference_avx2", "doc.md")


def test_markers_inside_code_are_examples_and_are_left_alone(tmp_path):
    results = results_tree(tmp_path, {"benchmarks/results/x/x.json": json.dumps(SAMPLE_JSON)})
    text = ("`<!-- fig:REL#KEY|FMT -->VALUE<!-- /fig -->`\n```\n<!-- fig:nope#x|.1f -->1<!-- /fig -->\n```\n"
            "`<!-- render:NAME -->` ... `<!-- /render:NAME -->`\n")
    assert render.render_text(text, results, "doc.md") == (text, [])


def test_derived_training_time_sums_the_u_net_rows_with_and_without_tta(tmp_path):
    csv_text = ("task,method,train_s\nni,random forest,30\nni,\"U-Net, VGG16 encoder\",90\nni,U-Net (from scratch),60\n"
                "ni,U-Net (from scratch) + TTA,60\n")
    results = results_tree(tmp_path, {"benchmarks/results/accuracy.csv": csv_text})
    assert render.DERIVED["accuracy_unet_train_min"](results) == pytest.approx(2.5)
    assert render.DERIVED["accuracy_unet_train_min_with_tta"](results) == pytest.approx(3.5)
    assert render.DERIVED["accuracy_all_train_min"](results) == pytest.approx(3.0)


def test_params_yaml_comments_inline_continued_nested_and_quoted():
    text = ('# file header\nsearch:   # the search\n  study_name: "a-#-b"   # name with a hash\n'
            '  pruner: {n: 2}   # median pruner\n  grace: 180   # seconds ...\n               #   and more\n'
            'train:\n  seed: 42\n  url: sqlite:///x#y\n')
    comments = render.yaml_comments(text)
    assert comments == {"search": "the search", "search.study_name": "name with a hash",
                        "search.pruner": "median pruner", "search.grace": "seconds ... and more"}


# --------------------------------------------------------------------------- the repository's documents


def test_render_check_passes_on_the_repository(capsys):
    """Every figure, block and generated page in README.md, benchmarks/README.md, serving/README.md
    and docs/ matches the result files (run `python benchmarks/render.py` after changing either)."""
    assert render.main(["--check"]) == 0, capsys.readouterr().out


def test_check_detects_a_stale_figure_block_page_and_image(tmp_path):
    root = copy_repo_docs(tmp_path, ["docs/benchmarks/speed.md"])
    doc = root / "docs/benchmarks/speed.md"
    text = doc.read_text()
    marker = "<!-- fig:inference_default/inference.json#rows.2.slices_per_s|.2f -->"
    right = text.split(marker, 1)[1].split("<!-- /fig -->", 1)[0]
    doc.write_text(text.replace(marker + right, marker + "77.77", 1).replace("| 1.31 |", "| 1.30 |", 1))
    (root / "docs/benchmarks/img/finetune.png").write_bytes(b"not the plot")
    page = root / "docs/reference/configuration.md"
    page.write_text(page.read_text().replace("`whole_slice`", "`sliding`", 1))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/render.py"), "--check", "--root", str(root)],
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(n for n, t in enumerate(doc.read_text().splitlines(), 1) if marker in t)
    assert f"docs/benchmarks/speed.md:{line}: fig inference_default/inference.json#rows.2.slices_per_s|.2f: " \
           f"document has '77.77', result files give '{right}'" in done.stdout
    assert "block inference_default" in done.stdout
    assert "docs/benchmarks/img/finetune.png: stale" in done.stdout
    assert "docs/reference/configuration.md: stale" in done.stdout
    assert doc.read_text().count("77.77") == 1  # --check writes nothing
    assert render.main(["--root", str(root)]) == 0 and render.main(["--check", "--root", str(root)]) == 0


def test_a_changed_result_file_makes_the_documents_stale(tmp_path):
    """The other direction: a benchmark rewrites its file, the docs quoting it fail --check."""
    root = copy_repo_docs(tmp_path, ["docs/benchmarks/speed.md"])
    assert render.render_all(root)[1] == []
    path = root / "benchmarks/results/inference_default/inference.json"
    record = json.loads(path.read_text())
    record["rows"][2]["slices_per_s"] = 4.5
    path.write_text(json.dumps(record))
    stale = [str(s) for s in render.render_all(root)[1]]
    assert any("rows.2.slices_per_s|.2f: document has '" in s and "result files give '4.50'" in s for s in stale)
    assert any("block inference_default" in s for s in stale)


def test_result_headers_state_the_known_discrepancies():
    """Facts computed from the files, not typed: the serving-load run's load and model, the H100
    header/note commits, an unknown commit, uncommitted trees, CPU classes."""
    results = render.Results(REPO)
    serving_load = render.render_block(results, "serving_load", "t")
    assert "machine otherwise idle\", but the load average before the run was 1.87" in serving_load
    assert "\"2.5D U-Net, fixed\"" in serving_load and "not today's default (params.yaml normalise.mode: per_volume)" in serving_load
    gpu = render.render_block(results, "gpu_h100", "t")
    assert "record commit 1d86ca9" in gpu and "commit a75ccc2" in gpu and "commit adf3607" in gpu
    assert "**GPU / Keras backend**: 1x NVIDIA H100 80GB HBM3 / jax" in gpu
    assert "commit unknown" in render.render_block(results, "normalisation_models", "t")
    quickstart = render.render_block(results, "quickstart", "t")
    assert json.loads((REPO / "benchmarks/results/quickstart/quickstart.json").read_text())["git_dirty"] is False
    assert "clean tree" in quickstart and "**CPU class**: AVX-512 + AMX" in quickstart
    # the fresh-clone caveat is for a checkout with edits only; both quick-start runs had none
    assert "measures a fresh clone of commit" not in quickstart
    assert json.loads((REPO / "benchmarks/results/quickstart_avx2/quickstart.json").read_text())["git_dirty"] is False
    assert "measures a fresh clone of commit" not in render.render_block(results, "quickstart_avx2", "t")
    assert "**CPU class**: AVX-512 + bf16" in render.render_block(results, "accuracy", "t")
    assert "**what else ran**: not recorded" in render.render_block(results, "2p5d", "t")


# --------------------------------------------------------------------------- hand-typed figures


def test_no_figure_is_typed_by_hand_in_the_documents():
    hits = render.lint_all(REPO)
    assert hits == [], "\n".join(hits)


def test_the_lint_catches_planted_figures_and_spares_markers_code_and_settings():
    planted = ("The forest segments 1.31 slices/s at an IoU of 0.9779, so the U-Net is 6.9x faster;\n"
               "training took 69.3 min and 25 s, and labels agree on 99.97 % of pixels.\n")
    kinds = [hit.split(": ", 2)[1].split(" '")[0] for hit in render.lint_text(planted, "README.md")]
    assert kinds == ["IoU-like decimal", "rate", "speed-up", "timing", "timing", "percentage"]
    assert render.lint_text(planted, "README.md")[0].startswith("README.md:1: IoU-like decimal '0.9779'")
    clean = ("The forest: <!-- fig:inference/inference.json#rows.0.slices_per_s|.2f -->1.31<!-- /fig --> slices/s.\n"
             "`--set train.max_minutes=8` gives an 8 min budget; 3 slices with 10 % of their pixels labelled.\n"
             "```\nIoU 0.9779 in 25 s\n```\n<!-- render:x -->\n| 0.9779 | 25 s |\n<!-- /render:x -->\n")
    assert render.lint_text(clean, "README.md") == []


def test_a_readme_line_must_not_start_with_a_figure_marker():
    """GitHub (CommonMark) starts an HTML block at a line beginning with ``<!--`` and splits the
    sentence; the site strips the markers (MkDocs hook), so docs/ pages may wrap freely."""
    text = "The forest runs at\n<!-- fig:x/x.json#rows.0.v|.2f -->1.31<!-- /fig --> slices/s.\n"
    assert render.lint_text(text, "README.md") == [
        "README.md:2: figure marker at the start of a line (GitHub's Markdown ends the paragraph there): "
        "move the word before it onto this line"]
    assert render.lint_text(text, "docs/index.md") == []
    assert render.lint_text("```\n<!-- fig:x/x.json#rows.0.v|.2f -->1<!-- /fig -->\n```\n", "README.md") == []


def test_a_marker_broken_by_a_rewrap_is_an_error_not_silently_skipped():
    broken = ("Ni IoU <!-- fig:x/x.json#rows.0.v|.4f -->0.9872<!-- /fig\n--> on the slab.\n"
              "<!-- render:serving -->\n| a |\n")
    hits = render.lint_text(broken, "docs/index.md")
    assert hits[0].startswith("docs/index.md:1: malformed figure marker")
    assert hits[1] == "docs/index.md:3: render block 'serving' has no closing <!-- /render:serving -->"
    fixed = "Ni IoU <!-- fig:x/x.json#rows.0.v|.4f -->0.9872<!-- /fig --> on the slab.\n"
    assert render.lint_text(fixed, "docs/index.md") == []


def test_the_site_gets_the_values_without_the_markers():
    text = (render.GENERATED_NOTE + "\n# t\nruns at\n<!-- fig:x/x.json#rows.0.v|.2f -->1.31<!-- /fig --> slices/s\n\n"
            "<!-- render:serving -->\n\n| a |\n|---|\n| 1 |\n\n<!-- /render:serving -->\n"
            "`<!-- fig:REL#KEY|FMT -->VALUE<!-- /fig -->`\n")
    assert render.on_page_markdown(text, page=None, config=None, files=None) == (
        "# t\nruns at\n1.31 slices/s\n\n\n| a |\n|---|\n| 1 |\n\n`<!-- fig:REL#KEY|FMT -->VALUE<!-- /fig -->`\n")


# --------------------------------------------------------------------------- configuration page and site


def schema_keys_from_params() -> list[tuple[str, str]]:
    """(section, dotted key) for every leaf field of socseg.params.Params, read here independently."""
    from socseg.params import Params

    def leaves(cls: type, prefix: str = "") -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            kind = typing.get_type_hints(cls)[f.name]
            out += leaves(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else [f"{prefix}{f.name}"]
        return out

    return [(s.name, key) for s in dataclasses.fields(Params) for key in leaves(typing.get_type_hints(Params)[s.name])]


def test_configuration_page_covers_every_schema_key_with_its_params_yaml_value():
    page = (REPO / "docs/reference/configuration.md").read_text()
    sections = {chunk.split("\n", 1)[0]: chunk for chunk in page.split("\n## ")[1:]}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = schema_keys_from_params()
    assert len(keys) > 60 and set(sections) == {section for section, _ in keys}
    for section, key in keys:
        row = next((line for line in sections[section].splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{section}.{key} missing from docs/reference/configuration.md"
        value = params[section]
        for part in key.split("."):
            value = value[part]
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            assert f"| `{value}` |" in row, (section, key, row)
    assert "| `mode` | `str` | `fixed`, `per_volume` |" in sections["normalise"]
    assert "MLFLOW_TRACKING_URI overrides" in sections["mlflow"]  # params.yaml's comment


@pytest.mark.slow(seconds=8)
def test_mkdocs_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    speed = (site / "benchmarks/speed/index.html").read_text()
    assert speed.count("<table>") >= 3 and "AVX-512 + AMX" in speed
    assert "<!-- fig:" not in speed and "render:" not in speed  # the hook gave the site values, not markers
    assert (site / "benchmarks/img/finetune.png").read_bytes() == (REPO / "benchmarks/results/finetune/finetune.png").read_bytes()
    assert "<table>" in (site / "reference/configuration/index.html").read_text()


def test_cli_page_shows_every_command_s_help():
    import click

    from socseg.cli import main

    def paths(command: click.Command, prefix: str) -> list[str]:
        subs = command.commands if isinstance(command, click.Group) else {}
        return [prefix] + [p for name, sub in sorted(subs.items()) for p in paths(sub, f"{prefix} {name}")]

    page = (REPO / "docs/reference/cli.md").read_text()
    headings = [line[3:] for line in page.splitlines() if line.startswith("## ")]
    assert headings == paths(main, "socseg") and len(headings) > 10
    assert "Usage: socseg segment [OPTIONS]" in page


def test_result_files_of_the_current_format_show_cpu_class_load_and_tree(tmp_path):
    """Files written since _common recorded cpu_class and load (JSON) or the header lines (accuracy.py)."""
    record = {**SAMPLE_JSON, "cpu_class": "AVX2 (oneDNN limited by ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 + bf16 CPU)",
              "git_dirty": False, "load_start": {"loadavg_1min": 0.12, "other_busy_processes": []},
              "load_end": {"loadavg_1min": 1.9, "other_busy_processes": ["pytest -n 2 (95.0 % CPU)"]},
              "rows": [{"model": "random forest", "window": "-", "iou_ni": 0.97788, "slices_per_s": 1.3, "x_forest": 1.0}]}
    header = ("# Accuracy benchmark\n\n- **command**: `python benchmarks/accuracy.py --tasks ni`\n"
              "- **date / commit**: 2026-12-03 18:00 / b680caf (uncommitted changes in tracked files)\n"
              "- **hardware**: AMD EPYC (avx512_bf16); CPU (x86_64, 2 cores), Keras 3.15.1 / tensorflow 2.21.0\n"
              "- **cpu class**: AVX-512 + bf16\n- **what else ran**: start: load average 0.3; no other process "
              "above 10 % CPU; end: load average 0.4; no other process above 10 % CPU\n\n| task |\n|---|\n")
    results = results_tree(tmp_path, {"benchmarks/results/inference_avx2/inference.json": json.dumps(record),
                                      "benchmarks/results/base_2p5d_pv/accuracy.md": header,
                                      "benchmarks/results/base_2p5d_pv/accuracy.csv": SAMPLE_CSV})
    speed = render.render_block(results, "inference_avx2", "t")
    assert "**CPU class**: AVX2 (oneDNN limited by ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 + bf16 CPU)" in speed
    assert ("**what else ran**: start: load average 0.12; no other process above 10 % CPU; end: load average 1.9; "
            "also running: pytest -n 2 (95.0 % CPU)") in speed
    assert "commit abc1234; clean tree" in speed and "| random forest | - | 0.9779 | – | 1.30 | 1.00 | – |" in speed
    accuracy = render.render_block(results, "base_2p5d_pv", "t")
    assert "commit b680caf; uncommitted changes in tracked files" in accuracy and "**CPU class**: AVX-512 + bf16" in accuracy
    assert "**what else ran**: start: load average 0.3" in accuracy and "| U-Net | – | – | – | 0.9803 |" in accuracy


def test_a_folder_run_in_parts_renders_each_part_after_its_own_files(tmp_path):
    """One measurement run as one invocation per fold (sub-folders fold1/, fold2/) is one folder on
    the page: its own files first, then each part's, in name order; deeper folders are not read."""
    header = "# Accuracy benchmark\n\n- **command**: `python benchmarks/accuracy.py --only-folds {f}`\n"
    results = results_tree(tmp_path, {
        "benchmarks/results/long/accuracy.csv": SAMPLE_CSV, "benchmarks/results/long/accuracy.md": header.format(f="all"),
        **{f"benchmarks/results/long/fold{f}/accuracy.{ext}": (header.format(f=f) if ext == "md" else SAMPLE_CSV)
           for f in (2, 1) for ext in ("md", "csv")},
        "benchmarks/results/long/fold1/deeper/accuracy.csv": SAMPLE_CSV,
        "benchmarks/results/long/fold1/deeper/accuracy.md": header.format(f=9)})
    assert render.result_files(results, "long") == ["long/accuracy.csv", "long/fold1/accuracy.csv",
                                                    "long/fold2/accuracy.csv"]
    block = render.render_block(results, "long", "t")
    assert block.index("--only-folds all") < block.index("--only-folds 1") < block.index("--only-folds 2")
    assert "--only-folds 9" not in block
