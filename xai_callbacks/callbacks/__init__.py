"""Lightning callbacks: when, where and what is logged; the work is done by the core packages."""
from .attribution import AttributionCallback
from .base import ExplanationCallback, Probe

__all__ = ["ExplanationCallback", "Probe", "AttributionCallback"]
