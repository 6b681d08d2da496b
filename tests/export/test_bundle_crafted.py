"""Hand-crafted hostile bundles: valid hashes everywhere, one broken invariant each.

The bundles are re-packed here from the byte layout of docs/bundle-format.md (2.0:
zlib-compressed header, one data SHA-256, 16-byte alignment), not with the
writer, so these tests also pin the documented layout.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harp.export.bundle import BundleError, load_bundle, write_bundle
from harp.export.csr import CSRTensor
from harp.export.graph import Graph, Node

PREAMBLE = struct.Struct("<8sHHIQ32s")
MAGIC = b"\x89HARPCSR"
MAX_HEADER_BYTES = 64 << 20


def align(n: int) -> int:
    return (n + 15) // 16 * 16


def split(raw: bytes) -> tuple[dict[str, Any], bytearray]:
    """(inflated header, data region) of a 2.0 bundle."""
    *_, header_length, _ = PREAMBLE.unpack_from(raw)
    end = PREAMBLE.size + header_length
    return json.loads(zlib.decompress(raw[PREAMBLE.size:end])), bytearray(raw[align(end):])


def assemble(stored: bytes, data: bytes, major: int = 2, minor: int = 0) -> bytes:
    """A file of the stored header bytes (normally a zlib stream) and the data region, with a matching preamble."""
    head = PREAMBLE.pack(MAGIC, major, minor, 0, len(stored), hashlib.sha256(stored).digest()) + stored
    return head + bytes(align(len(head)) - len(head)) + bytes(data)


def pack(header: dict[str, Any], data: bytes, major: int = 2, minor: int = 0) -> bytes:
    return assemble(zlib.compress(json.dumps(header).encode()), data, major, minor)


def seal(header: dict[str, Any], data: bytes) -> None:
    """Make header.data_sha256 match `data`, as an attacker who edits the data region would."""
    header["data_sha256"] = hashlib.sha256(data).hexdigest()


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
    """Apply fn to one stored array in place and give the data region a matching SHA-256."""
    entry = array_entry(header, tensor, role)
    start, end = entry["offset"], entry["offset"] + entry["length"]
    array = np.frombuffer(bytes(data[start:end]), dtype=np.dtype(entry["dtype"]).newbyteorder("<")).copy()
    fn(array)
    data[start:end] = array.tobytes()
    seal(header, data)


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
    seal(header, data)
    entry = array_entry(header, "conv.bias", "data")
    entry.update(dtype="object", count=len(payload), offset=offset, length=len(payload))
    with pytest.raises(BundleError, match=r"'conv.bias' array 'data': dtype 'object' is not one of"):
        load(tmp_path, pack(header, data))


@pytest.mark.parametrize("edit, match", [
    (lambda h: array_entry(h, "conv.weight", "values").update(dtype="uint32"), "dtype 'uint32' is not one of"),
    (lambda h: array_entry(h, "conv.weight", "indices").update(offset=1), "offset 1 is not a multiple of 16"),
    (lambda h: array_entry(h, "conv.weight", "values").update(offset=array_entry(h, "conv.weight", "values")["offset"]
                                                               + 8), r"offset \d+ is not a multiple of 16"),
    (lambda h: array_entry(h, "conv.weight", "indices").update(
        offset=array_entry(h, "conv.weight", "indptr")["offset"]), "'conv.weight' array 'indptr': bytes .* overlap"),
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
    (lambda h: h.pop("data_sha256"), r"header lacks fields \['data_sha256'\]"),
    (lambda h: h.update(data_sha256=h["data_sha256"].upper()), "header.data_sha256 must be 64 lowercase hex"),
    (lambda h: h.update(data_sha256="0" * 64), "header.data_sha256 does not match the data region"),
    (lambda h: array_entry(h, "fc.weight", "values").update(sha256="0" * 64), r"unknown fields \['sha256'\]"),
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
    seal(header, data)
    entry.update(layout="dense", arrays={"data": {"dtype": "float32", "count": 72, "offset": offset,
                                                  "length": len(dense)}})
    with pytest.raises(BundleError, match=r"'conv.weight': stored as dense, but node 'conv' \(conv2d\) takes"):
        load(tmp_path, pack(header, data))


def test_version_policy(tmp_path: Path, valid: bytes) -> None:
    header, data = split(valid)
    with pytest.raises(BundleError, match=r"format version 3\.0 is not supported \(this reader reads 2\.x\)"):
        load(tmp_path, pack(header, data, major=3))
    header["future_field"] = {"x": 1}
    with pytest.raises(BundleError, match="unknown fields"):
        load(tmp_path, pack(header, data, minor=0))
    assert load(tmp_path, pack(header, data, minor=1)).version == (2, 1)  # newer minor: ignored


@pytest.mark.parametrize("edit, match", [
    # each had been accepted and run without it: a reflect-padded conv ran with zero padding
    (lambda g: g["nodes"][0]["attrs"].update(padding_mode="reflect"),
     r"node 'conv'.*unknown attributes \['padding_mode'\]"),
    (lambda g: g["nodes"][1].update(activation="relu"), r"node .* has unknown fields \['activation'\]"),
    (lambda g: g.update(future=1), r"graph has unknown fields \['future'\]"),
    (lambda g: g["input"].update(layout="NHWC"), r"graph input has unknown fields \['layout'\]"),
    (lambda g: g["output"].update(softmax=True), r"graph output has unknown fields \['softmax'\]"),
    (lambda g: g.update(version=1.0), "graph version 1.0 is not supported"),
])
def test_unknown_graph_fields_are_refused_at_any_minor(tmp_path: Path, valid: bytes, edit: Any, match: str) -> None:
    header, data = split(valid)
    edit(header["graph"])
    for minor in (0, 1):  # a new graph field bumps graph.version, not the file's minor
        with pytest.raises(BundleError, match=match):
            load(tmp_path, pack(header, data, minor=minor))


def test_format_1_0_file_is_refused_in_one_clear_line(tmp_path: Path, valid: bytes) -> None:
    # A 1.0 file: plain JSON header with per-array hashes, 64-byte alignment. The reader stops at its preamble.
    header, data = split(valid)
    del header["data_sha256"]
    for entry in header["tensors"]:
        for spec in entry["arrays"].values():
            spec["sha256"] = hashlib.sha256(data[spec["offset"]:spec["offset"] + spec["length"]]).hexdigest()
    text = json.dumps(header).encode()
    head = PREAMBLE.pack(MAGIC, 1, 0, 0, len(text), hashlib.sha256(text).digest()) + text
    path = tmp_path / "old.hcsr"
    path.write_bytes(head + bytes(-len(head) % 64) + data)
    with pytest.raises(BundleError) as e:
        load_bundle(path)
    assert str(e.value) == f"bundle {path}: format version 1.0 is not supported (re-export with this harp version)"


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
    with pytest.raises(BundleError, match=match):
        load(tmp_path, assemble(zlib.compress(text), data))


def test_overlapping_arrays_are_rejected(tmp_path: Path, valid: bytes) -> None:
    header, data = split(valid)
    bias, indptr = array_entry(header, "conv.bias", "data"), array_entry(header, "fc.weight", "indptr")
    data[bias["offset"]:bias["offset"] + bias["length"]] = bytes(bias["length"])  # leave no stray bytes behind
    bias["offset"] = indptr["offset"]  # 16 bytes: fc.weight's 8-byte indptr (finite as float32) and zero padding
    seal(header, data)
    with pytest.raises(BundleError, match=r"'conv.bias' array 'data': bytes \[\d+, \d+\) overlap tensor 'fc.weight' "
                                          r"array 'indptr'"):
        load(tmp_path, pack(header, data))


def test_header_and_data_hashes_cover_their_bytes(tmp_path: Path, valid: bytes) -> None:
    *_, header_length, _ = PREAMBLE.unpack_from(valid)
    raw = bytearray(valid)
    raw[PREAMBLE.size + header_length // 2] ^= 0x01  # inside the stored header
    with pytest.raises(BundleError, match="header SHA-256 does not match the preamble"):
        load(tmp_path, bytes(raw))
    raw = bytearray(valid)
    raw[-1] ^= 0x01  # the last byte of the data region
    with pytest.raises(BundleError, match="header.data_sha256 does not match the data region"):
        load(tmp_path, bytes(raw))
    header, data = split(valid)
    data[-1] ^= 0x01
    seal(header, data)  # with a matching hash, the value checks behind it still run
    assert load(tmp_path, pack(header, data)).graph


def with_preset_dictionary(stored: bytes) -> bytes:
    """The same header as a zlib stream that needs a preset dictionary (which the format never has)."""
    deflate = zlib.compressobj(zdict=b'"graph"')
    return deflate.compress(zlib.decompress(stored)) + deflate.flush()


@pytest.mark.parametrize("restream, match", [
    (lambda s: b"not a zlib stream", "header is not a valid zlib stream"),
    (lambda s: s[:-4] + bytes(a ^ 0xFF for a in s[-4:]), "header is not a valid zlib stream.*data check"),
    (lambda s: gzip.compress(zlib.decompress(s), mtime=0), "header is not a valid zlib stream.*header check"),
    (with_preset_dictionary, "header is not a valid zlib stream"),
    (lambda s: s[:-6], "header zlib stream is truncated"),
    (lambda s: b"", "header zlib stream is truncated"),
    (lambda s: s + b"\x00", "1 bytes follow the end of the header zlib stream"),
    (lambda s: s + s, r"\d+ bytes follow the end of the header zlib stream"),
    (lambda s: zlib.compress(b"\xff\xfe{}"), "header is not well-formed JSON"),
])
def test_broken_header_stream_is_refused(tmp_path: Path, valid: bytes, restream: Any, match: str) -> None:
    *_, header_length, _ = PREAMBLE.unpack_from(valid)
    stored = valid[PREAMBLE.size:PREAMBLE.size + header_length]
    _, data = split(valid)
    with pytest.raises(BundleError, match=match):
        load(tmp_path, assemble(restream(stored), data))  # the preamble hash matches the broken stream


@pytest.mark.parametrize("level", [0, 1, 6])
def test_any_complete_zlib_stream_of_the_header_is_accepted(tmp_path: Path, valid: bytes, level: int) -> None:
    header, data = split(valid)
    loaded = load(tmp_path, assemble(zlib.compress(json.dumps(header, indent=1).encode(), level), data))
    assert loaded.header == header


def test_decompression_bomb_is_stopped_at_the_limit(tmp_path: Path, valid: bytes) -> None:
    _, data = split(valid)
    deflate, block = zlib.compressobj(9), bytes(16 << 20)
    bomb = b"".join(deflate.compress(block) for _ in range(8)) + deflate.flush()  # 128 MiB of zeros
    assert len(bomb) < (MAX_HEADER_BYTES >> 9)
    with pytest.raises(BundleError, match=f"header inflates to more than {MAX_HEADER_BYTES} bytes"):
        load(tmp_path, assemble(bomb, data))
