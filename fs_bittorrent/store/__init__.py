"""SQLite piece store (WAL): verified pieces, manifests and session records."""
from .sqlite_store import SCHEMA_VERSION, SESSION_FIELDS, HolderView, SQLitePieceStore

__all__ = ["SQLitePieceStore", "HolderView", "SCHEMA_VERSION", "SESSION_FIELDS"]
