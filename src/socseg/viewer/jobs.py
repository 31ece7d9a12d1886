"""The widget's model work, run in a child process: segmenting and fine-tuning never load
TensorFlow into the viewer's process.

Why a process and not a thread: TensorFlow and the OpenGL stack napari draws with cannot share
one process on many machines. Mesa's software renderer (llvmpipe: remote desktops, VMs, Xvfb)
loads its own LLVM, and loading TensorFlow beside it aborts the process whichever comes first.
A child started with ``spawn`` imports TensorFlow alone; the viewer only sends it the inputs and
reads its progress and result through a pipe. Cancelling a segmentation terminates the child; it
writes no file, so nothing is left behind. (A fine-tune is not cancelled half-way: its MLflow
run and registration are the record of it.)

Neither this module nor the results it returns (:mod:`socseg.viewer.results`) imports TensorFlow
or Keras; :mod:`socseg.viewer.session` (imported in the child only) does the work.
"""

from __future__ import annotations

import multiprocessing
import traceback
from typing import Any, Generator

from socseg.viewer.results import FinetuneSummary

POLL_SECONDS = 0.2


class JobError(RuntimeError):
    """The child's error, with its message (and its traceback in ``details``)."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def child_main(conn: Any, task: str, kwargs: dict[str, Any]) -> None:
    """The child process: run ``task`` and send ``("progress", done, total)`` messages, then
    ``("result", value)`` or ``("error", message, traceback)``."""
    try:
        from socseg.viewer import session

        if task == "segment":
            predictor = session.load_predictor(kwargs["model_uri"], kwargs["tracking_uri"])
            image = kwargs["image"]  # an array, or the path of the file the layer was opened from
            total = int(kwargs["slices"])
            generator = session.segment_array(predictor, image, slice_batch=kwargs["slice_batch"],
                                              model_uri=kwargs["model_uri"])
            while True:
                try:
                    conn.send(("progress", next(generator), total))
                except StopIteration as finished:
                    conn.send(("result", finished.value))
                    break
        elif task == "finetune":
            from socseg.training.finetune import promotion_verdict

            session.load_predictor(kwargs["model_uri"], kwargs["tracking_uri"])  # the store the run logs to
            result = session.finetune_on_corrections(kwargs["params"], kwargs["model_uri"], kwargs["image"],
                                                     kwargs["painted"], kwargs["phase_map"], kwargs.get("run_name"))
            conn.send(("result", FinetuneSummary(result.model_uri, result.run_id, list(result.train_slices),
                                                 list(result.test_slices), dict(result.metrics),
                                                 promotion_verdict(result), result.promotion)))
        else:
            raise ValueError(f"unknown task {task!r}")
    except BaseException as error:  # sent back whole: the viewer shows it
        conn.send(("error", " ".join(f"{type(error).__name__}: {error}".split()), traceback.format_exc()))
    finally:
        conn.close()


def run_in_child(task: str, **kwargs: Any) -> Generator[tuple[str, int, int], None, Any]:
    """Run ``task`` in a spawned child; yields ``(stage, done, total)`` about every
    :data:`POLL_SECONDS` (stage ``"starting"`` until the child reports) and returns its result.
    Closing the generator (a cancelled napari worker) terminates the child."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=child_main, args=(send, task, kwargs), daemon=True, name=f"socseg-{task}")
    process.start()
    send.close()
    stage, done, total = "starting", 0, 1
    try:
        while True:
            if receive.poll(POLL_SECONDS):
                try:
                    message = receive.recv()
                except EOFError:
                    raise JobError(f"the {task} process ended without a result (exit code {process.exitcode})") from None
                if message[0] == "progress":
                    stage, done, total = task, int(message[1]), int(message[2])
                elif message[0] == "result":
                    return message[1]
                else:
                    raise JobError(message[1], message[2])
            elif not process.is_alive() and not receive.poll():
                raise JobError(f"the {task} process ended without a result (exit code {process.exitcode})")
            yield stage, done, total
    finally:
        if process.is_alive():
            process.terminate()
        process.join(timeout=10)
        receive.close()
