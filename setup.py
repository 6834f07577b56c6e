from setuptools import find_packages, setup

setup(
    name="fs_bittorrent",
    version="0.1.0",
    description="BitTorrent-style peer-to-peer model exchange for FederatedScope",
    packages=find_packages(include=["fs_bittorrent", "fs_bittorrent.*"]),
    python_requires=">=3.9",
    # torch is pinned by .ci/run / README (a CPU build); a bare 'torch' here
    # would let pip pull a multi-GB CUDA build on a fresh machine.
    install_requires=[
        "numpy",
        # per-run TLS keys and self-signed certificates of the data plane
        "cryptography>=3.1",
        "safetensors>=0.4",
        "sqlite-utils>=3.30",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "plots": ["matplotlib"],
        # only scripts/bench_allgather.py's libtorrent comparison needs it
        "bench": ["libtorrent==2.1.1"],
    },
    entry_points={"console_scripts": ["fs-bittorrent=fs_bittorrent.cli:main"]},
)
