"""The sqllm release (one definition, read by the package and its saved configs)."""
__version__ = "0.1.0"
