"""`make demo`: deliverd on a local demo fleet, with real servers, in about ten seconds.

1. Checks the three example specs and prints the route each one describes.
2. Starts a lab on loopback: a real dnsmasq serving MX records and aiosmtpd MX sinks that
   accept, defer (451) or refuse (550) mail, plus the sender's own MX to receive bounces.
3. Renders a direct-mode spec with the role's templates and runs `deliverd run` on it.
4. Submits three messages over SMTP and shows what happened to each: the log lines, the queue,
   and the RFC 3464 bounce that came back to the sender.
5. As root: deploys a two-host demo fleet on this machine with the Ansible role
   (playbooks/deploy.yml; hosts relay-a from examples/direct.yml, relay-b in smart host mode),
   sends a message through each, shows the route each took, and removes the fleet again.
Nothing leaves 127.0.0.0/8; everything is stopped at the end.
"""

from __future__ import annotations

import contextlib
import email
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deliverd.spec.normalise import normalise
from deliverd.spec.render import write_rendered
from deliverd.spec.specfile import load_spec_file
from deliverd.spec.validation import check_spec
from deliverd_lab.dnsmasq import DnsServer, start_dnsmasq
from deliverd_lab.sink import Script, Sink, free_port

EXAMPLES = Path(__file__).resolve().parent
SENDER = "alice@demo.test"
HOSTS = {
    "sender": "127.0.0.41",  # demo.test: alice's own mail server, receives the bounce
    "accept": "127.0.0.42",  # example.net: accepts everything
    "defer": "127.0.0.43",  # busy.example: 451 to every recipient
    "refuse": "127.0.0.44",  # gone.example: 550 no such user
    "relay": "127.0.0.45",  # the fleet's smart host (accepts everything)
}
FLEET = {"relay-a": "127.0.0.51", "relay-b": "127.0.0.52"}
ZONE = [
    "mx-host=demo.test,mx.demo.test,10", f"host-record=mx.demo.test,{HOSTS['sender']}",
    "mx-host=example.net,mx.example.net,10", f"host-record=mx.example.net,{HOSTS['accept']}",
    "mx-host=busy.example,mx.busy.example,10", f"host-record=mx.busy.example,{HOSTS['defer']}",
    "mx-host=gone.example,mx.gone.example,10", f"host-record=mx.gone.example,{HOSTS['refuse']}",
    "local=/example/", "local=/example.net/",
]


def title(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m")


def describe(spec: dict[str, Any]) -> str:
    routing = spec["routing"]
    mode = routing["mode"]
    if mode == "direct":
        return f"direct to each recipient's MX hosts (port {routing['direct']['port']})"
    sh = routing["smarthost"]
    auth = "AUTH as " + sh["auth"]["username"] if "auth" in sh else "no AUTH"
    pop = ", POP-before-SMTP" if "pop_before_smtp" in sh else ""
    relay = f"smart host {sh['host']}:{sh['port']} (tls={sh['tls']}, {auth}{pop})"
    if mode == "smarthost":
        return f"everything through the {relay}"
    return f"direct first, then the {relay} as fallback"


def show_examples() -> None:
    title("1. The example specs")
    for path in sorted(EXAMPLES.glob("*.yml")):
        normalised, problems = check_spec(load_spec_file(path))
        if normalised is None:
            raise SystemExit(f"{path.name}: invalid: {[p.render() for p in problems]}")
        print(f"  {path.name:15} {describe(normalised)}")
        for problem in problems:
            print(f"  {'':15} {problem.render()}")


@contextlib.contextmanager
def lab(workdir: Path) -> Iterator[tuple[DnsServer, int, dict[str, Sink]]]:
    port = free_port(list(HOSTS.values()))
    scripts = {
        "sender": Script(hostname="mx.demo.test"),
        "accept": Script(hostname="mx.example.net"),
        "defer": Script(hostname="mx.busy.example",
                        rcpt={"carol@busy.example": "451 4.2.1 mailbox busy, try later"}),
        "refuse": Script(hostname="mx.gone.example",
                         rcpt={"dave@gone.example": "550 5.1.1 dave@gone.example: no such user"}),
        "relay": Script(hostname="smarthost.demo.test"),
    }
    sinks = {name: Sink(HOSTS[name], port, script, None).start()
             for name, script in scripts.items()}
    dns = start_dnsmasq(workdir, ZONE)
    try:
        yield dns, port, sinks
    finally:
        dns.stop()
        for sink in sinks.values():
            sink.stop()


def submit(listen: int, recipient: str, subject: str) -> None:
    body = (f"From: Alice <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n\r\n"
            "Hello from the deliverd demo.\r\n")
    with smtplib.SMTP("127.0.0.1", listen, timeout=10) as smtp:
        smtp.sendmail(SENDER, [recipient], body.encode())


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


def attempts(log_path: Path) -> list[dict[str, Any]]:
    records = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if "status" in record:
                records.append(record)
    return records


def main() -> int:
    show_examples()
    with tempfile.TemporaryDirectory(prefix="deliverd-demo-") as tmp:
        workdir = Path(tmp)
        with lab(workdir) as (dns, mx_port, sinks):
            title("2. A lab on loopback")
            print(f"  dnsmasq on {dns.nameserver}; MX sinks on port {mx_port}:")
            for name, address in HOSTS.items():
                print(f"    {address}  {name}")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                listen = s.getsockname()[1]
            spec = {
                "version": 1,
                "host": {"name": "relay1.demo.test"},
                "listen": [{"address": "127.0.0.1", "port": listen}],
                "queue": {"path": str(workdir / "queue")},
                "routing": {"mode": "direct", "direct": {"port": mx_port}},
                "dns": {"nameservers": [dns.nameserver]},
                "retry": {"temp_error_delay": "1m", "interval": "5m"},
                "dsn": {"notify_delayed": False},
            }
            config, _secrets = write_rendered(normalise(spec), workdir / "etc")
            title("3. deliverd run")
            print(f"  config {config.name} rendered from a direct-mode spec; listening on "
                  f"127.0.0.1:{listen}")
            log_path = workdir / "deliverd.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "deliverd", "run", "-c", str(config),
                     "--log-format", "json"], stdout=log, stderr=log)
            try:
                wait(lambda: _listening(listen), 15, "the engine to listen")
                title("4. Three messages")
                for rcpt, subject in (("bob@example.net", "delivered"),
                                      ("carol@busy.example", "deferred"),
                                      ("dave@gone.example", "bounced")):
                    submit(listen, rcpt, subject)
                    print(f"  submitted {SENDER} -> {rcpt}")
                wait(lambda: len(attempts(log_path)) >= 4 and sinks["sender"].messages, 20,
                     "three outcomes and a bounce")
                title("Log lines (one per recipient per attempt)")
                for record in attempts(log_path):
                    print(f"  {record['queue_id']}: to=<{record['to']}>, relay={record['relay']}, "
                          f"dsn={record['dsn']}, status={record['status']} ({record['reply']})")
                title("deliverd queue list")
                listing = subprocess.run(
                    [sys.executable, "-m", "deliverd", "queue", "-c", str(config), "list"],
                    capture_output=True, text=True, check=False)
                print("  " + listing.stdout.strip().replace("\n", "\n  "))
                title("The bounce alice@demo.test received (RFC 3464)")
                bounce = email.message_from_bytes(sinks["sender"].messages[0].data)
                print(f"  From: {bounce['From']}\n  Subject: {bounce['Subject']}")
                for part in bounce.walk():
                    if part.get_content_type() == "message/delivery-status":
                        for block in part.get_payload():
                            for key, value in block.items():
                                print(f"    {key}: {value}")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            deploy_fleet(workdir, dns, mx_port, sinks)
    title("Done: delivered, deferred and bounced by the rules of docs/delivery.md, and a fleet "
          "deployed from its spec.")
    return 0


def fleet_inventory(workdir: Path, dns: DnsServer, mx_port: int) -> dict[str, Any]:
    """relay-a runs examples/direct.yml, relay-b relays through the lab's smart host; both get
    the lab's overrides (own listener, queue, prefix; the lab DNS and MX port)."""
    direct = load_spec_file(EXAMPLES / "direct.yml")
    assert isinstance(direct, dict)
    hosts: dict[str, Any] = {}
    for name, address in FLEET.items():
        spec = dict(direct) if name == "relay-a" else {"version": 1}
        prefix = workdir / "fleet" / name
        spec.update({
            "host": {"name": f"{name}.demo.test", "addresses": [address]},
            "listen": [{"address": address, "port": 2525,
                        "allow_networks": [f"{address}/32"]}],
            "queue": {"path": str(prefix / "var" / "spool" / "deliverd")},
            "dns": {"nameservers": [dns.nameserver]},
        })
        routing = dict(spec.get("routing", {}))
        routing["direct"] = {**routing.get("direct", {}), "port": mx_port}
        if name == "relay-b":
            routing.update({"mode": "smarthost", "smarthost": {
                "host": HOSTS["relay"], "port": mx_port, "tls": "none"}})
        spec["routing"] = routing
        hosts[name] = {"ansible_connection": "local",
                       "ansible_python_interpreter": sys.executable,
                       "deliverd_prefix": str(prefix), "deliverd_spec": spec}
    return {"deliverd": {"hosts": hosts}}


def ansible(workdir: Path, inventory: Path, *extra: str) -> None:
    repo = EXAMPLES.parent
    env = {**os.environ, "ANSIBLE_CONFIG": str(repo / "ansible.cfg"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
         str(repo / "playbooks" / "deploy.yml"), *extra],
        cwd=repo, env=env, capture_output=True, text=True, check=False)
    recap = result.stdout[result.stdout.rfind("PLAY RECAP"):].strip()
    print("  " + recap.replace("\n", "\n  "))
    if result.returncode != 0:
        raise SystemExit(ansible_failure(result.stdout + result.stderr))


def ansible_failure(output: str) -> str:
    """The message for a failed ansible-playbook run: the failed tasks, and where the whole
    output is kept. Not in the demo's work directory, which is deleted on the way out."""
    fd, kept = tempfile.mkstemp(prefix="deliverd-demo-ansible-", suffix=".log")
    with os.fdopen(fd, "w") as log:
        log.write(output)
    return ("demo: ansible-playbook failed:\n" + "\n".join(failed_tasks(output))
            + f"\ndemo: the whole ansible-playbook output is in {kept}")


def failed_tasks(output: str, width: int = 2000) -> list[str]:
    """Each failed task's header with its failure lines (``fatal:``/``failed:``), shortened to
    ``width``; the output's last lines when none is found (a syntax error, say)."""
    found: list[str] = []
    task = ""
    for line in output.splitlines():
        if line.startswith("TASK ["):
            task = line.rstrip(" *")
        elif line.startswith(("fatal: ", "failed: ")):
            if task and task not in found:
                found.append(task)
            found.append("  " + line[:width])
    return found or output.splitlines()[-40:]


def deploy_fleet(workdir: Path, dns: DnsServer, mx_port: int, sinks: dict[str, Sink]) -> None:
    title("5. A demo fleet deployed with Ansible")
    if os.geteuid() != 0:
        print("  skipped: deploying with the role needs root (it creates the deliverd user)")
        return
    workdir.chmod(0o755)  # the engines run as the deliverd user and must reach their prefix
    inventory = workdir / "fleet.json"
    inventory.write_text(json.dumps(fleet_inventory(workdir, dns, mx_port), indent=2))
    print("  ansible-playbook playbooks/deploy.yml (relay-a: examples/direct.yml, relay-b: "
          "smart host mode)")
    ansible(workdir, inventory)
    try:
        for name, address in FLEET.items():
            rcpt = f"{name}@example.net"
            with smtplib.SMTP(address, 2525, timeout=10) as smtp:
                smtp.sendmail(SENDER, [rcpt], f"Subject: via {name}\r\n\r\nHello.\r\n")
            print(f"  submitted {SENDER} -> {rcpt} through {name}'s engine ({address}:2525)")
        wait(lambda: len(sinks["accept"].messages) >= 2 and sinks["relay"].messages, 30,
             "the fleet's deliveries")
        for name in FLEET:
            log = workdir / "fleet" / name / "var" / "log" / "deliverd" / "deliverd.log"
            for line in log.read_text().splitlines():
                if "status=sent" in line and f"{name}@example.net" in line:
                    print(f"  {name}: {line.split(': ', 1)[-1].removeprefix('INFO ')}")
        print(f"  the smart host sink received: "
              f"{[m.rcpt_tos for m in sinks['relay'].messages]}")
    finally:
        print("  removing the fleet (deliverd_state: absent)")
        ansible(workdir, inventory, "-e", "deliverd_state=absent", "-e",
                "deliverd_purge_queue=true")


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


if __name__ == "__main__":
    raise SystemExit(main())
