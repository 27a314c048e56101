"""RFC 3461 parameters, pure: xtext, MAIL and RCPT parameter parsing, what goes on to the next
hop, which notices NOTIFY asks for, and the fields and returned content of our DSNs."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message

import pytest
from flufl.bounce import all_failures
from hypothesis import given
from hypothesis import strategies as st

from deliverd.core.dsn_params import (
    DsnEvent,
    DsnSyntaxError,
    EnvelopeDsn,
    MailDsn,
    RcptDsn,
    Ret,
    check_envid,
    notify_wants,
    orcpt_of,
    orcpt_wire,
    parse_mail_params,
    parse_rcpt_params,
    xtext_decode,
    xtext_encode,
)
from deliverd.core.outcomes import Hop, Kind, Outcome, Route
from deliverd.reports.dsn import DsnKind, build_dsn, returned_message
from deliverd.sendmail.command_line import Failure, parse_args
from deliverd.smtp.policy import dsn_mail_parameters, dsn_rcpt_parameters

# -- xtext ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "xtext"), [
    ("", ""),
    ("plain@example.test", "plain@example.test"),
    ("a+b@example.test", "a+2Bb@example.test"),
    ("k=v", "k+3Dv"),
    ("two words", "two+20words"),
    ("tab\there", "tab+09here"),
    ("~!", "~!"),
    ("\x7f", "+7F"),
    ("é", "+C3+A9"),  # each UTF-8 octet
])
def test_xtext_encodes_plus_equals_and_everything_outside_printable_ascii(
    text: str, xtext: str
) -> None:
    assert xtext_encode(text) == xtext
    assert xtext_decode(xtext) == text


@pytest.mark.parametrize(("xtext", "text"), [
    ("a+2bb", "a+b"),  # lower-case hex is read too
    ("+41+42", "AB"),
])
def test_xtext_decode_reads_hexchars(xtext: str, text: str) -> None:
    assert xtext_decode(xtext) == text


@pytest.mark.parametrize("bad", ["a+b", "a+2", "a+GG", "a=b", "a b", "caf\u00e9", "x\x01"])
def test_xtext_decode_refuses_what_is_not_xtext(bad: str) -> None:
    with pytest.raises(ValueError, match="not xtext"):
        xtext_decode(bad)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_xtext_round_trips_any_text_and_is_printable_ascii(text: str) -> None:
    encoded = xtext_encode(text)
    assert encoded.isascii() and " " not in encoded and (not encoded or encoded.isprintable())
    assert xtext_decode(encoded) == text


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E)))
def test_xtext_of_printable_ascii_decodes_to_the_same_text(text: str) -> None:
    assert xtext_decode(xtext_encode(text)) == text


# -- MAIL and RCPT parameters -------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "dsn", "rest"), [
    ([], MailDsn(), []),
    (["SIZE=100"], MailDsn(), ["SIZE=100"]),
    (["RET=FULL"], MailDsn(Ret.FULL), []),
    (["ret=hdrs", "BODY=8BITMIME"], MailDsn(Ret.HDRS), ["BODY=8BITMIME"]),
    (["ENVID=QQ314159"], MailDsn(envid="QQ314159"), []),
    (["envid=Id+2BWith+3DSigns"], MailDsn(envid="Id+With=Signs"), []),  # case of the value kept
    (["RET=HDRS", "SMTPUTF8", "ENVID=x"], MailDsn(Ret.HDRS, "x"), ["SMTPUTF8"]),
])
def test_mail_parameters_take_ret_and_envid_and_leave_the_others(
    tokens: list[str], dsn: MailDsn, rest: list[str]
) -> None:
    assert parse_mail_params(tokens) == (dsn, rest)


@pytest.mark.parametrize(("tokens", "message"), [
    (["RET=BODY"], "RET must be FULL or HDRS"),
    (["RET="], "RET needs a value"),
    (["RET"], "RET needs a value"),
    (["RET=FULL", "RET=HDRS"], "RET given twice"),
    (["ENVID=a+zz"], "ENVID is not valid xtext"),
    (["ENVID=" + "x" * 101], "ENVID longer than 100"),
    (["ENVID=a+0Ab"], "printable"),
    (["ENVID=+C3+A9"], "printable US-ASCII"),
])
def test_bad_mail_parameters_get_501_with_an_enhanced_code(
    tokens: list[str], message: str
) -> None:
    with pytest.raises(DsnSyntaxError, match=message) as caught:
        parse_mail_params(tokens)
    assert caught.value.reply.startswith("501 5.5.4 ")


@pytest.mark.parametrize(("tokens", "dsn", "rest"), [
    ([], RcptDsn(), []),
    (["NOTIFY=NEVER"], RcptDsn("NEVER"), []),
    (["notify=never"], RcptDsn("NEVER"), []),
    (["NOTIFY=DELAY,SUCCESS"], RcptDsn("SUCCESS,DELAY"), []),  # stored in canonical order
    (["NOTIFY=FAILURE,DELAY,SUCCESS"], RcptDsn("SUCCESS,FAILURE,DELAY"), []),
    (["ORCPT=rfc822;Bob+2Bx@Example.test"], RcptDsn(orcpt="rfc822;Bob+x@Example.test"), []),
    (["ORCPT=RFC822;a@b.test", "X-FOO=1"], RcptDsn(orcpt="rfc822;a@b.test"), ["X-FOO=1"]),
    (["NOTIFY=FAILURE", "ORCPT=x-local;root"], RcptDsn("FAILURE", "x-local;root"), []),
])
def test_rcpt_parameters_take_notify_and_orcpt_and_leave_the_others(
    tokens: list[str], dsn: RcptDsn, rest: list[str]
) -> None:
    assert parse_rcpt_params(tokens) == (dsn, rest)


@pytest.mark.parametrize(("tokens", "message"), [
    (["NOTIFY=NEVER,SUCCESS"], "NOTIFY must be NEVER or"),
    (["NOTIFY=SOMETIMES"], "NOTIFY must be NEVER or"),
    (["NOTIFY=SUCCESS,SUCCESS"], "NOTIFY must be NEVER or"),
    (["NOTIFY=SUCCESS,"], "NOTIFY must be NEVER or"),
    (["NOTIFY=NEVER", "NOTIFY=NEVER"], "NOTIFY given twice"),
    (["ORCPT=a@b.test"], "addr-type;xtext"),
    (["ORCPT=rfc822;"], "addr-type;xtext"),
    (["ORCPT=rfc(822);a@b.test"], "addr-type;xtext"),
    (["ORCPT=rfc822;a+b@b.test"], "not valid xtext"),
    (["ORCPT=rfc822;a+0D+0Ab@b.test"], "control characters"),
    (["ORCPT=rfc822;" + "a" * 500], "longer than 500"),
])
def test_bad_rcpt_parameters_get_501_with_an_enhanced_code(
    tokens: list[str], message: str
) -> None:
    with pytest.raises(DsnSyntaxError, match=message) as caught:
        parse_rcpt_params(tokens)
    assert caught.value.reply.startswith("501 5.5.4 ")


@pytest.mark.parametrize(("envid", "ok"), [
    ("abc-123", True), ("x" * 100, True), ("with space", True), ("+" * 33, True),
    ("", False), ("x" * 101, False), ("+" * 34, False),  # 102 characters as xtext
    ("tab\tx", False), ("caf\u00e9", False),
])
def test_sendmail_envid_is_printable_ascii_up_to_100(envid: str, ok: bool) -> None:
    if ok:
        assert check_envid(envid) == envid
    else:
        with pytest.raises(DsnSyntaxError):
            check_envid(envid)


@pytest.mark.parametrize("envid", [
    "abc-123", "x" * 100, "with space", "+" * 33, "= " * 16 + "ab", "",
    "x" * 101, "+" * 34, " " * 34, "tab\tx", "caf\u00e9",
])
def test_sendmail_checks_v_as_the_pickup_does(envid: str) -> None:
    try:
        check_envid(envid)
        valid = True
    except DsnSyntaxError:
        valid = False
    if valid:
        assert parse_args(["-V", envid, "x@example.org"]).envid == envid
    else:
        with pytest.raises(Failure) as caught:
            parse_args(["-V", envid, "x@example.org"])
        assert caught.value.code == 64


# -- which notices NOTIFY asks for --------------------------------------------------------------


@pytest.mark.parametrize(("notify", "success", "failure", "delay"), [
    (None, False, True, True),  # RFC 3461 §4.1 default, and deliverd's behaviour before DSN
    ("NEVER", False, False, False),
    ("SUCCESS", True, False, False),
    ("FAILURE", False, True, False),
    ("SUCCESS,FAILURE", True, True, False),
    ("FAILURE,DELAY", False, True, True),
    ("SUCCESS,FAILURE,DELAY", True, True, True),
])
def test_notify_decides_each_kind_of_notice(
    notify: str | None, success: bool, failure: bool, delay: bool
) -> None:
    assert [notify_wants(notify, e) for e in DsnEvent] == [success, failure, delay]


# -- what goes on to the next hop ----------------------------------------------------------------

DSN_HOP = {"dsn": "", "size": "0"}
PLAIN_HOP = {"size": "0", "8bitmime": ""}


@pytest.mark.parametrize(("features", "dsn", "params"), [
    (DSN_HOP, EnvelopeDsn(), ()),
    (DSN_HOP, EnvelopeDsn(Ret.HDRS, "id+1 x"), ("RET=HDRS", "ENVID=id+2B1+20x")),
    (DSN_HOP, EnvelopeDsn(Ret.FULL), ("RET=FULL",)),
    (PLAIN_HOP, EnvelopeDsn(Ret.HDRS, "id"), ()),
])
def test_ret_and_envid_go_on_only_to_a_hop_offering_dsn(
    features: dict[str, str], dsn: EnvelopeDsn, params: tuple[str, ...]
) -> None:
    assert dsn_mail_parameters(features, dsn) == params


@pytest.mark.parametrize(("features", "dsn", "params"), [
    (DSN_HOP, RcptDsn(), ()),
    (DSN_HOP, RcptDsn("NEVER"), (b"NOTIFY=NEVER",)),
    (DSN_HOP, RcptDsn("SUCCESS,DELAY", "rfc822;a+b=c@x.test"),
     (b"NOTIFY=SUCCESS,DELAY", b"ORCPT=rfc822;a+2Bb+3Dc@x.test")),
    (DSN_HOP, RcptDsn(orcpt=orcpt_of("r\u00f6ot@x.test")), (b"ORCPT=utf-8;r+C3+B6ot@x.test",)),
    (PLAIN_HOP, RcptDsn("SUCCESS", "rfc822;a@x.test"), ()),
])
def test_notify_and_orcpt_go_on_only_to_a_hop_offering_dsn(
    features: dict[str, str], dsn: RcptDsn, params: tuple[bytes, ...]
) -> None:
    assert dsn_rcpt_parameters(features, dsn) == params


def test_orcpt_wire_form_parses_back_to_what_was_stored() -> None:
    stored = "rfc822;odd+name=x@example.test"
    assert parse_rcpt_params([f"ORCPT={orcpt_wire(stored)}"])[0].orcpt == stored


def test_envelope_dsn_gives_an_empty_request_for_a_recipient_without_one() -> None:
    dsn = EnvelopeDsn(recipients={"a@x.test": RcptDsn("NEVER")})
    assert dsn.of("a@x.test") == RcptDsn("NEVER")
    assert dsn.of("b@x.test") == RcptDsn()


# -- our notices ----------------------------------------------------------------------------------

HOP = Hop("relay.test", "127.0.0.1", 25, Route.SMARTHOST)
ORIGINAL = (b"From: app@example.test\r\nTo: bob@example.test\r\nSubject: s\r\n\r\n"
            + b"".join(b"body line %d\r\n" % i for i in range(100)))
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def report(kind: DsnKind, outcome: Outcome, **kw: object) -> bytes:
    return build_dsn(
        kind=kind, reporting_mta="deliverd.test", original_sender="app@example.test",
        queue_id="Q1", arrival=WHEN, original=ORIGINAL, outcomes=[outcome],
        include_transcript=False, now=WHEN, **kw,  # type: ignore[arg-type]
    )


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def status_fields(msg: EmailMessage) -> list[Message]:
    part = msg.get_payload()[1]  # type: ignore[index]
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


DELIVERED = Outcome("bob@example.test", Kind.DELIVERED, "2.0.0", "smtp; 250 2.0.0 queued", HOP)
BOUNCED = Outcome("bob@example.test", Kind.BOUNCED, "5.1.1", "smtp; 550 5.1.1 unknown", HOP)


def test_relayed_notice_says_relayed_and_a_bounce_parser_sees_no_failure() -> None:
    raw = report(DsnKind.RELAYED, DELIVERED, envid="ENV-7",
                 orcpts={"bob@example.test": "rfc822;Bob@Example.test"})
    msg = parse(raw)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    per_message, per_rcpt = status_fields(msg)
    assert per_message["Original-Envelope-Id"] == "ENV-7"
    assert per_rcpt["Action"] == "relayed"
    assert per_rcpt["Status"] == "2.0.0"
    assert per_rcpt["Original-Recipient"] == "rfc822; Bob@Example.test"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.test"
    assert all_failures(email.message_from_bytes(raw)) == (frozenset(), frozenset())


def test_failure_notice_is_a_permanent_failure_to_the_same_parser() -> None:
    raw = report(DsnKind.FAILURE, BOUNCED)
    assert all_failures(email.message_from_bytes(raw)) == (
        frozenset(), frozenset({b"bob@example.test"}))


@pytest.mark.parametrize(("kind", "outcome"), [
    (DsnKind.RELAYED, BOUNCED), (DsnKind.FAILURE, DELIVERED),
])
def test_a_notice_never_mixes_delivered_and_undelivered(kind: DsnKind, outcome: Outcome) -> None:
    with pytest.raises(ValueError, match="relayed notice"):
        report(kind, outcome)


def test_without_envid_or_orcpt_the_fields_are_absent() -> None:
    per_message, per_rcpt = status_fields(parse(report(DsnKind.FAILURE, BOUNCED)))
    assert per_message["Original-Envelope-Id"] is None
    assert per_rcpt["Original-Recipient"] is None


def test_ret_hdrs_returns_the_headers_only() -> None:
    msg = parse(report(DsnKind.FAILURE, BOUNCED))
    returned = msg.get_payload()[2]  # type: ignore[index]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"body line" not in msg.as_bytes()


def test_ret_full_returns_the_whole_message_as_message_rfc822() -> None:
    raw = report(DsnKind.FAILURE, BOUNCED, returned=returned_message(ORIGINAL, len(ORIGINAL)),
                 size=len(ORIGINAL))
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    text, _status, returned = msg.get_payload()  # type: ignore[misc]
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0]["Subject"] == "s"
    assert ORIGINAL in raw
    assert "returned in full" in text.get_content()
    assert all_failures(email.message_from_bytes(raw))[1] == frozenset({b"bob@example.test"})


def test_ret_full_over_the_limit_is_cut_at_a_line_end_and_says_so() -> None:
    limit = 200
    cut = returned_message(ORIGINAL, len(ORIGINAL), limit)
    assert len(cut) <= limit and cut.endswith(b"\r\n") and ORIGINAL.startswith(cut)
    raw = report(DsnKind.FAILURE, BOUNCED, returned=cut, size=len(ORIGINAL))
    text = parse(raw).get_payload()[0].get_content()  # type: ignore[index]
    assert f"was {len(ORIGINAL)} bytes long; only its first {len(cut)} bytes" in text
    assert b"body line 99" not in raw


@pytest.mark.parametrize(("prefix", "total", "limit", "expected"), [
    (b"a\r\nb\r\n", 6, 100, b"a\r\nb\r\n"),
    (b"a\nb", 3, 100, b"a\r\nb\r\n"),  # CRLF line ends, final one added
    (b"abc\r\ndef\r\nghi", 1000, 9, b"abc\r\n"),  # cut at the last whole line
    (b"abcdefghij", 1000, 5, b""),  # no line end within the limit: nothing
])
def test_returned_message_cuts_at_line_ends(
    prefix: bytes, total: int, limit: int, expected: bytes
) -> None:
    assert returned_message(prefix, total, limit) == expected
