"""xai-callbacks: PyTorch Lightning callbacks that make explanation part of training."""
from .callbacks import (ActivationMaximizationCallback, AttributionCallback, ExplanationCallback, ExplanationGate,
                        ExplanationMetricsCallback, GateFailure, InpainterCallback, SpRAyCallback)

__version__ = "0.1.0"
__all__ = ["AttributionCallback", "ExplanationMetricsCallback", "SpRAyCallback", "InpainterCallback",
           "ExplanationGate", "GateFailure", "ExplanationCallback", "ActivationMaximizationCallback"]
