"""srd: white-box knowledge distillation of LLMs with Selective Reflection Distillation."""

__version__ = "0.1.0"
