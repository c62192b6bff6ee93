"""What the engine raises to its callers; torch-free, so the API process may import it."""

from __future__ import annotations


class EngineClosedError(RuntimeError):
    """The engine shut down while the request was waiting or running."""


class EngineBusyError(RuntimeError):
    """The engine already holds as many requests as it takes (running plus waiting)."""
