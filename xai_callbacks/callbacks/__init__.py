"""Lightning callbacks: when, where and what is logged; the work is done by the core packages."""
from .activation_max import ActivationMaximizationCallback
from .attribution import AttributionCallback
from .base import ExplanationCallback, Probe
from .class_importance import ClassImportanceCallback
from .concepts import ConceptRelevanceCallback
from .gate import ExplanationGate, GateFailure
from .inpainter import InpainterCallback
from .metrics import ExplanationMetricsCallback
from .spray import SpRAyCallback

__all__ = ["ExplanationCallback", "Probe", "AttributionCallback", "ExplanationMetricsCallback", "SpRAyCallback",
           "InpainterCallback", "ExplanationGate", "GateFailure", "ActivationMaximizationCallback",
           "ConceptRelevanceCallback", "ClassImportanceCallback"]
