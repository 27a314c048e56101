"""POP-before-SMTP client against a real Dovecot: TLS policies, failures, login reuse."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from deliverd.config.convert import config_from_spec
from deliverd.config.model import Config
from deliverd.core.outcomes import Stage
from deliverd.smtp.pop3 import PopBeforeSmtp
from deliverd.spec.normalise import normalise
from deliverd.spec.validation import validate_spec
from deliverd_lab import Dovecot
from tests.fixtures.dns import DnsServer
from tests.fixtures.mailservers import DovecotFactory

pytestmark = pytest.mark.integration

USER, PASSWORD = "popuser", "pop-Secret-9"


def pop_config(
    server: Dovecot, tls: str, *, password: str = PASSWORD, ca_file: str | None = None,
    valid_for: str = "5m", pop_host: str = "127.0.0.1", nameserver: str | None = None,
    **smarthost: Any,
) -> Config:
    port = server.pop3s_port if tls == "tls" else server.pop3_port
    sh: dict[str, Any] = {
        "host": "relay.test",
        "pop_before_smtp": {"host": pop_host, "port": port, "tls": tls,
                            "username": USER, "password": password, "valid_for": valid_for},
        **smarthost,
    }
    if ca_file is not None:
        sh["ca_file"] = ca_file
    spec = {
        "version": 1,
        "host": {"name": "deliverd.test"},
        "routing": {"mode": "smarthost", "smarthost": sh},
        "timeouts": {"connect": "3s", "command": "3s"},
    }
    if nameserver is not None:
        spec["dns"] = {"nameservers": [nameserver]}
    errors = [p for p in validate_spec(spec) if p.severity.value == "error"]
    assert not errors, errors
    return config_from_spec(normalise(spec))


async def wait_logins(server: Dovecot, count: int) -> int:
    """Dovecot's log process writes asynchronously: wait for ``count`` logins, then settle."""
    for _ in range(100):  # at most 5 s
        if len(server.logins(USER)) >= count:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # long enough for an unexpected extra login to show up too
    return len(server.logins(USER))


async def test_plaintext_login_succeeds_when_plaintext_auth_allowed(
    dovecot_server: DovecotFactory,
) -> None:
    server = dovecot_server(tls=False)
    cfg = pop_config(server, "none", allow_plaintext_auth=True)

    assert await PopBeforeSmtp(cfg).ensure() is None

    assert await wait_logins(server, 1) == 1
    assert server.logins(USER)[0].tls is False


async def test_stls_login_succeeds_with_verified_certificate(
    dovecot_server: DovecotFactory, ca_file: str,
) -> None:
    server = dovecot_server(tls=True)
    cfg = pop_config(server, "starttls", ca_file=ca_file)

    assert await PopBeforeSmtp(cfg).ensure() is None

    assert await wait_logins(server, 1) == 1
    assert server.logins(USER)[0].tls is True


async def test_pop3s_login_succeeds_with_implicit_tls(
    dovecot_server: DovecotFactory, ca_file: str,
) -> None:
    server = dovecot_server(tls=True)
    cfg = pop_config(server, "tls", ca_file=ca_file)

    assert await PopBeforeSmtp(cfg).ensure() is None

    assert await wait_logins(server, 1) == 1
    assert server.logins(USER)[0].tls is True


async def test_wrong_password_is_a_temporary_pop_failure_without_the_password(
    dovecot_server: DovecotFactory, ca_file: str, caplog: pytest.LogCaptureFixture,
) -> None:
    server = dovecot_server(tls=True)
    wrong = "Wrong-Pop-Password-7"
    cfg = pop_config(server, "starttls", ca_file=ca_file, password=wrong)
    caplog.set_level(logging.DEBUG)

    failure = await PopBeforeSmtp(cfg).ensure()

    assert failure is not None
    assert (failure.stage, failure.temporary, failure.status) == (Stage.POP, True, "4.7.0")
    assert "PASS refused" in failure.error
    for text in (failure.error, repr(failure), caplog.text):
        assert wrong not in text and PASSWORD not in text
    assert await wait_logins(server, 0) == 0


async def test_stls_required_but_not_offered_fails_before_any_password_is_sent(
    dovecot_server: DovecotFactory,
) -> None:
    server = dovecot_server(tls=False)  # no certificate: Dovecot refuses STLS
    cfg = pop_config(server, "starttls")

    failure = await PopBeforeSmtp(cfg).ensure()

    assert failure is not None and failure.stage is Stage.POP
    assert "STLS refused" in failure.error
    await asyncio.sleep(0.3)
    log = server.log_text()
    # Dovecot logs every authentication attempt; none happened, so no PASS went out in clear.
    assert "no auth attempts" in log
    assert "auth failed" not in log.lower() and not server.logins()


async def test_untrusted_certificate_fails_verification(
    dovecot_server: DovecotFactory,
) -> None:
    server = dovecot_server(tls=True)
    cfg = pop_config(server, "starttls")  # system CAs do not know the test CA

    failure = await PopBeforeSmtp(cfg).ensure()

    assert failure is not None and "certificate verify failed" in failure.error
    assert await wait_logins(server, 0) == 0


async def test_plaintext_pop_without_allow_plaintext_auth_is_refused_locally(
    dovecot_server: DovecotFactory,
) -> None:
    server = dovecot_server(tls=False)
    allowed = pop_config(server, "none", allow_plaintext_auth=True)
    smarthost = allowed.routing.smarthost
    assert smarthost is not None
    # The validator refuses this spec; the client must refuse it too if one gets through.
    cfg = dataclasses.replace(allowed, routing=dataclasses.replace(
        allowed.routing, smarthost=dataclasses.replace(smarthost, allow_plaintext_auth=False)))
    await asyncio.sleep(0.2)
    connections_before = server.log_text().count("rip=127.0.0.1")  # readiness checks

    failure = await PopBeforeSmtp(cfg).ensure()

    assert failure is not None and "allow_plaintext_auth" in failure.error
    await asyncio.sleep(0.3)
    assert server.log_text().count("rip=127.0.0.1") == connections_before  # never connected


async def test_second_ensure_within_valid_for_does_not_log_in_again(
    dovecot_server: DovecotFactory, ca_file: str,
) -> None:
    server = dovecot_server(tls=True)
    pop = PopBeforeSmtp(pop_config(server, "starttls", ca_file=ca_file, valid_for="5m"))

    assert await pop.ensure(now=1000.0) is None
    assert await pop.ensure(now=1000.0 + 299) is None
    assert await wait_logins(server, 1) == 1

    assert await pop.ensure(now=1000.0 + 301) is None  # expired: a fresh login
    assert await wait_logins(server, 2) == 2


async def test_concurrent_ensure_calls_share_one_login(
    dovecot_server: DovecotFactory, ca_file: str,
) -> None:
    server = dovecot_server(tls=True)
    pop = PopBeforeSmtp(pop_config(server, "starttls", ca_file=ca_file))

    results = await asyncio.gather(*(pop.ensure() for _ in range(10)))

    assert results == [None] * 10
    assert await wait_logins(server, 1) == 1


async def test_changed_pop_settings_on_reload_force_a_new_login(
    dovecot_server: DovecotFactory, ca_file: str,
) -> None:
    server = dovecot_server(tls=True)
    pop = PopBeforeSmtp(pop_config(server, "starttls", ca_file=ca_file))
    assert await pop.ensure() is None

    pop.update_config(pop_config(server, "starttls", ca_file=ca_file))  # same settings
    assert await pop.ensure() is None
    assert await wait_logins(server, 1) == 1

    pop.update_config(pop_config(server, "tls", ca_file=ca_file))  # now POP3S
    assert await pop.ensure() is None
    assert await wait_logins(server, 2) == 2


async def test_pop_host_name_is_resolved_with_the_engines_nameservers(
    dovecot_server: DovecotFactory, ca_file: str,
    dns_server_factory: Callable[[Sequence[str]], DnsServer],
) -> None:
    dns = dns_server_factory(["host-record=relay.test,127.0.0.1"])
    server = dovecot_server(tls=True)
    cfg = pop_config(server, "starttls", ca_file=ca_file, pop_host="relay.test",
                     nameserver=dns.nameserver)

    assert await PopBeforeSmtp(cfg).ensure() is None  # TLS verified for relay.test

    assert await wait_logins(server, 1) == 1


async def test_unresolvable_pop_host_is_a_temporary_pop_failure(
    dovecot_server: DovecotFactory, dns_server_factory: Callable[[Sequence[str]], DnsServer],
) -> None:
    dns = dns_server_factory([])
    server = dovecot_server(tls=False)
    cfg = pop_config(server, "none", allow_plaintext_auth=True, pop_host="nowhere.test",
                     nameserver=dns.nameserver)

    failure = await PopBeforeSmtp(cfg).ensure()

    assert failure is not None and failure.stage is Stage.POP and failure.temporary
    assert "nowhere.test" in failure.error
    assert PASSWORD not in failure.error
