"""``deliverd validate`` as an operator runs it, and the spec file reader under it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deliverd.spec.specfile import SpecFileError, load_spec_file

PASSWORD = "Vault-Only-Pw-93"

VALID = f"""\
version: 1
host:
  name: mail.example.com
routing:
  mode: smarthost
  smarthost:
    host: relay.example.net
    port: 587
    auth:
      username: app01
      password: {PASSWORD}
"""

WITH_WARNING = """\
version: 1
host:
  name: mail
"""

INVALID = f"""\
version: 2
host:
  name: mail.example.com
routing:
  mode: smarthost
  smarthost:
    host: relay.example.net
    port: 70000
    tls: none
    auth:
      username: app01
      password: {PASSWORD}
retry:
  interval: 15 minutes
"""


def run_validate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deliverd", "validate", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text, encoding="utf-8")
    return name


def test_valid_spec_exits_0_and_says_so(tmp_path: Path) -> None:
    result = run_validate(tmp_path, write(tmp_path, "spec.yml", VALID))

    assert result.returncode == 0, result.stderr
    assert result.stdout == "spec.yml: valid (mode=smarthost, 0 warnings)\n"
    assert result.stderr == ""


def test_warnings_go_to_stderr_and_keep_exit_0(tmp_path: Path) -> None:
    result = run_validate(tmp_path, write(tmp_path, "spec.yml", WITH_WARNING))

    assert result.returncode == 0
    assert result.stdout == "spec.yml: valid (mode=direct, 1 warning)\n"
    assert result.stderr.startswith("warning: /host/name: 'mail' is not a fully qualified")


def test_invalid_spec_exits_1_with_one_error_per_line_pointer_first(tmp_path: Path) -> None:
    result = run_validate(tmp_path, write(tmp_path, "spec.yml", INVALID))

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [
        "/retry/interval",
        "/routing/smarthost/port",
        "/routing/smarthost/tls",
        "/version",
    ]
    assert "70000 is greater than the maximum of 65535" in result.stdout
    assert "spec.yml: invalid (4 errors)" in result.stderr
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_spec_that_is_not_a_mapping_exits_1(tmp_path: Path) -> None:
    result = run_validate(tmp_path, write(tmp_path, "spec.yml", "- version: 1\n"))

    assert result.returncode == 1
    assert result.stdout.startswith("/: the spec must be a mapping, not a list")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(None, "spec.yml: no such file", id="missing"),
        pytest.param("version: 1\nhost: [a\n", "line 3, column 1", id="unparsable"),
        pytest.param("version: 1\nhost: {name: a.b}\nversion: 1\n",
                     "duplicate key 'version' (first written on line 1)", id="duplicate-key"),
        pytest.param("", "no YAML document", id="empty"),
    ],
)
def test_unreadable_spec_exits_2_without_traceback(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    if content is not None:
        write(tmp_path, "spec.yml", content)

    result = run_validate(tmp_path, "spec.yml")

    assert result.returncode == 2
    assert result.stdout == ""
    assert expected in result.stderr
    assert "spec.yml" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_output_lists_errors_and_warnings_as_dicts(tmp_path: Path) -> None:
    spec = INVALID.replace("mail.example.com", "mail")
    result = run_validate(tmp_path, write(tmp_path, "spec.yml", spec), "--json")

    assert result.returncode == 1
    problems = json.loads(result.stdout)
    assert all(set(p) == {"pointer", "message", "hint", "severity"} for p in problems)
    assert {p["severity"] for p in problems} == {"error", "warning"}
    assert {"pointer": "/host/name", "severity": "warning"}.items() <= problems[0].items()
    assert PASSWORD not in result.stdout


def test_json_output_of_a_valid_spec_exits_0(tmp_path: Path) -> None:
    result = run_validate(tmp_path, write(tmp_path, "spec.yml", WITH_WARNING), "--json")

    assert result.returncode == 0
    assert [p["pointer"] for p in json.loads(result.stdout)] == ["/host/name"]


def test_normalised_output_has_defaults_and_no_secrets(tmp_path: Path) -> None:
    result = run_validate(tmp_path, write(tmp_path, "spec.yml", VALID), "--normalised")

    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(result.stdout)
    assert spec["queue"]["path"] == "/var/spool/deliverd"
    assert spec["retry"]["interval"] == "15m"
    assert spec["routing"]["smarthost"]["tls"] == "starttls"
    assert spec["dsn"]["postmaster"] == "postmaster@mail.example.com"
    assert spec["routing"]["smarthost"]["auth"] == {"username": "app01", "password": "<redacted>"}
    assert spec["routing"]["smarthost"]["use_account_mail_passwords"] is False
    assert PASSWORD not in result.stdout + result.stderr


def test_normalised_output_shows_secrets_only_when_asked(tmp_path: Path) -> None:
    name = write(tmp_path, "spec.yml", VALID)
    result = run_validate(tmp_path, name, "--normalised", "--show-secrets")

    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["routing"]["smarthost"]["auth"]["password"] == PASSWORD


def test_json_spec_file_is_accepted(tmp_path: Path) -> None:
    text = json.dumps({"version": 1, "host": {"name": "mail.example.com"}})
    result = run_validate(tmp_path, write(tmp_path, "spec.json", text))

    assert result.returncode == 0
    assert result.stdout == "spec.json: valid (mode=direct, 0 warnings)\n"


# --- the spec file reader -----------------------------------------------------------------------


def test_duplicate_key_in_a_nested_mapping_names_the_key_and_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "spec.yml"
    path.write_text("version: 1\nhost:\n  name: a.example\n  name: b.example\n")

    with pytest.raises(SpecFileError) as caught:
        load_spec_file(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML at line 4, column 3")
    assert "duplicate key 'name' (first written on line 3)" in message


def test_merge_keys_may_be_overridden_without_a_duplicate_error(tmp_path: Path) -> None:
    path = tmp_path / "spec.yml"
    path.write_text("base: &b {port: 25, tls: none}\nsmarthost:\n  <<: *b\n  port: 587\n")

    assert load_spec_file(path) == {
        "base": {"port": 25, "tls": "none"},
        "smarthost": {"port": 587, "tls": "none"},
    }


def test_boolean_key_is_refused_with_a_quoting_hint(tmp_path: Path) -> None:
    path = tmp_path / "spec.yml"
    path.write_text("version: 1\non: 1\n")

    with pytest.raises(SpecFileError, match=r"line 2, column 1: found a key that is not a string"):
        load_spec_file(path)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"a: 1\n---\nb: 2\n", "2 YAML documents", id="two-documents"),
        pytest.param(b"a: \xff\xfe\n", "is not UTF-8 text", id="not-utf8"),
        pytest.param(b"a: !!python/object:os.system x\n", "could not determine a constructor",
                     id="python-tag"),
        pytest.param(b"a: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested too deeply",
                     id="deep-nesting"),
    ],
)
def test_odd_yaml_is_a_spec_file_error(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "spec.yml"
    path.write_bytes(data)

    with pytest.raises(SpecFileError, match=expected):
        load_spec_file(path)


def test_a_directory_is_a_spec_file_error(tmp_path: Path) -> None:
    with pytest.raises(SpecFileError, match="is a directory"):
        load_spec_file(tmp_path)


def test_json_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"version": 1}).encode())

    assert load_spec_file(path) == {"version": 1}
