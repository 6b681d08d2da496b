"""warmup() compiles or loads every kernel family, and kernels import without torch/scipy."""

from harp.kernels.warmup import warmup


def test_warmup_covers_every_kernel_family():
    timings = warmup()
    assert set(timings) == {"sparse_conv2d", "spmm", "dense_conv2d", "winograd_conv2d", "dense_linear", "pool",
                            "elementwise"}
    assert all(t >= 0 for t in timings.values())


def test_kernels_run_where_torch_scipy_and_onnx_cannot_be_imported(device_python):
    # A device has only numpy and numba: import and run every kernel there.
    code = (
        "from harp.kernels.warmup import warmup\n"
        "import harp.kernels.reference, harp.kernels.threads\n"
        "warmup()\n"
    )
    result = device_python(code, timeout=120)
    assert result.returncode == 0, result.stderr
