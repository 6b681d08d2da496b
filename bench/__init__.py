"""harp-bench: latency and robustness reports of exported artifacts."""
