"""``sendmail``'s short import path against the standard library it does without.

Each piece a submission does without the email package, tomllib or the config model is held to
what those give: the config scanner to tomllib (and, where it is unsure, the same function
parses with tomllib), the ``-t`` addresses to the email package's parser (which reads what the
plain reader declines), From:/Date:/Message-ID: to ``email.utils``, the local address rules to
the daemon's ``LocalPolicy``, the drop file to ``json``. Then what a submission imports, and the
role's wrapper run from a venv as a host has it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import venv
from collections.abc import Iterator
from email.utils import formataddr, formatdate
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from deliverd.cli import sendmail
from deliverd.config import config_file as config_reader
from deliverd.config.config_file import (
    ConfigFileError,
    SendmailSettings,
    read_sendmail_settings,
    settings_from_tree,
)
from deliverd.config.convert import local_from_spec, masquerade_from_spec
from deliverd.queue.space import min_free_bytes
from deliverd.sendmail import submit
from deliverd.sendmail.command_line import Failure, parse_args
from deliverd.sendmail.submit import header_recipients, plain_addresses
from deliverd.spec.normalise import normalise
from deliverd.spec.render import render_config
from deliverd.spec.specfile import load_spec_file
from deliverd.submission.dropfile import envelope_line, json_string
from deliverd.submission.local import LocalPolicy, header_addresses, local_policy
from deliverd.submission.maildrop import DropEnvelope, prepare
from deliverd.submission.message_input import (
    complete_header,
    format_address,
    format_date,
    make_msgid,
    submitting_user,
)
from tests.fixtures import paths

REPO = paths.REPO
HOST = "web1.deliverd.test"
SPEC: dict[str, Any] = {
    "version": 1,
    "host": {"name": HOST},
    "local": {"aliases": {"root": ["ops@example.com"], "www-data": ["web@example.com"]}},
    "masquerade": {"domain": "example.com", "except_users": ["Root"]},
    "limits": {"max_message_size": "2MB"},
}


def _rendered(spec: dict[str, Any], queue: Path | None = None) -> str:
    spec = json.loads(json.dumps(spec))
    if queue is not None:
        spec["queue"] = {"path": str(queue)}
    text, _ = render_config(normalise(spec))
    return text


# -- flags ---------------------------------------------------------------------------------------


CALLERS = [
    ["-t", "-i"], ["-t", "-i", "-f", "app@example.org"],  # PHP
    ["-i", "-FCronDaemon", "-B8BITMIME", "-oem", "alice"],  # Debian cron
    ["-FCronDaemon", "-odi", "-oem", "-oi", "-t"],  # BSD/Vixie cron
    ["-i", "a@example.org", "b@example.org"], ["-i", "-f", "dev@x.org", "list@x.org"],  # git
    ["-i", "root"], ["-t"],  # mailx
    ["-ti", "-rbob"], ["-bm", "-C", "/etc/x.toml", "--", "-odd@example.org"],
    ["-v", "-m", "-U", "x@example.org"], ["-b", "m", "-B", "7BIT", "x@example.org"],
]
NOT_A_SUBMISSION = [["-bs"], ["-bs", "-odb", "-oem"], ["-bp"], ["-q"], ["-q30m"], ["-Z"],
                    ["-f"], ["-bd"], ["-N", "sometimes", "x"], ["-R"], ["-V", "", "x"]]


@pytest.mark.parametrize("argv", CALLERS)
def test_what_the_callers_pass_is_a_submission_without_dsn_options(argv: list[str]) -> None:
    opts = parse_args(argv)
    assert (opts.mode, opts.notify, opts.ret, opts.envid) == ("send", None, None, None)


@pytest.mark.parametrize("argv", NOT_A_SUBMISSION)
def test_smtp_queue_and_bad_flags_are_not_a_submission(argv: list[str]) -> None:
    try:
        assert parse_args(argv).mode != "send"
    except Failure as exc:
        assert exc.code == 64 and "\n" not in str(exc)


TOKENS = ["-t", "-i", "-oi", "-oem", "-odi", "-f", "-fa@b", "-r", "-F", "-FName", "-B8BITMIME",
          "-B", "-bm", "-b", "m", "-bs", "-bp", "-q", "-N", "never", "-R", "-V", "-C", "-ti",
          "-it", "-tZ", "--", "-", "a@b", "root", "x,y", "-v", "-m", "-L", "-h", "-o", "-x"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=6))
def test_a_command_line_is_read_or_refused_with_64(argv: list[str]) -> None:
    try:
        opts = parse_args(argv)
    except Failure as exc:
        assert exc.code == 64
        return
    assert opts.mode in ("send", "smtp", "list", "flush")
    if "--" not in argv:  # a recipient is a word, never a flag nor a flag's value
        assert all(r in argv and (r == "-" or not r.startswith("-")) for r in opts.recipients)


# -- the config ----------------------------------------------------------------------------------


def _attributes(s: SendmailSettings) -> tuple[object, ...]:
    return (s.queue_path, s.host_name, s.max_message_size, s.domains, s.qualify_domain,
            s.aliases, s.masquerade_domain, s.except_users)


def _example_specs() -> Iterator[dict[str, Any]]:
    for path in sorted((REPO / "examples").glob("*.yml")):
        spec = load_spec_file(path)
        assert isinstance(spec, dict)
        yield spec
    yield SPEC
    yield {"version": 1, "host": {"name": "h.example"}}
    yield {**SPEC, "local": {"domains": ["Example.ORG.", "localhost"], "qualify_domain": "",
                             "aliases": {"*": ["a@b.example"], 'we"ird\\u': ["c@d.example"]}},
           "queue": {"path": "/var/spool/d\u00e9 liverd \"q\"\t"}}


@pytest.mark.parametrize("spec", list(_example_specs()), ids=lambda s: s["host"]["name"])
def test_rendered_configs_read_the_same_by_the_scanner_and_by_tomllib(spec: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    text = _rendered(spec)
    path = tmp_path / "deliverd.toml"
    path.write_text(text, encoding="utf-8")
    scanned = _attributes(read_sendmail_settings(str(path)))
    assert scanned == _attributes(settings_from_tree(str(path), config_reader.scan(text)))
    assert scanned == _attributes(settings_from_tree(str(path), tomllib.loads(text)))


def test_configs_the_scanner_is_unsure_of_are_read_with_tomllib(tmp_path: Path) -> None:
    text = _rendered(SPEC)
    cases: dict[str, tuple[str | bytes, str | None]] = {  # content, ConfigFileError's words
        "old": (text.split("\n[local]\n")[0], None),  # before [local]: normalise fills it in
        "multi-line": (text + 'x = """\n[queue]\npath = "/elsewhere"\n"""\n', None),
        "garbage": ("this is = = not toml\n", "not valid TOML"),
        "int path": (text.replace('path = "/var/spool/deliverd"', "path = 3"),
                     "not a rendered deliverd config"),
        "twice": (text + '\n[queue]\npath = "/elsewhere"\n', "not valid TOML"),
        "bad size": (text.replace('max_message_size = "2MB"', 'max_message_size = "2 MB"'),
                     "not a rendered deliverd config"),
        "not utf-8": (text.replace("web1", "w\udcffb1").encode("utf-8", "surrogateescape"),
                      "is not UTF-8 text"),
    }
    for name, (content, error) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
            if name != "bad size":  # a string where a string belongs: the size is judged later
                with pytest.raises(config_reader.Unsure):
                    config_reader.scan(content)
        if error is None:
            assert read_sendmail_settings(str(path)).queue_path == "/var/spool/deliverd", name
            continue
        with pytest.raises(ConfigFileError) as caught:
            read_sendmail_settings(str(path))
        assert str(caught.value).startswith(f"{path}: {error}"), name
    with pytest.raises(ConfigFileError, match="no such file"):
        read_sendmail_settings(str(tmp_path / "missing"))


LINES = ['[queue]', 'path = "/q"', "path = '/q'", '[local]', 'domains = ["localhost"]',
         'domains = [', '"x",', ']', 'qualify_domain = "h"', '[local.aliases]',
         '"*" = ["a@b"]', 'root = ["r@b"]', '[masquerade]', 'except_users = []',
         'domain = "m"', '[host]', 'name = "h"', '[limits]', 'max_message_size = "1KB"',
         '[[listen]]', 'port = 25', 'x = { a = 1, b = "]" }', "local.domains = []",
         '# [queue]', 'k = "a#b" # c', '[routing.smarthost]', 'hosts = [', '{ host = "h" },',
         'path = "/\\u0071"', 'x = 1979-05-27T07:32:00Z', 'bad line', '[queue] x', '"k" = 1']


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LINES), max_size=24))
def test_what_the_config_scanner_takes_is_what_tomllib_reads(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    try:
        values, aliases = config_reader._scan(text)
    except config_reader.Unsure:
        return
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # wrong only in what sendmail does not read: the daemon refuses to load it
    for key, value in values.items():
        node: Any = tree
        for part in key:
            node = (node[-1] if isinstance(node, list) else node)[part]
        if value == config_reader._TABLE:
            assert isinstance(node, dict), key
        elif value == config_reader._ARRAY:
            assert isinstance(node, list), key
        else:
            assert node == value, key
    local = tree.get("local", {})
    assert aliases == (local.get("aliases", {}) if isinstance(local, dict) else {})


# -- the message ---------------------------------------------------------------------------------


HEADER_VALUES = ["a@example.org", "Name <a@example.org>", "<a@example.org>", "root",
                 "a@example.org, b@example.org", "a@b.example,,c@d.example", "x <a@b> y",
                 '"Doe, J" <a@b.example>', "a@b (c)", "undisclosed-recipients:;", "a@", "@b",
                 "a@b@c", "x <>", "A.B <a.b@c.d>", "a..b@c", "a@b c@d", "<a@b>x", "Mr. X <a@b>",
                 "\u00e9 <a@b>", "a@b,", " , ", "x y", "x@y <a@b>"]


@pytest.mark.parametrize("value", HEADER_VALUES)
def test_t_addresses_are_the_email_packages(value: str) -> None:
    header = f"Subject: s\r\nTo: {value}\r\nCc: c@example.org\r\n".encode()
    found = plain_addresses(header)
    assert found is None or found == header_addresses(header, ("to", "cc", "bcc"))
    assert header_recipients(header) == header_addresses(header, ("to", "cc", "bcc"))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='ab@.<>, "()\\:;x\t-_é', max_size=24))
def test_plain_t_addresses_agree_with_the_email_package_whenever_taken(value: str) -> None:
    header = b"To: " + value.encode() + b"\r\nBcc:\r\n " + value.encode() + b"\r\n"
    found = plain_addresses(header)
    if found is not None:
        assert found == header_addresses(header, ("to", "cc", "bcc")), value


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/St_Johns",
                                  "Africa/Monrovia", "Europe/Berlin"])
def test_date_is_formatdate_localtime(zone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        for when in (0.0, 63072000.5, 1_700_000_000.999, 1_719_000_000.0, time.time()):
            assert format_date(when) == formatdate(when, localtime=True), (zone, when)
    finally:
        monkeypatch.undo()
        time.tzset()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=20))
def test_from_display_name_is_formataddr(name: str) -> None:
    assert format_address(name, "a@b.example") == formataddr((name, "a@b.example"))


def test_message_id_has_make_msgids_shape() -> None:
    assert re.fullmatch(r"<\d+\.\d+\.\d+@h\.example>", make_msgid("h.example"))


@pytest.mark.parametrize("drop_bcc", [True, False])
def test_completed_header_adds_what_email_utils_would_and_drops_bcc_with_t(drop_bcc: bool,
                                                                         ) -> None:
    dated = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n"
    for name in ("Cron (Daemon)", "J\u00f6rg"):
        args: dict[str, Any] = {"sender": "root@example.com", "fullname": name,
                                "domain": HOST, "drop_bcc": drop_bcc}
        bcc = b"Bcc: s@x,\r\n t@x\r\n"
        assert (complete_header(b"From: a@b\r\n" + bcc + b"Subject: y\r\n" + dated, **args)
                == b"From: a@b\r\n" + (b"" if drop_bcc else bcc) + b"Subject: y\r\n" + dated)
        made = complete_header(b"Subject: x\r\n", **args).decode()
        assert made.startswith(f"Subject: x\r\nFrom: {formataddr((name, 'root@example.com'))}"
                               "\r\n")
        assert re.search(r"\r\nDate: \w{3}, \d\d \w{3} \d{4} [\d:]{8} [+-]\d{4}\r\n"
                         rf"Message-ID: <[\d.]+@{re.escape(HOST)}>\r\n$", made)


# -- the drop file -------------------------------------------------------------------------------


class _Stdin(io.BytesIO):
    def readline(self, size: int | None = -1) -> bytes:
        return super().readline(-1 if size is None else size)


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path]:
    queue = tmp_path / "queue"
    queue.mkdir()
    prepare(queue)
    config = tmp_path / "deliverd.toml"
    config.write_text(_rendered(SPEC, queue), encoding="utf-8")
    return queue, config


def _submit(main: Any, argv: list[str], message: bytes, queue: Path) -> tuple[int, bytes]:
    before = set(os.listdir(queue / "maildrop"))
    code = main(argv, "sendmail", _Stdin(message))
    made = sorted(set(os.listdir(queue / "maildrop")) - before)
    if not made:
        return code, b""
    data = (queue / "maildrop" / made[0]).read_bytes()
    (queue / "maildrop" / made[0]).unlink()
    return code, data


DATED = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <m@x>\n"
SUBMISSIONS = [
    (["-t", "-i"], b"To: root, x@example.org\nCc: www-data@localhost\nBcc: b@example.org\n"
                   b"Subject: php\n\nbody\n.\nmore\n"),
    (["-t", "-i", "-f", "app@example.org"], b"To: Someone <s@example.org>\n\nbody\n"),
    (["-i", "-FCron Daemon", "-B8BITMIME", "-oem", "root"], b"Subject: cron\n\nout\n"),
    (["-FCronDaemon", "-odi", "-oem", "-oi", "-t"], b"To: root\nSubject: c\n\n.\n"),
    (["-i", "a@example.org", "B@example.org,a@example.org"], b"From: Dev <d@x>\n\npatch\n"),
    (["x@example.org"], b"From b@c Mon Jan  1 00:00:00 2024\nSubject: mbox\n\nbody\n.\nnot\n"),
    (["-i", "root"], b"no header at all\n\nbody\n"),
    (["-t", "-oi"], b"To: a@example.org,\n\tB <b@example.org>\nSubject: folded\n\nf\n"),
    # for the email package's parser, a non-ASCII name, DSN options
    (["-t"], b'To: "Doe, J" <j@example.org>, root\nSubject: quoted\n\nq\n'),
    (["-t", "-i"], b"To: undisclosed-recipients:;\nCc: c@example.org\n\ng\n"),
    (["-i", "-F", "J\u00f6rg", "root"], b"Subject: name\n\nnon-ASCII\n"),
    (["-N", "success,delay", "-R", "hdrs", "-V", "id-1", "-fx@y.example", "root"],
     b"Subject: dsn\n\nd\n"),
]


def _policy(config: Path) -> LocalPolicy:
    tree = tomllib.loads(config.read_text(encoding="utf-8"))
    return local_policy(local_from_spec(tree["local"]), masquerade_from_spec(tree["masquerade"]))


@pytest.mark.parametrize(("argv", "message"), SUBMISSIONS)
def test_a_submission_is_what_the_daemons_local_policy_makes_of_it(
    argv: list[str], message: bytes, host: tuple[Path, Path],
) -> None:
    queue, config = host
    message = DATED + message if not message.startswith(b"From ") else message
    code, dropped = _submit(sendmail.main, ["-C", str(config), *argv], message, queue)
    assert code == 0
    policy, opts = _policy(config), parse_args(argv)
    login, gecos = submitting_user()
    header = message.removeprefix(message.split(b"\n")[0] + b"\n") if message.startswith(
        b"From ") else message
    header = header.split(b"\n\n")[0] + b"\n"
    recipients = [r for r in opts.recipients for r in r.split(",")]
    if opts.header_recipients:
        recipients += header_addresses(header, ("to", "cc", "bcc"))
    sender = policy.sender(opts.sender or login)
    envelope, _, data = dropped.partition(b"\n")
    assert envelope + b"\n" == envelope_line(sender, policy.resolve_recipients(recipients),
                                              opts.notify, opts.ret, opts.envid)
    written = data.split(b"\r\n\r\n")[0].decode() + "\r\n"
    assert ("\r\nBcc:" in written) == (b"\nBcc:" in header and not opts.header_recipients)
    if b"From:" not in header:
        assert f"\r\nFrom: {formataddr((opts.fullname or gecos, sender))}\r\n" in written


@pytest.mark.parametrize(("argv", "message", "code", "said"), [
    (["-t", "-i"], b"Subject: none\n\nx\n", 65, "no recipients"),
    (["-i"], b"Subject: none\n\nx\n", 65, "no recipients"),
    (["-i", "bob"], b"Subject: bob\n\nx\n", 67, "local user 'bob' has no alias"),
    (["-t"], b"To: bob@localhost\n\nx\n", 67, "local user 'bob' has no alias"),
    (["x@example.org"], b"Subject: big\n\n" + b"x" * 3_000_000 + b"\n", 65,
     "message larger than limits.max_message_size"),
    (["-i", "a b@example.org"], b"Subject: s\n\nx\n", 65, "bad address syntax"),
])
def test_refusals_say_why_in_one_line_with_their_exit_code(
    argv: list[str], message: bytes, code: int, said: str, host: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue, config = host
    assert _submit(sendmail.main, ["-C", str(config), *argv], message, queue) == (code, b"")
    err = capsys.readouterr().err
    assert err.startswith("sendmail: ") and said in err and err.count("\n") == 1


def test_the_drop_envelope_is_what_json_dumps_wrote() -> None:
    for args in [("a@b", ("c@d", "é\u2028\"\\\x01@x")), ("", ("r",), "NEVER", "HDRS", "id\n")]:
        line = envelope_line(*args)  # type: ignore[arg-type]
        keys = ("sender", "recipients", "notify", "ret", "envid")
        data: dict[str, object] = {"v": 1}
        data.update({k: list(v) if k == "recipients" else v for k, v in zip(keys, args,
                                                                          strict=False)})
        assert line == json.dumps(data, ensure_ascii=False).encode() + b"\n"
        assert DropEnvelope.from_line(line) == DropEnvelope(*args)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_envelope_strings_are_escaped_as_json_does(text: str) -> None:
    assert json_string(text) == json.dumps(text, ensure_ascii=False)
    assert json_string("".join(map(chr, range(128)))) == json.dumps(
        "".join(map(chr, range(128))), ensure_ascii=False)


def test_a_submission_keeps_the_queues_free_space_reserve(
    host: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue, config = host
    kept: list[int] = []
    write_drop = submit.write_drop

    def recorded(*args: Any, min_free: int) -> str:
        kept.append(min_free)
        return write_drop(*args, min_free=min_free)

    monkeypatch.setattr(submit, "write_drop", recorded)
    assert _submit(sendmail.main, ["-C", str(config), "root"], b"\n", queue)[0] == 0
    assert kept == [min_free_bytes(2 * 1024 * 1024)]


# -- the import path and the role's wrapper ------------------------------------------------------


HEAVY = ("re", "email", "dataclasses", "typing", "tomllib", "json", "pathlib", "contextlib",
         "collections", "enum", "inspect", "deliverd.config.model", "deliverd.config.loader",
         "deliverd.config.convert", "deliverd.spec", "deliverd.core.units", "deliverd.cli.queue",
         "deliverd.sendmail.smtp_stdio", "deliverd.submission.local",
         "deliverd.submission.maildrop",
         # os itself: under python -S nothing has imported it, and it costs milliseconds
         "os", "posixpath", "genericpath", "_collections_abc")


@pytest.mark.parametrize("argv", [["-t", "-i"], ["-i", "-N", "never", "-Rhdrs", "root"]])
def test_a_submission_imports_nothing_heavy(argv: list[str], host: tuple[Path, Path]) -> None:
    queue, config = host
    code = ("import sys, io\n"
            f"sys.path[:0] = [{str(REPO / 'engine')!r}]\n"
            "from deliverd.cli.sendmail import main\n"
            f"rc = main(['-C', {str(config)!r}, *{argv!r}], 'sendmail', "
            "io.BytesIO(b'To: root\\nSubject: s\\n\\nbody\\n'))\n"
            "print(rc, ' '.join(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                          text=True, check=True)
    rc, modules = done.stdout.split(" ", 1)
    assert rc == "0", done.stderr
    loaded = set(modules.split())
    assert [m for m in loaded if any(m == h or m.startswith(f"{h}.") for h in HEAVY)] == []
    assert len(os.listdir(queue / "maildrop")) == 1


def _role_wrappers(venv_dir: Path, config: Path) -> dict[str, str]:
    tasks = yaml.safe_load((REPO / "roles/deliverd/tasks/sendmail.yml").read_text())
    task = next(t for t in tasks if t["name"] == "Install the sendmail and mailq wrappers")
    template = jinja2.Template(task["ansible.builtin.copy"]["content"], keep_trailing_newline=True)
    return {item: template.render(item=item, __deliverd_venv=str(venv_dir),
                                  __deliverd_config_file=str(config))
            for item in task["loop"]}


def test_the_roles_wrappers_are_the_launcher(tmp_path: Path) -> None:
    wrappers = _role_wrappers(tmp_path / "venv", tmp_path / "etc" / "deliverd.toml")
    for prog, text in wrappers.items():
        comment = f"managed by deliverd (deliverd_provide_sendmail): {prog} for local programs"
        assert text == sendmail.launcher(f"{tmp_path}/venv/bin/python", None, prog,
                                         str(tmp_path / "etc" / "deliverd.toml"), comment)


@pytest.mark.integration
def test_the_roles_wrappers_work_from_a_venv_with_deliverd_in_site_packages(
    tmp_path: Path, host: tuple[Path, Path],
) -> None:
    queue, config = host
    venv_dir = tmp_path / "venv"
    venv.EnvBuilder(symlinks=True, with_pip=False).create(venv_dir)
    packages = venv_dir / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copytree(REPO / "engine" / "deliverd", packages / "site-packages" / "deliverd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for prog, text in _role_wrappers(venv_dir, config).items():
        (tmp_path / prog).write_text(text, encoding="utf-8")
        (tmp_path / prog).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "DELIVERD_CONFIG"}
    sent = subprocess.run([tmp_path / "sendmail", "-t", "-i"], input=b"To: root\n\nbody\n",
                          capture_output=True, env=env, check=False)
    assert sent.returncode == 0, sent.stderr
    [drop] = os.listdir(queue / "maildrop")
    envelope = b'{"v": 1, "sender": "root@%s", "recipients": ["ops@example.com"]}\n'
    # root: in except_users, so qualified and not masqueraded
    assert (queue / "maildrop" / drop).read_bytes().startswith(envelope % HOST.encode())
    # The full implementation, from the same wrapper: -bs with the config the wrapper names.
    smtp = subprocess.run([tmp_path / "sendmail", "-bs"], input=b"QUIT\r\n",
                          capture_output=True, env=env, check=False)
    assert smtp.returncode == 0 and smtp.stdout.startswith(f"220 {HOST} ".encode())
    listing = subprocess.run([tmp_path / "mailq", "-C", str(tmp_path / "missing.toml")],
                             capture_output=True, env=env, check=False)
    assert listing.returncode == 78 and listing.stderr.startswith(b"mailq: ")
