"""CCoE Serve: the library every service shares (model, experts, engine, routing, registry)."""

__version__ = "0.1.0"
