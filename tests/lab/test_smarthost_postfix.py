"""The real engine delivering through a real Postfix smart host: SASL over verified STARTTLS."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.fixtures.dns import DnsServer
from tests.fixtures.engine import Engine
from tests.fixtures.mailservers import SMARTHOST_USERS, SmarthostLab

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WRONG = "Wrong-Smtp-Password-5"
ALL_PASSWORDS = (*SMARTHOST_USERS.values(), WRONG)


@pytest.fixture
def relay_nameserver(dns_server_factory: Callable[[Sequence[str]], DnsServer]) -> str:
    return dns_server_factory(["host-record=relay.test,127.0.0.1"]).nameserver


def smarthost_spec(lab: SmarthostLab, **smarthost: Any) -> dict[str, Any]:
    return {
        "routing": {"mode": "smarthost", "smarthost": {
            "host": "relay.test", "port": lab.port, "tls": "starttls", "ca_file": lab.ca_file,
            **smarthost,
        }},
        # One message in, one message in the queue: no delay DSN next to it.
        "dsn": {"notify_delayed": False},
    }


def wait_for(read: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def assert_no_password(*texts: str) -> None:
    for text in texts:
        for password in ALL_PASSWORDS:
            assert password not in text


@pytest.mark.parametrize(("postfix_smarthost", "mechanism"), [
    ({}, "PLAIN"),  # Postfix via Dovecot offers PLAIN and LOGIN: PLAIN is the stronger
    ({"auth_mechanisms": ("plain", "login", "cram-md5")}, "CRAM-MD5"),  # preferred when offered
], indirect=["postfix_smarthost"])
def test_engine_delivers_through_postfix_with_global_credentials(
    postfix_smarthost: SmarthostLab, relay_nameserver: str,
    engine_factory: Callable[..., Engine], mechanism: str,
) -> None:
    lab = postfix_smarthost
    engine = engine_factory(smarthost_spec(
        lab, auth={"username": "relay", "password": lab.users["relay"]}),
        nameserver=relay_nameserver)

    engine.submit("app@deliverd.test", ["someone@dest.test"])

    record = engine.wait_status("someone@dest.test", "sent", timeout=30)
    assert record["relay"] == f"relay.test[127.0.0.1]:{lab.port}"
    assert lab.sink.wait_for(1, timeout=30), lab.postfix.log_text()
    assert lab.sink.messages[0].rcpt_tos == ("someone@dest.test",)
    assert wait_for(lab.postfix.sasl_users) == ["relay"]
    assert f"sasl_method={mechanism}, sasl_username=relay" in lab.postfix.log_text()
    assert "TLS connection established from localhost[127.0.0.1]" in lab.postfix.log_text()
    assert_no_password(engine.log_text())


def test_per_account_credentials_authenticate_each_sender_as_its_account(
    postfix_smarthost: SmarthostLab, relay_nameserver: str,
    engine_factory: Callable[..., Engine],
) -> None:
    lab = postfix_smarthost
    accounts = [
        {"address": f"{user}@deliverd.test",
         "smarthost_auth": {"username": user, "password": lab.users[user]}}
        for user in ("alice", "bob")
    ]
    engine = engine_factory({
        **smarthost_spec(lab, per_account_auth=True,
                         auth={"username": "relay", "password": lab.users["relay"]}),
        "accounts": accounts,
    }, nameserver=relay_nameserver)

    engine.submit("alice@deliverd.test", ["one@dest.test"])
    engine.submit("bob@deliverd.test", ["two@dest.test"])

    engine.wait_status("one@dest.test", "sent", timeout=30)
    engine.wait_status("two@dest.test", "sent", timeout=30)
    assert lab.sink.wait_for(2, timeout=30), lab.postfix.log_text()
    users = wait_for(lambda: len(lab.postfix.sasl_users()) >= 2 and lab.postfix.sasl_users())
    assert sorted(users) == ["alice", "bob"]
    by_sender = {m.mail_from: m.rcpt_tos for m in lab.sink.messages}
    assert by_sender == {"alice@deliverd.test": ("one@dest.test",),
                         "bob@deliverd.test": ("two@dest.test",)}
    assert_no_password(engine.log_text())


def test_wrong_smarthost_password_defers_loudly_and_never_bounces(
    postfix_smarthost: SmarthostLab, relay_nameserver: str,
    engine_factory: Callable[..., Engine],
) -> None:
    lab = postfix_smarthost
    engine = engine_factory(smarthost_spec(lab, auth={"username": "relay", "password": WRONG}),
                            nameserver=relay_nameserver)

    queue_id = engine.submit("app@deliverd.test", ["someone@dest.test"])

    record = engine.wait_status("someone@dest.test", "deferred", timeout=30)
    assert record["dsn"].startswith("4.")
    assert "auth" in record["reply"].lower()
    assert "535" in record["reply"]
    queue = engine.queue()
    assert [m["queue_id"] for m in queue] == [queue_id]
    assert [r["state"] for r in queue[0]["recipients"]] == ["deferred"]
    assert not [r for r in engine.attempts() if r["status"] == "bounced"]
    assert lab.sink.messages == []
    assert lab.postfix.sasl_users() == []
    queue_output = json.dumps(queue) + engine.cli("queue", "-c", str(engine.config), "list").stdout
    assert_no_password(engine.log_text(), queue_output)
