"""sith: data-free interpretability and concept editing for CLIP vision towers."""

__version__ = "0.1.0"
