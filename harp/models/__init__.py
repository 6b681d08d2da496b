"""Model registry: `build_model(arch, spec)`; one file per architecture family."""

from .registry import ARCHITECTURES, build_model, check_model_runs, default_arch, prunable_layers

__all__ = ["ARCHITECTURES", "build_model", "check_model_runs", "default_arch", "prunable_layers"]
