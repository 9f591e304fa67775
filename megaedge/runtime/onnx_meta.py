"""Shapes of an ONNX graph's initializers without the ``onnx`` package.

A runtime-only install (``pip install megaedge``) has onnxruntime but not onnx, and onnxruntime only reads a graph by
loading all of its weights. ``megaedge plan`` needs just the 2-D weight shapes, so this walks the protobuf wire
format directly: ModelProto.graph (field 7) -> GraphProto.initializer (field 5) -> TensorProto.dims (field 1). The
file is memory-mapped and weight bytes are skipped, never read, so a multi-GB graph costs no memory.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from megaedge.errors import BundleError

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS = 1


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) of one message; value is an int (varint) or a (start, end) span."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):  # fixed64 / fixed32
            width = 8 if wire == 1 else 4
            yield number, wire, (pos, pos + width)
            pos += width
        else:  # groups (3, 4) are not used by onnx.proto
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("message runs past its end")


def _dims(buf, start: int, end: int) -> tuple[int, ...]:
    dims: list[int] = []
    for number, wire, value in _fields(buf, start, end):
        if number != _TENSOR_DIMS:
            continue
        if wire == 0:  # unpacked repeated int64
            dims.append(value)
        elif wire == 2:  # packed
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(buf, pos)
                dims.append(dim)
    return tuple(d - (1 << 64) if d >= 1 << 63 else d for d in dims)  # int64 two's complement


def initializer_dims(path: str | Path) -> list[tuple[int, ...]]:
    """Dims of every initializer of the graph in ``path``, in file order."""
    file = Path(path)
    try:
        with open(file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            found = []
            for number, wire, span in _fields(buf, 0, len(buf)):
                if number != _MODEL_GRAPH or wire != 2:
                    continue
                for g_number, g_wire, g_span in _fields(buf, *span):
                    if g_number == _GRAPH_INITIALIZER and g_wire == 2:
                        found.append(_dims(buf, *g_span))
            return found
    except (OSError, ValueError, IndexError) as exc:  # IndexError: a truncated file ends inside a field
        raise BundleError(f"{file}: not a readable ONNX graph ({type(exc).__name__}: {exc}); copy the bundle "
                          "again or re-export it") from exc
