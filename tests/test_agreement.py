"""Agreement on the aggregate, the digest, K-model flattening and their wire
fields: unit tests (no run).  ``fs_bittorrent.fs`` needs FederatedScope."""
from __future__ import annotations

import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: fs_bittorrent.fs tests skipped")

import torch  # noqa: E402

from fs_bittorrent.errors import BitTorrentError, ProtocolError  # noqa: E402
from fs_bittorrent.fs import wire  # noqa: E402
from fs_bittorrent.fs.agreement import check_agreement  # noqa: E402
from fs_bittorrent.fs.fs_aggregation import (flatten_models, state_digest,  # noqa: E402
                                             unflatten_models)

A, B, C = "a" * 64, "b" * 64, "c" * 64


def test_largest_group_of_complete_clients_is_agreed_and_the_rest_named():
    ag = check_agreement(4, {1: A, 2: A, 3: B, 4: A, 5: C}, complete={1, 2, 3, 4},
                         reporters={1, 2, 3, 4, 5, 6})
    assert ag.digest == A and ag.agreeing == [1, 2, 4]
    assert ag.differing == [3] and ag.partial == [5] and ag.missing == [6]
    assert not ag.agreed and ag.source() == 1
    d = ag.as_dict()
    assert d["differing_count"] == 1 and d["agreed"] is False and d["round"] == 4


def test_ties_go_to_the_group_with_the_lowest_id_and_partial_clients_may_agree():
    ag = check_agreement(0, {1: B, 2: A, 3: "", 4: A}, complete={1, 2})
    assert ag.digest == B and ag.agreeing == [1] and ag.differing == [2]
    assert ag.partial == [4] and ag.missing == [3]
    ag = check_agreement(0, {1: A, 2: A}, complete={1})
    assert ag.agreed and ag.agreeing == [1, 2] and ag.partial == []


def test_no_complete_client_no_agreed_digest():
    ag = check_agreement(2, {1: A, 2: B}, complete=set())
    assert ag.digest is None and not ag.agreed and ag.source() is None
    assert ag.partial == [1, 2]


def test_digest_is_the_exact_bits_names_dtypes_and_shapes():
    m = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    assert state_digest(m) == state_digest({k: v.clone() for k, v in reversed(m.items())})
    bumped = {**m, "w": m["w"].clone()}
    bumped["w"][0, 0] = torch.nextafter(bumped["w"][0, 0], torch.tensor(1.0))
    assert state_digest(bumped) != state_digest(m)
    assert state_digest({**m, "w": m["w"].reshape(3, 2)}) != state_digest(m)
    assert state_digest({**m, "w": m["w"].double()}) != state_digest(m)
    assert state_digest({"v": m["w"], "b": m["b"]}) != state_digest(m)


def test_k_models_flatten_and_back():
    models = [{"fc.weight": torch.ones(2)}, {"fc.weight": torch.zeros(2)}]
    flat = flatten_models(models)
    assert sorted(flat) == ["bt_model0/fc.weight", "bt_model1/fc.weight"]
    back = unflatten_models(flat, 2)
    assert all(torch.equal(a["fc.weight"], b["fc.weight"]) for a, b in zip(back, models))
    assert unflatten_models(models[0], 1) == models[0]
    for bad in ({"fc.weight": torch.ones(2)}, {"bt_model2/fc.weight": torch.ones(2)},
                {"bt_modelx/fc": torch.ones(1)}):
        with pytest.raises(BitTorrentError) as err:
            unflatten_models(bad, 2)
        assert err.value.field == "model_para"
    with pytest.raises(BitTorrentError):
        flatten_models([torch.ones(1)])


def test_wire_fields_of_agreement_are_checked():
    stats = wire.pack_stats(3, 10, 20, 4, 0.5, A)
    assert wire.unpack_stats_digest(stats) == A and wire.unpack_stats(stats)[0] == 3
    assert wire.unpack_stats_digest({k: v for k, v in stats.items() if k != "digest"}) == ""
    for bad in ("A" * 64, "a" * 63, "z" * 64, 7):
        with pytest.raises(ProtocolError) as err:
            wire.unpack_stats_digest({**stats, "digest": bad})
        assert err.value.field == "bt_stats.digest"
    assert wire.unpack_order(wire.pack_round_end(2, [3, 1, 2])) == [3, 1, 2]
    assert wire.unpack_order({"round": 2}) == []
    for bad in ([1, "2"], "1,2", [True]):
        with pytest.raises(ProtocolError) as err:
            wire.unpack_order({"round": 2, "order": bad})
        assert err.value.field == "bt_round_end.order"
    model = {"w": torch.arange(4, dtype=torch.float32)}
    r, digest, flat = wire.unpack_aggregate(wire.pack_aggregate(5, A, model))
    assert (r, digest) == (5, A) and torch.equal(flat["w"], model["w"])
    with pytest.raises(ProtocolError) as err:
        wire.unpack_aggregate({"round": 5, "digest": A, "safetensors": "not base64!"})
    assert err.value.field == "model_para.safetensors"
