"""Shared FederatedScope test configs: FS's toy data (no download), seconds per run."""
from __future__ import annotations

import json
from pathlib import Path

TOY = """
use_gpu: False
device: -1
seed: 3
federate:
  mode: standalone
  client_num: {clients}
  total_round_num: {rounds}
data:
  type: toy
model:
  type: lr
trainer:
  type: general
eval:
  freq: 1
  metrics: ['loss_regular']
  count_flops: False
outdir: {outdir}
"""


def toy_cfg(tmp_path: Path, clients: int = 4, rounds: int = 3, name: str = "exp") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TOY.format(clients=clients, rounds=rounds, outdir=tmp_path / name))
    return str(path)


BT = ["bittorrent.enable", "True", "bittorrent.piece_size", "128",
      "bittorrent.block_size", "64", "bittorrent.timeout", "30.0"]


def round_stats(runner) -> list[dict]:
    """The run's per-round exchange figures (bittorrent_rounds.jsonl)."""
    path = Path(runner.cfg.outdir) / "bittorrent_rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def client_models(runner) -> dict:
    """Every client's model parameters, copied."""
    return {cid: {k: v.detach().clone() for k, v in c.trainer.get_model_para().items()}
            for cid, c in runner.client.items()}
