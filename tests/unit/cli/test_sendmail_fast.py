"""The ``sendmail`` fast path against the full implementation it stands in for.

Each piece the fast path does without the email package, tomllib or the config model is held
to the full path's answer: either it declines, or it gives the same result (flags, config,
-t addresses, From:/Date:, the drop file itself). Then what it imports, and the role's
wrapper run from a venv as a host has it.
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

from deliverd.cli import sendmail as full
from deliverd.cli import sendmail_fast as fast
from deliverd.cli import sendmail_settings as config_reader
from deliverd.queue.space import WAL_HEADROOM
from deliverd.spec.normalise import normalise
from deliverd.spec.render import render_config
from deliverd.spec.specfile import load_spec_file
from deliverd.submission.dropfile import envelope_line, json_string
from deliverd.submission.local import header_addresses
from deliverd.submission.maildrop import DropEnvelope, prepare
from deliverd.submission.message_input import complete_header
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


def _declines(call: Any, *args: Any) -> bool:
    try:
        call(*args)
    except (fast.Decline, config_reader.Unsure):
        return True
    return False


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
FULL_ONLY = [["-bs"], ["-bs", "-odb", "-oem"], ["-bp"], ["-q"], ["-q30m"], ["-N", "never", "x"],
             ["-Rhdrs", "x"], ["-V", "id", "x"], ["-Z"], ["-f"], ["-bd"], ["-t", "-L", "tag"]]


def _same_request(request: fast.Request, opts: full.Options) -> bool:
    return (opts.mode == "send" and opts.notify is None and opts.ret is None
            and opts.envid is None
            and (request.recipients, request.header_recipients, request.dot_ends,
                 request.sender, request.fullname, request.config)
            == (opts.recipients, opts.header_recipients, opts.dot_ends, opts.sender,
                opts.fullname, opts.config))


@pytest.mark.parametrize("argv", CALLERS)
def test_what_the_callers_pass_is_taken_on_the_fast_path_as_the_full_parser_reads_it(
    argv: list[str],
) -> None:
    assert _same_request(fast.parse_args(argv), full.parse_args(argv))


@pytest.mark.parametrize("argv", FULL_ONLY)
def test_smtp_queue_dsn_and_bad_flags_go_to_the_full_implementation(argv: list[str]) -> None:
    assert _declines(fast.parse_args, argv)


TOKENS = ["-t", "-i", "-oi", "-oem", "-odi", "-f", "-fa@b", "-r", "-F", "-FName", "-B8BITMIME",
          "-B", "-bm", "-b", "m", "-bs", "-bp", "-q", "-N", "never", "-R", "-V", "-C", "-ti",
          "-it", "-tZ", "--", "-", "a@b", "root", "x,y", "-v", "-m", "-L", "-h", "-o", "-x"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=6))
def test_the_fast_parser_declines_or_agrees_with_the_full_one(argv: list[str]) -> None:
    try:
        opts = full.parse_args(argv)
    except full.Failure:
        assert _declines(fast.parse_args, argv)
        return
    try:
        request = fast.parse_args(argv)
    except fast.Decline:
        return
    assert _same_request(request, opts), argv


# -- the config ----------------------------------------------------------------------------------


def _full_settings(path: Path) -> tuple[object, ...]:
    s = full.load_settings(str(path))
    p = s.policy
    return (s.queue_path, s.host_name, s.max_message_size, p.domains, p.qualify_domain,
            p.aliases, p.masquerade_domain, p.except_users)


def _fast_settings(path: Path) -> tuple[object, ...]:
    s = config_reader.read_settings(str(path))
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
           "queue": {"path": "/var/spool/dé liverd \"q\"\t"}}


@pytest.mark.parametrize("spec", list(_example_specs()), ids=lambda s: s["host"]["name"])
def test_rendered_configs_read_the_same_on_both_paths(spec: dict[str, Any],
                                                      tmp_path: Path) -> None:
    path = tmp_path / "deliverd.toml"
    path.write_text(_rendered(spec), encoding="utf-8")
    assert _fast_settings(path) == _full_settings(path)


def test_configs_the_fast_path_cannot_read_with_certainty_go_to_the_full_one(
    tmp_path: Path,
) -> None:
    text = _rendered(SPEC)
    cases: dict[str, str | bytes] = {
        "old": text.split("\n[local]\n")[0],  # before [local]: the full path normalises
        "garbage": "this is = = not toml\n",
        "multi-line": text + 'x = """\n[queue]\npath = "/elsewhere"\n"""\n',
        "int path": text.replace('path = "/var/spool/deliverd"', "path = 3"),
        "twice": text + '\n[queue]\npath = "/elsewhere"\n',
        "bad size": text.replace('max_message_size = "2MB"', 'max_message_size = "2 MB"'),
        "not utf-8": text.replace("web1", "w\udcffb1").encode("utf-8", "surrogateescape"),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        assert _declines(config_reader.read_settings, str(path)), name
    assert _declines(config_reader.read_settings, str(tmp_path / "missing"))


LINES = ['[queue]', 'path = "/q"', "path = '/q'", '[local]', 'domains = ["localhost"]',
         'domains = [', '"x",', ']', 'qualify_domain = "h"', '[local.aliases]',
         '"*" = ["a@b"]', 'root = ["r@b"]', '[masquerade]', 'except_users = []',
         'domain = "m"', '[host]', 'name = "h"', '[limits]', 'max_message_size = "1KB"',
         '[[listen]]', 'port = 25', 'x = { a = 1, b = "]" }', "local.domains = []",
         '# [queue]', 'k = "a#b" # c', '[routing.smarthost]', 'hosts = [', '{ host = "h" },',
         'path = "/\\u0071"', 'x = 1979-05-27T07:32:00Z', 'bad line', '[queue] x', '"k" = 1']


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LINES), max_size=24))
def test_what_the_fast_config_reader_takes_is_what_tomllib_reads(lines: list[str]) -> None:
    import tomllib

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
def test_t_addresses_are_the_email_packages_or_the_full_path_finds_them(value: str) -> None:
    header = f"Subject: s\r\nTo: {value}\r\nCc: c@example.org\r\n".encode()
    found = fast.header_addresses(header)
    assert found is None or found == header_addresses(header, ("to", "cc", "bcc"))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='ab@.<>, "()\\:;x\t-_é', max_size=24))
def test_t_addresses_agree_with_the_email_package_whenever_taken(value: str) -> None:
    header = b"To: " + value.encode() + b"\r\nBcc:\r\n " + value.encode() + b"\r\n"
    found = fast.header_addresses(header)
    if found is not None:
        assert found == header_addresses(header, ("to", "cc", "bcc")), value


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/St_Johns",
                                  "Africa/Monrovia", "Europe/Berlin"])
def test_date_is_formatdate_localtime(zone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        for when in (0.0, 63072000.5, 1_700_000_000.999, 1_719_000_000.0, time.time()):
            assert fast.format_date(when) == formatdate(when, localtime=True), (zone, when)
    finally:
        monkeypatch.undo()
        time.tzset()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20))
def test_from_display_name_is_formataddr(name: str) -> None:
    assert fast.format_address(name, "a@b.example") == formataddr((name, "a@b.example"))


def test_message_id_has_make_msgids_shape() -> None:
    assert re.fullmatch(r"<\d+\.\d+\.\d+@h\.example>", fast.make_msgid("h.example"))


@pytest.mark.parametrize("drop_bcc", [True, False])
def test_completed_header_is_the_full_paths(drop_bcc: bool) -> None:
    dated = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n"
    for header in (b"Subject: x\r\n", b"From: a@b\r\nBcc: s@x,\r\n t@x\r\nSubject: y\r\n"):
        args: dict[str, Any] = {"sender": "root@example.com", "fullname": "Cron (Daemon)",
                                "domain": HOST, "drop_bcc": drop_bcc}
        assert (fast.complete_header(header + dated, **args)
                == complete_header(header + dated, **args))
        made = fast.complete_header(header, **args).decode()
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
# (argv, message, whether the fast path takes it: False means it hands it to the full path)
SUBMISSIONS = [
    (["-t", "-i"], b"To: root, x@example.org\nCc: www-data@localhost\nBcc: b@example.org\n"
                   b"Subject: php\n\nbody\n.\nmore\n", True),
    (["-t", "-i", "-f", "app@example.org"], b"To: Someone <s@example.org>\n\nbody\n", True),
    (["-i", "-FCron Daemon", "-B8BITMIME", "-oem", "root"], b"Subject: cron\n\nout\n", True),
    (["-FCronDaemon", "-odi", "-oem", "-oi", "-t"], b"To: root\nSubject: c\n\n.\n", True),
    (["-i", "a@example.org", "B@example.org,a@example.org"], b"From: Dev <d@x>\n\npatch\n",
     True),
    (["x@example.org"], b"From b@c Mon Jan  1 00:00:00 2024\nSubject: mbox\n\nbody\n.\nnot\n",
     True),
    (["-i", "root"], b"no header at all\n\nbody\n", True),
    (["-t", "-oi"], b"To: a@example.org,\n\tB <b@example.org>\nSubject: folded\n\nf\n", True),
    (["-t"], b'To: "Doe, J" <j@example.org>, root\nSubject: quoted\n\nq\n', False),
    (["-t", "-i"], b"To: undisclosed-recipients:;\nCc: c@example.org\n\ng\n", False),
    (["-i", "-F", "J\u00f6rg", "root"], b"Subject: name\n\nfull path\n", False),
]


@pytest.mark.parametrize(("argv", "message", "taken"), SUBMISSIONS)
def test_both_paths_write_the_same_drop_file(argv: list[str], message: bytes, taken: bool,
                                             host: tuple[Path, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    queue, config = host
    argv = ["-C", str(config), *argv]
    message = DATED + message if not message.startswith(b"From ") else message
    code_full, by_full = _submit(full.main, argv, message, queue)
    handed_over: list[list[str]] = []
    full_main = full.main

    def counted(*args: Any) -> int:
        handed_over.append(list(args[0]))
        return full_main(*args)

    monkeypatch.setattr(full, "main", counted)
    code_fast, by_fast = _submit(fast.main, argv, message, queue)
    assert handed_over == ([] if taken else [argv])  # the fast path's own, or handed over
    assert code_full == code_fast == 0
    # The full path rewrites the header at submission, the fast path leaves it to the pickup.
    policy = full.load_settings(str(config)).policy
    env_full, _, msg_full = by_full.partition(b"\n")
    env_fast, _, msg_fast = by_fast.partition(b"\n")
    assert env_fast == env_full
    if b"\r\nDate: " in msg_full:  # an mbox message got a Date: and Message-ID: of its own
        msg_full, msg_fast = (re.sub(rb"(Date|Message-ID): [^\r]*", b"", m)
                              for m in (msg_full, msg_fast))
    assert policy.rewrite_message(msg_fast) == policy.rewrite_message(msg_full)


@pytest.mark.parametrize(("argv", "message", "code"), [
    (["-t", "-i"], b"Subject: none\n\nx\n", 65),
    (["-i"], b"Subject: none\n\nx\n", 65),
    (["-i", "bob"], b"Subject: bob\n\nx\n", 67),
    (["-t"], b"To: bob@localhost\n\nx\n", 67),
    (["x@example.org"], b"Subject: big\n\n" + b"x" * 3_000_000 + b"\n", 65),
])
def test_refusals_have_the_full_paths_code_and_message(
    argv: list[str], message: bytes, code: int, host: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue, config = host
    argv = ["-C", str(config), *argv]
    assert _submit(full.main, argv, message, queue) == (code, b"")
    said = capsys.readouterr().err
    assert _submit(fast.main, argv, message, queue) == (code, b"")
    assert capsys.readouterr().err == said and said.count("\n") == 1


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


def test_min_free_is_the_queues_reserve() -> None:
    assert fast.WAL_HEADROOM == WAL_HEADROOM


# -- the import path and the role's wrapper ------------------------------------------------------


HEAVY = ("re", "email", "dataclasses", "typing", "tomllib", "json", "pathlib", "contextlib",
         "collections", "enum", "inspect", "deliverd.config", "deliverd.cli.sendmail",
         "deliverd.submission.local", "deliverd.submission.maildrop",
         # os itself: under python -S nothing has imported it, and it costs milliseconds
         "os", "posixpath", "genericpath", "_collections_abc")


def test_a_submission_imports_nothing_heavy(host: tuple[Path, Path]) -> None:
    queue, config = host
    code = ("import sys, io\n"
            f"sys.path[:0] = [{str(REPO / 'engine')!r}]\n"
            "from deliverd.cli.sendmail_fast import main\n"
            f"rc = main(['-C', {str(config)!r}, '-t', '-i'], 'sendmail', "
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
        assert text == fast.launcher(f"{tmp_path}/venv/bin/python", None, prog,
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
