"""`.safetensors` files with NumPy (and ml_dtypes for BF16/F8) alone: weights without PyTorch.

The format (huggingface/safetensors, "Format"): an unsigned little-endian 64-bit header length
N, N bytes of JSON — per tensor `{"dtype", "shape", "data_offsets": [begin, end]}` into the byte
buffer that follows, plus an optional `"__metadata__"` of strings — then the buffer, tensors in
row-major order, little-endian. The header is padded with spaces to a multiple of 8 bytes, as the
reference writer does. Files written here load with `safetensors.torch.load_file` (tested), and
that library's files load here.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from dfa_jax import errors

# safetensors dtype names <-> NumPy dtypes. ml_dtypes (NumPy-only, installed with jaxlib) gives
# NumPy the bfloat16 and float8 types PyTorch saves.
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
# A header larger than this is no safetensors file (the reference reader's own limit).
MAX_HEADER_BYTES = 100_000_000
# What a clone without Git LFS leaves in place of a large file (a model repository's weights).
GIT_LFS_POINTER = b"version https://git-lfs"


class SafetensorsError(errors.InputError):
    """A file that is not a well-formed safetensors file, or an array it cannot hold."""


def save(path: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes `arrays` (name -> array) to `path`, atomically (a temporary file renamed; removed
    if the write fails). Arrays of either byte order are written little-endian."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    buffers, offset = [], 0
    for name, value in arrays.items():
        array = np.asarray(value)
        # The names are of native-order dtypes; a big-endian array ('>f4') is the same type.
        dtype = array.dtype.newbyteorder("=")
        if dtype not in _NAMES:
            raise SafetensorsError(
                f"{name}: dtype {array.dtype} has no safetensors name here; use one of"
                f" {sorted(str(np.dtype(d)) for d in DTYPES.values())}"
            )
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        buffers.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for data in buffers:
                f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> array, metadata) of the safetensors file at `path`."""
    with open(path, "rb") as f:
        blob = f.read()

    def bad(why: str) -> SafetensorsError:
        return SafetensorsError(f"{path} is not a safetensors file: {why}")

    if blob.startswith(GIT_LFS_POINTER):
        raise SafetensorsError(
            f"{path} is a Git LFS pointer, not the tensors: fetch the file itself with"
            " `git lfs pull` in the repository it came from (or download it directly)"
        )
    if len(blob) < 8:
        raise bad("shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise bad(f"its header claims {size} bytes")
    try:
        header = json.loads(blob[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad(f"its __metadata__ is not a JSON object of strings: {metadata!r:.80}")
    buffer = memoryview(blob)[8 + size :]
    arrays, spans = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r} is described by a {type(entry).__name__}, not an object")
        dtype_name, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets"))
        if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
            raise bad(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise bad(
                f"tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers"
            )
        if not isinstance(dtype_name, str):
            raise bad(f"tensor {name!r} has dtype {dtype_name!r}, not a name")
        if dtype_name not in DTYPES:
            # A well-formed file of a dtype NumPy cannot hold (e.g. a newer float8 variant).
            raise SafetensorsError(
                f"{path}: tensor {name!r} has dtype {dtype_name!r}, which is not supported here"
                f" (supported: {', '.join(DTYPES)}); save it as F32, F16 or BF16"
            )
        begin, end = offsets
        dtype = np.dtype(DTYPES[dtype_name]).newbyteorder("<")
        if not begin <= end <= len(buffer) or end - begin != dtype.itemsize * math.prod(shape):
            raise bad(f"tensor {name!r}'s data_offsets [{begin}, {end}] do not fit its shape")
        spans.append((begin, end, name))
        arrays[name] = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape).copy()
    # The format indexes the whole buffer: the tensors' bytes follow one another from its start
    # to its end, with no gap, overlap or trailing bytes (as the reference reader checks).
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            why = "overlaps the tensor before it" if begin < covered else "leaves a gap before it"
            raise bad(f"tensor {name!r}'s data_offsets [{begin}, {end}] {why} (at byte {covered})")
        covered = end
    if covered != len(buffer):
        raise bad(
            f"its tensors cover {covered} bytes of its {len(buffer)}-byte buffer (trailing bytes)"
        )
    return arrays, metadata


def _is_count(value) -> bool:
    """A JSON integer >= 0 (not a bool, not a float such as 2.5 or 2.0)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
