"""xai-callbacks: PyTorch Lightning callbacks that make explanation part of training."""
from .callbacks import AttributionCallback, ExplanationCallback

__version__ = "0.1.0"
__all__ = ["AttributionCallback", "ExplanationCallback"]
