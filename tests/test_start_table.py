"""The ``bt_start`` table as one binary field (fs/start_table.py): it round
trips through FS's own protobuf encoding, and every malformed table is
refused with an error naming the field and the peer."""
from __future__ import annotations

import base64
import struct
import zlib

import pytest

import torch

from fs_bittorrent.core.pieces import make_model_manifest
from fs_bittorrent.errors import ProtocolError
from fs_bittorrent.net.tls import LocalIdentity

wire = pytest.importorskip("fs_bittorrent.fs.wire", exc_type=ImportError,
                           reason="FederatedScope is not installed: control messages skipped")
from fs_bittorrent.fs.start_table import (MAX_INFLATED, StartPeer,  # noqa: E402
                                          decode_start_table, encode_start_table)

PEERS = (1, 2, 3)


@pytest.fixture(scope="module")
def table():
    manifests = tuple(make_model_manifest({"w": torch.full((40, 30), float(p))}, owner=p,
                                          round=4, sample_count=10 * p, piece_size=1024)[0]
                      for p in PEERS)
    certs = {p: LocalIdentity.generate().cert_der for p in PEERS}
    return dict(manifests=manifests,
                neighbours={p: [q for q in PEERS if q != p] for p in PEERS},
                addresses={p: f"10.0.0.{p}:{7000 + p}" for p in PEERS},
                certificates={p: wire.certificate_to_text(d) for p, d in certs.items()},
                uplinks={1: 1.25e7, 2: 2.5e6}, certs=certs)


def packed(t) -> dict:
    return wire.pack_start(4, t["manifests"], t["neighbours"], 30.0, t["addresses"],
                           t["certificates"], t["uplinks"])


def test_start_round_trips_through_fs_protobuf(table):
    from federatedscope.core.message import Message
    from federatedscope.core.proto import gRPC_comm_manager_pb2 as pb
    msg = Message(msg_type="bt_start", sender=0, receiver=[1], state=4, content=packed(table))
    request = pb.MessageRequest.FromString(msg.transform(to_list=True).SerializeToString())
    got = Message()
    got.parse(request.msg)
    start = wire.unpack_start(got.content)
    assert start.round == 4 and start.timeout == 30.0
    assert start.manifests == list(table["manifests"])
    assert start.neighbours == table["neighbours"]
    assert start.addresses == {p: (f"10.0.0.{p}", 7000 + p) for p in PEERS}
    assert start.certificates == table["certs"]
    assert start.uplinks == table["uplinks"]


def test_a_row_without_a_manifest_is_a_member_that_owns_nothing(table):
    start = wire.unpack_start(wire.pack_start(4, table["manifests"][:2], table["neighbours"],
                                              30.0, table["addresses"]))
    assert [m.owner for m in start.manifests] == [1, 2]
    assert set(start.addresses) == set(PEERS) and start.certificates == {}


def test_every_truncation_is_refused_naming_a_table_field(table):
    raw = base64.b64decode(packed(table)["table"])
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError) as err:
            decode_start_table(raw[:cut])
        assert err.value.field.startswith("bt_start.table."), (cut, err.value.field)


def rows(t):
    return decode_start_table(base64.b64decode(packed(t)["table"]))


def test_the_table_is_deflated_and_version_1_is_still_read(table):
    raw = base64.b64decode(packed(table)["table"])
    assert raw[:5] == b"FSBS\x02"
    rs = rows(table)
    plain = encode_start_table(rs, version=1)
    assert plain[:5] == b"FSBS\x01" and len(raw) < len(plain)
    assert decode_start_table(plain) == rs == decode_start_table(encode_start_table(rs))
    with pytest.raises(ProtocolError) as err:
        encode_start_table(rs, version=3)
    assert err.value.field == "bt_start.table.version"


@pytest.mark.parametrize("corrupt,field", [
    (lambda raw, rs: b"XXXX" + raw[4:], "bt_start.table.magic"),
    (lambda raw, rs: raw[:4] + b"\x09" + raw[5:], "bt_start.table.version"),
    (lambda raw, rs: raw + b"\0", "bt_start.table.trailing_bytes"),
    # the same id twice
    (lambda raw, rs: encode_start_table(rs, version=1)[:7] + b"".join(
        encode_start_table([rs[0]], version=1)[7:] for _ in range(3)), "bt_start.table.peer"),
    # peer 2's row carrying peer 1's manifest
    (lambda raw, rs: (lambda b: b[:7] + struct.pack(">I", 2) + b[11:])(
        encode_start_table([rs[0]], version=1)), "bt_start.table.manifest[2]"),
    # version 2: the records deflated
    (lambda raw, rs: raw[:7] + b"not zlib at all", "bt_start.table.body"),
    (lambda raw, rs: raw[:-3], "bt_start.table.body"),
    (lambda raw, rs: raw[:7] + zlib.compress(bytes(MAX_INFLATED + 1)),
     "bt_start.table.inflated"),
    # well-formed records in version 2's stream, but one trailing byte
    (lambda raw, rs: raw[:7] + zlib.compress(encode_start_table(rs, version=1)[7:] + b"\0"),
     "bt_start.table.trailing_bytes"),
])
def test_malformed_tables_name_the_field(table, corrupt, field):
    raw = base64.b64decode(packed(table)["table"])
    bad = corrupt(raw, rows(table))
    with pytest.raises(ProtocolError) as err:
        decode_start_table(bad)
    assert err.value.field == field


def test_a_corrupt_manifest_names_its_row(table):
    rs = rows(table)
    raw = bytearray(encode_start_table(rs, version=1))
    at = raw.index(b"FSBM", raw.index(b"FSBM") + 1)     # peer 2's manifest
    raw[at + 4] = 99                                     # its version
    with pytest.raises(ProtocolError) as err:
        decode_start_table(bytes(raw))
    assert err.value.field == "bt_start.table.manifest[2]" and "version" in str(err.value)


@pytest.mark.parametrize("row,field", [
    (dict(address="no-port"), "bt_start.addresses[2]"),
    (dict(address="host:70000"), "bt_start.addresses[2]"),
    (dict(certificate=b"not DER"), "bt_start.certificates[2]"),
])
def test_bad_addresses_and_certificates_name_the_peer(table, row, field):
    rs = rows(table)
    rs[1] = StartPeer(**{**rs[1].__dict__, **row})
    content = {"round": 4, "timeout": 30.0,
               "table": base64.b64encode(encode_start_table(rs)).decode()}
    with pytest.raises(ProtocolError) as err:
        wire.unpack_start(content)
    assert err.value.field == field


@pytest.mark.parametrize("content,field", [
    ({"round": 4, "timeout": 30.0, "table": "***"}, "bt_start.table"),
    ({"round": 4, "timeout": 30.0}, "bt_start.table"),
    ({"round": 4, "table": ""}, "bt_start.timeout"),
    ({"timeout": 1.0, "table": ""}, "bt_start.round"),
])
def test_bad_start_content_names_the_field(content, field):
    with pytest.raises(ProtocolError) as err:
        wire.unpack_start(content)
    assert err.value.field == field


def test_encoding_refuses_a_manifest_in_another_peers_row(table):
    m = table["manifests"][0]
    with pytest.raises(ProtocolError) as err:
        encode_start_table([StartPeer(peer=2, manifest=m)])
    assert err.value.field == "bt_start.table.manifest[2]"
