"""bitnet-kde: knowledge distillation from a locked teacher LLM into a BitNet b1.58 student."""

__version__ = "0.1.0"
