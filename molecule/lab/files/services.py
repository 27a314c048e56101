"""Start or stop the lab's servers in the service namespace (run it inside ``dlv-svc``).

    ip netns exec dlv-svc python services.py start --config services.json
    python services.py stop --config services.json        # from anywhere; safe twice
    ip netns exec dlv-svc python services.py publish --config services.json --records R.json

The config (rendered by create.yml from the scenario's variables) names every address:

- dnsmasq: the lab's DNS (MX/A records of the lab domains; ``publish`` restarts it serving
  the TXT records of a JSON list besides them, as an operator publishes DKIM keys);
- one CA (trustme) and a certificate for the smart hosts' and the POP server's names; the CA
  lands in ``<lab>/services/tls/ca.pem`` for the engines' ``ca_file``;
- Dovecot: POP3 (STLS, POP3S) for POP-before-SMTP, and SASL for both Postfix instances;
- Postfix smart hosts (STARTTLS, AUTH via Dovecot, AUTH only after TLS), each relaying
  everything to its own sink;
- aiosmtpd sinks (``sink.py``): the MX hosts and the smart hosts' onward relays, each recording
  what it received in ``<lab>/services/sinks/<name>/messages.jsonl``, with the result of
  verifying each DKIM signature against the lab's DNS.

``start`` leaves a running set alone (idempotent) and otherwise starts from a clean slate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trustme

from deliverd_lab import Dovecot, LabError, PostfixRelay, wait_for_port
from deliverd_lab.common import pid_alive, read_pid, terminate
from deliverd_lab.dnsmasq import start_dnsmasq

HERE = Path(__file__).resolve().parent


class Lab:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.root = Path(config["lab_dir"]) / "services"
        self.tls_dir = self.root / "tls"
        self.sink_dir = self.root / "sinks"
        self.state_file = self.root / "state.json"

    # -- the servers, as objects that know their own work directories ------------------------

    def dovecot(self) -> Dovecot:
        d = self.config["dovecot"]
        return Dovecot(
            self.root / "dovecot", listen=d["address"], pop3_port=d["pop3_port"],
            pop3s_port=d["pop3s_port"], users=d["users"], tls_cert=self._pop_cert(),
            plaintext_auth=True,
        )

    def postfixes(self, *, only_existing: bool = False) -> list[PostfixRelay]:
        """The smart hosts (``only_existing``: those with a work directory, for teardown:
        building the object writes its configuration)."""
        dovecot_socket = self.root / "dovecot" / "auth-client"
        return [
            PostfixRelay(
                self.root / f"postfix-{s['name']}", listen=s["address"], port=s["port"],
                relayhost=s["relayhost"], hostname=s["hostname"], sasl_socket=dovecot_socket,
                tls_chain_file=self.tls_dir / "server-chain.pem", require_auth=True,
            )
            for s in self.config["smarthosts"]
            if not only_existing or (self.root / f"postfix-{s['name']}").is_dir()
        ]

    def _pop_cert(self) -> tuple[bytes, bytes] | None:
        chain, key = self.tls_dir / "server-cert.pem", self.tls_dir / "server-key.pem"
        if not chain.exists():
            return None
        return chain.read_bytes(), key.read_bytes()

    # -- state ------------------------------------------------------------------------------

    def _pids(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.state_file.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def running(self) -> bool:
        pids = self._pids()
        expected = {"dnsmasq", "sinks", "dovecot", *(f"postfix-{s['name']}"
                                                    for s in self.config["smarthosts"])}
        return set(pids) == expected and all(pid_alive(pid) for pid in pids.values())

    # -- start ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.running():
            return
        self.stop()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        pids: dict[str, int] = {}
        try:
            self._write_tls()
            pids["sinks"] = self._start_sinks()
            pids["dnsmasq"] = self._start_dns()
            dovecot = self.dovecot()
            dovecot.start()
            pids["dovecot"] = dovecot.pid or 0
            for postfix in self.postfixes():
                postfix.start()
                pids[postfix.workdir.name] = postfix.pid or 0
        finally:
            self.state_file.write_text(json.dumps(pids))

    def _write_tls(self) -> None:
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        self.tls_dir.chmod(0o755)
        ca = trustme.CA(organization_name="deliverd lab CA")
        server = ca.issue_cert(*self.config["tls_names"])
        ca.cert_pem.write_to_path(str(self.tls_dir / "ca.pem"))
        server.private_key_and_cert_chain_pem.write_to_path(str(self.tls_dir / "server-chain.pem"))
        chain = b"".join(blob.bytes() for blob in server.cert_chain_pems)
        (self.tls_dir / "server-cert.pem").write_bytes(chain)
        server.private_key_pem.write_to_path(str(self.tls_dir / "server-key.pem"))
        (self.tls_dir / "ca.pem").chmod(0o644)  # the engines run as their own user
        for private in ("server-chain.pem", "server-key.pem"):
            (self.tls_dir / private).chmod(0o600)

    def _start_sinks(self) -> int:
        self.sink_dir.mkdir(parents=True, exist_ok=True)
        self.sink_dir.chmod(0o755)
        pid_file = self.root / "sinks.pid"
        argv = [sys.executable, str(HERE / "sink.py"), "--dir", str(self.sink_dir),
                "--pid-file", str(pid_file)]
        argv += [f"--lose={s['name']}={s['lose']}" for s in self.config["sinks"] if "lose" in s]
        argv += ["--dkim-dns", self.config["dns"]["address"]]
        argv += [f"{s['name']}={s['address']}:{s['port']}" for s in self.config["sinks"]]
        with (self.root / "sinks.log").open("ab") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True)
        for s in self.config["sinks"]:
            if process.poll() is not None:
                raise LabError(f"the sinks exited: {(self.root / 'sinks.log').read_text()}")
            wait_for_port(s["address"], s["port"], 15, f"sink {s['name']}")
        return process.pid

    def _start_dns(self) -> int:
        d = self.config["dns"]
        directory = self.root / "dns"
        directory.mkdir(parents=True, exist_ok=True)
        records = [*d["records"], *(txt_record_line(r["name"], r["value"])
                                    for r in self._published())]
        server = start_dnsmasq(directory, records, listen=d["address"], port=d["port"])
        return server.process.pid

    # -- TXT records published during the run (DKIM keys), kept across DNS restarts ----------

    def _published(self) -> list[dict[str, str]]:
        path = self.root / "dns" / "published.json"
        if not path.exists():
            return []
        records: list[dict[str, str]] = json.loads(path.read_text())
        return records

    def publish(self, records: list[dict[str, str]]) -> None:
        """Serve exactly ``records`` (``{name, value}``) as the lab's published TXT records
        besides the scenario's own: dnsmasq reads TXT records only at start, so it restarts."""
        (self.root / "dns").mkdir(parents=True, exist_ok=True)
        (self.root / "dns" / "published.json").write_text(json.dumps(records))
        pids = self._pids()
        old = pids.get("dnsmasq")
        if old and pid_alive(old):
            terminate(old, 5.0)
        pids["dnsmasq"] = self._start_dns()
        self.state_file.write_text(json.dumps(pids))

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every server this lab may have started; safe twice and after a failed start."""
        errors: list[str] = []
        for postfix in self.postfixes(only_existing=True):
            try:
                postfix.stop()
            except (LabError, OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{postfix.workdir.name}: {exc}")
        if (self.root / "dovecot" / "dovecot.conf").exists():
            self.dovecot().stop()
        pids = self._pids()
        sink_pid = read_pid(self.root / "sinks.pid")
        for pid in (pids.get("dnsmasq"), pids.get("sinks"), sink_pid):
            if pid and pid_alive(pid):
                terminate(pid, 5.0)
        self.state_file.unlink(missing_ok=True)
        if errors:
            raise LabError("; ".join(errors))


def txt_record_line(name: str, value: str) -> str:
    """dnsmasq's txt-record= for ``value``, in strings of at most 255 characters."""
    parts = ",".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"txt-record={name.rstrip('.')},{parts}"


def main() -> int:
    parser = argparse.ArgumentParser(description="the deliverd lab's servers")
    parser.add_argument("action", choices=("start", "stop", "status", "publish"))
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--records", type=Path, default=None,
                        help="publish: a JSON list of {name, value} TXT records to serve")
    args = parser.parse_args()
    if not args.config.exists() and args.action == "stop":
        return 0  # never started: nothing to stop
    lab = Lab(json.loads(args.config.read_text()))
    try:
        if args.action == "start":
            lab.start()
        elif args.action == "stop":
            lab.stop()
        elif args.action == "publish":
            if args.records is None:
                parser.error("publish needs --records FILE")
            lab.publish(json.loads(args.records.read_text()))
    except LabError as exc:
        print(f"lab services: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"running": lab.running(), "ca_file": str(lab.tls_dir / "ca.pem"),
                      "sinks": str(lab.sink_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
