"""TurboQuant: quantize a released causal LM into validated, reproducible artifacts."""

__version__ = "0.1.0"
