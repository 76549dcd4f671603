"""HTTP service for RINE (`rine serve`): FastAPI app, cross-request batching, request guards, web page.

Needs the `serve` extra (`pip install rine[serve]`): fastapi, uvicorn, python-multipart.
`rine.server.app.create_app` builds the app; `rine.server.batching` holds the batcher.
"""
