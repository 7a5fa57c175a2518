"""tslm: train small Transformer language models from scratch."""

__version__ = "0.1.0"
