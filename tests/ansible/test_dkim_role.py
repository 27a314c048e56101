"""The role and DKIM: keys the spec names and the host lacks are made (0600, the engine's
user), never replaced on the next run, and the DNS records to publish are shown."""

from __future__ import annotations

import hashlib
import os
import pwd
import re
from pathlib import Path

import pytest

from tests.ansible.test_ansible_role import _free_port, _play, _spec, prefix
from tests.fixtures.role import recap_changed

__all__ = ["prefix"]  # the fixture, shared with the role's other tests

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_the_role_makes_missing_dkim_keys_for_the_engine_and_shows_their_records(
    tmp_path: Path, prefix: Path
) -> None:
    keys = prefix / "etc" / "deliverd-dkim"
    spec = _spec(prefix, _free_port())
    spec["dkim"] = [
        {"domain": "role-test.deliverd.test", "selector": "rsa2026",
         "key_file": str(keys / "rsa2026.key")},
        {"domain": "role-test.deliverd.test", "selector": "ed2026",
         "algorithm": "ed25519-sha256", "key_file": str(keys / "ed2026.key")},
    ]
    try:
        output = _play(tmp_path, prefix, spec)
        engine_uid = pwd.getpwnam("deliverd").pw_uid
        digests = {}
        for name in ("rsa2026.key", "ed2026.key"):
            info = (keys / name).stat()
            assert (info.st_mode & 0o777, info.st_uid) == (0o600, engine_uid), name
            digests[name] = hashlib.sha256((keys / name).read_bytes()).hexdigest()
        # (the debug output escapes the quotes of the zone line)
        for selector, kind in (("rsa2026", "rsa"), ("ed2026", "ed25519")):
            line = (rf'{selector}\._domainkey\.role-test\.deliverd\.test\. IN TXT '
                    rf'\\?"v=DKIM1; k={kind}; p=')
            assert re.search(line, output), output[-4000:]
        assert (keys / "ed2026.key").read_text().strip() not in output  # the seed is secret

        assert recap_changed(_play(tmp_path, prefix, spec)) == 0
        for name, digest in digests.items():
            assert hashlib.sha256((keys / name).read_bytes()).hexdigest() == digest
    finally:
        _play(tmp_path, prefix, spec, state="absent")
    assert not os.path.exists(prefix / "etc" / "deliverd")
