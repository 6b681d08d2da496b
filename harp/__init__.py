"""harp: prune robust image classifiers to extreme sparsity and ship them to edge runtimes.

This module imports nothing heavy: the numba runtime (`harp.kernels`) and the bundle
loader (`harp.export.bundle`) must import on a device that has only numpy and numba.
"""

__version__ = "0.1.0"
