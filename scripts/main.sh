#!/usr/bin/env bash
# The main job on a fresh machine: set up, then
#  * with FederatedScope importable: federated learning on real data:
#    scikit-learn's bundled handwritten digits split non-IID over 8 clients
#    (configs/digits_bittorrent.yaml, 10 rounds), once with the peer-to-peer
#    exchange and once as plain FS (bittorrent.enable False), then the report
#    comparing them; it ends with the per-round figures and the accuracy line;
#  * without it: the engine's own swarm demo on real model weights.
# Extra arguments go to the exchange run (FS-style KEY VALUE pairs) or the demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
if python -c "import federatedscope" >/dev/null 2>&1; then
  CFG="$ROOT/configs/digits_bittorrent.yaml"
  echo "main: FederatedScope found: $CFG with the exchange (exp/digits_bittorrent)"
  fs-bittorrent run --cfg "$CFG" "$@"
  echo "main: the same as plain FederatedScope, bittorrent.enable False (exp/digits_plain)"
  fs-bittorrent run --cfg "$CFG" bittorrent.enable False outdir exp/digits_plain "$@"
  fs-bittorrent report exp/digits_bittorrent --compare exp/digits_plain
else
  echo "main: FederatedScope not installed: running the engine's swarm demo"
  fs-bittorrent demo "$@"
fi
