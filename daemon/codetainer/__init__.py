"""codetainer: the init system of a sandboxed AI coding agent's container."""

__version__ = "0.1.0"
