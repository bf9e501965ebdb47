"""Convert original LLaVA checkpoints to Hugging Face format."""

__version__ = "0.1.0"
