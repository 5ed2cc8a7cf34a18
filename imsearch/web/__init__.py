"""The search page and its JSON API (FastAPI) over the library; `imsearch serve` runs it with uvicorn."""

from .app import DEFAULT_MAX_UPLOAD_BYTES, create_app

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "create_app"]
