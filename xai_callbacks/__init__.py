"""xai-callbacks: PyTorch Lightning callbacks that make explanation part of training."""
__version__ = "0.1.0"
