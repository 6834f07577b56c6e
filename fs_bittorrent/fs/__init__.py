"""FederatedScope integration; importing it registers the ``bittorrent`` config node."""
try:
    import federatedscope  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fs_bittorrent.fs needs FederatedScope (package 'federatedscope'), "
                      "which is not installed") from exc

from .config import register_bittorrent_config

register_bittorrent_config()

from .data import register_data_types  # noqa: E402

register_data_types()
