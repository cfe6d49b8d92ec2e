"""The cluster config's compare logic (memosd/cluster/settings.py), pure: which must-agree values differ, the
one-line refusal, and what `memosctl cluster config set` may change. The etcd side is in tests/cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from memosd.cluster.etcd import KeyValue
from memosd.cluster.placement import RULE
from memosd.cluster.settings import (
    FIXED_KEYS,
    KEY,
    SETTING_KEYS,
    ClusterSettings,
    changed,
    fixed_of,
    mismatches,
    refusal,
    settings_of,
)
from memosd.config import Config, QuotasConfig, SecurityConfig
from memosd.errors import InvalidField


def _fixed(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"embedder.fingerprint": "abc", "embedder.dim": 384, "runtime.model": "none",
                               "security.auth": True, "security.tls": False, "cluster.lease_seconds": 5,
                               "cluster.placement": RULE}
    return {**base, **over}


def test_equal_values_agree() -> None:
    assert mismatches(_fixed(), _fixed()) == []


def test_each_must_agree_value_is_compared() -> None:
    for key in FIXED_KEYS:
        theirs = _fixed(**{key: "other"})
        found = mismatches(_fixed(), theirs)
        assert [m.key for m in found] == [key]


def test_a_boolean_is_not_a_number() -> None:
    # JSON keeps true and 1 apart; Python's True == 1 must not make auth=on agree with a stray 1.
    assert [m.key for m in mismatches(_fixed(), _fixed(**{"security.auth": 1}))] == ["security.auth"]
    assert [m.key for m in mismatches(_fixed(**{"embedder.dim": 384}), _fixed(**{"embedder.dim": 384.0}))] \
        == ["embedder.dim"]


def test_a_value_the_stored_record_lacks_is_not_compared() -> None:
    theirs = _fixed()
    del theirs["security.tls"]  # written by a memosd that did not know it
    assert mismatches(_fixed(**{"security.tls": True}), theirs) == []


def test_the_refusal_is_one_line_naming_the_setting_and_both_values() -> None:
    stored = ClusterSettings(_fixed(), {}, created_by="alpha")
    line = refusal(mismatches(_fixed(**{"cluster.lease_seconds": 3}), stored.fixed), stored)
    assert "\n" not in line
    assert "cluster.lease_seconds is 3 on this node but 5 in the cluster" in line
    assert KEY in line and "'alpha'" in line
    several = refusal(mismatches(_fixed(**{"security.auth": False, "runtime.model": "x"}), stored.fixed), stored)
    assert several.startswith("cluster config: runtime.model is \"x\" on this node but \"none\"")
    assert "(and 1 more: security.auth)" in several


def test_fixed_of_reads_the_nodes_configuration(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path, security=SecurityConfig(auth=False, tls_cert_file="/x.pem"))
    fixed = fixed_of(config, "fp", 768)
    assert set(fixed) == set(FIXED_KEYS)
    assert fixed["embedder.fingerprint"] == "fp" and fixed["embedder.dim"] == 768
    assert fixed["security.auth"] is False and fixed["security.tls"] is True
    assert fixed["cluster.placement"] == RULE


def test_settings_are_the_quotas_and_replace_the_nodes_own() -> None:
    settings = settings_of(QuotasConfig())
    assert set(settings) == set(SETTING_KEYS)
    stored = ClusterSettings(_fixed(), {**settings, "quotas.max_mounts_per_principal": 7, "quotas.unknown": 1})
    quotas = stored.quotas(QuotasConfig(max_streams_per_principal=3))
    assert quotas.max_mounts_per_principal == 7
    assert quotas.max_streams_per_principal == QuotasConfig().max_streams_per_principal  # the cluster's wins


def test_changed_sets_one_setting_by_the_configs_rules() -> None:
    stored = ClusterSettings(_fixed(), settings_of(QuotasConfig()), created_by="alpha", revision=9)
    new = changed(stored, "quotas.max_mounts_per_principal", "12", "beta")
    assert new.settings["quotas.max_mounts_per_principal"] == 12 and new.updated_by == "beta"
    assert new.fixed == stored.fixed and new.created_by == "alpha"
    assert changed(stored, "quotas.max_mounts_per_principal", "0", "beta").settings[
        "quotas.max_mounts_per_principal"] == 0  # 0: no limit, as in the file


@pytest.mark.parametrize(("key", "value", "says"), [
    ("security.auth", "false", "fixed when the cluster is made"),
    ("cluster.lease_seconds", "9", "fixed when the cluster is made"),
    ("quotas.nope", "1", "unknown cluster setting"),
    ("server.workers", "4", "unknown cluster setting"),
    ("quotas.max_mounts_per_principal", "-1", "expected an integer >= 0"),
    ("quotas.max_streams_per_principal", "0", "expected an integer > 0"),
    ("quotas.max_streams_per_principal", "many", "expected an integer"),
])
def test_changed_refuses_what_cannot_be_set(key: str, value: str, says: str) -> None:
    stored = ClusterSettings(_fixed(), settings_of(QuotasConfig()))
    with pytest.raises(InvalidField, match=says):
        changed(stored, key, value, "beta")


def test_a_record_round_trips_and_a_bad_one_is_refused() -> None:
    stored = ClusterSettings(_fixed(), settings_of(QuotasConfig()), created_by="a", updated_by="b", update_ns=5)
    kv = KeyValue(KEY.encode(), stored.record(), 3, 8, 2, 0)
    back = ClusterSettings.from_kv(kv)
    assert back == stored and back.revision == 8
    with pytest.raises(ValueError, match="not a cluster config record"):
        ClusterSettings.from_kv(KeyValue(KEY.encode(), b'{"fixed": []}', 3, 8, 2, 0))
