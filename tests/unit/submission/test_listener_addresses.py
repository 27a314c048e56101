"""The listener's own parsing of MAIL FROM:/RCPT TO: arguments against aiosmtpd's.

``_SubmissionSMTP._getaddr`` takes the common ``<local@domain> PARAMS`` form with one regular
expression and leaves everything else to aiosmtpd (``email._header_value_parser``); for every
argument, it must give what aiosmtpd gives. Pure: no socket is opened.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from deliverd.submission.gate import InboundGate
from deliverd.submission.listener import _PLAIN_ADDRESS, _SubmissionHandler, _SubmissionSMTP


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[SMTP, _SubmissionSMTP]]:
    loop = asyncio.new_event_loop()
    handler = _SubmissionHandler.__new__(_SubmissionHandler)  # hooks unused: parsing only
    plain = SMTP(handler, loop=loop)
    ours = _SubmissionSMTP(handler, gate=InboundGate(), limits=lambda: (1, 1), loop=loop)
    yield plain, ours
    loop.close()


ATEXT = "abcxyzABCXYZ0189!#$%&'*+/=?^_`{|}~-"
WORDS = st.lists(st.text(ATEXT, min_size=1, max_size=8), min_size=1, max_size=3)
ODD_LOCAL = st.lists(st.text(ATEXT + '."\\ ()<>@,;:[]', max_size=8), min_size=1, max_size=3)
LOCAL = st.one_of(WORDS, WORDS, ODD_LOCAL).map(".".join)
LABELS = st.lists(st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,4}[A-Za-z0-9])?", fullmatch=True),
                  min_size=1, max_size=3)
ODD_DOMAIN = st.lists(st.text("abzAZ09-_[]. ", max_size=6), min_size=1, max_size=3)
DOMAIN = st.one_of(LABELS, LABELS, ODD_DOMAIN).map(".".join)
SPACE = st.sampled_from(["", " ", "  ", "\t", " \t "])
PARAMS = st.sampled_from(["", "SIZE=1024", "SIZE=10 BODY=8BITMIME", "(comment)", "x", "=",
                          "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b", "SIZE=1  ", "<a@b>"])
ARGUMENT = st.builds(
    lambda s1, lt, local, at, domain, gt, s2, params: f"{s1}{lt}{local}{at}{domain}{gt}{s2}"
                                                      f"{params}",
    SPACE, st.sampled_from(["<", "<", "<", ""]), LOCAL, st.sampled_from(["@", "@", "", "@@"]),
    DOMAIN, st.sampled_from([">", ">", ">", ""]), SPACE, PARAMS,
)


@settings(max_examples=1000, deadline=None)
@given(ARGUMENT)
@example("<bench@source.test>")
@example("<a.b+c@sub-1.example.com> SIZE=1309 BODY=8BITMIME")
@example("<a@b> (comment)")
@example("<a@b>SIZE=1")
@example("<>")
@example('<"quoted local"@example.com>')
@example("<a@[127.0.0.1]>")
@example("<a..b@example.com>")
@example("<a@-example.com>")
@example("<0@[>")
def test_fast_path_gives_what_aiosmtpd_gives(servers: tuple[SMTP, _SubmissionSMTP], arg: str
                                             ) -> None:
    plain, ours = servers
    assert outcome(ours, arg) == outcome(plain, arg)


def outcome(server: SMTP, arg: str) -> object:
    """The parse, or the kind of error: ``email``'s parser crashes on some odd input (``<0@[>``
    raises AttributeError), and the listener must then fail the same way aiosmtpd does."""
    try:
        return server._getaddr(arg)
    except Exception as exc:
        return type(exc)


@pytest.mark.parametrize("arg", [
    "<bench@source.test>", " <a.b+c@sub-1.example.com>  SIZE=1309 BODY=8BITMIME",
    "<user@example.com>\tSIZE=1",
])
def test_the_common_forms_take_the_fast_path(arg: str) -> None:
    assert _PLAIN_ADDRESS.match(arg) is not None


@pytest.mark.parametrize("arg", [
    "<>", '<"q"@b.c>', "<a@[127.0.0.1]>", "<a..b@c.d>", "<a@b> (x)", "<a@b>SIZE=1", "a@b.c",
])
def test_unusual_forms_go_to_aiosmtpd(arg: str) -> None:
    assert _PLAIN_ADDRESS.match(arg) is None
