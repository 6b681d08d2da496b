"""Property: a mutated bundle loads as the same model or raises BundleError, nothing else.

Hypothesis draws a base bundle (fp32 or fp16), a mutation kind and its details;
each example writes one mutated file and loads it. Header edits are re-packed
(re-compressed, with a recomputed header SHA-256), array edits with a recomputed
data SHA-256, and broken header streams with a matching header SHA-256, so the
checks behind the hashes are what has to catch them.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harp.export.bundle import BundleError, load_bundle, write_bundle
from harp.export.csr import CSRTensor
from harp.export.graph import Graph, Node

N_BUNDLES = 10_000
PREAMBLE = struct.Struct("<8sHHIQ32s")
WHITELIST = ["float32", "float16", "uint8", "uint16", "uint32", "uint64"]
FOREIGN_DTYPES = ["object", "O", "|O", "float64", "int8", "int64", "bool", "<f4", ">u2", "V8", "complex64", "",
                  "pickle"]
CSR_KINDS = ("csr_out_of_range", "csr_decreasing", "csr_unsorted", "csr_nonfinite")


def align(n: int) -> int:
    return (n + 15) // 16 * 16


def tiny_graph() -> Graph:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0
    w[:, 0, 0, 0], w[:, 1, 2, 2] = 1.5, -0.5  # every row has >= 2 entries
    fc = np.array([[1, 0, 2], [0, 3, 4]], np.float32)
    tensors = {"conv.weight": w, "conv.bias": rng.standard_normal(3).astype(np.float32),
               "bn.scale": np.ones(3, np.float32), "bn.shift": np.zeros(3, np.float32), "fc.weight": fc}
    nodes = [
        Node("conv2d", "conv", ("x",), "c", {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
             {"weight": "conv.weight", "bias": "conv.bias"}),
        Node("affine", "bn", ("c",), "b", {}, {"scale": "bn.scale", "shift": "bn.shift"}),
        Node("relu", "relu", ("b",), "r"),
        Node("global_avgpool", "gap", ("r",), "g"),
        Node("flatten", "flat", ("g",), "f"),
        Node("linear", "fc", ("f",), "y", {}, {"weight": "fc.weight"}),
    ]
    return Graph("x", (2, 4, 4), "y", nodes, tensors)


@dataclass(frozen=True)
class Base:
    raw: bytes
    header_end: int  # file offset where the stored (compressed) header ends
    header: dict[str, Any]
    data: bytes
    structure: dict[str, Any]
    tensors: dict[str, tuple[bool, np.ndarray]]  # name -> (is CSR, dense float32 value)


def make_base(directory: Path, values_dtype: str) -> Base:
    path = directory / f"base-{values_dtype}.hcsr"
    write_bundle(tiny_graph(), path, values_dtype=values_dtype, meta={"architecture": "tiny", "n": [1, 2]})
    raw = path.read_bytes()
    *_, header_length, _ = PREAMBLE.unpack_from(raw)
    end = PREAMBLE.size + header_length
    loaded = load_bundle(path)
    return Base(raw, end, json.loads(zlib.decompress(raw[PREAMBLE.size:end])), raw[align(end):],
                loaded.graph.structure_json(), {k: _value(t) for k, t in loaded.graph.tensors.items()})


def _value(t: np.ndarray | CSRTensor) -> tuple[bool, np.ndarray]:
    return (True, t.to_dense()) if isinstance(t, CSRTensor) else (False, np.asarray(t))


def assemble(stored: bytes, data: bytes | bytearray) -> bytes:
    """A 2.0 file of the stored header bytes and the data region, with a matching preamble."""
    head = PREAMBLE.pack(b"\x89HARPCSR", 2, 0, 0, len(stored), hashlib.sha256(stored).digest()) + stored
    return head + bytes(align(len(head)) - len(head)) + bytes(data)


def pack(header: Any, data: bytes | bytearray) -> bytes:
    return assemble(zlib.compress(json.dumps(header).encode()), data)


def seal(header: dict[str, Any], data: bytes | bytearray) -> None:
    """Make header.data_sha256 match `data` after an edit of the data region."""
    header["data_sha256"] = hashlib.sha256(data).hexdigest()


def copy_header(base: Base) -> dict[str, Any]:
    return json.loads(json.dumps(base.header))


def arrays(header: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(e["name"], role, spec) for e in header["tensors"] for role, spec in e["arrays"].items()]


# ---------------------------------------------------------------- mutations
# Each takes hypothesis' `draw` and the base bundle and returns the mutated file bytes.


def m_flip(draw: Any, base: Base) -> bytes:
    raw = bytearray(base.raw)
    lo, hi = draw(st.sampled_from([(0, PREAMBLE.size), (PREAMBLE.size, base.header_end), (base.header_end, len(raw)),
                                   (0, len(raw))]))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(lo, min(hi, len(raw)) - 1))
        raw[pos] ^= draw(st.integers(1, 255))
    return bytes(raw)


def m_truncate(draw: Any, base: Base) -> bytes:
    return base.raw[:draw(st.integers(0, len(base.raw) - 1))]


def m_extend(draw: Any, base: Base) -> bytes:
    return base.raw + draw(st.binary(min_size=1, max_size=130))


def _csr_edit(draw: Any, base: Base, role: str, fn: Any) -> bytes:
    """Apply fn(array, entry) to one CSR array, recompute its hash, re-pack."""
    header, data = copy_header(base), bytearray(base.data)
    entry = draw(st.sampled_from([e for e in header["tensors"] if e["layout"] == "csr"]))
    spec = entry["arrays"][role]
    start, end = spec["offset"], spec["offset"] + spec["length"]
    array = np.frombuffer(bytes(data[start:end]), np.dtype(spec["dtype"]).newbyteorder("<")).copy()
    indptr_spec = entry["arrays"]["indptr"]
    indptr = np.frombuffer(data[indptr_spec["offset"]:indptr_spec["offset"] + indptr_spec["length"]],
                           np.dtype(indptr_spec["dtype"]).newbyteorder("<")).astype(np.int64)
    fn(array, entry, indptr)
    data[start:end] = array.tobytes()
    seal(header, data)
    return pack(header, data)


def m_csr_out_of_range(draw: Any, base: Base) -> bytes:
    def fn(indices: np.ndarray, entry: dict[str, Any], indptr: np.ndarray) -> None:
        n_cols = int(np.prod(entry["shape"][1:]))
        k = draw(st.integers(0, indices.size - 1))
        indices[k] = draw(st.integers(n_cols, np.iinfo(indices.dtype).max))
    return _csr_edit(draw, base, "indices", fn)


def m_csr_decreasing(draw: Any, base: Base) -> bytes:
    def fn(ptr: np.ndarray, entry: dict[str, Any], indptr: np.ndarray) -> None:
        r = draw(st.integers(1, ptr.size - 2))  # an interior entry
        ptr[r] = draw(st.integers(int(ptr[r + 1]) + 1, np.iinfo(ptr.dtype).max))
    return _csr_edit(draw, base, "indptr", fn)


def m_csr_unsorted(draw: Any, base: Base) -> bytes:
    def fn(indices: np.ndarray, entry: dict[str, Any], indptr: np.ndarray) -> None:
        row = draw(st.sampled_from([r for r in range(indptr.size - 1) if indptr[r + 1] - indptr[r] >= 2]))
        k = draw(st.integers(int(indptr[row]) + 1, int(indptr[row + 1]) - 1))
        indices[k] = indices[k - 1] - draw(st.integers(0, int(indices[k - 1])))  # duplicate or smaller
    return _csr_edit(draw, base, "indices", fn)


def m_csr_nonfinite(draw: Any, base: Base) -> bytes:
    def fn(values: np.ndarray, entry: dict[str, Any], indptr: np.ndarray) -> None:
        values[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return _csr_edit(draw, base, "values", fn)


def _header_edit(draw: Any, base: Base, fn: Any) -> bytes:
    header, data = copy_header(base), bytearray(base.data)
    fn(header, data)
    return pack(header, data)


def m_dtype(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:
        _, _, spec = draw(st.sampled_from(arrays(header)))
        spec["dtype"] = draw(st.sampled_from(WHITELIST + FOREIGN_DTYPES + [None, 4, ["float32"]]))
    return _header_edit(draw, base, fn)


def m_shape(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:
        entry = draw(st.sampled_from(header["tensors"]))
        shape = entry["shape"]
        how = draw(st.sampled_from(["zero", "rows", "second", "append", "drop", "type"]))
        if how == "zero":
            shape[draw(st.integers(0, len(shape) - 1))] = 0
        elif how in ("rows", "second"):
            i = 0 if how == "rows" else min(1, len(shape) - 1)
            shape[i] += draw(st.integers(-3, 3).filter(bool))
        elif how == "append":
            shape.append(1)
        elif how == "drop":
            shape.pop()
        else:
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from([1.5, "3", None, True, [2], -1]))
    return _header_edit(draw, base, fn)


def m_offset(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:
        table = arrays(header)
        _, _, spec = draw(st.sampled_from(table))
        spec["offset"] = draw(st.one_of(
            st.sampled_from([s["offset"] for _, _, s in table]),  # onto another array: overlap
            st.integers(0, header["data_size"] + 256),
            st.sampled_from([spec["offset"] + 16, spec["offset"] - 16, spec["offset"] + 8, spec["offset"] + 64,
                             -16, 1 << 62, 1 << 64, "0", 0.0])))
    return _header_edit(draw, base, fn)


def m_count(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:
        _, _, spec = draw(st.sampled_from(arrays(header)))
        itemsize = spec["length"] // max(spec["count"], 1) or 1
        spec["count"] = max(0, spec["count"] + draw(st.integers(-5, 5).filter(bool)))
        if draw(st.booleans()):
            spec["length"] = spec["count"] * itemsize  # consistent, so only other checks can object
    return _header_edit(draw, base, fn)


def m_length(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:
        _, _, spec = draw(st.sampled_from(arrays(header)))
        spec["length"] = draw(st.one_of(st.integers(-8, header["data_size"] + 64), st.sampled_from([None, 2.0])))
    return _header_edit(draw, base, fn)


def m_pickle(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:
        payload = pickle.dumps(draw(st.tuples(st.text(max_size=8), st.integers())))
        offset = align(len(data))
        data.extend(bytes(offset - len(data)) + payload)
        header["data_size"] = len(data)
        seal(header, data)
        spec = {"dtype": draw(st.sampled_from(["object", "O", "uint8", "pickle"])), "count": len(payload),
                "offset": offset, "length": len(payload)}
        if draw(st.booleans()):
            _, _, target = draw(st.sampled_from(arrays(header)))
            target.update(spec)  # an existing array now points at the pickle
        else:
            header["tensors"].append({"name": "payload", "layout": "dense", "shape": [len(payload)],
                                      "arrays": {"data": spec}})
    return _header_edit(draw, base, fn)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        out.extend(_paths(value, prefix + (key,)))
    return out


def _kind(v: Any) -> str:
    return "number" if isinstance(v, int | float) and not isinstance(v, bool) else type(v).__name__


OTHER_VALUES = [0, -1, 2.5, 1 << 62, "", "x", "float32", None, True, False, [], [1, 2], {}, {"a": 1}]


def m_type_confusion(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:
        path = draw(st.sampled_from(_paths(header)[1:]))
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
        parent[path[-1]] = draw(st.sampled_from([v for v in OTHER_VALUES if _kind(v) != _kind(old)]))
    return _header_edit(draw, base, fn)


def m_delete_key(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:
        path = draw(st.sampled_from([p for p in _paths(header)[1:] if not isinstance(p[-1], int)]))
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
    return _header_edit(draw, base, fn)


def m_data_size(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:
        header["data_size"] = draw(st.one_of(st.integers(-1, 2 * header["data_size"]),
                                             st.sampled_from([None, "12", 1e3, 1 << 63])))
    return _header_edit(draw, base, fn)


def m_data_sha256(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:
        header["data_sha256"] = draw(st.one_of(st.text("0123456789abcdefABCDEF", min_size=63, max_size=65),
                                               st.just(header["data_sha256"].upper()),
                                               st.just(hashlib.sha256(data + b"\x00").hexdigest()),
                                               st.sampled_from([None, 0, []])))
    return _header_edit(draw, base, fn)


def m_array_sha256(draw: Any, base: Base) -> bytes:
    def fn(header: dict[str, Any], data: bytearray) -> None:  # the 1.0 per-array field is unknown in 2.0
        _, _, spec = draw(st.sampled_from(arrays(header)))
        spec["sha256"] = hashlib.sha256(b"").hexdigest()
    return _header_edit(draw, base, fn)


def m_stream(draw: Any, base: Base) -> bytes:
    """Replace the stored header by another byte string, with a matching header SHA-256."""
    stored = base.raw[PREAMBLE.size:base.header_end]
    text = zlib.decompress(stored)
    how = draw(st.sampled_from(["flip", "cut", "trailing", "recompress", "raw_deflate", "gzip", "garbage"]))
    if how == "flip":
        edited = bytearray(stored)
        for _ in range(draw(st.integers(1, 3))):
            edited[draw(st.integers(0, len(edited) - 1))] ^= draw(st.integers(1, 255))
        stored = bytes(edited)
    elif how == "cut":
        stored = stored[:draw(st.integers(0, len(stored) - 1))]
    elif how == "trailing":
        stored += draw(st.binary(min_size=1, max_size=16))
    elif how in ("recompress", "raw_deflate", "gzip"):  # only a complete zlib stream may load
        wbits = {"recompress": 15, "raw_deflate": -15, "gzip": 31}[how]
        deflate = zlib.compressobj(draw(st.integers(0, 9)), zlib.DEFLATED, wbits)
        stored = deflate.compress(text) + deflate.flush()
    else:
        stored = draw(st.binary(max_size=64))
    return assemble(stored, base.data)


def m_preamble(draw: Any, base: Base) -> bytes:
    magic, major, minor, flags, length, digest = PREAMBLE.unpack_from(base.raw)
    field = draw(st.sampled_from(["major", "minor", "flags", "length"]))
    values = {"major": major, "minor": minor, "flags": flags, "length": length}
    values[field] = draw(st.integers(0, (1 << 16) - 1 if field in ("major", "minor") else (1 << 32) - 1))
    head = PREAMBLE.pack(magic, values["major"], values["minor"], values["flags"], values["length"], digest)
    return head + base.raw[PREAMBLE.size:]


MUTATIONS = {
    "flip": m_flip, "truncate": m_truncate, "extend": m_extend, "preamble": m_preamble,
    "csr_out_of_range": m_csr_out_of_range, "csr_decreasing": m_csr_decreasing,
    "csr_unsorted": m_csr_unsorted, "csr_nonfinite": m_csr_nonfinite,
    "dtype": m_dtype, "shape": m_shape, "offset": m_offset, "count": m_count, "length": m_length,
    "pickle": m_pickle, "type_confusion": m_type_confusion, "delete_key": m_delete_key,
    "data_size": m_data_size, "data_sha256": m_data_sha256, "array_sha256": m_array_sha256, "stream": m_stream,
}


@st.composite
def mutated(draw: Any, bases: list[Base]) -> tuple[int, str, bytes]:
    i = draw(st.integers(0, len(bases) - 1))
    kind = draw(st.sampled_from(sorted(MUTATIONS)))
    return i, kind, MUTATIONS[kind](draw, bases[i])


def assert_same_model(loaded: Any, base: Base) -> None:
    assert loaded.graph.structure_json() == base.structure
    assert set(loaded.graph.tensors) == set(base.tensors)
    for name, (is_csr, value) in base.tensors.items():
        got_csr, got = _value(loaded.graph.tensors[name])
        assert got_csr == is_csr, name
        np.testing.assert_array_equal(got, value, err_msg=name)


def test_mutated_bundles_load_equivalent_or_raise_bundle_error(tmp_path: Path) -> None:
    bases = [make_base(tmp_path, "float32"), make_base(tmp_path, "float16")]
    outcomes: Counter[tuple[str, str]] = Counter()

    @settings(max_examples=N_BUNDLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated(bases))
    def one(case: tuple[int, str, bytes]) -> None:
        i, kind, raw = case
        # A fresh file each time: on ext4, truncating and rewriting one file costs milliseconds.
        target = tmp_path / f"mutated-{sum(outcomes.values())}.hcsr"
        target.write_bytes(raw)
        try:
            loaded = load_bundle(target)
        except BundleError as e:
            assert "unexpected" not in str(e), str(e)  # a named check caught it, not the last-resort wrapper
            outcomes[kind, "rejected"] += 1
            return
        finally:
            target.unlink()
        outcomes[kind, "loaded"] += 1
        assert_same_model(loaded, bases[i])

    start = time.perf_counter()
    one()
    elapsed = time.perf_counter() - start
    total = sum(outcomes.values())
    print(f"\n{total} mutated bundles loaded in {elapsed:.1f} s: "
          + ", ".join(f"{k}/{o}={n}" for (k, o), n in sorted(outcomes.items())))
    assert total >= N_BUNDLES
    for kind in MUTATIONS:
        assert outcomes[kind, "rejected"] > 0, kind  # every mutation family was exercised and caught
    for kind in (*CSR_KINDS, "pickle", "truncate", "extend"):
        assert outcomes[kind, "loaded"] == 0, kind  # never silently accepted
