"""benchmarks/quickstart_bench.py: what it reads from a quick start's log."""


def test_the_segment_time_is_the_last_one_socseg_segment_reports(load_benchmark):
    quickstart_bench = load_benchmark("quickstart_bench")
    log = ("Epoch 4/4\n40/40 - 19s - 472ms/step - loss: 0.0159\n"
           "segmented 48x192x192 in 85.3 s (0.56 slices/s) -> outputs/a.tif\n"
           "runtime: openvino 2026.4.1 (CPU, f32, 2 threads)\n"
           "segmented 48x192x192 in 6.1 s (7.85 slices/s) -> outputs/sample_segmented.tif\n")
    assert quickstart_bench.segment_seconds(log) == 6.1
    assert quickstart_bench.segment_seconds("Done. nothing segmented in 3 s here\n") is None


def test_the_quickstart_command_is_read_from_the_script(load_benchmark):
    common = load_benchmark("_common")
    line, parameters = common.quickstart_command()
    script = (common.REPO / "scripts" / "quickstart.sh").read_text()
    assert line.startswith("mlflow run . ") and line in script and not line.endswith("\\")
    assert parameters["n_trials"] == "1" and int(parameters["epochs"]) >= 1 and int(parameters["steps_per_epoch"]) >= 1
