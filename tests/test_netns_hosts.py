"""scripts/netns_hosts.py: shaped hosts come up, talk, and always go away.

The namespace tests need root and the ``ip``/``tc`` tools; they skip otherwise.  Each test builds
at most two hosts (about 0.3 s).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import netns_hosts as nh  # noqa: E402

def _ours(tag: str) -> list[str]:
    return [s for s in nh.list_netns() if s.startswith(tag)]


@pytest.fixture
def netns():
    """Skip unless we are root with ip/tc and namespaces can be created;
    afterwards, check that no namespace of this process is left."""
    if not (nh.is_root() and nh.have_ip_tool()):
        pytest.skip("needs root and the ip/tc tools")
    probe = f"{nh.PREFIX}{os.getpid()}-probe"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot create network namespaces: {res.stderr.decode().strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    yield
    assert _ours(f"{nh.PREFIX}{os.getpid()}-") == []


def test_hosts_are_shaped_reachable_and_removed(netns):
    with nh.ShapedHosts(2, up_mbit=100, down_mbit=150, up_overrides={1: 20}) as hs:
        tag = hs.tag
        assert len(_ours(tag)) == 3                   # switch + 2 hosts
        assert [h.ip for h in hs] == ["10.77.0.1", "10.77.0.2"]
        assert [h.up_mbit for h in hs] == [100, 20]
        qd = subprocess.run(["ip", "netns", "exec", hs[1].netns, "tc", "qdisc", "show", "dev",
                             hs[1].ifname], capture_output=True, text=True).stdout
        assert "tbf" in qd and "20Mbit" in qd, qd
        qd = subprocess.run(["ip", "netns", "exec", hs.switch, "tc", "qdisc", "show", "dev",
                             "p0"], capture_output=True, text=True).stdout
        assert "150Mbit" in qd, qd
        srv = hs.popen(1, [sys.executable, "-c",
                           "import socket; s=socket.create_server(('10.77.0.2', 5998));"
                           "print('up', flush=True); c,_=s.accept(); c.sendall(c.recv(4))"],
                       stdout=subprocess.PIPE, text=True)
        assert srv.stdout.readline().strip() == "up"
        cli = hs.popen(0, [sys.executable, "-c",
                           "import socket; c=socket.create_connection(('10.77.0.2', 5998));"
                           "c.sendall(b'ping'); print(c.recv(4).decode())"],
                       stdout=subprocess.PIPE, text=True)
        assert cli.communicate(timeout=20)[0].strip() == "ping"
        # A process that would outlive the block is killed by close().
        sleeper = hs.popen(0, [sys.executable, "-c", "import time; time.sleep(60)"])
    assert sleeper.poll() is not None
    assert _ours(tag) == []


def test_exception_inside_block_removes_namespaces(netns):
    with pytest.raises(RuntimeError, match="boom"):
        with nh.ShapedHosts(1, up_mbit=50) as hs:
            tag = hs.tag
            assert _ours(tag)
            raise RuntimeError("boom")
    assert _ours(tag) == []


def test_stale_namespaces_of_dead_runs_are_removed_live_ones_kept(netns):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{nh.PREFIX}{dead.pid}-sw"
    live = f"{nh.PREFIX}{os.getpid()}-keep"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = nh.cleanup_namespaces()
        assert stale in removed
        assert live not in removed
        assert stale not in nh.list_netns() and live in nh.list_netns()
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_sigterm_tears_down(netns):
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "netns_hosts.py")
    proc = subprocess.Popen([sys.executable, script, "--hold", "--n", "1", "--up", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    tag = f"{nh.PREFIX}{proc.pid}-"
    try:
        for line in proc.stdout:
            if line.startswith("holding"):
                break
        assert len(_ours(tag)) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        nh.cleanup_namespaces()
    assert _ours(tag) == []


def test_local_hosts_kill_their_processes():
    with nh.LocalHosts(2) as hs:
        assert [h.ip for h in hs] == ["127.0.0.1"] * 2
        p = hs.popen(1, [sys.executable, "-c", "import time; time.sleep(60)"])
        t = time.monotonic()
    assert p.poll() is not None and time.monotonic() - t < 5
