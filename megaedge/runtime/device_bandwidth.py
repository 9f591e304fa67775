"""Memory bandwidth of the device an execution provider runs on, measured through onnxruntime itself.

A decoder on the GPU streams its weights from GPU memory, so its bandwidth bound is the GPU's, not the host's; the
runtime has no torch or CUDA bindings of its own, so two tiny shipped graphs (``assets/probes``, rebuilt and compared
by the tests) are run on the provider: a matrix-vector product over a matrix far beyond the caches (the read pattern
of a decode step) and an elementwise Relu (bytes read + written, the STREAM copy pattern). Each is timed at two
sizes and the bandwidth taken from the difference, so the fixed cost of one onnxruntime call (launch, synchronise:
tens of microseconds, a sizeable share of a 256 MiB read on a 3 TB/s GPU) drops out.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

PROBE_DIR = Path(__file__).resolve().parents[1] / "assets" / "probes"
GEMV_PROBE = "gemv_f32.onnx"  # vector [1, rows] x matrix [rows, GEMV_COLUMNS] -> product [1, GEMV_COLUMNS]
COPY_PROBE = "relu_f32.onnx"  # x [n] -> y [n]
GEMV_COLUMNS = 4096
PROVIDER_FOR = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _session(name: str, device: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # never spin-wait
    providers = [PROVIDER_FOR[device]] + (["CPUExecutionProvider"] if device != "cpu" else [])
    return ort.InferenceSession(str(PROBE_DIR / name), options, providers=providers)


def _best_seconds(session, feed: dict, output: str, device: str, rounds: int) -> float:
    """Fastest of ``rounds`` calls with inputs and output in the device's memory (a call returns once the device
    has finished: onnxruntime synchronises at the end of a run)."""
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output(output, device)
    best = float("inf")
    for _ in range(rounds + 2):  # the first calls allocate the output and warm the kernels
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        best = min(best, time.perf_counter() - t0)
    return best


def _slope(bytes_moved: tuple[int, int], seconds: tuple[float, float]) -> float:
    """GB/s from two sizes. Where noise (a slow spell during the smaller size's calls) leaves the larger size barely
    slower, the slope would claim a fixed cost above half of the larger call and a rate many times the real one
    (a busy 2-core CI machine once gave 58,868 GB/s); the larger size's plain rate is reported there instead."""
    extra = seconds[1] - seconds[0]
    fixed = seconds[0] - extra * bytes_moved[0] / (bytes_moved[1] - bytes_moved[0])  # the call's cost at 0 bytes
    if extra <= 0 or fixed > seconds[1] / 2:
        return bytes_moved[1] / seconds[1] / 1e9
    return (bytes_moved[1] - bytes_moved[0]) / extra / 1e9


def _filled(shape: list[int], device: str):
    """A device buffer; on a CPU filled with ones (leftover bytes may hold denormals, which CPUs compute slowly),
    on a GPU left as allocated (speed does not depend on the values there, and no host copy is needed)."""
    import onnxruntime as ort

    if device == "cpu":
        return ort.OrtValue.ortvalue_from_numpy(np.ones(shape, np.float32))
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, device, 0)


def device_bandwidths(device: str = "cuda", mib: int = 256, rounds: int = 10) -> tuple[float, float]:
    """(copy GB/s counting bytes read + written, read GB/s) of ``device``'s memory, at ``mib`` and 2 x ``mib`` MiB."""
    import onnxruntime as ort

    if device not in PROVIDER_FOR:
        raise ValueError(f"device {device!r} is not one of {sorted(PROVIDER_FOR)}")
    gemv, relu = _session(GEMV_PROBE, device), _session(COPY_PROBE, device)
    sizes = (mib * 2**20, 2 * mib * 2**20)
    rows = tuple(size // (4 * GEMV_COLUMNS) for size in sizes)
    read_s, copy_s = [], []
    for size, n in zip(sizes, rows):
        matrix = _filled([n, GEMV_COLUMNS], device)
        vector = ort.OrtValue.ortvalue_from_numpy(np.full((1, n), 1e-3, np.float32), device, 0)
        read_s.append(_best_seconds(gemv, {"vector": vector, "matrix": matrix}, "product", device, rounds))
        del matrix, vector  # at most one size of each probe in device memory at a time (8 GB boards)
        x = _filled([size // 4], device)
        copy_s.append(_best_seconds(relu, {"x": x}, "y", device, rounds))
        del x
    read_bytes = tuple(n * GEMV_COLUMNS * 4 for n in rows)
    return _slope((2 * sizes[0], 2 * sizes[1]), tuple(copy_s)), _slope(read_bytes, tuple(read_s))
