"""Hand-crafted hostile bundles: valid hashes everywhere, one broken invariant each.

The bundles are re-packed here from the byte layout of docs/bundle-format.md, not
with the writer, so these tests also pin the documented layout.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harp.export.bundle import BundleError, load_bundle, write_bundle
from harp.export.csr import CSRTensor
from harp.export.graph import Graph, Node

PREAMBLE = struct.Struct("<8sHHIQ32s")


def align(n: int) -> int:
    return (n + 63) // 64 * 64


def split(raw: bytes) -> tuple[dict[str, Any], bytearray]:
    *_, header_length, _ = PREAMBLE.unpack_from(raw)
    end = PREAMBLE.size + header_length
    return json.loads(raw[PREAMBLE.size:end]), bytearray(raw[align(end):])


def pack(header: dict[str, Any], data: bytes, major: int = 1, minor: int = 0) -> bytes:
    text = json.dumps(header).encode()
    head = PREAMBLE.pack(b"\x89HARPCSR", major, minor, 0, len(text), hashlib.sha256(text).digest()) + text
    return head + bytes(align(len(head)) - len(head)) + bytes(data)


def tiny_graph() -> Graph:
    w = np.zeros((4, 2, 3, 3), np.float32)
    w[:, 0, 1, 1] = [1, 2, 3, 4]
    w[1, 1, 2, 2] = 5
    tensors = {"conv.weight": w, "conv.bias": np.ones(4, np.float32),
               "fc.weight": np.eye(3, 4, dtype=np.float32)}
    nodes = [
        Node("conv2d", "conv", ("x",), "c", {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
             {"weight": "conv.weight", "bias": "conv.bias"}),
        Node("global_avgpool", "gap", ("c",), "g"),
        Node("flatten", "flat", ("g",), "f"),
        Node("linear", "fc", ("f",), "y", {}, {"weight": "fc.weight"}),
    ]
    return Graph("x", (2, 5, 5), "y", nodes, tensors)


@pytest.fixture
def valid(tmp_path: Path) -> bytes:
    write_bundle(tiny_graph(), tmp_path / "valid.hcsr", meta={"architecture": "tiny"})
    return (tmp_path / "valid.hcsr").read_bytes()


def array_entry(header: dict[str, Any], tensor: str, role: str) -> dict[str, Any]:
    return next(e for e in header["tensors"] if e["name"] == tensor)["arrays"][role]


def rewrite_array(header: dict[str, Any], data: bytearray, tensor: str, role: str, fn: Any) -> None:
    """Apply fn to one stored array in place and give it a matching SHA-256."""
    entry = array_entry(header, tensor, role)
    start, end = entry["offset"], entry["offset"] + entry["length"]
    array = np.frombuffer(bytes(data[start:end]), dtype=np.dtype(entry["dtype"]).newbyteorder("<")).copy()
    fn(array)
    data[start:end] = array.tobytes()
    entry["sha256"] = hashlib.sha256(data[start:end]).hexdigest()


def load(tmp_path: Path, raw: bytes) -> Any:
    (tmp_path / "crafted.hcsr").write_bytes(raw)
    return load_bundle(tmp_path / "crafted.hcsr")


def test_repacking_unchanged_is_still_valid(tmp_path: Path, valid: bytes) -> None:
    header, data = split(valid)
    loaded = load(tmp_path, pack(header, data))
    assert isinstance(loaded.graph.tensors["conv.weight"], CSRTensor)
    np.testing.assert_array_equal(loaded.graph.tensors["conv.weight"].to_dense(), tiny_graph().tensors["conv.weight"])


def test_out_of_range_column_with_valid_hashes_is_rejected(tmp_path: Path, valid: bytes) -> None:
    header, data = split(valid)

    def push_out(indices: np.ndarray) -> None:
        indices[-1] = 18  # conv.weight has 2*3*3 = 18 columns: 18 is one past the end

    rewrite_array(header, data, "conv.weight", "indices", push_out)
    with pytest.raises(BundleError, match=r"'conv.weight'.*column index 18 .*out of range for 18 columns"):
        load(tmp_path, pack(header, data))


def test_decreasing_indptr_with_valid_hashes_is_rejected(tmp_path: Path, valid: bytes) -> None:
    header, data = split(valid)

    def swap(indptr: np.ndarray) -> None:
        indptr[1], indptr[2] = indptr[2] + 1, indptr[1]

    rewrite_array(header, data, "fc.weight", "indptr", swap)
    with pytest.raises(BundleError, match=r"'fc.weight'.*indptr decreases"):
        load(tmp_path, pack(header, data))


def test_pickle_payload_as_object_array_is_refused(tmp_path: Path, valid: bytes) -> None:
    header, data = split(valid)
    payload = pickle.dumps({"evil": ["os.system", "echo pwned"]})
    offset = align(len(data))
    data.extend(bytes(offset - len(data)) + payload)
    header["data_size"] = len(data)
    entry = array_entry(header, "conv.bias", "data")
    entry.update(dtype="object", count=len(payload), offset=offset, length=len(payload),
                 sha256=hashlib.sha256(payload).hexdigest())
    with pytest.raises(BundleError, match=r"'conv.bias' array 'data': dtype 'object' is not one of"):
        load(tmp_path, pack(header, data))


@pytest.mark.parametrize("edit, match", [
    (lambda h: array_entry(h, "conv.weight", "values").update(dtype="uint32"), "dtype 'uint32' is not one of"),
    (lambda h: array_entry(h, "conv.weight", "indices").update(offset=1), "offset 1 is not a multiple of 64"),
    (lambda h: array_entry(h, "conv.weight", "indices").update(
        offset=array_entry(h, "conv.weight", "indptr")["offset"]), "overlap|SHA-256"),
    (lambda h: array_entry(h, "fc.weight", "values").update(count=2), r"count 2 x itemsize 4 != length"),
    (lambda h: array_entry(h, "fc.weight", "values").update(offset=1 << 40), "run past"),
    (lambda h: h["tensors"][0].update(shape=[5, 2, 3, 3]), "'conv.weight'.*indptr has 5 entries"),
    (lambda h: h["tensors"][0].update(layout="dense"), "'conv.weight'.*lacks fields"),
    (lambda h: h["tensors"][0].update(shape="4x2x3x3"), "'conv.weight'.*shape must be a list"),
    (lambda h: h["tensors"].append(h["tensors"][0]), "'conv.weight' appears twice"),
    (lambda h: h["tensors"].pop(), r"padding bytes \[\d+, \d+\) at the end of the data region are not zero"),
    (lambda h: h["graph"]["nodes"][3]["params"].update(weight="fc.w"), "header.graph.*tensor 'fc.w' is missing"),
    (lambda h: h.update(extra=1), r"header has unknown fields \['extra'\]"),
    (lambda h: h.update(meta=[1]), "header.meta must be an object"),
    (lambda h: h.pop("data_size"), r"header lacks fields \['data_size'\]"),
    (lambda h: h.update(data_size=True), "header.data_size must be a non-negative integer"),
    (lambda h: h["graph"]["nodes"][0]["attrs"].update(groups=2), "node 'conv'.*groups=2"),
    (lambda h: h["graph"]["input"].update(shape=[2, 50000, 50000]), "more than 2147483647 elements"),
    (lambda h: h["graph"]["nodes"][0].update(op="conv3d"), "unknown op"),
    (lambda h: h["graph"].update(version=True), "graph version True"),
])
def test_header_edit_is_rejected_by_name(tmp_path: Path, valid: bytes, edit: Any, match: str) -> None:
    header, data = split(valid)
    edit(header)
    with pytest.raises(BundleError, match=match):
        load(tmp_path, pack(header, data))


def test_dense_stored_conv_weight_is_refused(tmp_path: Path, valid: bytes) -> None:
    header, data = split(valid)
    dense = tiny_graph().tensors["conv.weight"].astype("<f4").tobytes()
    offset = align(len(data))
    data.extend(bytes(offset - len(data)) + dense)
    header["data_size"] = len(data)
    entry = next(e for e in header["tensors"] if e["name"] == "conv.weight")
    # Drop the CSR arrays (zero their bytes so no stray data remains) and point at the dense copy.
    for spec in entry["arrays"].values():
        data[spec["offset"]:spec["offset"] + spec["length"]] = bytes(spec["length"])
    entry.update(layout="dense", arrays={"data": {"dtype": "float32", "count": 72, "offset": offset,
                                                  "length": len(dense), "sha256": hashlib.sha256(dense).hexdigest()}})
    with pytest.raises(BundleError, match=r"'conv.weight': stored as dense, but node 'conv' \(conv2d\) takes"):
        load(tmp_path, pack(header, data))


def test_version_policy(tmp_path: Path, valid: bytes) -> None:
    header, data = split(valid)
    with pytest.raises(BundleError, match="format version 2.0 is not supported"):
        load(tmp_path, pack(header, data, major=2))
    header["future_field"] = {"x": 1}
    with pytest.raises(BundleError, match="unknown fields"):
        load(tmp_path, pack(header, data, minor=0))
    assert load(tmp_path, pack(header, data, minor=1)).version == (1, 1)  # newer minor: ignored


@pytest.mark.parametrize("text_edit, match", [
    (lambda t: t.replace(b'{"graph"', b'{"meta": {}, "graph"', 1), "duplicate key 'meta'"),
    (lambda t: t.replace(b'"groups": 1', b'"groups": 1' + b"0" * 30, 1), "int64 range"),
    (lambda t: t.replace(b'"groups": 1', b'"groups": NaN', 1), "NaN is not JSON"),
    (lambda t: t.replace(b'"groups": 1', b'"groups": 1e999', 1), "overflows a double"),
    (lambda t: t.replace(b'"architecture"', b'"\xff\xfe"', 1), "not well-formed JSON"),
    (lambda t: b"[" * 100000 + b"]" * 100000, "not well-formed JSON"),
])
def test_malformed_header_text_is_refused(tmp_path: Path, valid: bytes, text_edit: Any, match: str) -> None:
    header, data = split(valid)
    text = text_edit(json.dumps(header).encode())
    head = PREAMBLE.pack(b"\x89HARPCSR", 1, 0, 0, len(text), hashlib.sha256(text).digest()) + text
    with pytest.raises(BundleError, match=match):
        load(tmp_path, head + bytes(align(len(head)) - len(head)) + data)
