#!/usr/bin/env bash
# The main job on a fresh machine: set up, then
#  * with FederatedScope importable: a real federated run with the exchange
#    (a small CNN on synthetic images, 8 clients, 5 rounds, ~15 s);
#  * without it: the engine's own swarm demo on real model weights.
# Extra arguments go to whichever runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
if python -c "import federatedscope" >/dev/null 2>&1; then
  echo "main: FederatedScope found: federated run of configs/cnn_synthetic_bittorrent.yaml"
  fs-bittorrent run --cfg "$ROOT/configs/cnn_synthetic_bittorrent.yaml" "$@"
  out=$(ls -td exp/cnn_synthetic_bittorrent/*/ 2>/dev/null | head -1)
  if [ -n "$out" ]; then
    echo "main: per-round exchange figures ($out/bittorrent_rounds.jsonl):"
    python - "$out/bittorrent_rounds.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    eta = f"{r['eta']:.3f}" if r["eta"] else "n/a"
    print(f"  round {r['round']}: {r['reason']}, exchange {r['exchange_time']:.3f} s "
          f"({r['clock']}), completion {r['completion_ratio']:.2f}, eta {eta}")
PY
  fi
else
  echo "main: FederatedScope not installed: running the engine's swarm demo"
  fs-bittorrent demo "$@"
fi
