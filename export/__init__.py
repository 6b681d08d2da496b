"""Export pruned checkpoints as ONNX graphs and CSR bundles (torch-free where it loads)."""
