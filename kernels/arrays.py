"""Hand numba kernels arrays of one layout only, so each kernel keeps one compiled signature.

numba types an array by dtype, rank, layout and writeability: a read-only array
(np.frombuffer, a read-only memmap) or a strided view would make it compile and
cache another version of the kernel on first use. Public entry points pass every
array through `as_kernel_array`, which returns it untouched when it is already
C-contiguous and writeable and copies it otherwise. Loaders should hand over
such arrays so that this never copies on the hot path.
"""

from __future__ import annotations

import numpy as np


def as_kernel_array(a: np.ndarray) -> np.ndarray:
    """`a` itself if C-contiguous and writeable, else a C-contiguous writeable copy."""
    if a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, order="C")
