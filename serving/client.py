"""Segment a whole volume with a running ``mlflow models serve`` of a socseg segmenter.

    python serving/client.py http://127.0.0.1:5000 volume.tif labels.tif [--slice-batch 8]
        [--form compact|tensor] [--encoding tiff|npy] [--tta] [--allow-out-of-range]
        [--grey-range LOW,HIGH] [--overwrite] [--retries 8]

Sends INPUT (multi-page TIFF, folder of slice TIFFs or socseg volume directory) to
``/invocations`` a few slices per request, reassembles the answers and writes the label stack
OUTPUT with the same guarantees as ``socseg segment`` (streamed, atomic, never over INPUT, an
existing OUTPUT only with --overwrite): the reading and writing are :mod:`socseg.inference.segment`'s.
The client first asks the server for the model's config (request param ``describe``): a 2.5D
model's ``context_slices`` decides how many neighbouring slices go around each chunk, and the
phase map goes into OUTPUT's metadata. For a per_volume model (its ``normalisation``) the client
estimates the whole input's grey range once and sends it with every request (``grey_low``,
``grey_high``; ``--grey-range`` gives it instead).
Connection errors, timeouts and 502/503/504 are retried with exponential backoff (0.5 s doubling,
at most 30 s: the default 8 retries wait about 90 s in all, long enough for a server restarted
by its supervisor to load the model again); a 4xx is the server naming a problem with the request and
stops the run with that message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import requests

from socseg.inference.config import ModelConfig
from socseg.inference.request import InferenceOptions, InferenceRequest
from socseg.params import WINDOWS
from socseg.inference.pyfunc import IMAGE_COLUMN, decode_array, encode_array
from socseg.inference.segment import SegmentOutputs, SegmentResult, segment_stream
from socseg.data.normalise import GreyRangeEstimateError, parse_grey_range
from socseg.data.stacks import SliceReader
from socseg.data.volumes import VolumeError, parse_phase_map

RETRY_STATUS = (502, 503, 504)


class ServerError(RuntimeError):
    """The server refused a request (4xx) or kept failing after all retries."""


class RestSegmenter:
    """Callable ``(N, H, W)`` grey slices -> ``(N, H, W)`` labels through ``POST /invocations``.

    ``form="compact"`` sends base64 ``.npy``/TIFF slices (exact uint16, ~20x smaller than JSON
    numbers) and learns the phase map from the answer; ``form="tensor"`` sends JSON numbers.
    ``bytes_sent``, ``bytes_received`` and ``requests`` count the traffic (the benchmark reports them).
    """

    def __init__(
        self,
        url: str,
        form: str = "compact",
        encoding: str = "tiff",
        params: Mapping[str, Any] | None = None,
        retries: int = 8,
        timeout: float = 300.0,
        backoff: float = 0.5,
    ):
        if form not in ("compact", "tensor"):
            raise ValueError(f"form must be compact or tensor, got {form!r}")
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/invocations") else "/invocations")
        self.form, self.encoding = form, encoding
        self.params = {k: v for k, v in dict(params or {}).items() if v is not None}
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.session = requests.Session()
        self.phase_map: dict[int, str] | None = None
        self.runtime = ""  # what runs the server's forward passes, from describe()
        self.bytes_sent = self.bytes_received = 0
        self.requests = 0

    def describe(self) -> dict[str, Any]:
        """The served model's config (task, phase map, context_slices, tile size, ...)."""
        body = json.dumps({"inputs": [[[0]]], "params": {"describe": True}}).encode()
        predictions = self.post(body)
        try:
            config = json.loads(predictions[0]["config"])
            self.runtime = str(predictions[0].get("runtime", "not reported (an older socseg server)"))
            return config
        except (TypeError, KeyError, IndexError, ValueError):
            raise ServerError(f"{self.url} did not describe its model: not a socseg segmenter of this version "
                              "(re-log it with socseg train)") from None

    def payload(self, batch: np.ndarray, context: Mapping[str, int] | None = None) -> bytes:
        if self.form == "compact":
            body: dict[str, Any] = {
                "dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[encode_array(s, self.encoding)] for s in batch]}
            }
        else:
            body = {"inputs": batch.tolist()}
            if batch.dtype.name in ("uint8", "uint16", "float32"):
                self.params.setdefault("dtype", batch.dtype.name)  # lets the server check the numbers
        params = {**self.params, **dict(context or {})}
        if params:
            body["params"] = params
        return json.dumps(body).encode()

    def post(self, body: bytes) -> Any:
        """POST with retries on transient failures; the decoded ``predictions``."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                response = self.session.post(
                    self.url, data=body, headers={"Content-Type": "application/json"}, timeout=(10, self.timeout)
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    self.bytes_sent += len(body)
                    self.bytes_received += len(response.content)
                    self.requests += 1
                    return response.json()["predictions"]
                if response.status_code not in RETRY_STATUS:
                    raise ServerError(f"{self.url} answered {response.status_code}: {_message(response)}")
                problem = f"HTTP {response.status_code}: {_message(response)}"
            if attempt < self.retries:
                print(f"retrying in {delay:.1f} s ({problem})", file=sys.stderr)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise ServerError(f"{self.url}: giving up after {self.retries + 1} attempts ({problem})")

    def __call__(self, batch: np.ndarray, before: int = 0, after: int = 0) -> np.ndarray:
        """Labels for ``batch`` without its first ``before`` and last ``after`` slices, which a
        2.5D model only uses as context."""
        context = {"context_before": int(before), "context_after": int(after)} if before or after else None
        predictions = self.post(self.payload(np.asarray(batch), context))
        if self.form == "tensor":
            return np.asarray(predictions, dtype=np.uint8)
        if self.phase_map is None and predictions and "phase_map" in predictions[0]:
            self.phase_map = {int(k): v for k, v in json.loads(predictions[0]["phase_map"]).items()}
        return np.stack([decode_array(row["labels"]) for row in predictions]).astype(np.uint8, copy=False)


def label_phase_map(config: Mapping[str, Any]) -> dict[int, str]:
    """Label value -> class of what the described model returns."""
    return ModelConfig.from_dict(config).label_phase_map


def _message(response: requests.Response) -> str:
    try:
        return str(response.json().get("message", response.text))[-2000:]
    except ValueError:
        return response.text[-2000:]


def segment_with_server(
    url: str,
    source: str,
    output: str,
    *,
    slice_batch: int,
    overwrite: bool = False,
    form: str = "compact",
    encoding: str = "tiff",
    params: Mapping[str, Any] | None = None,
    phase_map: Mapping[int, str] | None = None,
    retries: int = 8,
    timeout: float = 300.0,
    progress: bool = True,
) -> tuple[SegmentResult, RestSegmenter]:
    """Segment ``source`` through the server at ``url`` into the label stack ``output``.

    A 2.5D model (the server reports its ``context_slices``) gets that many neighbouring slices
    around each chunk, so slices at chunk borders see their true neighbours; a model that fuses
    y and x planes (its ``planes``, or ``params["planes"]``) gets ``fusion_depth`` slices per request
    with ``fusion_halo`` more on either side, as ``socseg segment`` reads them.
    """
    client = RestSegmenter(url, form=form, encoding=encoding, params=params, retries=retries, timeout=timeout)
    config = client.describe()
    if phase_map is None and config.get("phase_map"):
        client.phase_map = {int(k): v for k, v in label_phase_map(config).items()}
    model = ModelConfig.from_dict(config)
    given = client.params.get("grey_low"), client.params.get("grey_high")
    given = None if given[0] is None else (float(given[0]), float(given[1]))
    # Each request carries only some slices: a per_volume model gets the whole input's grey range
    # with every one, estimated as `socseg segment` and `socseg stats` do, so the labels do not
    # depend on the batching (a fixed model: none, raw values). The same request says how many
    # slices go in one request and how many neighbours around them (2.5D context, fusion halo).
    with SliceReader(source) as reader:
        request = InferenceRequest.resolve(model, InferenceOptions(planes=client.params.get("planes"), grey_range=given),
                                           source=reader)
    if given is None and request.grey_range is not None:
        client.params.update(grey_low=request.grey_range[0], grey_high=request.grey_range[1])

    def metadata() -> dict[str, Any]:  # asked after the first answer, which carries the phase map
        known = dict(phase_map) if phase_map else client.phase_map
        return {
            "phase_map": {str(k): v for k, v in sorted(known.items())} if known else None,
            "server": client.url,
            "runtime": client.runtime,
            "source": str(source),
            "params": client.params,
        }

    outputs = SegmentOutputs.check(source, output, overwrite=overwrite)
    result = segment_stream(client, source, outputs, context=request.context(model.context_slices),
                            slice_batch=request.chunk_slices(slice_batch), metadata=metadata, progress=progress)
    return result, client


def free_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A free TCP port on 127.0.0.1, not one of ``taken`` (servers here listen on loopback only)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port


@contextlib.contextmanager
def local_server(
    model_uri: str, port: int | None = None, timeout: float = 90.0, log_path: str | os.PathLike | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mlflow models serve -m MODEL_URI --env-manager local`` on 127.0.0.1 (tests, benchmarks):
    yields ``(url, process)`` once ``/ping`` answers; the whole process group is stopped on exit."""
    port = port or free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if log_path is None:  # kept after the server stops: the place to look when it fails
        handle, log_path = tempfile.mkstemp(prefix="mlflow-serve-", suffix=".log")
        os.close(handle)
    log_path = Path(log_path)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    with open(log_path, "w") as log:
        # Own session: uvicorn is a child of the mlflow CLI, and both must go on exit.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve not up after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the group, wait for the CLI, then SIGKILL whatever of the group is left (uvicorn)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="server, e.g. http://127.0.0.1:5000")
    parser.add_argument("input", help="multi-page TIFF, folder of slice TIFFs or socseg volume directory")
    parser.add_argument("output", help="label stack to write (.tif)")
    parser.add_argument("--slice-batch", type=int, default=None, help="slices per request [params: inference.slice_batch]")
    parser.add_argument("--form", choices=("compact", "tensor"), default="compact")
    parser.add_argument("--encoding", choices=("tiff", "npy"), default="tiff", help="compact form only")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="8-fold flip/rotation TTA (server default)")
    parser.add_argument("--window", choices=WINDOWS, default=None,
                        help="one pass per slice, or the sliding window (server default)")
    parser.add_argument("--step-fraction", type=float, default=None, help="sliding window: tile step / tile size (server default)")
    parser.add_argument("--smoothing-sigma", type=float, default=None,
                        help="in-plane Gaussian sigma (pixels) on the class probabilities before the argmax (server default)")
    parser.add_argument("--planes", default=None,
                        help="planes predicted and averaged: z (slice by slice) or zyx (multi-axis fusion) (server default)")
    parser.add_argument("--phase-map", default=None, help="label value -> phase for the metadata, e.g. 0=pore,255=ni")
    parser.add_argument("--allow-out-of-range", action="store_true",
                        help="segment even when most grey values lie outside the model's range "
                             "(sends the request param allow_out_of_range: true)")
    parser.add_argument("--grey-range", type=parse_grey_range, default=None, metavar="LOW,HIGH",
                        help="the input's grey range, sent as grey_low/grey_high with every request "
                             "[default: estimated on the whole input for a per_volume model, as `socseg stats`]")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    parser.add_argument("--retries", type=int, default=8, help="retries of one request (backoff 0.5 s doubling, max 30 s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one answer")
    args = parser.parse_args(argv)
    try:
        if args.slice_batch is None:
            from socseg.params import load_params, typed

            args.slice_batch = typed(load_params()).inference.slice_batch
        result, client = segment_with_server(
            args.url,
            args.input,
            args.output,
            slice_batch=args.slice_batch,
            overwrite=args.overwrite,
            form=args.form,
            encoding=args.encoding,
            params={"tta": args.tta, "window": args.window, "step_fraction": args.step_fraction,
                    "smoothing_sigma": args.smoothing_sigma, "planes": args.planes,
                    "allow_out_of_range": True if args.allow_out_of_range else None,
                    "grey_low": args.grey_range[0] if args.grey_range else None,
                    "grey_high": args.grey_range[1] if args.grey_range else None},
            phase_map=parse_phase_map(args.phase_map) if args.phase_map else None,
            retries=args.retries,
            timeout=args.timeout,
        )
    except (VolumeError, ServerError, GreyRangeEstimateError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    z, h, w = result.shape
    print(
        f"segmented {z}x{h}x{w} in {result.seconds:.1f} s ({result.slices_per_second:.2f} slices/s, "
        f"{client.bytes_sent / max(z, 1) / 1024:.0f} KiB sent per slice) -> {result.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
