"""Pure SMTP client logic: reply classification, error translation, TLS and AUTH decisions."""

from __future__ import annotations

import errno
import re
import ssl

import pytest
from aiosmtplib.errors import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPReadTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from hypothesis import given
from hypothesis import strategies as st

from deliverd.config.model import (
    Config,
    DsnConfig,
    HostConfig,
    RoutingConfig,
    SmarthostConfig,
    TlsPolicy,
)
from deliverd.core.outcomes import Envelope, Reply, Route, Stage
from deliverd.smtp.errors import (
    SessionError,
    clip,
    enhanced_status,
    failure_from_exception,
    failure_from_reply,
    map_errors,
    parse_enhanced,
    reply_from,
)
from deliverd.smtp.policy import (
    choose_mechanism,
    is_loop_banner,
    mail_parameters,
    may_authenticate,
    needs_smtputf8,
    size_limit,
    unsafe_address,
    wire_body,
    wire_size,
)
from deliverd.smtp.pool import FailureCache
from deliverd.smtp.tls import DIRECT_PLAN, StartTls, TlsMode, TlsPlan, plan_for, starttls_decision

VALID_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")

# -- reply classification --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        (550, "5.1.1 no such user", "5.1.1"),
        (550, "no such user", "5.0.0"),
        (554, "5.7.1 relay denied\nsecond line", "5.7.1"),
        (451, "4.7.1 greylisted", "4.7.1"),
        (452, "too many recipients", "4.0.0"),
        (421, "closing connection", "4.4.2"),
        (421, "4.7.0 too many errors", "4.7.0"),
        (550, "4.1.1 contradicts the basic code", "5.0.0"),
        (250, "2.0.0 Ok: queued", "2.0.0"),
        (250, "Ok", "2.0.0"),
        (550, "5.01.001 zero padded", "5.1.1"),
        (550, "5.1.1234 detail too long", "5.0.0"),
        (354, "go ahead", "4.5.0"),
        (999, "nonsense", "4.5.0"),
        (-1, "malformed", "4.5.0"),
    ],
)
def test_reply_is_classified_to_an_enhanced_status(code: int, text: str, status: str) -> None:
    assert enhanced_status(reply_from(code, text)) == status


def test_enhanced_code_is_split_off_the_reply_text() -> None:
    assert parse_enhanced("5.1.1 no such user") == ("5.1.1", "no such user")
    assert parse_enhanced("no code here") == (None, "no code here")
    assert parse_enhanced("5.1.1") == ("5.1.1", "")
    reply = reply_from(550, "5.1.1 no such user")
    assert (reply.enhanced, reply.text, str(reply)) == ("5.1.1", "no such user",
                                                         "550 5.1.1 no such user")


@given(klass=st.sampled_from([2, 4, 5]), rest=st.integers(0, 99), text=st.text())
def test_any_2xx_4xx_5xx_reply_gets_a_valid_status_of_the_same_class(
    klass: int, rest: int, text: str
) -> None:
    code = klass * 100 + rest
    status = enhanced_status(reply_from(code, text))
    assert VALID_STATUS.match(status), status
    assert status[0] == str(code)[0]


@given(code=st.integers(min_value=-1000, max_value=10_000), text=st.text())
def test_any_code_and_text_gets_a_valid_status(code: int, text: str) -> None:
    assert VALID_STATUS.match(enhanced_status(reply_from(code, text)))


@given(klass=st.sampled_from("245"), subject=st.integers(0, 999), detail=st.integers(0, 999),
       rest=st.text())
def test_a_well_formed_enhanced_code_of_the_right_class_is_kept(
    klass: str, subject: int, detail: int, rest: str
) -> None:
    code = int(klass) * 100 + 50
    text = f"{klass}.{subject}.{detail} {rest}"
    assert enhanced_status(reply_from(code, text)) == f"{klass}.{subject}.{detail}"


@pytest.mark.parametrize(("code", "temporary"), [(421, True), (451, True), (550, False),
                                                 (554, False)])
def test_failure_from_reply_is_temporary_for_4xx_only(code: int, temporary: bool) -> None:
    failure = failure_from_reply(Stage.MAIL, Reply(code, "x"))
    assert failure.temporary is temporary
    assert failure.stage is Stage.MAIL and failure.reply == Reply(code, "x")


def test_failure_from_a_positive_reply_is_a_temporary_protocol_error() -> None:
    failure = failure_from_reply(Stage.DATA, Reply(250, "ok?"))
    assert failure.temporary and failure.status == "4.5.0"


# -- error translation -----------------------------------------------------------------------


def _wrapped(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("exc", "stage", "expected_stage", "error", "status"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Stage.CONNECT, Stage.CONNECT,
         "Connection refused", "4.4.1"),
        (TimeoutError(), Stage.CONNECT, Stage.CONNECT, "connection timed out", "4.4.1"),
        (SMTPReadTimeoutError("slow"), Stage.RCPT, Stage.RCPT, "timeout at rcpt", "4.4.2"),
        (SMTPServerDisconnected("gone"), Stage.DATA, Stage.DATA, "lost connection at data",
         "4.4.2"),
        (ConnectionResetError(), Stage.MAIL, Stage.MAIL, "lost connection at mail", "4.4.2"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), Stage.CONNECT, Stage.CONNECT,
         "Network is unreachable", "4.4.1"),
        (SMTPResponseException(-1, "Malformed SMTP response line: xx"), Stage.EHLO, Stage.EHLO,
         "protocol error at ehlo: Malformed SMTP response line: xx", "4.5.0"),
        (ValueError("control character"), Stage.RCPT, Stage.RCPT,
         "local error at rcpt: ValueError", "4.3.0"),
    ],
)
def test_library_errors_are_translated_once(
    exc: BaseException, stage: Stage, expected_stage: Stage, error: str, status: str
) -> None:
    failure = failure_from_exception(exc, stage)
    assert (failure.stage, failure.error, failure.status) == (expected_stage, error, status)
    assert failure.temporary and failure.reply is None


def test_certificate_error_hidden_under_a_connect_error_is_a_tls_failure() -> None:
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "unable to get local issuer certificate"
    exc = _wrapped(SMTPConnectError("Error connecting"), cert)
    failure = failure_from_exception(exc, Stage.GREETING)
    assert failure.stage is Stage.STARTTLS and failure.status == "4.7.5" and failure.temporary
    assert failure.error == "certificate verify failed: unable to get local issuer certificate"


def test_negative_greeting_exception_keeps_the_reply() -> None:
    failure = failure_from_exception(SMTPConnectResponseError(554, "5.3.2 no service"),
                                     Stage.GREETING)
    assert failure.reply == Reply(554, "no service", "5.3.2")
    assert not failure.temporary and failure.status == "5.3.2"


def test_map_errors_raises_session_error_without_the_library_chain() -> None:
    with pytest.raises(SessionError) as info, map_errors(Stage.MAIL):
        raise SMTPServerDisconnected("Connection lost")
    assert info.value.failure.stage is Stage.MAIL
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_map_errors_lets_programming_errors_through() -> None:
    with pytest.raises(KeyError), map_errors(Stage.MAIL):
        raise KeyError("bug")


def test_error_text_is_clipped_to_one_printable_line() -> None:
    text = clip("a\r\nb\x00c" + "x" * 1000)
    assert len(text) == 200 and text.startswith("a b?c") and text.endswith("...")


# -- policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["PLAIN", "LOGIN", "CRAM-MD5"], "CRAM-MD5"),
        (["login", "plain"], "PLAIN"),
        (["LOGIN"], "LOGIN"),
        (["XOAUTH2", "GSSAPI"], None),
        ([], None),
    ],
)
def test_auth_mechanism_preference(offered: list[str], chosen: str | None) -> None:
    assert choose_mechanism(offered) == chosen


@pytest.mark.parametrize(
    ("tls", "plaintext_ok", "allowed"),
    [(True, False, True), (False, False, False), (False, True, True)],
)
def test_credentials_only_over_tls_unless_allowed(tls: bool, plaintext_ok: bool,
                                                  allowed: bool) -> None:
    assert may_authenticate(tls, plaintext_ok) is allowed


@pytest.mark.parametrize(
    ("greeting", "loop"),
    [
        ("deliverd.test ESMTP Postfix", True),
        ("DELIVERD.TEST. ready", True),
        ("mx.other.test ESMTP deliverd.test", False),
        ("", False),
        ("deliverd.test\nsecond line", True),
    ],
)
def test_greeting_naming_us_first_is_a_loop(greeting: str, loop: bool) -> None:
    assert is_loop_banner(greeting, "deliverd.test") is loop


@pytest.mark.parametrize(
    ("plan", "offered", "active", "decision"),
    [
        (DIRECT_PLAN, True, False, StartTls.START),
        (DIRECT_PLAN, False, False, StartTls.SKIP),
        (TlsPlan(TlsMode.REQUIRED, True), True, False, StartTls.START),
        (TlsPlan(TlsMode.REQUIRED, True), False, False, StartTls.FAIL),
        (TlsPlan(TlsMode.IMPLICIT, True), False, True, StartTls.SKIP),
        (TlsPlan(TlsMode.NONE), True, False, StartTls.SKIP),
        (TlsPlan(TlsMode.REQUIRED, True), True, True, StartTls.SKIP),
    ],
)
def test_starttls_decision(plan: TlsPlan, offered: bool, active: bool,
                           decision: StartTls) -> None:
    assert starttls_decision(plan, offered, active) is decision


def _cfg(tls: TlsPolicy, verify: bool = True) -> Config:
    smarthost = SmarthostConfig("relay.test", tls=tls, verify_tls=verify, ca_file="/ca.pem")
    return Config(HostConfig("deliverd.test"), DsnConfig("postmaster@deliverd.test"),
                  routing=RoutingConfig(smarthost=smarthost))


@pytest.mark.parametrize(
    ("route", "policy", "verify", "plan"),
    [
        (Route.DIRECT, TlsPolicy.STARTTLS, True, TlsPlan(TlsMode.OPPORTUNISTIC, False)),
        (Route.SMARTHOST, TlsPolicy.STARTTLS, True, TlsPlan(TlsMode.REQUIRED, True, "/ca.pem")),
        (Route.SMARTHOST, TlsPolicy.TLS, False, TlsPlan(TlsMode.IMPLICIT, False, "/ca.pem")),
        (Route.SMARTHOST, TlsPolicy.OPPORTUNISTIC, True,
         TlsPlan(TlsMode.OPPORTUNISTIC, True, "/ca.pem")),
        (Route.SMARTHOST, TlsPolicy.NONE, True, TlsPlan(TlsMode.NONE, True, "/ca.pem")),
    ],
)
def test_tls_plan_from_route_and_policy(route: Route, policy: TlsPolicy, verify: bool,
                                        plan: TlsPlan) -> None:
    assert plan_for(route, _cfg(policy, verify)) == plan


def test_only_opportunistic_tls_falls_back_to_clear_text() -> None:
    assert DIRECT_PLAN.may_fall_back_to_clear
    assert not TlsPlan(TlsMode.REQUIRED).may_fall_back_to_clear
    assert not TlsPlan(TlsMode.IMPLICIT).may_fall_back_to_clear


@pytest.mark.parametrize(
    ("features", "eightbit", "smtputf8", "params"),
    [
        ({"size": "1000", "8bitmime": "", "smtputf8": ""}, True, True,
         ("SIZE=42", "BODY=8BITMIME", "SMTPUTF8")),
        ({"size": "1000"}, True, False, ("SIZE=42",)),
        ({"8bitmime": ""}, False, False, ()),
        ({}, True, True, ()),
    ],
)
def test_mail_parameters_follow_the_offered_extensions(
    features: dict[str, str], eightbit: bool, smtputf8: bool, params: tuple[str, ...]
) -> None:
    assert mail_parameters(features, 42, eightbit, smtputf8) == params


@pytest.mark.parametrize(("features", "limit"), [({"size": "1000"}, 1000), ({"size": "0"}, None),
                                                 ({"size": ""}, None), ({}, None)])
def test_size_limit_from_ehlo(features: dict[str, str], limit: int | None) -> None:
    assert size_limit(features) == limit


def test_wire_body_normalises_line_ends_and_stuffs_dots() -> None:
    assert wire_body(b"a\n.b\r\n..c\rd") == b"a\r\n..b\r\n...c\r\nd\r\n.\r\n"
    assert wire_size(b"a\n.b") == len(b"a\r\n.b\r\n")


def test_smtputf8_needed_for_flag_or_non_ascii_address() -> None:
    assert needs_smtputf8(Envelope("a@x.test", ("b@y.test",), b"", smtputf8=True))
    assert needs_smtputf8(Envelope("a@x.test", ("jörg@y.test",), b""))
    assert not needs_smtputf8(Envelope("a@x.test", ("b@y.test",), b"caf\xc3\xa9"))


@pytest.mark.parametrize(("address", "unsafe"), [("a@x.test", False), ("", False),
                                                 ("a@x.test>\r\nRCPT", True), ("a b@x", True)])
def test_unsafe_addresses_are_never_put_on_the_wire(address: str, unsafe: bool) -> None:
    assert unsafe_address(address) is unsafe


def test_connection_failure_cache_expires() -> None:
    now = [100.0]
    cache = FailureCache(clock=lambda: now[0])
    cache.record(("127.0.0.1", 25), 10)
    cache.record(("127.0.0.2", 25), 0)  # 0 disables the cache
    assert cache.is_cached(("127.0.0.1", 25))
    assert not cache.is_cached(("127.0.0.2", 25))
    now[0] = 110.0
    assert not cache.is_cached(("127.0.0.1", 25))
