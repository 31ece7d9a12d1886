"""socseg evaluate: the logged model re-scored on a volume gives training's test numbers, and the CLI agrees."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from socseg.inference.evaluate import evaluate_model, parse_slices
from socseg.model.metrics import confusion_matrix, segmentation_scores


def test_ni_fraction_error_by_hand():
    truth = np.array([[0, 1], [1, 1]])  # Ni fraction 0.75
    pred = np.array([[1, 1], [0, 0]])  # Ni fraction 0.5
    scores = segmentation_scores(confusion_matrix(truth, pred, 2), ["rest", "ni"])
    assert scores["ni_fraction_true"] == pytest.approx(0.75)
    assert scores["ni_fraction_pred"] == pytest.approx(0.5)
    assert scores["ni_fraction_error"] == pytest.approx(0.25)
    assert scores["iou_ni"] == pytest.approx(1 / 4)  # TP 1, FP 1, FN 2
    phases = segmentation_scores(confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), 3), ["pore", "ysz", "ni"])
    assert phases["ni_fraction_error"] == pytest.approx(0.25)
    # No class called "ni": no Ni fraction to report.
    other = segmentation_scores(confusion_matrix(truth, pred, 2), ["a", "b"])
    assert not any(key.startswith("ni_fraction") for key in other) and other["iou_b"] == pytest.approx(1 / 4)


def test_tpb_error_of_an_evaluation_against_its_slabs_labels():
    """The TPB error a training run logs and the register stage compares: 0 for the labels
    themselves, positive for specks that add three-phase contacts; only 3-phase classes have one."""
    from scipy import ndimage as ndi

    from socseg.analysis.microstructure import flatten_metrics, measure
    from socseg.inference.evaluate import Evaluation, has_tpb, tpb_error

    rng = np.random.default_rng(0)
    fields = np.stack([ndi.gaussian_filter(rng.standard_normal((8, 40, 40)), 3.0) for _ in range(3)], -1)
    truth = fields.argmax(-1).astype(np.uint8)
    specks = truth.copy()
    flip = rng.random(truth.shape) < 0.02
    specks[flip] = (truth[flip] + 1) % 3
    slab = type("Slab", (), {"targets": lambda self, task: truth})()
    names = ["pore", "ysz", "ni"]

    def evaluation(predicted):
        return Evaluation(names, np.eye(3), 0.0, 8, predictions=[predicted])

    assert tpb_error(evaluation(truth), [slab], "phases") == 0.0
    found = tpb_error(evaluation(specks), [slab], "phases")
    by_hand = [flatten_metrics(measure(v, dict(enumerate(names))))["tpb.density"] for v in (specks, truth)]
    assert found == pytest.approx(by_hand[0] / by_hand[1] - 1) and found > 0.2
    assert has_tpb(["Pore", "YSZ", "Ni"]) and not has_tpb(["rest", "ni"])


def test_parse_slices():
    assert parse_slices(None, 10) == (0, 10)
    assert parse_slices("2:5", 10) == (2, 5)
    assert parse_slices(":-2", 10) == (0, 8)
    assert parse_slices("7:", 10) == (7, 10)
    for bad in ("5", "a:b", "5:5", "20:30"):
        with pytest.raises(ValueError):
            parse_slices(bad, 10)


@pytest.fixture()
def trained(tiny_params, mlflow_env):
    from socseg.training.train import train

    result = train(tiny_params, run_name="tiny-eval")
    return tiny_params, result


def test_model_scores_on_its_test_slab_match_training_and_the_cli(trained):
    from mlflow.tracking import MlflowClient

    from socseg.cli import main

    params, result = trained
    volume = f"{params['data']['dir']}/tiny"
    start, stop = map(int, MlflowClient().get_run(result.run_id).data.params["split_tiny_test"].split("-"))
    scores = evaluate_model(result.model_uri, volume, z_range=(start, stop))
    for key in ("iou_ni", "iou_rest", "dice_ni", "mean_iou", "accuracy"):
        assert scores[key] == pytest.approx(result.metrics[f"test_{key}"], abs=1e-6), key
    assert scores["task"] == "ni" and scores["n_slices"] == stop - start
    cm = np.asarray(scores["confusion"])
    assert cm.sum() == (stop - start) * 64 * 64
    assert scores["ni_fraction_error"] == pytest.approx(abs(cm[:, 1].sum() - cm[1].sum()) / cm.sum())
    # The one scoring path underneath: the logged segmenter's Predictor on the test slab.
    from socseg.data.prepare import Slab
    from socseg.data.volumes import load_volume
    from socseg.inference.evaluate import score_slabs
    from socseg.inference.predictor import Predictor

    predictor = Predictor.load(result.model_uri)
    loaded = load_volume(volume)
    evaluation = score_slabs(predictor, [Slab(loaded, (start, stop))], keep_predictions=True)
    assert evaluation.confusion.tolist() == scores["confusion"] and evaluation.n_slices == stop - start
    assert evaluation.scores["mean_iou"] == pytest.approx(scores["mean_iou"])
    (kept,) = evaluation.predictions
    assert kept.shape == (stop - start, 64, 64)
    # A 2-D model: no context; a per_volume one (the default) with the whole volume's grey range.
    request = predictor.request(source=loaded.image)  # the whole volume's range, as scoring maps it
    np.testing.assert_array_equal(kept, predictor.classes(loaded.image[start:stop], request=request))
    with pytest.raises(ValueError, match="cannot be scored on task 'phases'"):
        score_slabs(predictor, [Slab(loaded, (start, stop))], task="phases")

    # A fresh process: the model must load without anything training imported.
    out = subprocess.run(
        [sys.executable, "-m", "socseg.cli", "evaluate", result.model_uri, volume, "--json", "--slices", f"{start}:{stop}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cli = json.loads(out.stdout)
    for key, value in scores.items():
        if key != "seconds_per_slice":
            assert cli[key] == (pytest.approx(value) if isinstance(value, float) else value), key

    text = CliRunner().invoke(main, ["evaluate", result.model_uri, volume])
    assert text.exit_code == 0 and "IoU" in text.output and "Ni fraction" in text.output
    assert "TTA" not in text.output  # the model's setting (inference.tta: false)
    # --tta overrides the model's setting; the scores are evaluate_model's with tta=True.
    tta = CliRunner().invoke(main, ["evaluate", result.model_uri, volume, "--json", "--tta", "--slices", f"{start}:{stop}"])
    assert tta.exit_code == 0, tta.output
    with_tta = json.loads(tta.stdout)
    assert with_tta["tta"] is True and scores["tta"] is False
    assert with_tta["confusion"] == evaluate_model(result.model_uri, volume, z_range=(start, stop), tta=True)["confusion"]
    wrong = CliRunner().invoke(main, ["evaluate", result.model_uri, volume, "--task", "phases"])
    assert wrong.exit_code == 2 and "cannot be scored" in wrong.output


def test_benchmark_help_runs(repo_root):
    out = subprocess.run([sys.executable, str(repo_root / "benchmarks/accuracy.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--train-volume" in out.stdout and "--test-volume" in out.stdout and "--leakage" in out.stdout


def _accuracy_module(repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("socseg_accuracy_benchmark", repo_root / "benchmarks/accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _search_json(path, encoder="unet", **best_params):
    """A search.json exactly as ``socseg search`` writes it (same dataclass, same writer)."""
    from socseg.training.search import SearchResult, write_result

    write_result(SearchResult(study_name="real-ni", storage="sqlite:///optuna.db", parent_run_id="p", n_finished=5, n_trained=5,
                              best_trial=3, best_value=0.97, best_params=best_params, best_encoder=encoder,
                              best_run_id="r", best_model_uri="m"), path)
    return path


def test_benchmark_takes_a_searchs_best_settings_and_set_still_wins(repo_root, tiny_params, tmp_path):
    accuracy = _accuracy_module(repo_root)
    found = _search_json(tmp_path / "search.json", **{"train.learning_rate": 0.002, "train.loss": "dice",
                                                     "tiles.augment.intensity_jitter": 0.08, "train.context_slices": 1})
    args = accuracy.parse_args(["--from-search", str(found), "--set", "unet:train.loss=focal"])
    setting = accuracy.Setting("z-slabs", tmp_path, ["tiny"], {"train": 0.6, "val": 0.2, "test": 0.2, "gap": 2}, [])
    p = accuracy.unet_params("unet", "ni", tiny_params, args, setting, "unet")
    assert p["train"]["learning_rate"] == 0.002 and p["train"]["context_slices"] == 1
    assert p["tiles"]["augment"]["intensity_jitter"] == 0.08 and p["tiles"]["augment"]["flips"] is True  # nested key, siblings kept
    assert p["train"]["loss"] == "focal"  # an explicit --set overrides the search
    assert "trial 3" in args.search_sources["unet"] and "intensity_jitter 0.08" in args.search_sources["unet"]
    other = accuracy.unet_params("vgg16", "ni", tiny_params, args, setting, "vgg16")
    assert other["train"]["learning_rate"] == tiny_params["train"]["learning_rate"]  # only the searched method changes


def test_benchmark_refuses_a_set_that_silently_replaces_a_searched_value(repo_root, tiny_params, tmp_path, capsys):
    """`--set unet:KEY` reaches `--variant searched=unet` too: it must not replace the search's KEY unnoticed."""
    accuracy = _accuracy_module(repo_root)
    found = _search_json(tmp_path / "search.json", **{"train.learning_rate": 0.000274, "train.loss": "ce",
                                                     "tiles.augment.intensity_jitter": 0.01})
    search = ["--variant", "searched=unet", "--from-search", f"searched={found}", "--methods", "unet,searched"]
    for given in ("unet:train.learning_rate=0.001",  # via the shared encoder (the search_vs_hand run)
                  "train.learning_rate=0.001",  # no prefix: every method
                  "tiles.augment={flips: true, rot90: true, intensity_jitter: 0.05}"):  # a section holding a searched key
        with pytest.raises(SystemExit) as stop:
            accuracy.parse_args([*search, "--set", given])
        assert stop.value.code == 2
        error = capsys.readouterr().err
        key, value = ("tiles.augment.intensity_jitter", "0.01") if given.startswith("tiles") else ("train.learning_rate", "0.000274")
        assert f"{key}={value}, which --from-search set for 'searched'" in error, error  # which key, set to what
        assert f"add --set searched:{key}=" in error and "--variant hand=unet" in error  # how to do it explicitly

    # Naming the searched method is an explicit override; keys the search did not set stay free for all.
    args = accuracy.parse_args([*search, "--set", "searched:train.learning_rate=0.001", "--set", "train.reduce_lr_patience=5",
                                "--variant", "hand=unet", "--set", "hand:train.learning_rate=0.002"])
    setting = accuracy.Setting("z-slabs", tmp_path, ["tiny"], {"train": 0.6, "val": 0.2, "test": 0.2, "gap": 2}, [])
    searched = accuracy.unet_params("unet", "ni", tiny_params, args, setting, "searched")
    assert searched["train"]["learning_rate"] == 0.001 and searched["train"]["loss"] == "ce"
    assert searched["train"]["reduce_lr_patience"] == 5
    hand = accuracy.unet_params("unet", "ni", tiny_params, args, setting, "hand")
    assert hand["train"]["learning_rate"] == 0.002 and hand["train"]["loss"] == tiny_params["train"]["loss"]
    # With the searched method's value given explicitly, a broader --set may stand beside it (for the
    # other methods), wherever the explicit one stands on the line: the search_vs_hand run, made explicit.
    both = accuracy.parse_args([*search, "--set", "searched:train.learning_rate=0.0003", "--set", "unet:train.learning_rate=0.001"])
    assert accuracy.unet_params("unet", "ni", tiny_params, both, setting, "searched")["train"]["learning_rate"] == 0.0003
    assert accuracy.unet_params("unet", "ni", tiny_params, both, setting, "unet")["train"]["learning_rate"] == 0.001
    # The search's own encoder as method name (no --variant) is explicit too.
    plain = accuracy.parse_args(["--from-search", str(found), "--set", "unet:train.learning_rate=0.001"])
    assert accuracy.unet_params("unet", "ni", tiny_params, plain, setting, "unet")["train"]["learning_rate"] == 0.001


def test_benchmark_result_writer_records_command_commit_hardware_software(repo_root, tmp_path, monkeypatch):
    """benchmarks/_common.py: what serving_bench.py and scaleout_bench.py write beside their figures."""
    import json

    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    import _common

    meta = _common.run_metadata("serving_bench.py", ["--slices", "2", "--note", "two words"])
    assert meta["command"] == "python benchmarks/serving_bench.py --slices 2 --note 'two words'"
    assert meta["git_commit"] != "" and meta["software"]["python"] and "keras" in meta["software"]
    hw = meta["hardware"]
    assert hw["cores"] >= 1 and hw["ram_gib"] > 0 and hw["model"]
    assert set(hw["flags"]) == set(_common.CPU_FLAGS) and all(isinstance(v, bool) for v in hw["flags"].values())
    rows = [{"mode": "local", "rate": 2.0512, "kib": None}, {"mode": "REST", "rate": 1.5, "kib": 605.4}]
    json_path, md_path = _common.write_result(tmp_path / "out", "bench", "A bench", meta, {"slices": 2},
                                              {"peak_rss_mib": {"server": 1029.0}},
                                              [("mode", "mode"), ("rate", "slices/s"), ("kib", "KiB", ",.0f")], rows, ["a note"])
    record = json.loads(json_path.read_text())
    assert record["command"] == meta["command"] and record["hardware"] == json.loads(json.dumps(hw))
    assert record["rows"][0]["rate"] == 2.0512 and record["figures"]["peak_rss_mib"]["server"] == 1029.0
    md = md_path.read_text()
    assert md.startswith("# A bench\n") and meta["command"] in md and meta["git_commit"] in md and "GiB RAM" in md
    assert "| local | 2.05 | - |" in md and "| REST | 1.50 | 605 |" in md and "a note" in md


def test_benchmark_refuses_a_search_for_another_encoder(repo_root, tmp_path):
    found = _search_json(tmp_path / "search.json", encoder="vgg16", **{"train.learning_rate": 0.002})
    out = subprocess.run([sys.executable, str(repo_root / "benchmarks/accuracy.py"), "--from-search", f"resnet50={found}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "vgg16 U-Net, not resnet50" in out.stderr
    missing = subprocess.run([sys.executable, str(repo_root / "benchmarks/accuracy.py"), "--from-search", str(tmp_path / "nope.json")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "nope.json" in missing.stderr


@pytest.mark.slow
def test_benchmark_runs_end_to_end_on_a_tiny_volume(repo_root, tiny_params, mlflow_env, tmp_path):
    """The accuracy script on a phantom: baseline and U-Net rows (one a 2.5D variant) in one table."""
    import csv

    import yaml

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params))
    out = tmp_path / "results"
    command = [
        sys.executable, str(repo_root / "benchmarks/accuracy.py"), "--params", str(params_file),
        "--train-volume", f"{tiny_params['data']['dir']}/tiny", "--split", "0.6,0.2,0.2,2", "--tasks", "ni",
        "--methods", "threshold,unet,2.5D", "--variant", "2.5D=unet", "--set", "2.5D:train.context_slices=1",
        "--leakage", "none", "--epochs", "1", "--out", str(out),
        "--from-search", f"2.5D={_search_json(tmp_path / 'search.json', **{'train.loss': 'dice', 'train.learning_rate': 0.002})}",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(repo_root / "src")})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = list(csv.DictReader((out / "accuracy.csv").open()))
    assert [r["method"] for r in rows] == ["global threshold(s)", "U-Net (from scratch)", "U-Net (from scratch), 2.5D"]
    assert "2.5D: 1 neighbour slices per side" in rows[2]["settings"] and "2.5D" not in rows[1]["settings"]
    assert rows[2]["settings"].startswith("dice, lr 0.002") and "search real-ni trial 3" in rows[2]["settings"]
    assert "search" not in rows[1]["settings"]
    for row in rows:
        assert 0.0 <= float(row["iou_ni"]) <= 1.0 and row["split"] == "z-slabs, gap 2"
    assert "| ni | U-Net (from scratch), 2.5D |" in (out / "accuracy.md").read_text()


def test_quantise_volume_normalises_on_the_training_slab_and_keeps_labels(repo_root, tmp_path):
    """The uint8 copy carried to a GPU node: training-slab percentiles, labels untouched, source kept."""
    import numpy as np

    from socseg.data.split import slab_split
    from socseg.data.volumes import Volume, VolumeMeta, load_volume, save_volume

    rng = np.random.default_rng(0)
    grey = rng.integers(1000, 2000, (30, 16, 16)).astype(np.uint16)
    grey[25:] += 30000  # a bright test slab: must not move the training percentiles
    labels = rng.choice(np.array([0, 128, 255], np.uint8), grey.shape)
    source = save_volume(Volume(grey, labels, VolumeMeta("v", grey.shape, "uint16", {0: "pore", 128: "ysz", 255: "ni"},
                                                         has_labels=True)), tmp_path / "v")
    before = (source / "image.tif").read_bytes()
    subprocess.run([sys.executable, str(repo_root / "benchmarks/quantise_volume.py"), str(source), str(tmp_path / "u8"),
                    "--split", "0.6,0.1,0.3,2", "--percentiles", "0,100"], check=True, timeout=120)
    copy = load_volume(tmp_path / "u8")
    assert copy.image.dtype == np.uint8 and copy.meta.name == "v-u8"
    np.testing.assert_array_equal(copy.labels, labels)
    record = copy.meta.extra["quantised_from"]
    a, b = slab_split(30, 0.6, 0.1, 0.3, 2).train
    assert record["train_slab"] == [a, b]
    assert (record["low"], record["high"]) == (float(grey[a:b].min()), float(grey[a:b].max()))
    assert copy.image[a:b].min() == 0 and copy.image[a:b].max() == 255 and (copy.image[25:] == 255).all()
    assert (source / "image.tif").read_bytes() == before


def test_benchmark_model_rows_keep_logged_models_of_the_task(repo_root, tmp_path, monkeypatch):
    """benchmarks/_common.py: the model rows inference_bench, normalisation_bench and fusion_depth read."""
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    import _common

    csv = tmp_path / "accuracy.csv"
    csv.write_text("task,method,model_uri\nni,forest,\nni,U-Net,models:/m-1\nphases,U-Net,models:/m-2\n")
    assert list(_common.model_rows(csv)["model_uri"]) == ["models:/m-1", "models:/m-2"]
    assert list(_common.model_rows(csv, "phases")["method"]) == ["U-Net"]
    csv.write_text("task,method,model_uri\nni,forest,\nphases,U-Net,models:/m-2\n")
    with pytest.raises(SystemExit, match="no ni-task row with a model_uri"):
        _common.model_rows(csv, "ni")
