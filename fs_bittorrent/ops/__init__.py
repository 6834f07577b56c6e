"""Operating a deployment: ``fs-bittorrent clean`` (rollback) and
``fs-bittorrent check`` (preflight).  See docs/operations.md."""
