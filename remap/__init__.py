"""remap: plan, convert, verify and parity-check DeepSeek-V3-family checkpoints."""

__version__ = "0.1.0"
