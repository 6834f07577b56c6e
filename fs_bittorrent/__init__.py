"""fs_bittorrent: peer-to-peer model exchange for FederatedScope.

Layout:
  core/   sans-IO engine: manifests, pieces, wire protocol, picker, sessions
  store/  SQLite piece store (WAL)
  sim/    deterministic virtual network that drives sessions
  fs/     FederatedScope adapter (imports FederatedScope; load it explicitly)
"""
__version__ = "0.1.0"
