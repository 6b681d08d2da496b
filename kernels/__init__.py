"""numba CSR kernels and the torch-free runtime that executes exported bundles.

Importing this package imports nothing; import the module you need. Every
operator has its kernel, its NumPy reference twin (`reference.py`) and its test
(tests/kernels/test_<module>.py):

    conv2d (sparse)      conv.sparse_conv2d, conv.plan_sparse_conv2d    reference.conv2d_ref
    conv2d (dense)       dense.dense_conv2d                             reference.conv2d_ref
    conv2d (unrolled)    unrolled.compile_unrolled, bind_unrolled_conv2d reference.conv2d_ref
    linear (sparse)      spmm.sparse_linear, spmm.spmm                  reference.linear_ref, csr_matmul_ref
    linear (dense)       dense.dense_linear                             reference.linear_ref
    maxpool2d            pool.maxpool2d                                 reference.maxpool2d_ref
    avgpool2d            pool.avgpool2d                                 reference.avgpool2d_ref
    global_avgpool       pool.global_avgpool                            reference.global_avgpool_ref
    add/relu/clip/affine elementwise.*                                  reference.*_ref

Shared pieces: `csr` (a checked `harp.export.csr.CSRTensor` as kernel arrays,
row blocks), `epilogue` (fused bias/activation/residual), `packing` (the conv
input layout), `layout` (bordered, image-grouped activation buffers the runtime
passes between steps), `threads` (thread count and wait policy), `warmup`
(compile or load every kernel).

The runtime: `runtime.load_runtime(path) -> Runtime` loads a bundle through
`harp.export.bundle.load_bundle`, `plan.plan_graph` fuses and allocates it once,
`steps.EXECUTORS` bind each step's kernels per batch size (`bind_*` functions of
the kernel modules: checked once, then plain kernel calls).

Only numpy and numba (with its own llvmlite, and threadpoolctl, optionally) are
imported in this package, plus harp's numpy-only `harp.export.bundle/csr/graph`.
"""
