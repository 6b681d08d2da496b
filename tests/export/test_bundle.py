"""CSR bundle round trips (fp32 exact, fp16 within rounding) and the atomic writer."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from harp.export import bundle as bundle_mod
from harp.export.bundle import ALIGN, BundleError, load_bundle, read_header, write_bundle
from harp.export.csr import CSRTensor
from harp.export.graph import Graph, Node

META = {"architecture": "tiny-resnet", "dataset": "synthetic", "sparsity": 0.95, "tags": ["test", "ü"]}


def sparse(rng: np.random.Generator, shape: tuple[int, ...], density: float = 0.05) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0
    w.reshape(shape[0], -1)[:, 0] = rng.standard_normal(shape[0])  # no empty filter: keep nnz > 0
    return w


def small_graph(seed: int = 0) -> Graph:
    """Every op of the graph version 1 op set, with ~95%-sparse conv/linear weights."""
    rng = np.random.default_rng(seed)

    def conv(name: str, x: str, out: str, w: tuple[int, ...], padding: int, groups: int = 1,
             bias: bool = False) -> Node:
        params = {"weight": f"{name}.weight"}
        tensors[f"{name}.weight"] = sparse(rng, w)
        if bias:
            params["bias"] = f"{name}.bias"
            tensors[f"{name}.bias"] = rng.standard_normal(w[0]).astype(np.float32)
        return Node("conv2d", name, (x,), out, {"stride": [1, 1], "padding": [padding, padding],
                                                "dilation": [1, 1], "groups": groups}, params)

    tensors: dict[str, np.ndarray] = {
        "bn1.scale": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "bn1.shift": rng.standard_normal(8).astype(np.float32),
        "fc.weight": sparse(rng, (10, 16)),
        "fc.bias": rng.standard_normal(10).astype(np.float32),
    }
    nodes = [
        Node("normalize", "norm", ("x",), "n", {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}),
        conv("conv1", "n", "c1", (8, 3, 3, 3), 1, bias=True),  # (8, 16, 16)
        Node("affine", "bn1", ("c1",), "b1", {}, {"scale": "bn1.scale", "shift": "bn1.shift"}),
        Node("relu", "relu1", ("b1",), "r1"),
        Node("maxpool2d", "pool1", ("r1",), "p1", {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0],
                                                   "dilation": [1, 1], "ceil_mode": False}),  # (8, 8, 8)
        conv("conv2", "p1", "c2", (8, 4, 3, 3), 1, groups=2),
        Node("clip", "relu6", ("c2",), "q2", {"min": 0.0, "max": 6.0}),
        Node("add", "residual", ("q2", "p1"), "s2"),
        Node("avgpool2d", "pool2", ("s2",), "p2", {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1],
                                                   "ceil_mode": True, "count_include_pad": False}),  # (8, 4, 4)
        conv("conv3", "p2", "c3", (16, 8, 1, 1), 0, bias=True),  # (16, 4, 4)
        Node("global_avgpool", "gap", ("c3",), "g"),
        Node("flatten", "flat", ("g",), "f"),
        Node("linear", "fc", ("f",), "logits", {}, {"weight": "fc.weight", "bias": "fc.bias"}),
    ]
    return Graph("x", (3, 16, 16), "logits", nodes, tensors)


def as_dense(t: np.ndarray | CSRTensor) -> np.ndarray:
    return t.to_dense() if isinstance(t, CSRTensor) else t


def test_round_trip_fp32_is_exact(tmp_path: Path) -> None:
    graph = small_graph()
    info = write_bundle(graph, tmp_path / "m.hcsr", meta=META)
    loaded = load_bundle(tmp_path / "m.hcsr")

    assert loaded.version == (bundle_mod.FORMAT_MAJOR, bundle_mod.FORMAT_MINOR)
    assert loaded.meta == META
    assert loaded.graph.structure_json() == graph.structure_json()
    assert loaded.graph.validate() == graph.validate()
    assert set(loaded.graph.tensors) == set(graph.tensors)
    for name, original in graph.tensors.items():
        t = loaded.graph.tensors[name]
        is_weight = name.endswith(".weight")
        assert isinstance(t, CSRTensor) == is_weight, name  # conv/linear weights CSR, the rest dense
        arrays = (t.indptr, t.indices, t.values) if is_weight else (t,)
        assert all(a.dtype.kind in "uf" and not a.flags.writeable for a in arrays), name
        assert as_dense(t).dtype == np.float32
        np.testing.assert_array_equal(as_dense(t), original, err_msg=name)

    raw = (tmp_path / "m.hcsr").read_bytes()
    assert info["file_bytes"] == len(raw)
    assert info["file_sha256"] == hashlib.sha256(raw).hexdigest()
    assert info["header"]["meta"] == META


def test_round_trip_fp16_is_within_rounding(tmp_path: Path) -> None:
    graph = small_graph(1)
    write_bundle(graph, tmp_path / "m16.hcsr", values_dtype="float16")
    loaded = load_bundle(tmp_path / "m16.hcsr")
    stored = {e["name"]: e for e in loaded.header["tensors"]}
    for name, original in graph.tensors.items():
        t = loaded.graph.tensors[name]
        if isinstance(t, CSRTensor):
            assert stored[name]["arrays"]["values"]["dtype"] == "float16"
            assert t.values.dtype == np.float32  # upcast at load
            np.testing.assert_allclose(t.to_dense(), original, rtol=2.0**-11, atol=6e-8, err_msg=name)
            assert not np.array_equal(t.to_dense(), original)  # it really went through fp16
        else:
            np.testing.assert_array_equal(t, original, err_msg=name)  # dense tensors stay fp32
    assert loaded.meta == {}


def test_fp16_bundle_is_smaller(tmp_path: Path) -> None:
    graph = small_graph()
    a = write_bundle(graph, tmp_path / "a", values_dtype="float32")["file_bytes"]
    b = write_bundle(graph, tmp_path / "b", values_dtype="float16")["file_bytes"]
    assert b < a


def test_rewriting_a_loaded_bundle_is_byte_identical(tmp_path: Path) -> None:
    write_bundle(small_graph(), tmp_path / "a", meta=META)
    loaded = load_bundle(tmp_path / "a")
    write_bundle(loaded.graph, tmp_path / "b", meta=loaded.meta)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_layout_is_aligned_and_narrow(tmp_path: Path) -> None:
    header = write_bundle(small_graph(), tmp_path / "m")["header"]
    by_name = {e["name"]: e for e in header["tensors"]}
    assert by_name["fc.bias"]["layout"] == "dense"
    conv1 = by_name["conv1.weight"]
    assert conv1["layout"] == "csr" and conv1["shape"] == [8, 3, 3, 3]
    assert conv1["arrays"]["indices"]["dtype"] == "uint8"  # 27 columns
    assert conv1["arrays"]["indptr"]["dtype"] == "uint16"
    arrays = [a for e in header["tensors"] for a in e["arrays"].values()]
    assert all(a["offset"] % ALIGN == 0 for a in arrays)
    ends = sorted((a["offset"], a["offset"] + a["length"]) for a in arrays)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(ends, ends[1:]))
    assert header["data_size"] == ends[-1][1]


def test_header_is_compressed_and_two_hashes_cover_every_stored_byte(tmp_path: Path) -> None:
    info = write_bundle(small_graph(), tmp_path / "m", meta=META)
    raw = (tmp_path / "m").read_bytes()
    magic, major, minor, flags, header_length, header_sha = struct.unpack_from("<8sHHIQ32s", raw)
    assert (magic, major, minor, flags) == (b"\x89HARPCSR", 2, 0, 0)
    stored = raw[56:56 + header_length]
    assert hashlib.sha256(stored).digest() == header_sha
    text = zlib.decompress(stored)
    assert json.loads(text) == info["header"]
    assert len(stored) * 2 < len(text)  # the tensor table and graph compress well
    data_start = -(-(56 + header_length) // ALIGN) * ALIGN
    assert ALIGN == 16 and not any(raw[56 + header_length:data_start])
    assert len(raw) == data_start + info["header"]["data_size"]
    assert hashlib.sha256(raw[data_start:]).hexdigest() == info["header"]["data_sha256"]
    assert all(set(a) == {"dtype", "count", "offset", "length"}
               for e in info["header"]["tensors"] for a in e["arrays"].values())  # no per-array hashes


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.hcsr"
    target.write_bytes(b"previous")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_bundle(small_graph(), target)
    assert target.read_bytes() == b"previous"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.hcsr"]  # no temp file left behind

    monkeypatch.undo()
    (tmp_path / "m.hcsr").unlink()
    with pytest.raises(BundleError, match="meta"):
        write_bundle(small_graph(), target, meta={"bad": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"values_dtype": "float64"}, "values_dtype"),
    ({"meta": ["not", "a", "dict"]}, "meta must be a dict"),
    ({"meta": {"x": float("nan")}}, "not plain JSON"),
    ({"meta": {"x": 1 << 70}}, "not plain JSON.*int64"),
])
def test_write_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        write_bundle(small_graph(), tmp_path / "m", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_invalid_graph_and_weights(tmp_path: Path) -> None:
    graph = small_graph()
    graph.tensors["fc.bias"] = np.zeros(3, np.float32)
    with pytest.raises(BundleError, match="graph is invalid.*bias shape"):
        write_bundle(graph, tmp_path / "m")
    graph = small_graph()
    graph.tensors["conv1.weight"][0, 0, 0, 0] = np.inf
    with pytest.raises(BundleError, match="'conv1.weight'.*non-finite"):
        write_bundle(graph, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_read_header_reads_the_header_alone_and_checks_it(tmp_path: Path) -> None:
    info = write_bundle(small_graph(), tmp_path / "m", meta=META)
    assert read_header(tmp_path / "m") == info["header"] == load_bundle(tmp_path / "m").header
    raw = (tmp_path / "m").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:80])  # the data region is not read: a cut inside the header is caught
    with pytest.raises(BundleError, match="header_length .* runs past the end of the file"):
        read_header(tmp_path / "cut")
    (tmp_path / "bad").write_bytes(raw[:60] + bytes([raw[60] ^ 1]) + raw[61:])
    with pytest.raises(BundleError, match="header SHA-256 does not match the preamble"):
        read_header(tmp_path / "bad")
    (tmp_path / "short").write_bytes(raw[:10])
    with pytest.raises(BundleError, match="shorter than the 56-byte preamble"):
        read_header(tmp_path / "short")
    with pytest.raises(BundleError, match="cannot read: not a regular file"):
        read_header("/dev/zero")


def test_load_refuses_missing_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(tmp_path / "absent")
    write_bundle(small_graph(), tmp_path / "m")
    size = (tmp_path / "m").stat().st_size
    assert load_bundle(tmp_path / "m", max_bytes=size).graph
    with pytest.raises(BundleError, match="exceeds max_bytes"):
        load_bundle(tmp_path / "m", max_bytes=size - 1)
    with pytest.raises(BundleError, match="max_bytes"):
        load_bundle(tmp_path / "m", max_bytes="big")  # type: ignore[arg-type]


def test_load_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.harpz")  # `harp run pipe.harpz` had blocked in open() forever
    with pytest.raises(BundleError, match="pipe.harpz: cannot read: not a regular file"):
        load_bundle(tmp_path / "pipe.harpz")
    with pytest.raises(BundleError, match="cannot read: not a regular file"):
        load_bundle("/dev/zero")
