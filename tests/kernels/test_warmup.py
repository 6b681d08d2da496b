"""warmup() compiles or loads every kernel family, and kernels import without torch/scipy."""

import subprocess
import sys

from harp.kernels.warmup import warmup


def test_warmup_covers_every_kernel_family():
    timings = warmup()
    assert set(timings) == {"sparse_conv2d", "spmm", "dense_conv2d", "winograd_conv2d", "dense_linear", "pool",
                            "elementwise"}
    assert all(t >= 0 for t in timings.values())


def test_kernels_run_where_torch_scipy_and_onnx_cannot_be_imported():
    # A device has only numpy and numba: hide the rest, then import and run every kernel.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'scipy', 'onnx', 'onnxruntime'):\n"
        "            raise ImportError(f'blocked {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from harp.kernels.warmup import warmup\n"
        "import harp.kernels.reference, harp.kernels.threads\n"
        "warmup()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
