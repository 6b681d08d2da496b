"""Hand numba kernels arrays of one layout only, so each kernel keeps one compiled signature.

numba types an array by dtype, rank, layout and writeability: a read-only array
(np.frombuffer, a read-only memmap) or a strided view would make it compile and
cache another version of the kernel on first use. Public entry points pass every
array through `as_kernel_array`, which returns it untouched when it is already
C-contiguous and writeable and copies it otherwise. Loaders should hand over
such arrays so that this never copies on the hot path.

Activation buffers also start on a cache line (`aligned_zeros`): in an image
group of 16 every run a kernel reads then starts on one, and a 64-byte load that
straddles two lines costs two line reads.
"""

from __future__ import annotations

import numpy as np


def as_kernel_array(a: np.ndarray) -> np.ndarray:
    """`a` itself if C-contiguous and writeable, else a C-contiguous writeable copy."""
    if a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, order="C")


CACHE_LINE = 64


def aligned_zeros(size: int) -> np.ndarray:
    """A float32 array of `size` zeros whose first element starts a 64-byte cache line.

    NumPy aligns large allocations to 16 bytes only; a view into a slightly larger
    buffer is still C-contiguous and writeable, so kernels take it as is.
    """
    lanes = CACHE_LINE // 4
    raw = np.zeros(size + lanes, np.float32)
    skip = (-raw.ctypes.data % CACHE_LINE) // 4
    return raw[skip:skip + size]
