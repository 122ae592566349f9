"""Client for the Qwen3-Omni Captioner service: audio in, caption out."""

__version__ = "0.1.0"
