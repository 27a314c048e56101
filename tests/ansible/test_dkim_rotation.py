"""The DKIM rotation plan (collection module_utils/dkim_rotation.py, behind the dkim_rotation
and with_dkim_selector filters of playbooks/rotate-dkim.yml): which dkim[] entries move, where
their new keys go, and the rotations refused because they would reuse a selector or a key.

The playbook itself runs in the molecule lab (molecule/lab/rotate_dkim.yml,
tests/ansible/test_molecule_lab.py): keys made, preflight against the lab's DNS, switch, retirement.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from ansible_collections.mailops.deliverd.plugins.module_utils.dkim_rotation import (
    RotationError,
    rotation,
    switched_spec,
)

from deliverd.spec.validation import validate_spec

KEYS = "/etc/deliverd/dkim"


def spec() -> dict[str, Any]:
    return {
        "version": 1,
        "host": {"name": "mail.example.com"},
        "routing": {"mode": "direct"},
        "dkim": [
            {"domain": "example.com", "selector": "s1", "key_file": f"{KEYS}/s1.key"},
            {"domain": "example.org", "selector": "s1", "key_file": f"{KEYS}/org-s1.key",
             "algorithm": "ed25519-sha256"},
            {"domain": "example.net", "selector": "old", "key_file": "/srv/keys/old.key"},
        ],
    }


def test_every_entry_moves_to_the_new_selector_with_a_key_beside_the_old_one() -> None:
    plan = rotation(spec(), "s2")
    assert [(p["old_record"], p["new_record"], p["new_key_file"], p["algorithm"])
            for p in plan] == [
        ("s1._domainkey.example.com", "s2._domainkey.example.com", f"{KEYS}/s2.key",
         "rsa-sha256"),
        ("s1._domainkey.example.org", "s2._domainkey.example.org", f"{KEYS}/s2.key",
         "ed25519-sha256"),
        ("old._domainkey.example.net", "s2._domainkey.example.net", "/srv/keys/s2.key",
         "rsa-sha256"),
    ]


def test_old_selector_and_domains_choose_the_entries() -> None:
    assert [p["domain"] for p in rotation(spec(), "s2", old_selector="s1")] == [
        "example.com", "example.org"]
    assert [p["domain"] for p in rotation(spec(), "s2", domains=["example.net"])] == [
        "example.net"]
    assert [p["old_key_file"] for p in rotation(spec(), "s2", "s1", ["example.org"])] == [
        f"{KEYS}/org-s1.key"]


def test_the_switched_spec_moves_only_the_chosen_entries_and_still_validates() -> None:
    original = spec()
    kept = copy.deepcopy(original)
    switched = switched_spec(original, "s2", domains=["example.com", "example.net"])
    assert original == kept  # the input is not changed
    assert [(e["selector"], e["key_file"]) for e in switched["dkim"]] == [
        ("s2", f"{KEYS}/s2.key"), ("s1", f"{KEYS}/org-s1.key"), ("s2", "/srv/keys/s2.key"),
    ]
    assert switched["dkim"][1]["algorithm"] == "ed25519-sha256"
    assert validate_spec(switched) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"new_selector": "s1", "old_selector": "s1"}, "already the selector in use"),
    ({"new_selector": "s9", "old_selector": "nope"}, "no dkim[] entry to rotate"),
    ({"new_selector": "s9", "domains": ["example.edu"]}, "no dkim[] entry to rotate"),
    ({"new_selector": ""}, "non-empty string"),
    # example.com's new key would be s1.key... of another entry: refuse to overwrite it
    ({"new_selector": "org-s1", "domains": ["example.com"]}, "already named by dkim[]"),
])
def test_rotations_that_would_reuse_a_selector_or_a_key_are_refused(
        kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RotationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rotation(spec(), **kwargs)
    with pytest.raises(RotationError):
        switched_spec(spec(), **kwargs)


def test_a_second_entry_already_on_the_new_selector_is_refused() -> None:
    both = spec()
    both["dkim"].append({"domain": "example.com", "selector": "s2",
                         "key_file": f"{KEYS}/other-s2.key"})
    with pytest.raises(RotationError, match=r"already has s2._domainkey.example.com"):
        rotation(both, "s2", old_selector="s1")
