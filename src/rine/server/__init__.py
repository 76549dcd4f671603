"""HTTP service for RINE (`rine serve`): FastAPI app, cross-request batching, request guards, web page.

Needs the `serve` extra (`pip install rine[serve]`): fastapi, uvicorn, python-multipart.
"""

from .app import ServerSettings, create_app
from .batching import Batcher, Overloaded

__all__ = ["Batcher", "Overloaded", "ServerSettings", "create_app"]
