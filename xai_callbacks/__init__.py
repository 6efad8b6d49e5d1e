"""xai-callbacks: PyTorch Lightning callbacks that make explanation part of training."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["AttributionCallback", "ExplanationMetricsCallback", "SpRAyCallback", "InpainterCallback",
           "ExplanationGate", "GateFailure", "ExplanationCallback", "ActivationMaximizationCallback",
           "ConceptRelevanceCallback"]


def __getattr__(name: str):
    # the callbacks load on first use, so `xai-callbacks gate` and the core import no Lightning
    if name in __all__:
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'xai_callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
