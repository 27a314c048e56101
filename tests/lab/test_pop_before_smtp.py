"""POP-before-SMTP end to end: real Dovecot, the real engine, and a smart host double that
relays only for hosts Dovecot's log shows a recent POP login from (how real pop-before-smtp
daemons decide: they follow the POP server's log)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from deliverd_lab import Dovecot
from tests.fixtures.engine import Engine
from tests.fixtures.mailservers import DovecotFactory
from tests.fixtures.smtp_sink import free_port

POP_USER, POP_PASSWORD = "popuser", "pop-Secret-9"
WINDOW = dt.timedelta(minutes=5)


pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
]


@dataclass
class PopGatedRelay:
    """aiosmtpd handler: RCPT is accepted only after a recent POP login from the client IP."""

    dovecot: Dovecot
    lock: threading.Lock = field(default_factory=threading.Lock)
    logins_at_ehlo: list[int] = field(default_factory=list)
    messages: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def _recent_login(self, ip: str) -> bool:
        now = dt.datetime.now()
        return any(x.remote_ip == ip and now - x.time <= WINDOW for x in self.dovecot.logins())

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        with self.lock:
            self.logins_at_ehlo.append(len(self.dovecot.logins()))
        return responses

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not self._recent_login(session.peer[0]):
            with self.lock:
                self.refused.append(address)
            return f"554 5.7.1 <{address}>: Relay access denied (check your mail first)"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.messages.append((envelope.mail_from, tuple(envelope.rcpt_tos)))
        return "250 2.0.0 Ok: queued"


@pytest.fixture
def pop_gated_relay(dovecot_server: DovecotFactory) -> Any:
    dovecot = dovecot_server({POP_USER: POP_PASSWORD}, tls=True)
    handler = PopGatedRelay(dovecot)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(),
                            server_hostname="relay.test")
    controller.start()
    yield handler, controller.port
    controller.stop()


def pop_spec(dovecot: Dovecot, port: int, ca_file: str, password: str) -> dict[str, Any]:
    return {
        "routing": {"mode": "smarthost", "smarthost": {
            "host": "127.0.0.1", "port": port, "tls": "none", "ca_file": ca_file,
            "pop_before_smtp": {"host": "127.0.0.1", "port": dovecot.pop3_port,
                                "tls": "starttls", "username": POP_USER,
                                "password": password, "valid_for": "5m"},
        }},
        "dsn": {"notify_delayed": False},
    }


def wait_for(read: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_engine_logs_in_to_pop_before_the_smtp_session_and_delivers(
    pop_gated_relay: Any, engine_factory: Callable[..., Engine], ca_file: str,
) -> None:
    relay, port = pop_gated_relay
    engine = engine_factory(pop_spec(relay.dovecot, port, ca_file, POP_PASSWORD))

    engine.submit("app@deliverd.test", ["someone@dest.test"])

    engine.wait_status("someone@dest.test", "sent", timeout=30)
    assert relay.messages == [("app@deliverd.test", ("someone@dest.test",))]
    assert relay.refused == []
    # Dovecot had already logged the POP login when the SMTP session said EHLO.
    assert relay.logins_at_ehlo and relay.logins_at_ehlo[0] >= 1
    assert relay.dovecot.logins(POP_USER)[0].tls is True
    assert POP_PASSWORD not in engine.log_text()


def test_wrong_pop_password_defers_the_message_without_relaying(
    pop_gated_relay: Any, engine_factory: Callable[..., Engine], ca_file: str,
) -> None:
    relay, port = pop_gated_relay
    wrong = "Wrong-Pop-Password-7"
    engine = engine_factory(pop_spec(relay.dovecot, port, ca_file, wrong))

    engine.submit("app@deliverd.test", ["someone@dest.test"])

    record = engine.wait_status("someone@dest.test", "deferred", timeout=30)
    assert record["dsn"].startswith("4.")
    assert "pop" in record["reply"].lower()
    assert relay.messages == []
    assert not [r for r in engine.attempts() if r["status"] == "bounced"]
    assert wait_for(lambda: relay.dovecot.logins(POP_USER)) == []
    assert wrong not in engine.log_text()
