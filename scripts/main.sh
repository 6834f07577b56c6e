#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the swarm demo on real
# model weights (FederatedScope runs come with `fs-bittorrent run`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
fs-bittorrent demo "$@"
