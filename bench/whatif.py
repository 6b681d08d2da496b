"""What-if artifacts: an architecture with random weights, pruned one-shot, exported, ready to benchmark.

    build_whatif_artifact("vgg16_bn", (3, 32, 32), 10, 0.99, "global-magnitude", out)

answers "how fast would VGG16-BN at 99% sparsity run here?" before training one.
Weights: torch seed 0 init with seeded, non-trivial BatchNorm statistics (so
folding matters); pruning by weight magnitude, either global (one threshold for
all conv/linear layers) or uniform (every layer at the same density). The
latency of a random-weight model is that of a trained one with the same
per-layer densities; its accuracy means nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from harp.errors import HarpError

PRUNINGS = ("global-magnitude", "uniform")  # = random_models.PRUNING_RULES (this module stays torch-free)


def build_whatif_artifact(arch: str, input_shape: tuple[int, int, int], classes: int, sparsity: float,
                          pruning: str, out: str | os.PathLike[str]) -> Path:
    """Export the pruned random-weight model to `out` (replaced if it is a harp export); returns `out`."""
    from harp.data import DatasetSpec
    from harp.export.exporter import export_model

    from .random_models import random_pruned_model

    if pruning not in PRUNINGS:
        raise HarpError(f"unknown pruning {pruning!r} (choose from {', '.join(PRUNINGS)})")
    if not 0.0 <= sparsity < 1.0:
        raise HarpError(f"--sparsity must be in [0, 1), got {sparsity}")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise HarpError(f"--input-shape must be C,H,W with positive sizes, got {input_shape}")
    if classes < 2:
        raise HarpError(f"--classes must be >= 2, got {classes}")
    c, h, w = input_shape
    spec = DatasetSpec("what-if", c, (h, w), classes, (0.5,) * c, (0.25,) * c, 8 / 255, 10, 10, 2 / 255, False)
    model = random_pruned_model(arch, spec, sparsity, pruning)
    export_model(model, input_shape, out, force=True,
                 meta={"architecture": arch, "dataset": {"name": "what-if (random weights)",
                                                         "input_shape": list(input_shape), "classes": classes},
                       "pruning": {"method": pruning, "target_sparsity": sparsity, "weights": "random (seed 0)"}})
    return Path(out)
