"""DKIM signing (issue 16): keys as dknewkey writes them, signatures dkimpy's verifier accepts.

The pure part (which keys sign which From: domain, oversigning, tampering, key errors) runs
without sockets; the integration part sends mail through a running engine to aiosmtpd sinks
with the public keys served by a real dnsmasq, and checks every way in, retries and the smart
host path carry the very bytes signed when the message was queued.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dkim
import dns.exception
import dns.resolver
import pytest

from deliverd.config.model import (
    Config,
    DkimKey,
    DsnConfig,
    HostConfig,
    LocalConfig,
    MasqueradeConfig,
)
from deliverd.dkim.check import check_key
from deliverd.dkim.keys import DkimKeyError, load_key
from deliverd.dkim.signer import from_domain, signed, signer_for
from deliverd.queue.store import QueueStore
from deliverd.submission.cleanup import Intake
from deliverd.submission.maildrop import DropEnvelope, prepare, write_drop
from deliverd.submission.pickup import Pickup
from tests.fixtures.dns import DnsServer
from tests.fixtures.engine import Engine
from tests.fixtures.smtp_sink import Sink, free_port

DKNEWKEY = str(Path(sys.executable).with_name("dknewkey"))
MESSAGE = (b"From: Alice <alice@news.sender.test>\r\nTo: bob@dkim-rcpt.test\r\n"
           b"Subject: quarterly report\r\nDate: Mon, 30 Nov 2026 20:00:00 +0000\r\n"
           b"Message-ID: <r1@news.sender.test>\r\n\r\nThe numbers.\r\n")


@dataclass(frozen=True)
class Keys:
    rsa: DkimKey
    ed25519: DkimKey

    def records(self) -> dict[bytes, bytes]:
        """name -> TXT value, as a verifier's dnsfunc answers."""
        out = {}
        for entry in (self.rsa, self.ed25519):
            key = load_key(entry)
            out[f"{key.record_name}.".encode()] = key.txt_value().encode()
        return out


def _dknewkey(directory: Path, name: str, *ktype: str) -> Path:
    subprocess.run([DKNEWKEY, *ktype, name], cwd=directory, check=True, capture_output=True)
    return directory / f"{name}.key"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("dkim-keys")
    rsa = _dknewkey(directory, "rsa2048")
    ed = _dknewkey(directory, "ed2026", "--ktype", "ed25519")
    return Keys(DkimKey("sender.test", "rsa2048", str(rsa)),
                DkimKey("sender.test", "ed2026", str(ed), "ed25519-sha256"))


def answers(records: dict[bytes, bytes]) -> Callable[..., bytes | None]:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)
    return dnsfunc


def verify_all(message: bytes, dnsfunc: Callable[..., bytes | None]) -> list[tuple[str, bool]]:
    """(algorithm, verified) for every DKIM-Signature of the message, top first."""
    count = len(re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n", 1)[0]))
    checker = dkim.DKIM(message)
    results = []
    for index in range(count):
        try:
            ok = bool(checker.verify(idx=index, dnsfunc=dnsfunc))
        except dkim.DKIMException:  # a body hash mismatch is raised, not returned
            ok = False
        results.append((checker.signature_fields[b"a"].decode(), ok))
    return results


# --- pure ---------------------------------------------------------------------------------------

def test_the_txt_records_are_the_ones_dknewkey_writes(keys: Keys) -> None:
    for entry in (keys.rsa, keys.ed25519):
        written = Path(entry.key_file).with_suffix(".dns").read_text()
        assert load_key(entry).txt_value() == written.replace("h=sha256; ", "")
    line = load_key(keys.rsa).zone_line()
    assert line.startswith('rsa2048._domainkey.sender.test. IN TXT "v=DKIM1; k=rsa; p=MII')
    assert all(len(part) <= 255 for part in re.findall(r'"([^"]*)"', line))


def test_a_subdomain_is_signed_with_rsa_and_ed25519_and_both_verify(keys: Keys) -> None:
    out = signed((keys.rsa, keys.ed25519), MESSAGE)
    assert out.endswith(MESSAGE)
    assert verify_all(out, answers(keys.records())) == [("rsa-sha256", True),
                                                        ("ed25519-sha256", True)]
    assert b"c=relaxed/relaxed" in out


def test_h_lists_the_oversigned_fields_twice(keys: Keys) -> None:
    out = signed((keys.rsa,), MESSAGE)
    signature = dkim.DKIM(out)
    signature.verify(dnsfunc=answers(keys.records()))
    h = [name.strip() for name in signature.signature_fields[b"h"].split(b":")]
    for name in (b"from", b"to", b"subject", b"date", b"message-id"):
        assert h.count(name) == 2, h
    assert b"received" not in h


@pytest.mark.parametrize("tamper", [
    pytest.param(lambda m: m.replace(b"quarterly report", b"quarterly refund"),
                 id="subject-edited"),
    pytest.param(lambda m: m.replace(b"Subject:", b"Subject: injected\r\nSubject:"),
                 id="second-subject-added"),
    pytest.param(lambda m: m.replace(b"To: bob", b"To: eve@evil.test\r\nTo: bob"),
                 id="second-to-added"),
    pytest.param(lambda m: m.replace(b"The numbers.", b"Other numbers."), id="body-edited"),
])
def test_a_tampered_message_fails_verification(keys: Keys,
                                               tamper: Callable[[bytes], bytes]) -> None:
    out = signed((keys.rsa, keys.ed25519), MESSAGE)
    assert verify_all(tamper(out), answers(keys.records())) == [("rsa-sha256", False),
                                                                ("ed25519-sha256", False)]


def test_a_received_field_added_above_the_signature_leaves_it_valid(keys: Keys) -> None:
    out = b"Received: from client.test ([127.0.0.1])\r\n\tby deliverd.test; now\r\n" + signed(
        (keys.rsa,), MESSAGE)
    assert verify_all(out, answers(keys.records())) == [("rsa-sha256", True)]


@pytest.mark.parametrize(("from_field", "signed_by"), [
    (b"From: a@sender.test", 2),
    (b"From: a@deep.news.Sender.TEST", 2),
    (b"From: a@othersender.test", 0),
    (b"From: a@sender.test.example", 0),
    (b"From: a@sender.test, b@sender.test", 0),  # two authors: whose domain is unclear
    (b"X-No-From: 1", 0),
])
def test_only_mail_from_the_domain_or_below_is_signed(keys: Keys, from_field: bytes,
                                                      signed_by: int) -> None:
    message = from_field + b"\r\nSubject: x\r\n\r\nbody\r\n"
    out = signed((keys.rsa, keys.ed25519), message)
    assert out.count(b"DKIM-Signature:") == signed_by


def test_two_from_fields_are_not_signed_for_either() -> None:
    assert from_domain(b"From: a@sender.test\r\nFrom: b@sender.test\r\n\r\n") is None
    assert from_domain(b"From: A\r\n <a@x.sender.test>\r\n\r\nFrom: b@o.test\r\n") == (
        "x.sender.test")


def test_no_dkim_config_costs_nothing_and_changes_nothing() -> None:
    assert signer_for(()) is None
    assert signed((), MESSAGE) is MESSAGE


def test_a_key_that_cannot_be_read_or_parsed_is_an_error_without_the_key(tmp_path: Path) -> None:
    missing = DkimKey("sender.test", "s", str(tmp_path / "none.key"))
    with pytest.raises(DkimKeyError, match=r"none\.key: cannot be read"):
        signed((missing,), MESSAGE)
    secret = "TOP-SECRET-KEY-MATERIAL"
    garbage = tmp_path / "garbage.key"
    garbage.write_text(f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n")
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        with pytest.raises(DkimKeyError) as caught:
            signed((DkimKey("sender.test", "s", str(garbage), algorithm),), MESSAGE)
        assert secret not in str(caught.value)
        assert "garbage.key" in str(caught.value)


def test_a_key_file_replaced_on_disk_is_read_again(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "current.key"
    path.write_bytes(Path(keys.ed25519.key_file).read_bytes())
    entry = DkimKey("sender.test", "ed2026", str(path), "ed25519-sha256")
    first = signer_for((entry,))
    assert first is not None
    other = _dknewkey(tmp_path, "next", "--ktype", "ed25519")
    os.replace(other, path)
    second = signer_for((entry,))
    assert second is not None
    assert second.keys[0].public != first.keys[0].public


# --- through the engine -----------------------------------------------------------------------

MX = "127.0.0.81"
RELAY = "127.0.0.82"
SENDER = "alice@sender.test"
RCPT = "bob@dkim-rcpt.test"


def txt_record_line(entry: DkimKey) -> str:
    """dnsmasq's txt-record= for a key: the value in strings of at most 255 characters."""
    key = load_key(entry)
    value = key.txt_value()
    parts = ",".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"txt-record={key.record_name},{parts}"


@pytest.fixture(scope="module")
def zone(session_dns_server_factory: Callable[..., DnsServer], keys: Keys) -> DnsServer:
    return session_dns_server_factory((
        "mx-host=dkim-rcpt.test,mx.dkim-rcpt.test,10",
        f"host-record=mx.dkim-rcpt.test,{MX}",
        f"host-record=relay.dkim.test,{RELAY}",
        txt_record_line(keys.rsa),
        txt_record_line(keys.ed25519),
    ))


def dns_lookup(server: DnsServer) -> Callable[..., bytes | None]:
    """A dkimpy dnsfunc that asks the lab's dnsmasq, as a receiving MTA asks its resolver."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]
    return lookup


@pytest.fixture(scope="module")
def port() -> int:
    return free_port([MX, RELAY])


@pytest.fixture
def start(engine_factory: Callable[..., Engine], zone: DnsServer, port: int,
          keys: Keys) -> Callable[..., Engine]:
    def make(mode: str = "direct", dkim_entries: tuple[DkimKey, ...] | None = None,
             smtp_workers: int = 0) -> Engine:
        entries = (keys.rsa, keys.ed25519) if dkim_entries is None else dkim_entries
        spec = {
            "limits": {"smtp_workers": smtp_workers},
            "routing": {"mode": mode, "direct": {"port": port},
                        "smarthost": {"host": "relay.dkim.test", "port": port, "tls": "none"}},
            "dsn": {"notify_delayed": False},
            "dkim": [{"domain": e.domain, "selector": e.selector, "key_file": e.key_file,
                      "algorithm": e.algorithm} for e in entries],
        }
        return engine_factory(spec, nameserver=zone.nameserver)
    return make


@pytest.mark.integration
@pytest.mark.parametrize("smtp_workers", [0, 1], ids=["in-the-daemon", "in-a-worker"])
def test_mail_through_the_listener_verifies_against_the_lab_dns(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int,
        zone: DnsServer, smtp_workers: int) -> None:
    # A worker signs with the keys named in the config it was handed, as the daemon does.
    mx = smtp_sink(MX, port)
    engine = start(smtp_workers=smtp_workers)
    engine.submit(SENDER, [RCPT], headers={"Message-ID": "<m1@sender.test>"})
    engine.wait_status(RCPT, "sent")
    assert mx.wait_for(1)
    data = mx.messages[0].data
    assert data.startswith(b"Received: ")  # the listener's trace field sits above the signatures
    assert verify_all(data, dns_lookup(zone)) == [("rsa-sha256", True), ("ed25519-sha256", True)]
    tampered = data.replace(b"Subject: test", b"Subject: test, now free money")
    assert verify_all(tampered, dns_lookup(zone)) == [("rsa-sha256", False),
                                                      ("ed25519-sha256", False)]


@pytest.mark.integration
def test_deliverd_send_signs_and_an_unreadable_key_queues_nothing(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int,
        zone: DnsServer, tmp_path: Path) -> None:
    mx = smtp_sink(MX, port)
    engine = start()
    engine.cli("send", "-c", str(engine.config), "--from", SENDER, "--to", RCPT)
    assert mx.wait_for(1, timeout=20)
    assert verify_all(mx.messages[0].data, dns_lookup(zone)) == [("rsa-sha256", True),
                                                                 ("ed25519-sha256", True)]

    broken = start(dkim_entries=(DkimKey("sender.test", "gone", str(tmp_path / "gone.key")),))
    result = broken.cli("send", "-c", str(broken.config), "--from", SENDER, "--to", RCPT,
                        check=False)
    assert result.returncode == 75
    assert "gone.key: cannot be read" in result.stderr
    assert broken.queue() == []


@pytest.mark.integration
def test_the_listener_refuses_with_451_when_a_key_cannot_be_read(
        start: Callable[..., Engine], tmp_path: Path) -> None:
    import smtplib

    engine = start(dkim_entries=(DkimKey("sender.test", "gone", str(tmp_path / "gone.key")),))
    with smtplib.SMTP("127.0.0.1", engine.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail(SENDER)
        smtp.rcpt(RCPT)
        code, reply = smtp.data(b"From: alice@sender.test\r\nSubject: x\r\n\r\nbody\r\n")
    assert (code, reply[:5]) == (451, b"4.3.0")
    assert engine.queue() == []
    assert "gone.key: cannot be read" in engine.log_text()


@pytest.mark.integration
@pytest.mark.slow
def test_retries_and_the_smart_host_carry_the_bytes_signed_at_queueing(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int,
        zone: DnsServer) -> None:
    mx = smtp_sink(MX, port, data="451 4.3.0 try again later")
    relay = smtp_sink(RELAY, port, data="451 4.3.0 busy too")
    engine = start("direct_then_smarthost")
    engine.submit(SENDER, [RCPT])
    engine.wait_status(RCPT, "deferred")
    engine.wait_for(lambda: len(mx.refused) >= 2 and relay.refused, what="a retry")
    relay.stop()
    healthy_relay = smtp_sink(RELAY, port)
    record = engine.wait_status(RCPT, "sent", timeout=30)
    assert record["route"] == "smarthost"
    delivered = healthy_relay.messages[0].data
    assert verify_all(delivered, dns_lookup(zone)) == [("rsa-sha256", True),
                                                       ("ed25519-sha256", True)]
    assert {*mx.refused, *relay.refused} == {delivered}


# --- the maildrop pickup (what sendmail leaves) ------------------------------------------------

def _pickup_config(entries: tuple[DkimKey, ...]) -> Config:
    host = "web1.deliverd.test"
    return Config(
        host=HostConfig(host), dsn=DsnConfig(f"postmaster@{host}"),
        local=LocalConfig(("localhost", host), host, (("root", ("ops@example.com",)),)),
        masquerade=MasqueradeConfig("example.com"), dkim=entries,
    )


def _pickup(path: Path, store: QueueStore, entry: DkimKey, woken: list[str]) -> Pickup:
    cfg = _pickup_config((entry,))
    return Pickup(path, store, Intake(store, lambda: cfg, lambda qid, _source: woken.append(qid)))


@pytest.mark.integration
async def test_the_pickup_signs_after_masquerading(keys: Keys, tmp_path: Path) -> None:
    entry = DkimKey("example.com", "rsa2048", keys.rsa.key_file)
    path = tmp_path / "queue"
    store = await QueueStore.open(path)
    prepare(path)
    woken: list[str] = []
    try:
        write_drop(path, DropEnvelope("root", ("x@example.org",)),
                   [b"From: root\r\nSubject: cron\r\n\r\nbody\r\n"], min_free=0)
        assert await _pickup(path, store, entry, woken).scan() == 1
        data = await store.read_data(woken[0])
    finally:
        await store.close()
    records = {b"rsa2048._domainkey.example.com.": load_key(entry).txt_value().encode()}
    assert b"\r\nFrom: root@example.com\r\n" in data
    assert verify_all(data, answers(records)) == [("rsa-sha256", True)]


@pytest.mark.integration
async def test_the_pickup_keeps_the_file_when_a_key_cannot_be_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entry = DkimKey("example.com", "gone", str(tmp_path / "gone.key"))
    path = tmp_path / "queue"
    store = await QueueStore.open(path)
    prepare(path)
    woken: list[str] = []
    try:
        name = write_drop(path, DropEnvelope("root", ("x@example.org",)),
                          [b"From: root\r\nSubject: cron\r\n\r\nbody\r\n"], min_free=0)
        assert await _pickup(path, store, entry, woken).scan() == 0
    finally:
        await store.close()
    assert woken == []
    assert (path / "maildrop" / name).exists()
    assert "gone.key: cannot be read" in caplog.text


# --- DSNs ---------------------------------------------------------------------------------------

@pytest.mark.integration
def test_a_bounce_is_signed_only_for_the_host_name_domain(
        engine_factory: Callable[..., Engine], zone: DnsServer, port: int,
        smtp_sink: Callable[..., Sink], keys: Keys) -> None:
    mx = smtp_sink(MX, port, rcpt={"bad@dkim-rcpt.test": "550 5.1.1 no such user",
                                   "worse@dkim-rcpt.test": "550 5.1.1 no such user"})
    host_key = DkimKey("deliverd.test", "rsa2048", keys.rsa.key_file)
    spec = {
        "routing": {"mode": "direct", "direct": {"port": port}},
        "dsn": {"notify_delayed": False},
        "dkim": [{"domain": "sender.test", "selector": "rsa2048",
                  "key_file": keys.rsa.key_file}],
    }
    # The sender's own domain has a key, host.name's has none: the bounce goes unsigned.
    engine = engine_factory(spec, nameserver=zone.nameserver)
    engine.submit("carol@dkim-rcpt.test", ["bad@dkim-rcpt.test"],
                  headers={"From": "alice@sender.test"})
    engine.wait_status("bad@dkim-rcpt.test", "bounced")
    assert mx.wait_for(1, timeout=20)
    bounce_header = mx.messages[0].data.split(b"\r\n\r\n", 1)[0]
    assert b"MAILER-DAEMON@deliverd.test" in bounce_header
    assert b"DKIM-Signature:" not in bounce_header  # (the returned original keeps its own)
    engine.stop()

    spec["dkim"] = [{"domain": "deliverd.test", "selector": "rsa2048",
                     "key_file": keys.rsa.key_file}]
    signing = engine_factory(spec, nameserver=zone.nameserver)
    signing.submit("carol@dkim-rcpt.test", ["worse@dkim-rcpt.test"],
                   headers={"From": "alice@sender.test"})
    signing.wait_status("worse@dkim-rcpt.test", "bounced")
    assert mx.wait_for(2, timeout=20)
    bounce = mx.messages[1].data
    records = {b"rsa2048._domainkey.deliverd.test.": load_key(host_key).txt_value().encode()}
    assert verify_all(bounce, answers(records)) == [("rsa-sha256", True)]


# --- deliverd dkim record / check ----------------------------------------------------------------

@pytest.mark.integration
def test_dkim_record_prints_the_zone_lines_and_check_finds_them_in_the_lab_dns(
        start: Callable[..., Engine], keys: Keys) -> None:
    engine = start()
    record = engine.cli("dkim", "record", "-c", str(engine.config))
    assert record.stdout.splitlines() == [load_key(keys.rsa).zone_line(),
                                          load_key(keys.ed25519).zone_line()]
    check = engine.cli("dkim", "check", "-c", str(engine.config), "--json")
    assert json.loads(check.stdout) == [
        {"name": "rsa2048._domainkey.sender.test", "selector": "rsa2048",
         "domain": "sender.test", "ok": True, "problems": [],
         "published": load_key(keys.rsa).txt_value()},
        {"name": "ed2026._domainkey.sender.test", "selector": "ed2026",
         "domain": "sender.test", "ok": True, "problems": [],
         "published": load_key(keys.ed25519).txt_value()},
    ]


@pytest.mark.integration
def test_dkim_check_fails_for_a_missing_record_and_a_key_dns_does_not_publish(
        start: Callable[..., Engine], keys: Keys, tmp_path: Path) -> None:
    other = _dknewkey(tmp_path, "other")
    engine = start(dkim_entries=(DkimKey("sender.test", "rsa2048", str(other)),
                                 DkimKey("sender.test", "unpublished", keys.rsa.key_file)))
    check = engine.cli("dkim", "check", "-c", str(engine.config), check=False)
    assert check.returncode == 1
    lines = check.stdout.splitlines()
    assert "is not the public half of" in lines[0]
    assert "no TXT record at unpublished._domainkey.sender.test" in lines[1]
    assert "BEGIN" not in check.stdout + check.stderr  # nothing of a private key is shown
    results = json.loads(engine.cli("dkim", "check", "-c", str(engine.config), "--json",
                                    check=False).stdout)
    # what DNS returned is reported as it is: another key's record, and nothing
    assert [r["published"] for r in results] == [load_key(keys.rsa).txt_value(), None]


def test_check_key_compares_the_record_and_verifies_a_test_signature(keys: Keys) -> None:
    rsa = load_key(keys.rsa)
    assert check_key(rsa, rsa.txt_value()).ok
    assert check_key(rsa, "v=DKIM1; k=rsa; h=sha256; " + rsa.txt_value()[16:]).ok
    assert "revoked" in check_key(rsa, "v=DKIM1; k=rsa; p=").problems[0]
    ed = load_key(keys.ed25519)
    assert "but the key is rsa" in check_key(rsa, ed.txt_value()).problems[0]
    assert check_key(rsa, ed.txt_value()).published == ed.txt_value()
    assert check_key(rsa, None).published is None


# --- OpenDKIM's own tools ---------------------------------------------------------------------

def opendkim_testkey(zone: DnsServer, directory: Path, selector: str,
                     key_file: Path) -> subprocess.CompletedProcess[str]:
    """``opendkim-testkey`` asking the lab dnsmasq through its libunbound: forwarded there,
    loopback allowed, and ``test.`` not answered locally (unbound's RFC 6761 default)."""
    unbound = directory / "unbound.conf"
    unbound.write_text(
        "server:\n  do-not-query-localhost: no\n  local-zone: \"test.\" nodefault\n"
        f"forward-zone:\n  name: \".\"\n  forward-addr: {zone.host}@{zone.port}\n")
    conf = directory / "opendkim.conf"
    conf.write_text(f"ResolverConfiguration {unbound}\n")
    return subprocess.run(
        ["opendkim-testkey", "-x", str(conf), "-d", "sender.test", "-s", selector,
         "-k", str(key_file), "-vvv"], capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_opendkim_testkey_accepts_the_published_rsa_key(zone: DnsServer, keys: Keys,
                                                        tmp_path: Path) -> None:
    # Debian 12's opendkim-testkey (2.11.0~beta2) checks RSA keys only ("expecting an rsa
    # key" for Ed25519): the Ed25519 record is proven by dkimpy's verifier above.
    if subprocess.run(["sh", "-c", "command -v opendkim-testkey"],
                      capture_output=True).returncode != 0:
        pytest.skip("opendkim-testkey is not installed (Debian package opendkim-tools)")
    rsa = opendkim_testkey(zone, tmp_path, "rsa2048", Path(keys.rsa.key_file))
    assert rsa.returncode == 0, rsa.stderr
    assert "key OK" in rsa.stdout
    wrong = opendkim_testkey(zone, tmp_path, "rsa2048", _dknewkey(tmp_path, "other"))
    assert wrong.returncode != 0
    assert "key OK" not in wrong.stdout
