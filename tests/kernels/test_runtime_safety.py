"""The runtime trusts nothing it did not validate, and needs nothing but numpy and numba."""

import hashlib
import json
import struct
import zlib

import numpy as np
import pytest

from harp.export.bundle import BundleError, write_bundle
from harp.export.graph import Graph, Node
from harp.export.reference import run_reference
from harp.kernels import runtime as runtime_module
from harp.kernels.runtime import load_runtime

PREAMBLE = struct.Struct("<8sHHIQ32s")


def small_graph() -> Graph:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * (rng.random((4, 2, 3, 3)) < 0.5)
    nodes = [
        Node("conv2d", "conv", ("x",), "c", {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
             {"weight": "conv.w", "bias": "conv.b"}),
        Node("relu", "relu", ("c",), "r"), Node("global_avgpool", "gap", ("r",), "g"),
        Node("flatten", "flat", ("g",), "f"), Node("linear", "fc", ("f",), "y", {}, {"weight": "fc.w"}),
    ]
    tensors = {"conv.w": w, "conv.b": rng.standard_normal(4).astype(np.float32),
               "fc.w": rng.standard_normal((3, 4)).astype(np.float32)}
    return Graph("x", (2, 6, 6), "y", nodes, tensors)


def corrupt_index(raw: bytes, tensor: str, value: int) -> bytes:
    """Set the first CSR column index of `tensor` to `value`, with both SHA-256s made consistent again.

    Format 2.0 (docs/bundle-format.md): zlib-compressed header, one data SHA-256, 16-byte alignment.
    """
    *_, header_length, _ = PREAMBLE.unpack_from(raw)
    end = PREAMBLE.size + header_length
    header = json.loads(zlib.decompress(raw[PREAMBLE.size:end]))
    data = bytearray(raw[-(-end // 16) * 16:])
    entry = next(e for e in header["tensors"] if e["name"] == tensor)["arrays"]["indices"]
    start, stop = entry["offset"], entry["offset"] + entry["length"]
    indices = np.frombuffer(bytes(data[start:stop]), dtype=entry["dtype"]).copy()
    indices[0] = value
    data[start:stop] = indices.tobytes()
    header["data_sha256"] = hashlib.sha256(data).hexdigest()
    stored = zlib.compress(json.dumps(header).encode())
    head = PREAMBLE.pack(b"\x89HARPCSR", 2, 0, 0, len(stored), hashlib.sha256(stored).digest()) + stored
    return head + bytes(-len(head) % 16) + bytes(data)


def test_out_of_range_index_is_rejected_before_any_kernel(tmp_path, monkeypatch):
    write_bundle(small_graph(), tmp_path / "model.harpz")
    raw = corrupt_index((tmp_path / "model.harpz").read_bytes(), "conv.w", 18)  # columns are 0..17
    (tmp_path / "model.harpz").write_bytes(raw)

    def no_kernel(*args, **kwargs):
        raise AssertionError("a Runtime was built from an invalid bundle")

    monkeypatch.setattr(runtime_module.Runtime, "__init__", no_kernel)
    with pytest.raises(BundleError, match=r"conv\.w.*column index 18 .* out of range for 18 columns"):
        load_runtime(tmp_path)


TORCH_FREE = """
import numpy as np
from harp.kernels.runtime import load_runtime
runtime = load_runtime(sys.argv[1], threads=1)
np.save(sys.argv[3], runtime.run(np.load(sys.argv[2])))
"""


def test_runtime_runs_where_torch_onnx_and_scipy_cannot_be_imported(tmp_path, device_python):
    graph = small_graph()
    write_bundle(graph, tmp_path / "model.harpz")
    x = np.random.default_rng(1).random((3, 2, 6, 6), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    result = device_python(TORCH_FREE, tmp_path, tmp_path / "x.npy", tmp_path / "y.npy")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), run_reference(graph, x), rtol=1e-5, atol=1e-5)
