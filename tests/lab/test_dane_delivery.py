"""DANE (RFC 7672) end to end: the real DNSSEC lab (NSD + validating Unbound), a real engine and
aiosmtpd MX sinks presenting trustme certificates, one matching the lab's TLSA records and one
that does not."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fixtures.dnssec import DnssecLab
from tests.fixtures.engine import Engine, textfile_samples
from tests.fixtures.smtp_sink import Script, Sink, TlsCA, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SENDER = "alice@sender.test"


@pytest.fixture
def mx_port(dnssec_lab: DnssecLab) -> int:
    return free_port([dnssec_lab.mx_address])


@pytest.fixture
def mx(dnssec_lab: DnssecLab, mx_port: int) -> Iterator[Callable[[TlsCA], Sink]]:
    """Factory: the sink behind every lab MX name, with STARTTLS and the given certificate."""
    sinks: list[Sink] = []

    def start(tls: TlsCA) -> Sink:
        sink = Sink(dnssec_lab.mx_address, mx_port, Script(starttls=True), tls).start()
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        sink.stop()


@pytest.fixture
def start(engine_factory: Callable[..., Engine], dnssec_lab: DnssecLab,
          mx_port: int) -> Callable[..., Engine]:
    def make(**direct: Any) -> Engine:
        spec = {"routing": {"direct": {"port": mx_port, **direct}}}
        return engine_factory(spec, nameserver=dnssec_lab.resolver)
    return make


def test_matching_tlsa_delivers_over_dane_verified_tls(
        start: Callable[..., Engine], mx: Callable[[TlsCA], Sink], dnssec_lab: DnssecLab,
        mx_port: int) -> None:
    sink = mx(dnssec_lab.tls)
    engine = start()
    engine.submit(SENDER, ["bob@secure.test"])
    record = engine.wait_status("bob@secure.test", "sent")
    assert record["tls"] == "dane"
    assert record["relay"] == f"mx.secure.test[{dnssec_lab.mx_address}]:{mx_port}"
    assert sink.messages[0].rcpt_tos == ("bob@secure.test",)
    assert sink.sessions[-1].tls
    engine.stop()
    samples = textfile_samples(engine)
    assert samples[("deliverd_delivered_tls_total", (("tls", "dane"),))] == 1


def test_certificate_matching_no_tlsa_defers_and_the_log_says_why(
        start: Callable[..., Engine], mx: Callable[[TlsCA], Sink],
        dnssec_lab: DnssecLab) -> None:
    sink = mx(dnssec_lab.wrong_tls)
    engine = start()
    engine.submit(SENDER, ["bob@secure.test"])
    record = engine.wait_status("bob@secure.test", "deferred")
    assert record["dsn"] == "4.7.5"
    assert "DANE: certificate matches no TLSA record" in record["reply"]
    assert not sink.messages  # never in clear text after the failed check
    assert all("MAIL FROM" not in " ".join(s.commands) for s in sink.sessions)


def test_dane_off_delivers_to_the_same_certificate_without_checking(
        start: Callable[..., Engine], mx: Callable[[TlsCA], Sink],
        dnssec_lab: DnssecLab) -> None:
    sink = mx(dnssec_lab.wrong_tls)
    engine = start(dane=False)
    engine.submit(SENDER, ["bob@secure.test"])
    assert engine.wait_status("bob@secure.test", "sent")["tls"] == "encrypted"
    assert sink.messages


def test_tlsa_in_an_unsigned_zone_is_ignored(
        start: Callable[..., Engine], mx: Callable[[TlsCA], Sink],
        dnssec_lab: DnssecLab) -> None:
    sink = mx(dnssec_lab.wrong_tls)  # the insecure zone's TLSA names the other certificate
    engine = start()
    engine.submit(SENDER, ["bob@insecure.test"])
    assert engine.wait_status("bob@insecure.test", "sent")["tls"] == "encrypted"
    assert sink.messages[0].rcpt_tos == ("bob@insecure.test",)


def test_secure_mx_with_authenticated_denial_of_tlsa_delivers_opportunistically(
        start: Callable[..., Engine], mx: Callable[[TlsCA], Sink],
        dnssec_lab: DnssecLab) -> None:
    mx(dnssec_lab.wrong_tls)
    engine = start()
    engine.submit(SENDER, ["bob@nodane.secure.test"])
    assert engine.wait_status("bob@nodane.secure.test", "sent")["tls"] == "encrypted"


def test_bogus_tlsa_signature_defers_without_connecting(
        start: Callable[..., Engine], mx: Callable[[TlsCA], Sink],
        dnssec_lab: DnssecLab) -> None:
    sink = mx(dnssec_lab.tls)  # even the right certificate: the TLSA answer cannot be trusted
    engine = start()
    engine.submit(SENDER, ["bob@bogus.test"])
    record = engine.wait_status("bob@bogus.test", "deferred")
    assert record["dsn"] == "4.7.5"
    assert "TLSA lookup for mx.bogus.test failed" in record["reply"]
    assert not sink.sessions


def test_a_domain_without_mx_gets_dane_for_its_own_name(
        start: Callable[..., Engine], mx: Callable[[TlsCA], Sink],
        dnssec_lab: DnssecLab) -> None:
    # mx.secure.test has no MX (validated NODATA) but an A and a TLSA record of its own
    sink = mx(dnssec_lab.wrong_tls)
    engine = start()
    engine.submit(SENDER, ["bob@mx.secure.test"])
    record = engine.wait_status("bob@mx.secure.test", "deferred")
    assert "DANE: certificate matches no TLSA record" in record["reply"]
    assert not sink.messages


def test_bogus_mx_answer_defers_without_connecting(
        start: Callable[..., Engine], mx: Callable[[TlsCA], Sink],
        dnssec_lab: DnssecLab) -> None:
    sink = mx(dnssec_lab.tls)
    engine = start()
    engine.submit(SENDER, ["bob@badmx.bogus.test"])
    engine.wait_status("bob@badmx.bogus.test", "deferred")
    assert not sink.sessions


def test_required_tls_defers_when_starttls_is_not_offered(
        start: Callable[..., Engine], dnssec_lab: DnssecLab, mx_port: int) -> None:
    sink = Sink(dnssec_lab.mx_address, mx_port, Script(starttls=False), None).start()
    try:
        engine = start(tls="required")
        engine.submit(SENDER, ["bob@insecure.test"])
        record = engine.wait_status("bob@insecure.test", "deferred")
        assert "TLS is required" in record["reply"]
        assert not sink.messages
    finally:
        sink.stop()
