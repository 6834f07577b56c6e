"""``data.type: bt_synthetic_images``: a small image task that downloads nothing.

Each class has a seeded 28x28 prototype; a sample is its class prototype
plus noise.  Clients get skewed label mixes (a Dirichlet draw per client),
so FedAvg has real work to do.  Sized for FS's ``convnet2`` (about 1.7 MB
of float32 with ``model.hidden 128``): a realistic model to exchange.
"""
from __future__ import annotations

import numpy as np

NAME = "bt_synthetic_images"
CLASSES = 10


def _samples(rng: np.random.Generator, protos: np.ndarray, n: int, mix: np.ndarray):
    import torch
    y = rng.choice(CLASSES, size=n, p=mix).astype(np.int64)
    x = protos[y] + rng.normal(0.0, 1.0, size=(n, 1, 28, 28)).astype(np.float32)
    return torch.utils.data.TensorDataset(torch.from_numpy(x.astype(np.float32)),
                                          torch.from_numpy(y))


def load_synthetic_images(config, client_cfgs=None):
    """FS data loader: returns (data, config) like FS's own loaders."""
    from federatedscope.core.data import DummyDataTranslator
    from federatedscope.core.data.utils import convert_data_mode

    rng = np.random.default_rng(config.seed + 4242)
    protos = rng.normal(0.0, 1.0, size=(CLASSES, 1, 28, 28)).astype(np.float32)
    per_client = 96
    uniform = np.full(CLASSES, 1.0 / CLASSES)
    dataset = {}
    for cid in range(1, config.federate.client_num + 1):
        mix = rng.dirichlet(np.full(CLASSES, 0.5))
        dataset[cid] = {split: _samples(rng, protos, n, mix)
                        for split, n in (("train", per_client), ("val", 32), ("test", 32))}
    dataset[0] = {split: _samples(rng, protos, 200, uniform)
                  for split in ("val", "test")}
    data = DummyDataTranslator(config, client_cfgs)(dataset)
    return convert_data_mode(data, config), config


def call_synthetic_images(config, client_cfgs=None):
    if config.data.type == NAME:
        return load_synthetic_images(config, client_cfgs)
    return None


def register_synthetic_images() -> None:
    from federatedscope.register import data_dict, register_data
    if NAME not in data_dict:
        register_data(NAME, call_synthetic_images)
