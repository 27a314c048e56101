"""Mail of this host's users: local recipients, aliases, qualifying and masquerading.

The pure rules table by table, the spec keys through validation and normalising, and the rules
applied by the real listener (550 5.1.1 for a local user without an alias).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from deliverd.config.convert import config_from_spec, config_to_spec
from deliverd.config.model import (
    Config,
    DsnConfig,
    HostConfig,
    Listener,
    LocalConfig,
    MasqueradeConfig,
)
from deliverd.queue.store import QueueStore
from deliverd.spec.normalise import normalise
from deliverd.spec.problems import errors
from deliverd.spec.render import render_config
from deliverd.spec.validation import validate_spec
from deliverd.submission.cleanup import Intake
from deliverd.submission.listener import start_listeners
from deliverd.submission.local import (
    LocalPolicy,
    UnknownLocalUser,
    header_addresses,
    local_policy,
)

HOST = "web1.example.com"


def policy(
    aliases: dict[str, list[str]] | None = None,
    masquerade: str | None = None,
    except_users: tuple[str, ...] = (),
) -> LocalPolicy:
    local = LocalConfig(
        domains=("localhost", HOST),
        qualify_domain=HOST,
        aliases=tuple((u, tuple(t)) for u, t in (aliases or {}).items()),
    )
    return local_policy(local, MasqueradeConfig(masquerade, except_users))


ALIASES = {
    "root": ["ops@example.com"],
    "www-data": ["web@example.com", "ops@example.com"],
}


# -- recipients ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "aliases", "expected"),
    [
        ("root", ALIASES, ["ops@example.com"]),
        ("root@localhost", ALIASES, ["ops@example.com"]),
        ("root@LOCALHOST", ALIASES, ["ops@example.com"]),
        (f"root@{HOST}", ALIASES, ["ops@example.com"]),
        (f"root@{HOST.upper()}.", ALIASES, ["ops@example.com"]),
        ("ROOT@localhost", ALIASES, ["ops@example.com"]),
        (f"www-data@{HOST}", ALIASES, ["web@example.com", "ops@example.com"]),
        ("alice@example.org", ALIASES, ["alice@example.org"]),
        # a subdomain of a local domain is not local
        (f"root@sub.{HOST}", ALIASES, [f"root@sub.{HOST}"]),
        ("bob", {**ALIASES, "*": ["admin@example.com"]}, ["admin@example.com"]),
        # the user's own alias wins over "*"
        ("root", {"root": ["ops@example.com"], "*": ["admin@example.com"]}, ["ops@example.com"]),
    ],
)
def test_recipient_resolution(
    address: str, aliases: dict[str, list[str]], expected: list[str]
) -> None:
    assert list(policy(aliases).resolve_recipient(address)) == expected


@pytest.mark.parametrize("address", ["bob", "bob@localhost", f"bob@{HOST}"])
def test_local_user_without_alias_is_refused_naming_the_key_to_set(address: str) -> None:
    with pytest.raises(UnknownLocalUser) as caught:
        policy(ALIASES).resolve_recipient(address)
    assert caught.value.user == "bob"
    assert "local.aliases.bob" in str(caught.value)
    shown = address if "@" in address else f"bob@{HOST}"
    assert caught.value.smtp_reply.startswith(f"550 5.1.1 <{shown}>: ")


def test_aliases_apply_once_even_when_a_target_looks_local() -> None:
    # The spec rules refuse such a target; the resolver still never expands it again.
    p = policy({"root": [f"admin@{HOST}"], "admin": ["x@example.com"]})
    assert p.resolve_recipient("root") == (f"admin@{HOST}",)


def test_resolved_recipients_are_listed_once_in_order() -> None:
    p = policy(ALIASES)
    assert p.resolve_recipients(["root", "www-data", "OPS@example.com", "a@example.org"]) == [
        "ops@example.com", "web@example.com", "a@example.org",
    ]


def test_a_config_without_local_settings_treats_no_address_as_local() -> None:
    p = local_policy(LocalConfig(), MasqueradeConfig())
    assert p.resolve_recipients(["root@localhost", "x@y.test"]) == ["root@localhost", "x@y.test"]
    assert p.sender("root") == "root"


# -- senders -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "masquerade", "except_users", "expected"),
    [
        ("root", None, (), f"root@{HOST}"),
        ("root@localhost", None, (), "root@localhost"),
        ("", None, (), ""),
        ("root", "example.com", (), "root@example.com"),
        (f"cron@{HOST}", "example.com", (), "cron@example.com"),
        ("cron@localhost", "example.com", (), "cron@example.com"),
        ("root", "example.com", ("root",), f"root@{HOST}"),
        (f"ROOT@{HOST}", "example.com", ("root",), f"ROOT@{HOST}"),
        ("app@other.example", "example.com", (), "app@other.example"),
        ("", "example.com", (), ""),
    ],
)
def test_sender_qualified_and_masqueraded(
    sender: str, masquerade: str | None, except_users: tuple[str, ...], expected: str
) -> None:
    assert policy(masquerade=masquerade, except_users=except_users).sender(sender) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # sender fields masqueraded, recipient fields only qualified
        (b"From: root\r\nTo: root\r\nSubject: x\r\n",
         b"From: root@example.com\r\nTo: root@" + HOST.encode() + b"\r\nSubject: x\r\n"),
        (b"From: Cron Daemon <root@" + HOST.encode() + b">\r\n",
         b"From: Cron Daemon <root@example.com>\r\n"),
        (b"Sender: www-data@localhost\n", b"Sender: www-data@example.com\n"),
        (b"From: =?utf-8?q?J=C3=B6rg?= <root>\r\n",
         b"From: =?utf-8?q?J=C3=B6rg?= <root@example.com>\r\n"),
        # folded field
        (b"To: a@example.org,\r\n bob\r\n", b"To: a@example.org, bob@" + HOST.encode() + b"\r\n"),
    ],
)
def test_headers_rewritten(header: bytes, expected: bytes) -> None:
    assert policy(masquerade="example.com").rewrite_headers(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        b"From: App <app@other.example>\r\nTo: x@y.test\r\n",
        b"To: undisclosed-recipients:;\r\n",
        b"Subject: root\r\nX-From: root\r\n",
        b"From: root@" + HOST.encode() + b"\r\n",  # excepted user
    ],
)
def test_headers_without_local_addresses_keep_their_bytes(header: bytes) -> None:
    p = policy(masquerade="example.com", except_users=("root",))
    assert p.rewrite_headers(header) is header


def test_rewrite_message_leaves_the_body_alone() -> None:
    data = b"From: root\r\n\r\nFrom: root\r\nTo: root\r\n"
    assert policy(masquerade="example.com").rewrite_message(data) == (
        b"From: root@example.com\r\n\r\nFrom: root\r\nTo: root\r\n"
    )


def test_header_addresses_reads_to_cc_and_bcc() -> None:
    header = b"To: a@x.test, B <b@x.test>\r\nCc: c\r\nBcc: d@x.test\r\nFrom: e@x.test\r\n"
    assert header_addresses(header, ("to", "cc", "bcc")) == ["a@x.test", "b@x.test", "c",
                                                              "d@x.test"]


# -- the spec keys -------------------------------------------------------------------------------


def _spec(**extra: Any) -> dict[str, Any]:
    return {"version": 1, "host": {"name": HOST}, **extra}


def test_defaults_are_localhost_and_the_host_name() -> None:
    n = normalise(_spec())
    assert n["local"] == {"domains": ["localhost", HOST], "qualify_domain": HOST, "aliases": {}}
    assert n["masquerade"] == {"except_users": []}


def test_host_named_localhost_gives_one_local_domain() -> None:
    assert normalise(_spec(host={"name": "localhost"}))["local"]["domains"] == ["localhost"]


def test_local_settings_round_trip_through_render_and_config() -> None:
    spec = _spec(
        local={"aliases": {"root": ["ops@example.com"], "*": ["admin@example.com"]},
               "domains": ["localhost"]},
        masquerade={"domain": "example.com", "except_users": ["root"]},
    )
    assert errors(validate_spec(spec)) == []
    n = normalise(spec)
    cfg = config_from_spec(n)
    assert dict(cfg.local.aliases)["*"] == ("admin@example.com",)
    assert cfg.masquerade == MasqueradeConfig("example.com", ("root",))
    assert config_to_spec(cfg) == n
    text, _ = render_config(n)
    import tomllib

    assert normalise(tomllib.loads(text)) == n


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"local": {"aliases": {"root": "ops@example.com"}}}, "/local/aliases/root"),
        ({"local": {"aliases": {"root": []}}}, "/local/aliases/root"),
        ({"local": {"aliases": {"root": ["not an address"]}}}, "/local/aliases/root/0"),
        ({"local": {"aliases": {"root": [f"admin@{HOST}"]}}}, "/local/aliases/root/0"),
        ({"local": {"aliases": {"root": ["admin@localhost"]}}}, "/local/aliases/root/0"),
        ({"local": {"domains": ["example.net"], "aliases": {"r": ["a@example.net"]}}},
         "/local/aliases/r/0"),
        ({"local": {"qualify_domain": "not a domain"}}, "/local/qualify_domain"),
        ({"local": {"mydomain": "x"}}, "/local/mydomain"),
        ({"masquerade": {"domain": "bad domain"}}, "/masquerade/domain"),
        ({"masquerade": {"except_users": ["a b"]}}, "/masquerade/except_users/0"),
    ],
)
def test_invalid_local_settings_are_reported_at_their_pointer(
    extra: dict[str, Any], where: str
) -> None:
    problems = errors(validate_spec(_spec(**extra)))
    assert where in [p.pointer for p in problems], problems


def test_bad_alias_key_is_an_error() -> None:
    problems = errors(validate_spec(_spec(local={"aliases": {"two words": ["a@example.com"]}})))
    assert problems and all(p.pointer.startswith("/local/aliases") for p in problems)


# -- the listener --------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    s = await QueueStore.open(tmp_path / "queue")
    yield s
    await s.close()


@pytest.mark.integration
async def test_listener_resolves_aliases_masquerades_and_refuses_unknown_users(
    store: QueueStore,
) -> None:
    cfg = Config(
        host=HostConfig(HOST), dsn=DsnConfig(f"postmaster@{HOST}"),
        listen=(Listener("127.0.0.1", 0),),
        local=LocalConfig(("localhost", HOST), HOST, (("root", ("ops@example.com",)),)),
        masquerade=MasqueradeConfig("example.com"),
    )
    current = {"cfg": cfg}
    intake = Intake(store, lambda: current["cfg"], lambda _qid, _source: None)
    servers = await start_listeners(cfg, intake, current=lambda: current["cfg"])
    port = servers[0].sockets[0].getsockname()[1]
    try:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
        await smtp.connect()
        await smtp.mail(f"cron@{HOST}")
        refused = await smtp.execute_command(b"RCPT", b"TO:<bob@localhost>")
        assert refused.code == 550
        assert refused.message.startswith("5.1.1 ") and "local.aliases.bob" in refused.message
        assert (await smtp.rcpt("root@localhost")).code == 250
        reply = await smtp.data(b"From: cron@" + HOST.encode() + b"\r\nTo: root\r\n\r\nhi\r\n")
        qid = reply.message.rsplit(" ", 1)[-1]
        msg = await store.get(qid)
        assert msg is not None
        assert msg.sender == "cron@example.com"
        assert [r.address for r in msg.recipients] == ["ops@example.com"]
        data = await store.read_data(qid)
        assert b"\r\nFrom: cron@example.com\r\nTo: root@" + HOST.encode() + b"\r\n" in data
        # A reload that adds "*" is seen by the running listener without rebinding.
        current["cfg"] = Config(
            host=cfg.host, dsn=cfg.dsn, listen=cfg.listen, masquerade=cfg.masquerade,
            local=LocalConfig(cfg.local.domains, HOST, (("*", ("all@example.com",)),)),
        )
        await smtp.mail("")
        assert (await smtp.rcpt("bob@localhost")).code == 250
        await smtp.quit()
    finally:
        for server in servers:
            server.close()
        await asyncio.gather(*(s.wait_closed() for s in servers))


# -- deliverd send -------------------------------------------------------------------------------


@pytest.mark.integration
def test_deliverd_send_applies_aliases_and_masquerading_and_refuses_unknown_users(
    tmp_path: Path,
) -> None:
    import json
    import subprocess
    import sys

    from deliverd.spec.render import write_rendered

    spec = _spec(queue={"path": str(tmp_path / "queue")},
                 local={"aliases": {"root": ["ops@example.com"]}},
                 masquerade={"domain": "example.com"})
    config, _ = write_rendered(normalise(spec), tmp_path / "etc")

    def send(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deliverd", "send", "-c", str(config),
                               "--json", *args], capture_output=True, text=True, check=False,
                              timeout=60)

    ok = send("--from", f"cron@{HOST}", "--to", "root@localhost")
    assert ok.returncode == 0, ok.stderr
    listed = subprocess.run([sys.executable, "-m", "deliverd", "queue", "-c", str(config),
                             "list", "--json"], capture_output=True, text=True, check=True,
                            timeout=60)
    [message] = json.loads(listed.stdout)
    assert message["sender"] == "cron@example.com"
    assert [r["address"] for r in message["recipients"]] == ["ops@example.com"]
    refused = send("--from", "app@example.org", "--to", "bob@localhost")
    assert refused.returncode == 2
    assert "local.aliases.bob" in refused.stderr
