"""ditc: a compiler from a declarative DiT spec to an NNTile model and a reference torch module."""

__version__ = "0.2.0"
