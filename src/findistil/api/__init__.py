"""findistil's REST API: upstream-compatible job routes over the flywheel (``findistil serve``).

``create_app(settings)`` builds the FastAPI app; ``BackgroundServer`` runs it in a thread.
"""

from findistil.api.app import BackgroundServer, create_app

__all__ = ["BackgroundServer", "create_app"]
