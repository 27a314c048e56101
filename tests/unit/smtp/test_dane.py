"""RFC 7672 matching of a server's certificate chain against TLSA records: one row per rule."""

from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from deliverd.config.model import TimeoutsConfig
from deliverd.core.outcomes import Hop, Route
from deliverd.smtp.dane import Tlsa, name_matches, usable, verify
from deliverd.smtp.session import SmtpSession
from deliverd.smtp.tls import client_context
from tests.fixtures.smtp_sink import Script, Sink, TlsCA, free_port

MX = "mx.secure.test"


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def spki(cert_der: bytes) -> bytes:
    return x509.load_der_x509_certificate(cert_der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def record(usage: int, selector: int, mtype: int, cert_der: bytes) -> Tlsa:
    data = cert_der if selector == 0 else spki(cert_der)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return Tlsa(usage, selector, mtype, data)


@pytest.fixture(scope="module")
def pki() -> dict[str, bytes]:
    root = trustme.CA()
    inter = root.create_child_ca()
    leaf = inter.issue_cert(MX)
    other = trustme.CA().issue_cert(MX)
    expired = root.issue_cert(MX, not_after=datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC))
    return {
        "root": der(root.cert_pem.bytes()),
        "inter": der(inter.cert_pem.bytes()),
        "leaf": der(leaf.cert_chain_pems[0].bytes()),
        "other": der(other.cert_chain_pems[0].bytes()),
        "expired": der(expired.cert_chain_pems[0].bytes()),
        "wrongname": der(inter.issue_cert("mx.elsewhere.test").cert_chain_pems[0].bytes()),
    }


@pytest.mark.parametrize(("selector", "mtype"), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_dane_ee_matches_the_leaf_in_every_selector_and_matching_type(
        pki: dict[str, bytes], selector: int, mtype: int) -> None:
    result = verify([record(3, selector, mtype, pki["leaf"])], [pki["leaf"]], [MX])
    assert result.ok, result.reason


def test_dane_ee_rejects_another_certificate_and_says_why(pki: dict[str, bytes]) -> None:
    result = verify([record(3, 1, 1, pki["leaf"])], [pki["other"]], [MX])
    assert not result.ok
    assert "matches no TLSA record" in result.reason


def test_dane_ee_ignores_names_and_expiry(pki: dict[str, bytes]) -> None:
    for cert in (pki["expired"], pki["wrongname"]):
        assert verify([record(3, 1, 1, cert)], [cert], [MX]).ok


def test_dane_ta_matches_an_issuer_in_the_chain(pki: dict[str, bytes]) -> None:
    chain = [pki["leaf"], pki["inter"], pki["root"]]
    assert verify([record(2, 1, 1, pki["inter"])], chain, [MX]).ok
    assert verify([record(2, 0, 2, pki["root"])], chain, [MX]).ok


def test_dane_ta_needs_the_mx_name_on_the_leaf(pki: dict[str, bytes]) -> None:
    chain = [pki["wrongname"], pki["inter"], pki["root"]]
    assert not verify([record(2, 1, 1, pki["inter"])], chain, [MX]).ok


def test_dane_ta_needs_a_valid_signature_up_to_the_anchor(pki: dict[str, bytes]) -> None:
    # the other leaf was not issued by this intermediate, whatever the chain claims
    chain = [pki["other"], pki["inter"], pki["root"]]
    assert not verify([record(2, 1, 1, pki["inter"])], chain, [MX]).ok


def test_dane_ta_with_the_full_anchor_in_dns_verifies_a_leaf_sent_alone(
        pki: dict[str, bytes]) -> None:
    assert verify([Tlsa(2, 0, 0, pki["inter"])], [pki["leaf"]], [MX]).ok
    assert not verify([Tlsa(2, 0, 0, pki["root"])], [pki["leaf"]], [MX]).ok


def test_dane_ta_does_not_match_the_leaf_itself(pki: dict[str, bytes]) -> None:
    assert not verify([record(2, 1, 1, pki["leaf"])], [pki["leaf"]], [MX]).ok


def test_pkix_usages_and_unknown_parameters_are_unusable(pki: dict[str, bytes]) -> None:
    records = [record(0, 1, 1, pki["root"]), record(1, 1, 1, pki["leaf"]),
               Tlsa(3, 2, 1, b"x"), Tlsa(3, 1, 9, b"x")]
    assert usable(records) == ()
    assert not verify(records, [pki["leaf"]], [MX]).ok


def test_one_matching_record_among_others_is_enough(pki: dict[str, bytes]) -> None:
    records = [record(3, 1, 1, pki["other"]), record(3, 1, 1, pki["leaf"])]
    assert verify(records, [pki["leaf"]], [MX]).ok


def test_no_certificate_or_garbage_fails(pki: dict[str, bytes]) -> None:
    assert not verify([record(3, 1, 1, pki["leaf"])], [], [MX]).ok
    assert not verify([record(3, 1, 1, pki["leaf"])], [b"not a certificate"], [MX]).ok


@pytest.mark.parametrize(("pattern", "host", "expected"), [
    ("mx.secure.test", "MX.Secure.Test.", True),
    ("*.secure.test", "mx.secure.test", True),
    ("*.secure.test", "a.mx.secure.test", False),
    ("*.secure.test", "secure.test", False),
    ("mx.secure.test", "mx2.secure.test", False),
])
def test_name_matching_wildcard_is_one_label(pattern: str, host: str, expected: bool) -> None:
    assert name_matches(pattern, host) is expected


@pytest.mark.integration
async def test_peer_chain_of_a_real_handshake_carries_the_issuer_for_dane_ta() -> None:
    """On every supported Python the chain the server sent (leaf, intermediate) is read, so
    DANE-TA can match the intermediate after an unverified handshake."""
    root = trustme.CA()
    inter = root.create_child_ca()
    leaf = inter.issue_cert(MX)
    port = free_port(["127.0.0.78"])
    sink = Sink("127.0.0.78", port, Script(starttls=True), TlsCA(root, leaf)).start()
    session = SmtpSession(Hop(MX, "127.0.0.78", port, Route.DIRECT), "client.test",
                          TimeoutsConfig(connect=5, greeting=5, command=5))
    try:
        await session.open(None)
        await session.hello()
        assert (await session.starttls(client_context(False, None))).code == 220
        chain = session.peer_chain()
    finally:
        await session.quit()
        sink.stop()
    assert chain[:2] == [der(leaf.cert_chain_pems[0].bytes()), der(inter.cert_pem.bytes())]
    assert verify([record(2, 1, 1, chain[1])], chain, [MX]).ok
    assert not verify([record(2, 1, 1, chain[1])], chain, ["mx.other.test"]).ok
