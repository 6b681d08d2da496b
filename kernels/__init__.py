"""numba CSR kernels and the torch-free runtime that executes exported bundles."""
