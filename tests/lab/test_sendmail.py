"""``deliverd sendmail``: flags as real callers pass them, every exit code, and the maildrop
with the daemon down and up, run by throwaway non-root users against a scripted smart host."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deliverd.sendmail.command_line import Failure, Options, parse_args
from deliverd.submission.message_input import complete_header
from tests.fixtures.mta import HOST, MASQUERADE, MtaHost

MESSAGE = b"Subject: test\n\nHello.\n"


# -- flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # PHP mail()
        (["-t", "-i", "-f", "app@example.org"],
         Options(header_recipients=True, dot_ends=False, sender="app@example.org")),
        # Debian cron
        (["-i", "-FCronDaemon", "-B8BITMIME", "-oem", "alice"],
         Options(recipients=["alice"], dot_ends=False, fullname="CronDaemon")),
        # BSD/Vixie cron
        (["-FCronDaemon", "-odi", "-oem", "-oi", "-t"],
         Options(header_recipients=True, dot_ends=False, fullname="CronDaemon")),
        # git send-email
        (["-i", "a@example.org", "b@example.org"],
         Options(recipients=["a@example.org", "b@example.org"], dot_ends=False)),
        # Symfony Mailer, Alpine
        (["-bs"], Options(mode="smtp")),
        (["-bs", "-odb", "-oem"], Options(mode="smtp")),
        # mailq, flush, grouped flags, DSN flags, config
        (["-bp"], Options(mode="list")),
        (["-q"], Options(mode="flush")),
        (["-q30m"], Options(mode="flush")),
        (["-ti", "-rbob"], Options(header_recipients=True, dot_ends=False, sender="bob")),
        (["-N", "failure,delay", "-R", "hdrs", "-V", "id1", "x@example.org"],
         Options(recipients=["x@example.org"], notify="DELAY,FAILURE", ret="HDRS",
                 envid="id1")),
        (["-Nnever", "x@example.org"], Options(recipients=["x@example.org"], notify="NEVER")),
        (["-C", "/etc/x.toml", "-bm", "--", "-odd@example.org"],
         Options(recipients=["-odd@example.org"], config="/etc/x.toml")),
        (["-v", "-m", "-U", "x@example.org"], Options(recipients=["x@example.org"])),
    ],
)
def test_flags_real_callers_pass(argv: list[str], expected: Options) -> None:
    assert parse_args(argv) == expected


@pytest.mark.parametrize("argv", [["-Z"], ["-f"], ["-bd"], ["-N", "sometimes"], ["-R", "all"]])
def test_bad_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(Failure) as caught:
        parse_args(argv)
    assert caught.value.code == 64


def test_missing_date_message_id_and_from_are_added() -> None:
    header = complete_header(b"Subject: x\r\n", sender="root@example.com", fullname="Cron Daemon",
                             domain=HOST, drop_bcc=False)
    assert header.startswith(b"Subject: x\r\nFrom: Cron Daemon <root@example.com>\r\nDate: ")
    assert re.search(rb"\r\nMessage-ID: <[^>]+@" + HOST.encode() + rb">\r\n$", header)


def test_present_fields_are_kept_and_bcc_removed_with_t() -> None:
    header = (b"From: a@example.org\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
              b"Message-ID: <x@y>\r\nBcc: secret@example.org,\r\n more@example.org\r\n")
    assert complete_header(header, sender="s@example.org", fullname=None, domain=HOST,
                           drop_bcc=True) == header.split(b"Bcc:")[0]


# -- exit codes (a real sendmail process as a non-root user) -------------------------------------


integration = pytest.mark.integration


def _user(host: MtaHost) -> str:
    return host.users[0]


def _without_catch_all(host: MtaHost) -> None:
    host.engine.spec["local"]["aliases"] = {"root": ["ops@example.com"]}  # no "*"
    host.engine.render()


@integration
def test_exit_64_on_an_unknown_flag(mta_host: type[MtaHost]) -> None:
    host = mta_host()
    result = host.run(_user(host), "-Z", "x@example.org", stdin=MESSAGE)
    assert result.returncode == 64
    assert result.stderr.decode().startswith("sendmail: unknown option -Z")


@integration
def test_exit_65_when_no_recipient_at_all(mta_host: type[MtaHost]) -> None:
    host = mta_host()
    host.make_maildrop()
    result = host.run(_user(host), "-t", "-i", stdin=MESSAGE)
    assert result.returncode == 65
    assert b"no recipients" in result.stderr and result.stderr.count(b"\n") == 1
    assert host.drop_files() == []


@integration
def test_exit_65_when_larger_than_the_size_limit(mta_host: type[MtaHost]) -> None:
    host = mta_host({"limits": {"max_message_size": "1KB"}})
    host.make_maildrop()
    result = host.run(_user(host), "x@example.org", stdin=b"Subject: big\n\n" + b"x" * 2048)
    assert result.returncode == 65
    assert b"limits.max_message_size" in result.stderr
    assert host.drop_files() == []
    assert [p for p in (host.queue / "maildrop").iterdir()] == []  # no temp file either


@integration
def test_exit_67_for_a_local_user_without_alias(mta_host: type[MtaHost]) -> None:
    host = mta_host()
    _without_catch_all(host)
    host.make_maildrop()
    result = host.run(_user(host), "-i", "bob", stdin=MESSAGE)
    assert result.returncode == 67
    assert b"local.aliases.bob" in result.stderr
    assert host.drop_files() == []


@integration
def test_exit_73_when_there_is_no_maildrop(mta_host: type[MtaHost]) -> None:
    host = mta_host()  # the daemon never ran: no queue, no maildrop
    result = host.run(_user(host), "x@example.org", stdin=MESSAGE)
    assert result.returncode == 73
    assert b"start it once" in result.stderr


@integration
def test_exit_74_when_the_message_cannot_be_read(mta_host: type[MtaHost]) -> None:
    host = mta_host()
    host.make_maildrop()
    # stdin is a TCP connection the other end resets: read() fails with ECONNRESET.
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        peer.sendall(b"Subject: cut off\n")
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        time.sleep(0.2)
        try:
            result = host.run(_user(host), "x@example.org", stdin=client.fileno())
        finally:
            client.close()
    assert result.returncode == 74, result.stderr
    assert host.drop_files() == []


@integration
def test_exit_75_when_the_queue_filesystem_is_short_of_space(mta_host: type[MtaHost]) -> None:
    # The reserve is 1.5 x the largest message plus the WAL's room: no disk has that free.
    host = mta_host({"limits": {"max_message_size": "999999999GB"}})
    host.make_maildrop()
    result = host.run(_user(host), "x@example.org", stdin=MESSAGE)
    assert result.returncode == 75
    assert b"short of space" in result.stderr
    assert list((host.queue / "maildrop").iterdir()) == []


@integration
def test_exit_78_when_the_config_cannot_be_read(mta_host: type[MtaHost], tmp_path: Path) -> None:
    host = mta_host()
    missing = host.run(_user(host), "-C", "/nonexistent/deliverd.toml", "x@example.org",
                       stdin=MESSAGE)
    assert missing.returncode == 78
    bad = host.root / "bad.toml"
    bad.write_text("this is = = not toml\n")
    bad.chmod(0o644)
    host.env["DELIVERD_CONFIG"] = str(bad)
    garbage = host.run(_user(host), "x@example.org", stdin=MESSAGE)
    assert garbage.returncode == 78
    assert str(bad).encode() in garbage.stderr


@integration
def test_exit_69_mailq_for_a_user_while_the_daemon_is_down(mta_host: type[MtaHost]) -> None:
    host = mta_host()
    host.make_maildrop()
    result = host.run(_user(host), program="mailq")
    assert result.returncode == 69
    assert b"not running" in result.stderr


@integration
def test_exit_77_flush_by_a_user_who_cannot_write_the_queue(mta_host: type[MtaHost]) -> None:
    host = mta_host()
    host.make_maildrop()
    assert host.run(_user(host), "-q").returncode == 77
    assert host.run(None, "-q").returncode == 0


# -- the maildrop --------------------------------------------------------------------------------


@integration
@pytest.mark.slow
def test_two_users_submit_200_messages_while_the_daemon_is_down_each_delivered_once(
    mta_host: type[MtaHost],
) -> None:
    host = mta_host()
    host.make_maildrop()
    alice, bob, eve = host.users

    def submit(n: int) -> subprocess.CompletedProcess[bytes]:
        user = (alice, bob)[n % 2]
        body = f"Subject: message {n}\nX-N: {n}\n\nmessage {n}\n".encode()
        return host.run(user, "-i", f"rcpt{n}@example.org", stdin=body)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, range(200)))
    assert [r.returncode for r in results] == [0] * 200, results[0].stderr
    drops = host.drop_files()
    assert len(drops) == 200
    owners = {p.stat().st_uid for p in drops}
    assert owners == {host.uid(alice), host.uid(bob)}
    # A third user can neither list the maildrop nor read a file whose name it knows.
    listing = host.run(eve, "-c", f"ls {host.queue / 'maildrop'}", program="/bin/sh")
    assert listing.returncode != 0 and b"Permission denied" in listing.stderr
    peek = host.run(eve, str(drops[0]), program="/bin/cat")
    assert peek.returncode != 0 and b"Permission denied" in peek.stderr
    # ...nor the other submitter, nor anyone the queue database.
    assert host.run(bob, str(next(p for p in drops if p.stat().st_uid == host.uid(alice))),
                    program="/bin/cat").returncode != 0
    assert host.run(eve, str(host.queue / "queue.db"), program="/bin/cat").returncode != 0
    # The queue's owner sees what waits, with the daemon down.
    waiting = host.run(None, program="mailq")
    assert waiting.returncode == 0
    assert b"-- 200 more in the maildrop, not yet queued" in waiting.stdout

    host.engine.start()
    assert host.sink.wait_for(200, timeout=90), len(host.sink.messages)
    time.sleep(2)  # anything sent twice would arrive now
    messages = host.sink.messages
    assert sorted(m.rcpt_tos[0] for m in messages) == sorted(
        f"rcpt{n}@example.org" for n in range(200))
    assert host.drop_files() == []
    one = next(m for m in messages if m.rcpt_tos == ("rcpt1@example.org",))
    assert one.mail_from == f"{bob}@{MASQUERADE}"
    assert f"(deliverd pickup, from userid {host.uid(bob)})".encode() in one.data
    assert b"\r\nFrom: Test " + bob.encode() + b" <" + f"{bob}@{MASQUERADE}".encode() in one.data
    assert b"\r\nMessage-ID: <" in one.data and b"\r\nDate: " in one.data


@integration
def test_submission_while_the_daemon_runs_goes_out_at_once_with_aliases_and_masquerading(
    mta_host: type[MtaHost],
) -> None:
    host = mta_host()
    host.engine.start()
    user = host.users[0]
    started = time.monotonic()
    result = host.run(user, "-t", "-i", stdin=b"To: root\nCc: someone\nBcc: x@example.org\n"
                                                b"Subject: cron\n\nout\n")
    assert result.returncode == 0, result.stderr
    assert host.sink.wait_for(1, timeout=15)
    assert time.monotonic() - started < 5  # woken through the FIFO, not the periodic scan
    msg = host.sink.messages[0]
    assert msg.mail_from == f"{user}@{MASQUERADE}"
    assert set(msg.rcpt_tos) == {"ops@example.com", "admins@example.com", "x@example.org"}
    assert b"\r\nTo: root@" + HOST.encode() + b"\r\n" in msg.data
    assert b"Bcc" not in msg.data


@integration
def test_bs_scripted_smtp_dialogue(mta_host: type[MtaHost]) -> None:
    host = mta_host()
    _without_catch_all(host)
    host.engine.start()
    dialogue = (b"EHLO client\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<nobody-here@localhost>"
                b"\r\nRCPT TO:<root@localhost>\r\nDATA\r\nSubject: bs\r\n\r\n..dot line\r\n.\r\n"
                b"QUIT\r\n")
    result = host.run(host.users[1], "-bs", "-odb", "-oem", stdin=dialogue)
    assert result.returncode == 0
    replies = [line[:3] for line in result.stdout.decode().splitlines()]
    assert replies[0] == "220"
    assert replies[-6:] == ["250", "550", "250", "354", "250", "221"]
    assert b"550 5.1.1 <nobody-here@localhost>" in result.stdout
    assert host.sink.wait_for(1, timeout=15)
    msg = host.sink.messages[0]
    assert (msg.mail_from, msg.rcpt_tos) == ("app@example.org", ("ops@example.com",))
    assert b"\r\n\r\n.dot line\r\n" in msg.data


@integration
def test_mailq_lists_a_deferred_message_for_a_non_root_user(mta_host: type[MtaHost]) -> None:
    host = mta_host(mail="451 4.3.0 try later")
    host.engine.start()
    assert host.run(None, "x@example.org", stdin=b"Subject: secret subject\n\nbody\n"
                    ).returncode == 0
    host.engine.wait_for(lambda: host.sink.sessions, what="a delivery attempt")
    deadline = time.monotonic() + 15
    while True:
        listing = host.run(host.users[2], program="mailq")
        if b"deferred" in listing.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout.decode()
    assert "<x@example.org>  deferred" in out and "451 4.3.0 try later" in out
    assert "secret subject" not in out and "body" not in out


def test_a_config_rendered_before_the_local_keys_gets_their_defaults(tmp_path: Path) -> None:
    from deliverd.config.config_file import read_sendmail_settings
    from deliverd.sendmail.submit import local_rules
    from deliverd.spec.normalise import normalise
    from deliverd.spec.render import render_config

    text, _ = render_config(normalise({"version": 1, "host": {"name": HOST}}))
    old = tmp_path / "deliverd.toml"
    old.write_text(text.split("\n[local]\n")[0], encoding="utf-8")
    assert "[local" not in old.read_text() and "[masquerade" not in old.read_text()
    settings = read_sendmail_settings(str(old))
    assert local_rules(settings).domains == frozenset({"localhost", HOST})
    assert local_rules(settings).sender("root") == f"root@{HOST}"
    assert settings.queue_path == "/var/spool/deliverd"


def test_deliverd_sendmail_subcommand_takes_sendmails_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from deliverd.cli.main import main

    assert main(["sendmail", "-Z"]) == 64
    assert capsys.readouterr().err == "sendmail: unknown option -Z\n"
    assert main(["sendmail", "-bp", "-C", "/nonexistent/deliverd.toml"]) == 78


@integration
def test_bs_refuses_a_message_over_the_size_limit_and_stays_in_step(
    mta_host: type[MtaHost],
) -> None:
    host = mta_host({"limits": {"max_message_size": "1KB"}})
    host.make_maildrop()
    big = b"Subject: big\r\n\r\n" + b"x" * 100 + b"\r\n" * 30 + b"y" * 2000 + b"\r\n.\r\n"
    dialogue = (b"HELO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                + big + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                b"Subject: small\r\n\r\nok\r\n.\r\nQUIT\r\n")
    result = host.run(host.users[0], "-bs", stdin=dialogue)
    assert result.returncode == 0
    replies = [line[:9] for line in result.stdout.decode().splitlines()]
    assert replies[5] == "552 5.3.4", replies
    assert replies[-2].startswith("250 2.0.0") and replies[-1].startswith("221")
    [drop] = host.drop_files()
    assert b"Subject: small" in drop.read_bytes()
