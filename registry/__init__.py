"""model-registry: which models can be loaded on this machine right now."""

__version__ = "0.1.0"
