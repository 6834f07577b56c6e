"""The server's round state machine (sans-IO) and the control-message codec."""
from __future__ import annotations

import copy

import pytest

from fs_bittorrent.core.coordinator import (CompletionReport, Phase, RoundCoordinator,
                                            RoundEnd, StartExchange)
from fs_bittorrent.errors import ConfigError, ManifestError, ProtocolError

from swarm_helpers import random_owner

CLIENTS = (1, 2, 3, 4)


def manifest(owner, rnd=0):
    return random_owner(owner, 3, 64, rnd=rnd)[0]


def report(rnd, complete=True, have=12, total=12):
    return CompletionReport(rnd, complete, have, total, 100, 200, 1.5, "complete")


def started(timeout=10.0, ratio=0.5, policy="proceed", rnd=0):
    c = RoundCoordinator(timeout, ratio, policy, report_grace=1.0)
    c.begin_round(rnd, CLIENTS, CLIENTS, now=0.0)
    actions = []
    for cid in CLIENTS:
        actions += c.on_manifest(cid, rnd, manifest(cid, rnd), now=1.0)
    return c, actions


def state(c):
    return (c.phase, c.round, c._deadline, dict(c._manifests), dict(c._reports), c.stale_messages)


def test_all_manifests_start_the_exchange_and_all_reports_end_it():
    c, actions = started()
    assert len(actions) == 1 and isinstance(actions[0], StartExchange)
    start = actions[0]
    assert [m.owner for m in start.manifests] == list(CLIENTS) and start.participants == CLIENTS
    assert c.phase is Phase.EXCHANGING and c.next_deadline() == 1.0 + 10.0 + 1.0
    for cid in CLIENTS[:-1]:
        assert c.on_report(cid, report(0), now=2.0) == []
    (end,) = c.on_report(4, report(0), now=3.0)
    assert isinstance(end, RoundEnd) and end.reason == "complete" and not end.abort
    assert end.completion_ratio == 1.0 and end.exchange_time == pytest.approx(2.0)
    assert c.phase is Phase.DONE and c.next_deadline() is None


def test_polling_is_non_blocking_and_does_nothing_before_the_deadline():
    c, _ = started()
    before = state(c)
    for now in (0.0, 5.0, 11.99):
        assert c.poll(now) == []
    assert state(c) == before


def test_deadline_with_enough_completions_ends_partially():
    c, _ = started(ratio=0.5)
    c.on_report(1, report(0), now=2.0)
    c.on_report(2, report(0), now=2.0)
    (end,) = c.poll(12.0)
    assert end.reason == "deadline" and not end.abort and end.completed == [1, 2]
    assert end.completion_ratio == 0.5


@pytest.mark.parametrize("policy,abort", [("proceed", False), ("abort", True)])
def test_deadline_with_too_few_completions_follows_the_policy(policy, abort):
    c, _ = started(ratio=0.75, policy=policy)
    c.on_report(1, report(0), now=2.0)
    (end,) = c.poll(12.0)
    assert end.reason == "insufficient" and end.abort is abort


def test_all_reported_but_some_partial_is_judged_by_the_ratio():
    for ratio, reason, abort in [(0.5, "partial", False), (0.9, "insufficient", True)]:
        c, _ = started(ratio=ratio, policy="abort")
        out = []
        for cid in CLIENTS:
            out += c.on_report(cid, report(0, complete=cid <= 2, have=12 if cid <= 2 else 5),
                               now=2.0)
        (end,) = out
        assert end.reason == reason and end.abort is abort


def test_manifest_deadline_starts_with_what_arrived():
    c = RoundCoordinator(10.0)
    c.begin_round(0, CLIENTS, CLIENTS, now=0.0)
    c.on_manifest(1, 0, manifest(1), now=1.0)
    c.on_manifest(3, 0, manifest(3), now=1.0)
    (start,) = c.poll(10.0)
    assert isinstance(start, StartExchange) and [m.owner for m in start.manifests] == [1, 3]
    assert start.participants == CLIENTS  # everybody still swarms and aggregates


def test_no_manifest_at_all_ends_the_round():
    c = RoundCoordinator(10.0, insufficient_policy="abort")
    c.begin_round(0, CLIENTS, CLIENTS, now=0.0)
    (end,) = c.poll(10.0)
    assert end.reason == "no manifests" and end.abort


def test_old_and_future_round_messages_are_ignored_and_counted():
    c, _ = started(rnd=3)
    before = state(c)
    assert c.on_report(1, report(2), now=2.0) == []          # old round
    assert c.on_report(1, report(4), now=2.0) == []          # future round
    assert c.on_manifest(2, 1, manifest(2, 1), now=2.0) == []
    after = state(c)
    assert after[:5] == before[:5] and after[5] == before[5] + 3


def test_a_late_manifest_during_the_exchange_is_ignored():
    c, _ = started()
    before = state(c)
    assert c.on_manifest(1, 0, manifest(1), now=2.0) == []
    assert state(c)[:5] == before[:5]


@pytest.mark.parametrize("sender,m,field", [
    (2, "owner1", "owner"),          # a client sending someone else's manifest
    (1, "round7", "round"),          # a manifest of another round in this round's message
    (9, "owner9", "owner"),          # a client that was not asked to train
])
def test_bad_manifests_raise_naming_the_field_and_change_nothing(sender, m, field):
    c = RoundCoordinator(10.0)
    c.begin_round(0, CLIENTS, CLIENTS, now=0.0)
    c.on_manifest(3, 0, manifest(3), now=0.5)
    bad = {"owner1": manifest(1), "round7": manifest(1, 7), "owner9": manifest(9)}[m]
    before = state(c)
    with pytest.raises(ManifestError) as err:
        c.on_manifest(sender, 0, bad, now=1.0)
    assert err.value.field == field
    assert state(c) == before


def test_a_report_from_a_stranger_raises_and_changes_nothing():
    c, _ = started()
    before = state(c)
    with pytest.raises(ConfigError) as err:
        c.on_report(99, report(0), now=2.0)
    assert err.value.field == "client" and state(c) == before


@pytest.mark.parametrize("kw,field", [({"timeout": 0}, "timeout"),
                                      ({"timeout": 1, "min_completion_ratio": 1.5},
                                       "min_completion_ratio"),
                                      ({"timeout": 1, "insufficient_policy": "retry"},
                                       "insufficient_policy")])
def test_bad_settings_are_refused(kw, field):
    with pytest.raises(ConfigError) as err:
        RoundCoordinator(**kw)
    assert err.value.field == field


def test_a_new_round_cannot_begin_while_one_is_running():
    c, _ = started()
    before = state(c)
    with pytest.raises(ConfigError):
        c.begin_round(1, CLIENTS, CLIENTS, now=2.0)
    assert state(c) == before


# ---- control-message content (protobuf-safe dicts) -------------------------------
wire = pytest.importorskip("fs_bittorrent.fs.wire",
                           reason="FederatedScope is not installed: control-message tests skipped",
                           exc_type=ImportError)


def test_control_messages_round_trip():
    ms = tuple(manifest(c) for c in CLIENTS)
    r, m, addr, cert = wire.unpack_manifest(wire.pack_manifest(0, ms[0]))
    assert r == 0 and m == ms[0] and addr == "" and cert == ""
    start = wire.pack_start(0, ms, {1: [2, 3], 2: [1]}, 5.0)
    assert "secret" not in start           # nothing secret crosses FS's plaintext gRPC
    got = wire.unpack_start(start)
    assert got.round == 0 and got.manifests == list(ms) and got.timeout == 5.0
    assert got.neighbours == {1: [2, 3], 2: [1], 3: [], 4: []}   # every owner has a row
    rep = report(0)
    assert wire.unpack_report(wire.pack_report(rep)) == rep


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("round"), "bt_report.round"),
    (lambda d: d.update(bytes_up="many"), "bt_report.bytes_up"),
    (lambda d: d.update(complete=True), "bt_report.complete"),   # bool is not protobuf-safe
])
def test_malformed_reports_name_the_field(mutate, field):
    content = wire.pack_report(report(0))
    original = copy.deepcopy(content)
    mutate(content)
    with pytest.raises(ProtocolError) as err:
        wire.unpack_report(content)
    assert err.value.field == field
    assert repr(original) != repr(content)  # the test really broke something


def test_a_manifest_that_is_not_base64_is_refused():
    with pytest.raises(ManifestError) as err:
        wire.unpack_manifest({"round": 0, "manifest": "not base64!!"})
    assert err.value.field == "manifest"
