"""The CSR bundle: harp's own binary container for a pruned model (numpy only).

Layout of format 2.0 (all integers little-endian; docs/bundle-format.md is the
full spec):

    offset 0   preamble, 56 bytes: magic b"\\x89HARPCSR", u16 major (2), u16 minor,
               u32 flags (0), u64 header_length, 32-byte SHA-256 of the stored header
    offset 56  header: header_length bytes, one zlib stream (RFC 1950) that inflates
               to at most 64 MiB of UTF-8 JSON (graph structure, tensor table,
               data_size, data_sha256, meta)
               zero bytes up to the next multiple of 16 = data_start
    data_start data region: data_size bytes of raw little-endian arrays, each at
               an offset (relative to data_start) that is a multiple of 16;
               every byte not covered by an array is zero; the header's
               data_sha256 covers the whole region; the file ends here.

Conv and linear weights are stored as CSR (indptr, indices, values); every other
tensor (biases, affine scale/shift) dense. CSR values are float32 or float16 (the
writer's `values_dtype`); `load_bundle` always hands out float32 (fp16 values are
upcast, exactly, at load).

`load_bundle` is the only way a bundle enters the runtime: it checks every byte
and every header field before it returns, and reports any failure as one
`BundleError` that names the tensor or header field and the broken invariant.
`read_header` checks and returns the header alone, for readers that only compare it with a manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harp.io import atomic_writer, open_regular

from .csr import CSRError, CSRTensor, INDICES_DTYPES, INDPTR_DTYPES, VALUES_DTYPES, check_csr, dense_to_csr
from .graph import Graph, GraphError

MAGIC = b"\x89HARPCSR"
FORMAT_MAJOR = 2
FORMAT_MINOR = 0
PREAMBLE = struct.Struct("<8sHHIQ32s")  # magic, major, minor, flags, header_length, header_sha256
ALIGN = 16  # of the data region in the file and of every array in it: a multiple of every itemsize
MAX_HEADER_BYTES = 64 << 20  # limit of the stored (compressed) header and of the JSON it inflates to
COMPRESS_LEVEL = 9
MAX_RANK = 8
MAX_VALUE_ELEMENTS = (1 << 31) - 1  # per-sample elements of any activation: int32 indexing is safe
_INT64 = 1 << 63

# The dtype whitelist of the format, and which dtypes each array role may use.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "uint8", "uint16", "uint32", "uint64")
}
ROLE_DTYPES: dict[str, tuple[str, ...]] = {
    "indptr": tuple(d.name for d in INDPTR_DTYPES),
    "indices": tuple(d.name for d in INDICES_DTYPES),
    "values": tuple(d.name for d in VALUES_DTYPES),
    "data": ("float32", "float16"),
}
LAYOUT_ROLES: dict[str, tuple[str, ...]] = {"csr": ("indptr", "indices", "values"), "dense": ("data",)}
CSR_PARAMS = {("conv2d", "weight"), ("linear", "weight")}  # (op, role) stored as CSR

_HEADER_KEYS = ("graph", "tensors", "data_size", "data_sha256", "meta")
_TENSOR_KEYS = ("name", "layout", "shape", "arrays")
_ARRAY_KEYS = ("dtype", "count", "offset", "length")
_SHA256 = re.compile(r"[0-9a-f]{64}")

Fail = Callable[[str], "BundleError"]  # builds the error for a message (the loader prefixes the path)


class BundleError(ValueError):
    """A bundle cannot be written or loaded; the message names the tensor or field."""


@dataclass(frozen=True)
class Bundle:
    """A loaded, fully validated bundle.

    graph.tensors holds CSRTensor (float32 values) for CSR-stored weights and
    float32 ndarrays for dense tensors; all arrays are read-only.
    """

    graph: Graph
    meta: dict[str, Any]
    version: tuple[int, int]  # (major, minor) of the file
    header: dict[str, Any]  # the parsed (inflated) header: stored dtypes, offsets, data_sha256


# ---------------------------------------------------------------- writing


def write_bundle(graph: Graph, path: str | os.PathLike[str], *, values_dtype: str = "float32",
                 meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `graph` as a CSR bundle at `path`, atomically.

    Returns {"path", "file_bytes", "file_sha256", "header"}. Raises BundleError
    if the graph, its tensors or meta cannot be stored, and OSError if writing
    fails; either way nothing new is left at `path` or beside it.
    """
    if values_dtype not in ROLE_DTYPES["values"]:
        raise BundleError(f"values_dtype {values_dtype!r} is not one of {list(ROLE_DTYPES['values'])}")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise BundleError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        shapes = graph.validate()
    except GraphError as e:
        raise BundleError(f"graph is invalid: {e}") from e
    _check_value_sizes(shapes, BundleError)

    layouts = _layouts(graph)
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []  # the data region: arrays and the zero gaps before them, in order
    cursor = 0
    for name, layout in layouts.items():
        arrays = _stored_arrays(name, graph.tensors[name], layout, values_dtype)
        table: dict[str, Any] = {}
        for role, array in arrays.items():
            raw = np.ascontiguousarray(array, dtype=DTYPES[array.dtype.name]).tobytes()
            offset = _align(cursor)
            table[role] = {"dtype": array.dtype.name, "count": int(array.size), "offset": offset,
                           "length": len(raw)}
            chunks += [bytes(offset - cursor), raw]
            cursor = offset + len(raw)
        entries.append({"name": name, "layout": layout, "shape": [int(d) for d in graph.tensors[name].shape],
                        "arrays": table})
    data_hash = hashlib.sha256()
    for chunk in chunks:
        data_hash.update(chunk)
    header = {"graph": graph.structure_json(), "tensors": entries, "data_size": cursor,
              "data_sha256": data_hash.hexdigest(), "meta": meta}
    try:
        header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        header = _decode_header(header_bytes)  # what a reader will see; also a copy the caller may keep
    except (TypeError, ValueError, RecursionError) as e:
        raise BundleError(f"header (graph attributes or meta) is not plain JSON: {e}") from e
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise BundleError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    stored = zlib.compress(header_bytes, COMPRESS_LEVEL)
    if len(stored) > MAX_HEADER_BYTES:
        raise BundleError(f"compressed header of {len(stored)} bytes exceeds {MAX_HEADER_BYTES}")

    preamble = PREAMBLE.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, len(stored), hashlib.sha256(stored).digest())
    head = preamble + stored
    head += bytes(_align(len(head)) - len(head))
    file_hash = hashlib.sha256(head)
    path = Path(path)
    with atomic_writer(path) as f:
        f.write(head)
        for chunk in chunks:
            f.write(chunk)
            file_hash.update(chunk)
    return {"path": str(path), "file_bytes": len(head) + cursor, "file_sha256": file_hash.hexdigest(),
            "header": header}


def _layouts(graph: Graph) -> dict[str, str]:
    """Tensor name -> "csr" or "dense", in order of first use."""
    layouts: dict[str, str] = {}
    for node in graph.nodes:
        for role, name in node.params.items():
            layout = "csr" if (node.op, role) in CSR_PARAMS else "dense"
            if layouts.setdefault(name, layout) != layout:
                raise BundleError(f"tensor {name!r} is used both as a CSR weight and as a dense parameter")
    return layouts


def _stored_arrays(name: str, tensor: np.ndarray | CSRTensor, layout: str, values_dtype: str) -> dict[str, np.ndarray]:
    try:
        if layout == "dense":
            data = tensor.to_dense() if isinstance(tensor, CSRTensor) else np.asarray(tensor, dtype=np.float32)
            if not np.isfinite(data).all():
                raise BundleError(f"tensor {name!r}: holds non-finite values")
            return {"data": data.ravel()}
        if isinstance(tensor, CSRTensor):
            check_csr(tensor, name)
            with np.errstate(over="ignore"):  # an overflow to inf fails check_csr below
                values = tensor.values.astype(values_dtype)
            csr = CSRTensor(tensor.shape, tensor.indptr, tensor.indices, values)
        else:
            csr = dense_to_csr(np.asarray(tensor), values_dtype)
        check_csr(csr, name)
    except CSRError as e:
        raise BundleError(f"tensor {name!r}: {e}") from e
    return {"indptr": csr.indptr, "indices": csr.indices, "values": csr.values}


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ---------------------------------------------------------------- loading


def load_bundle(path: str | os.PathLike[str], *, max_bytes: int = 1 << 31, sha256: str | None = None) -> Bundle:
    """Read and validate the bundle at `path`; raise BundleError on any problem.

    Nothing is returned unless every check of docs/bundle-format.md passed, so
    kernels can trust every index and shape they are handed. sha256: the whole file's
    digest an export's manifest records, checked on the bytes read here (not on a
    second read, which another file could have answered).
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < PREAMBLE.size:
        raise BundleError(f"max_bytes must be an integer >= {PREAMBLE.size}, got {max_bytes!r}")
    try:
        source = os.fspath(path)
    except TypeError as e:
        raise BundleError(f"bundle path must be a str or os.PathLike, got {type(path).__name__}") from e
    try:
        with open_regular(source) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise BundleError(f"bundle {source}: file of {size} bytes exceeds max_bytes={max_bytes}")
            buf = np.empty(size + 1, dtype=np.uint8)  # one spare byte detects a file that grew
            got = f.readinto(memoryview(buf))
    except (OSError, ValueError) as e:  # ValueError: not a regular file (a fifo would block forever)
        raise BundleError(f"bundle {source}: cannot read: {e}") from e
    if got != size:
        raise BundleError(f"bundle {source}: file changed while it was read ({got} bytes, expected {size})")
    buf = buf[:size]
    buf.flags.writeable = False
    if sha256 is not None and hashlib.sha256(buf).hexdigest() != sha256:
        raise BundleError(f"bundle {source}: SHA-256 does not match the manifest (corrupted or tampered)")
    try:
        return _parse(buf, source)
    except BundleError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError,
            MemoryError, struct.error) as e:
        # Defence in depth: every check above should have caught this first.
        raise BundleError(f"bundle {source}: unexpected {type(e).__name__}: {e}") from e


def _parse(buf: np.ndarray, source: str) -> Bundle:
    def fail(msg: str) -> BundleError:
        return BundleError(f"bundle {source}: {msg}")

    size = buf.size
    if size < PREAMBLE.size:
        raise fail(f"file of {size} bytes is shorter than the {PREAMBLE.size}-byte preamble")
    minor, header_length, header_sha = _preamble(buf[:PREAMBLE.size].tobytes(), fail)
    header_end = PREAMBLE.size + header_length
    if header_end > size:
        raise fail(f"header_length {header_length} runs past the end of the {size}-byte file")
    strict = minor <= FORMAT_MINOR  # a newer minor may add fields this reader can ignore
    header = _header(buf[PREAMBLE.size:header_end].tobytes(), header_sha, strict, fail)
    data_start = _align(header_end)
    if data_start > size:
        raise fail(f"file of {size} bytes ends inside the header padding (data starts at {data_start})")
    if buf[header_end:data_start].any():
        raise fail("header padding bytes are not zero")
    data_size = _nonneg_int(header["data_size"], "header.data_size", fail)
    if data_start + data_size != size:
        raise fail(f"header.data_size {data_size} + data start {data_start} != file size {size}")
    digest = header["data_sha256"]
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise fail(f"header.data_sha256 must be 64 lowercase hex digits, got {digest!r}")
    if hashlib.sha256(buf[data_start:]).hexdigest() != digest:
        raise fail("header.data_sha256 does not match the data region")
    meta = header["meta"]
    if not isinstance(meta, dict):
        raise fail(f"header.meta must be an object, got {type(meta).__name__}")
    entries = header["tensors"]
    if not isinstance(entries, list):
        raise fail(f"header.tensors must be a list, got {type(entries).__name__}")

    data = buf[data_start:]
    tensors: dict[str, np.ndarray | CSRTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for i, entry in enumerate(entries):
        name, tensor, tensor_spans = _tensor(entry, i, data, strict, fail)
        if name in tensors:
            raise fail(f"tensor {name!r} appears twice in header.tensors")
        tensors[name] = tensor
        spans.extend(tensor_spans)
    _check_layout_gaps(data, spans, fail)

    try:
        graph = Graph.from_structure_json(header["graph"], tensors)
        shapes = graph.validate()
    except GraphError as e:
        raise fail(f"header.graph: {e}") from e
    for node in graph.nodes:
        for role, name in node.params.items():
            want = "csr" if (node.op, role) in CSR_PARAMS else "dense"
            have = "csr" if isinstance(tensors[name], CSRTensor) else "dense"
            if have != want:
                raise fail(f"tensor {name!r}: stored as {have}, but node {node.name!r} ({node.op}) "
                           f"takes its {role} as {want}")
    _check_value_sizes(shapes, fail)
    return Bundle(graph=graph, meta=meta, version=(FORMAT_MAJOR, minor), header=header)  # `_preamble` read no other


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked header of the bundle at `path` (graph structure, tensor table, meta), read without
    its data region: what a reader of an export's manifest compares it with. BundleError on any problem."""
    source = os.fspath(path)

    def fail(msg: str) -> BundleError:
        return BundleError(f"bundle {source}: {msg}")

    try:
        with open_regular(source) as f:
            preamble = f.read(PREAMBLE.size)
            if len(preamble) < PREAMBLE.size:
                raise fail(f"file of {len(preamble)} bytes is shorter than the {PREAMBLE.size}-byte preamble")
            minor, header_length, header_sha = _preamble(preamble, fail)
            stored = f.read(header_length)
    except BundleError:
        raise
    except (OSError, ValueError) as e:  # ValueError: not a regular file (a fifo would block forever)
        raise fail(f"cannot read: {e}") from e
    if len(stored) < header_length:
        raise fail(f"header_length {header_length} runs past the end of the file")
    return _header(stored, header_sha, minor <= FORMAT_MINOR, fail)


def _preamble(preamble: bytes, fail: Fail) -> tuple[int, int, bytes]:
    """(minor version, header_length, header SHA-256) of a checked preamble."""
    magic, major, minor, flags, header_length, header_sha = PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise fail(f"magic {magic!r} is not {MAGIC!r}: not a harp CSR bundle")
    if major < FORMAT_MAJOR:
        raise fail(f"format version {major}.{minor} is not supported (re-export with this harp version)")
    if major > FORMAT_MAJOR:
        raise fail(f"format version {major}.{minor} is not supported (this reader reads {FORMAT_MAJOR}.x)")
    if flags != 0:
        raise fail(f"preamble flags {flags:#x} must be 0")
    if header_length > MAX_HEADER_BYTES:
        raise fail(f"header_length {header_length} exceeds {MAX_HEADER_BYTES}")
    return minor, header_length, header_sha


def _header(stored: bytes, header_sha: bytes, strict: bool, fail: Fail) -> dict[str, Any]:
    """The header JSON of its stored (compressed) bytes, with the fields every reader needs."""
    if hashlib.sha256(stored).digest() != header_sha:
        raise fail("header SHA-256 does not match the preamble")
    header_bytes = _inflate(stored, fail)
    try:
        header = _decode_header(header_bytes)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise fail(f"header is not well-formed JSON: {e}") from e
    return _fields(header, _HEADER_KEYS, "header", strict, fail)


def _tensor(entry: Any, i: int, data: np.ndarray, strict: bool,
            fail: Fail) -> tuple[str, np.ndarray | CSRTensor, list[tuple[int, int, str]]]:
    """Check one tensor table entry and return (name, tensor, [(start, end, label)])."""
    entry = _fields(entry, _TENSOR_KEYS, f"header.tensors[{i}]", strict, fail)
    name = entry["name"]
    if not isinstance(name, str) or not name:
        raise fail(f"header.tensors[{i}].name must be a non-empty string, got {name!r}")
    where = f"tensor {name!r}"
    layout = entry["layout"]
    if not isinstance(layout, str) or layout not in LAYOUT_ROLES:
        raise fail(f"{where}: layout {layout!r} is not one of {list(LAYOUT_ROLES)}")
    shape_json = entry["shape"]
    if not isinstance(shape_json, list) or len(shape_json) > MAX_RANK:
        raise fail(f"{where}: shape must be a list of at most {MAX_RANK} integers, got {shape_json!r}")
    shape = tuple(_nonneg_int(d, f"{where} shape", fail) for d in shape_json)
    if layout == "csr" and len(shape) < 2:
        raise fail(f"{where}: a CSR tensor needs a shape of 2 or more dimensions, got {list(shape)}")
    table = _fields(entry["arrays"], LAYOUT_ROLES[layout], f"{where} arrays", True, fail)

    arrays: dict[str, np.ndarray] = {}
    spans = []
    for role in LAYOUT_ROLES[layout]:
        label = f"{where} array {role!r}"
        spec = _fields(table[role], _ARRAY_KEYS, label, strict, fail)
        dtype_name = spec["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in ROLE_DTYPES[role]:
            raise fail(f"{label}: dtype {dtype_name!r} is not one of {list(ROLE_DTYPES[role])}")
        dtype = DTYPES[dtype_name]
        count = _nonneg_int(spec["count"], f"{label} count", fail)
        offset = _nonneg_int(spec["offset"], f"{label} offset", fail)
        length = _nonneg_int(spec["length"], f"{label} length", fail)
        if count * dtype.itemsize != length:
            raise fail(f"{label}: count {count} x itemsize {dtype.itemsize} != length {length}")
        if offset % ALIGN:
            raise fail(f"{label}: offset {offset} is not a multiple of {ALIGN}")
        if offset + length > data.size:
            raise fail(f"{label}: bytes [{offset}, {offset + length}) run past the {data.size}-byte data region")
        array = data[offset:offset + length].view(dtype)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if array.dtype != np.float32 and dtype.kind == "f":
            array = array.astype(np.float32)  # fp16 -> fp32 is exact
        array.flags.writeable = False
        arrays[role] = array
        spans.append((offset, offset + length, label))

    if layout == "dense":
        values = arrays["data"]
        if values.size != math.prod(shape):
            raise fail(f"{where}: {values.size} elements do not fill shape {list(shape)}")
        if not np.isfinite(values).all():
            raise fail(f"{where}: holds non-finite values")
        return name, values.reshape(shape), spans
    tensor = CSRTensor(shape, arrays["indptr"], arrays["indices"], arrays["values"])
    try:
        check_csr(tensor, name)
    except CSRError as e:
        raise fail(str(e)) from e
    return name, tensor, spans


def _check_layout_gaps(data: np.ndarray, spans: list[tuple[int, int, str]], fail: Fail) -> None:
    """Arrays must not overlap, and every byte outside them must be zero."""
    cursor, previous = 0, "start of data region"
    for start, end, label in sorted(spans):
        if start == end:
            continue  # an empty array covers no byte
        if start < cursor:
            raise fail(f"{label}: bytes [{start}, {end}) overlap {previous}")
        if data[cursor:start].any():
            raise fail(f"padding bytes [{cursor}, {start}) of the data region are not zero")
        cursor, previous = end, label
    if data[cursor:].any():
        raise fail(f"padding bytes [{cursor}, {data.size}) at the end of the data region are not zero")


def _check_value_sizes(shapes: dict[str, tuple[int, ...]], fail: Fail) -> None:
    for value, shape in shapes.items():
        if math.prod(shape) > MAX_VALUE_ELEMENTS:
            raise fail(f"header.graph: value {value!r} of shape {shape} has more than {MAX_VALUE_ELEMENTS} elements")


def _inflate(stored: bytes, fail: Fail) -> bytes:
    """The header JSON bytes of one complete zlib stream, refusing more than MAX_HEADER_BYTES of output."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(stored, MAX_HEADER_BYTES + 1)  # one byte more detects an overlong header
    except zlib.error as e:
        raise fail(f"header is not a valid zlib stream: {e}") from e
    if len(text) > MAX_HEADER_BYTES:
        raise fail(f"header inflates to more than {MAX_HEADER_BYTES} bytes")
    if not inflater.eof:  # all input consumed (the output limit was not hit), yet the stream goes on
        raise fail(f"header zlib stream is truncated: it does not end within header_length {len(stored)}")
    if inflater.unused_data:
        raise fail(f"{len(inflater.unused_data)} bytes follow the end of the header zlib stream "
                   f"within header_length {len(stored)}")
    return text


def _fields(obj: Any, keys: tuple[str, ...], what: str, strict: bool, fail: Fail) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise fail(f"{what} must be an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise fail(f"{what} lacks fields {missing}")
    unknown = sorted(set(obj) - set(keys))
    if strict and unknown:
        raise fail(f"{what} has unknown fields {unknown[:5]}")
    return obj


def _nonneg_int(v: Any, what: str, fail: Fail) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise fail(f"{what} must be a non-negative integer, got {v!r}")
    return v


class _HeaderSyntaxError(ValueError):
    pass


def _decode_header(text: bytes) -> Any:
    """Strict JSON: UTF-8, unique keys, int64 integers, finite numbers; raises ValueError."""
    return json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys, parse_int=_bounded_int,
                      parse_float=_finite_float, parse_constant=_no_constant)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _HeaderSyntaxError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _bounded_int(text: str) -> int:
    if len(text) > 20:
        raise _HeaderSyntaxError(f"integer {text[:24]}... is out of the int64 range")
    value = int(text)
    if not -_INT64 <= value < _INT64:
        raise _HeaderSyntaxError(f"integer {text} is out of the int64 range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _HeaderSyntaxError(f"number {text[:24]} overflows a double")
    return value


def _no_constant(text: str) -> float:
    raise _HeaderSyntaxError(f"{text} is not JSON")
