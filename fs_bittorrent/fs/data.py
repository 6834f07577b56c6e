"""Data types the plugin registers with FS; neither downloads anything.

``data.type: bt_digits`` -- real data: scikit-learn's bundled handwritten
digits (``sklearn.datasets.load_digits``: 1797 8x8 grey images of 0-9,
shipped inside scikit-learn, which FS needs anyway).  A seeded, stratified
20 % is held out for testing and 10 % for validation, spread evenly over
the clients, so every client evaluates on the same mix of all ten digits
and FS's weighted average is the global model's accuracy.  The remaining
70 % is split **non-IID**: for each digit, the share each client gets is
drawn from Dirichlet(``DIGITS_ALPHA``) (the usual label-skew split), so a
client sees a few digits often and others rarely or never; FedAvg has to
combine them.  Pixels are scaled to [0, 1].  Fits FS's ``convnet2``
(``1x8x8`` input).

``data.type: bt_synthetic_images`` -- a synthetic image task: each class
has a seeded 28x28 prototype; a sample is its prototype plus noise, with a
Dirichlet label mix per client.  Sized for ``convnet2`` (about 1.7 MB of
float32 with ``model.hidden 128``): a realistic model to exchange.
"""
from __future__ import annotations

import numpy as np

NAME = "bt_synthetic_images"
DIGITS = "bt_digits"
CLASSES = 10
DIGITS_ALPHA = 0.5          # Dirichlet concentration of the label skew (smaller: more skewed)
DIGITS_TEST, DIGITS_VAL = 0.2, 0.1
MIN_TRAIN_PER_CLIENT = 8    # redraw a split that leaves a client (almost) nothing to train on


def _tensors(x: np.ndarray, y: np.ndarray):
    import torch
    return torch.utils.data.TensorDataset(torch.from_numpy(x.astype(np.float32)),
                                          torch.from_numpy(y.astype(np.int64)))


def _to_fs(config, client_cfgs, dataset: dict):
    """Per-client splits -> FS's data object, as FS's own loaders return it."""
    from federatedscope.core.data import DummyDataTranslator
    from federatedscope.core.data.utils import convert_data_mode
    data = DummyDataTranslator(config, client_cfgs)(dataset)
    return convert_data_mode(data, config), config


# ---- synthetic images -------------------------------------------------------------

def _samples(rng: np.random.Generator, protos: np.ndarray, n: int, mix: np.ndarray):
    y = rng.choice(CLASSES, size=n, p=mix).astype(np.int64)
    x = protos[y] + rng.normal(0.0, 1.0, size=(n, 1, 28, 28)).astype(np.float32)
    return _tensors(x, y)


def load_synthetic_images(config, client_cfgs=None):
    """FS data loader: returns (data, config) like FS's own loaders."""
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
    return _to_fs(config, client_cfgs, dataset)


# ---- handwritten digits -----------------------------------------------------------

def _stratified_split(rng: np.random.Generator, y: np.ndarray, fraction: float):
    """Indices (held out, rest): ``fraction`` of every class held out."""
    held = []
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        held.extend(idx[:round(fraction * len(idx))])
    held = np.sort(np.array(held))
    return held, np.setdiff1d(np.arange(len(y)), held)


def label_skew_split(rng: np.random.Generator, y: np.ndarray, clients: int,
                     alpha: float = DIGITS_ALPHA) -> list[np.ndarray]:
    """Non-IID split of indices: each class divided among the clients by a
    Dirichlet(alpha) draw.  Redrawn (at most 100 times) while a client would
    get fewer than MIN_TRAIN_PER_CLIENT samples."""
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in range(CLASSES):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts[:-1])):
                parts[k].extend(chunk)
        if min(len(p) for p in parts) >= MIN_TRAIN_PER_CLIENT:
            break
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def load_digits_data(config, client_cfgs=None):
    """FS data loader for ``bt_digits``: returns (data, config)."""
    from sklearn.datasets import load_digits

    clients = config.federate.client_num
    if clients < 1:
        from ..errors import ConfigError
        raise ConfigError("federate.client_num", clients, f"data.type {DIGITS} needs >= 1 client")
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]     # N x 1 x 8 x 8
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(config.seed + 1797)
    test, rest = _stratified_split(rng, y, DIGITS_TEST)
    val_in_rest, train_in_rest = _stratified_split(rng, y[rest], DIGITS_VAL / (1 - DIGITS_TEST))
    val, train = rest[val_in_rest], rest[train_in_rest]
    shares = label_skew_split(rng, y[train], clients)
    test_parts = np.array_split(rng.permutation(test), clients)
    val_parts = np.array_split(rng.permutation(val), clients)
    dataset = {}
    for k in range(clients):
        tr = train[shares[k]]
        dataset[k + 1] = {"train": _tensors(x[tr], y[tr]),
                          "val": _tensors(x[val_parts[k]], y[val_parts[k]]),
                          "test": _tensors(x[test_parts[k]], y[test_parts[k]])}
    dataset[0] = {"val": _tensors(x[val], y[val]), "test": _tensors(x[test], y[test])}
    return _to_fs(config, client_cfgs, dataset)


_LOADERS = {NAME: load_synthetic_images, DIGITS: load_digits_data}


def call_plugin_data(config, client_cfgs=None):
    loader = _LOADERS.get(config.data.type)
    return loader(config, client_cfgs) if loader is not None else None


def register_data_types() -> None:
    """Register the plugin's data types with FS (idempotent)."""
    from federatedscope.register import data_dict, register_data
    for name in _LOADERS:
        if name not in data_dict:
            register_data(name, call_plugin_data)
