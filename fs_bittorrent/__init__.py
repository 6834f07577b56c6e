"""fs_bittorrent: peer-to-peer model exchange for FederatedScope.

Layout:
  core/   sans-IO engine: manifests, pieces, wire protocol, picker, sessions
  store/  SQLite piece store (WAL)
  sim/    deterministic in-memory network that drives sessions
"""
__version__ = "0.1.0"
