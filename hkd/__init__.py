"""hkd: progressive hierarchical knowledge distillation for transformer models."""

__version__ = "0.1.0"
