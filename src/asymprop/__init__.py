"""asymprop: train PyTorch models without weight transport."""

__version__ = "0.1.0"
