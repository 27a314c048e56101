"""A DNSSEC lab for DANE on loopback: NSD serves three zones, a validating Unbound answers.

=================  ==========================================================================
``secure.test``    signed. Apex MX 10 ``mx.secure.test``, its A and ``_25._tcp`` TLSA: all
                   secure (AD). ``nodane.secure.test`` MX → ``mx-nodane``, which has no TLSA:
                   authenticated denial (NXDOMAIN + AD).
``insecure.test``  unsigned, same shape: answers without AD.
``bogus.test``     signed, then single RRSIGs corrupted (``BROKEN``): the TLSA of
                   ``mx.bogus.test``, the MX of ``badmx.bogus.test`` and the A of
                   ``mx-badaddr.bogus.test`` are SERVFAIL; the apex MX, ``mx`` A and
                   ``badaddr`` MX stay secure, so each failure is tested on its own.
=================  ==========================================================================

Every MX host's A is the lab's MX address, and every TLSA is ``3 1 1`` (SHA-256 of the
certificate's SubjectPublicKeyInfo) of the lab certificate: one given by the caller (a trustme
leaf) or a self-signed P-256 one made here. Keys and signatures are new on every start (KSK + ZSK,
ECDSA P-256, from ``dnssec-keygen``/``dnssec-signzone``, valid from an hour ago for 30 days).

Unbound has a stub zone per lab zone pointing at NSD, the KSKs' DS records as trust anchors,
``insecure.test`` as an insecure domain, and refuses every other name at once: no packet leaves
the machine. Reasons for a SERVFAIL are in ``DIR/unbound.log``. Note that AD comes back only when
the query sets AD or DO.

Everything lives under the lab directory; both servers run in the foreground of their own session
(as root, no chroot), PIDs in ``DIR/run/``. ``DIR/lab.env`` records what a client needs.
``python -m deliverd_lab.dnssec start|check|stop --lab-dir DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from deliverd_lab.common import LabError, pid_alive, read_pid, terminate

ZONES = ("secure.test", "insecure.test", "bogus.test")
SIGNED = ("secure.test", "bogus.test")
# (owner, type) of the bogus.test RRsets whose signature is corrupted after signing.
BROKEN = (("_25._tcp.mx.bogus.test.", "TLSA"), ("badmx.bogus.test.", "MX"),
          ("mx-badaddr.bogus.test.", "A"))
MX_NAMES = ("mx.secure.test", "mx-nodane.secure.test", "mx.insecure.test", "mx.bogus.test",
            "mx-badaddr.bogus.test")
# Tools and the Debian packages that ship them.
TOOLS = {"nsd": "nsd", "unbound": "unbound", "dnssec-keygen": "bind9-utils",
         "dnssec-signzone": "bind9-utils", "dnssec-dsfromkey": "bind9-utils"}
SERVERS = ("nsd", "unbound")
MARKER = ".deliverd-dnssec-lab"


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        address, _, port = text.rpartition(":")
        return cls(address, int(port))

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class LabConfig:
    lab_dir: Path
    auth: Endpoint = Endpoint("127.0.0.60", 5353)
    resolver: Endpoint = Endpoint("127.0.0.62", 5353)
    mx_address: str = "127.0.0.61"
    cert: Path | None = None  # PEM; None: a self-signed one is made under lab_dir/tls
    key: Path | None = None

    def conf(self, server: str) -> Path:
        return self.lab_dir / f"{server}.conf"

    def pid_file(self, server: str) -> Path:
        return self.lab_dir / "run" / f"{server}.pid"


@dataclass(frozen=True)
class RunningLab:
    """What clients of a started lab need (also written to ``lab.env``)."""

    resolver: Endpoint
    auth: Endpoint
    mx_address: str
    cert: Path
    key: Path | None
    tlsa: str  # "3 1 1 <hex>"

    def env_text(self) -> str:
        return "".join(f"{k}={v}\n" for k, v in (
            ("DNSSEC_LAB_RESOLVER", self.resolver), ("DNSSEC_LAB_AUTH", self.auth),
            ("DNSSEC_LAB_MX_ADDR", self.mx_address), ("DNSSEC_LAB_CERT", self.cert),
            ("DNSSEC_LAB_KEY", self.key or ""), ("DNSSEC_LAB_TLSA", f'"{self.tlsa}"')))


# -- what the lab serves (pure) ---------------------------------------------------------------


def tlsa_3_1_1(cert_pem: bytes) -> str:
    """SHA-256 over the DER SubjectPublicKeyInfo: the data of a ``3 1 1`` TLSA record."""
    spki = x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def zone_text(zone: str, auth: Endpoint, mx_address: str, tlsa_hash: str) -> str:
    lines = [f"$ORIGIN {zone}.", "$TTL 300",
             f"@ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 300",
             f"@ IN NS ns.{zone}.", f"ns IN A {auth.address}",
             f"@ IN MX 10 mx.{zone}.", f"mx IN A {mx_address}",
             f"_25._tcp.mx IN TLSA 3 1 1 {tlsa_hash}"]
    if zone == "secure.test":
        lines += [f"nodane IN MX 10 mx-nodane.{zone}.", f"mx-nodane IN A {mx_address}"]
    elif zone == "bogus.test":
        lines += [f"badmx IN MX 10 mx.{zone}.", f"badaddr IN MX 10 mx-badaddr.{zone}.",
                  f"mx-badaddr IN A {mx_address}",
                  f"_25._tcp.mx-badaddr IN TLSA 3 1 1 {tlsa_hash}"]
    return "\n".join(lines) + "\n"


def break_signatures(signed: str, targets: Sequence[tuple[str, str]] = BROKEN) -> str:
    """Flip one base64 character of the RRSIG covering each (owner, type) in ``targets``, in a
    zone written one record per line (``dnssec-signzone -O full``)."""
    wanted = set(targets)
    hit: set[tuple[str, str]] = set()
    out: list[str] = []
    for line in signed.splitlines():
        fields = line.split()
        if len(fields) > 12 and fields[3] == "RRSIG" and (fields[0], fields[4]) in wanted:
            sig = fields[12]
            fields[12] = sig[:4] + ("B" if sig[4] == "A" else "A") + sig[5:]
            hit.add((fields[0], fields[4]))
            line = " ".join(fields)
        out.append(line)
    if hit != wanted:
        raise LabError(f"RRSIGs not found to break: {sorted(wanted - hit)}")
    return "\n".join(out) + "\n"


def nsd_conf_text(config: LabConfig) -> str:
    d, auth = config.lab_dir, config.auth
    lines = ["server:", f"  ip-address: {auth.address}@{auth.port}", f"  port: {auth.port}",
             "  do-ip6: no", "  server-count: 1", "  reuseport: no", '  username: ""',
             '  chroot: ""', f'  zonesdir: "{d}/zones"', '  database: ""',
             f'  zonelistfile: "{d}/nsd.zonelist"', f'  xfrdfile: "{d}/nsd.xfrd.state"',
             f'  xfrdir: "{d}/run"', f'  pidfile: "{d}/run/nsd.daemon.pid"',
             f'  logfile: "{d}/nsd.log"', "  verbosity: 1", "  hide-version: yes",
             "remote-control:", "  control-enable: no"]
    for zone in ZONES:
        suffix = "signed" if zone in SIGNED else "zone"
        lines += ["zone:", f'  name: "{zone}"', f'  zonefile: "{zone}.{suffix}"']
    return "\n".join(lines) + "\n"


def unbound_conf_text(config: LabConfig, anchors: Sequence[str]) -> str:
    d, res, auth = config.lab_dir, config.resolver, config.auth
    lines = ["server:", f"  interface: {res.address}@{res.port}", f"  port: {res.port}",
             "  do-ip4: yes", "  do-ip6: no", "  do-udp: yes", "  do-tcp: yes",
             "  access-control: 127.0.0.0/8 allow", "  num-threads: 1",
             "  outgoing-range: 64", "  so-reuseport: no", '  username: ""', '  chroot: ""',
             f'  directory: "{d}"', f'  pidfile: "{d}/run/unbound.daemon.pid"',
             "  use-syslog: no", f'  logfile: "{d}/unbound.log"', "  verbosity: 1",
             "  log-servfail: yes", "  val-log-level: 2",
             '  module-config: "validator iterator"', "  do-not-query-localhost: no",
             "  trust-anchor-signaling: no", "  ede: yes",
             # Only the lab's zones are resolved; anything else is REFUSED, no root hints used.
             '  local-zone: "." refuse', '  domain-insecure: "insecure.test"',
             *(f'  local-zone: "{zone}." transparent' for zone in ZONES),
             *(f'  trust-anchor: "{ds}"' for ds in anchors),
             "remote-control:", "  control-enable: no"]
    for zone in ZONES:
        lines += ["stub-zone:", f'  name: "{zone}"', f"  stub-addr: {auth.address}@{auth.port}"]
    return "\n".join(lines) + "\n"


# -- building the lab (tools) -----------------------------------------------------------------


def missing_tools() -> list[str]:
    """Debian packages to install before the lab can start."""
    return sorted({pkg for tool, pkg in TOOLS.items()
                   if shutil.which(tool) is None
                   and shutil.which(tool, path="/usr/sbin:/sbin") is None})


def _run(*argv: str, cwd: Path) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd,
                          timeout=120)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def _self_signed(tls_dir: Path) -> tuple[Path, Path]:
    """A P-256 key and a self-signed certificate naming every MX host (DANE-EE ignores names
    and dates, but a client that also checks them finds them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MX_NAMES[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in MX_NAMES]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tls_dir / "mx.crt", tls_dir / "mx.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _sign(config: LabConfig, zone: str) -> str:
    """Sign ``zone`` (KSK + ZSK); the KSK's DS record, the trust anchor for it."""
    keys, zones = config.lab_dir / "keys", config.lab_dir / "zones"
    ksk = _run("dnssec-keygen", "-q", "-K", str(keys), "-a", "ECDSAP256SHA256", "-f", "KSK",
               zone, cwd=keys).strip()
    _run("dnssec-keygen", "-q", "-K", str(keys), "-a", "ECDSAP256SHA256", zone, cwd=keys)
    _run("dnssec-signzone", "-q", "-S", "-K", str(keys), "-O", "full", "-o", zone,
         "-d", str(keys), "-f", str(zones / f"{zone}.signed"), str(zones / f"{zone}.zone"),
         cwd=keys)
    return _run("dnssec-dsfromkey", "-2", str(keys / f"{ksk}.key"), cwd=keys).strip()


def _answers(endpoint: Endpoint, qname: str, rdtype: str) -> bool:
    query = dns.message.make_query(qname, rdtype)
    try:
        reply = dns.query.udp(query, endpoint.address, port=endpoint.port, timeout=0.5)
    except (dns.exception.DNSException, OSError):
        return False
    return reply.rcode() == dns.rcode.NOERROR


def port_free(endpoint: Endpoint) -> bool:
    """Nothing holds ``endpoint`` for UDP or TCP: otherwise the probes below would get another
    server's answers (another lab on the same addresses) and take them for ours."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind((endpoint.address, endpoint.port))
            except OSError:
                return False
    return True


def _server_pid(config: LabConfig, server: str) -> int | None:
    """The recorded PID, if that process is still ours (its command line names our config)."""
    pid = read_pid(config.pid_file(server))
    if pid is None or not pid_alive(pid):
        return None
    with contextlib.suppress(OSError):
        if str(config.conf(server)).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def _launch(config: LabConfig, server: str, probe: tuple[Endpoint, str, str]) -> None:
    argv = {"nsd": ["nsd", "-d", "-c", str(config.conf("nsd"))],
            "unbound": ["unbound", "-d", "-c", str(config.conf("unbound"))]}[server]
    with (config.lab_dir / f"{server}.stderr").open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True, cwd=config.lab_dir)
    config.pid_file(server).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        if _answers(*probe) and proc.poll() is None:
            return
        time.sleep(0.1)
    logs = "".join(p.read_text(errors="replace") for p in
                   (config.lab_dir / f"{server}.stderr", config.lab_dir / f"{server}.log")
                   if p.exists())
    stop(config)
    raise LabError(f"{server} did not answer on {probe[0]}:\n{logs[-4000:]}")


def start(config: LabConfig) -> RunningLab:
    """Make keys, certificate, zones and configs under the lab directory and start both
    servers; refuses a non-empty directory that is not a lab's, or a lab already running."""
    d = config.lab_dir
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()) and not (d / MARKER).exists():
        raise LabError(f"{d} is not empty and holds no DNSSEC lab")
    if any(_server_pid(config, s) is not None for s in SERVERS):
        raise LabError(f"the DNSSEC lab in {d} is running: stop it first")
    missing = missing_tools()
    if missing:
        raise LabError(f"the DNSSEC lab needs the Debian packages {' '.join(missing)}")
    for endpoint in (config.auth, config.resolver):
        if not port_free(endpoint):
            raise LabError(f"{endpoint} is in use (another DNSSEC lab?)")
    for sub in ("keys", "zones", "tls", "run"):
        shutil.rmtree(d / sub, ignore_errors=True)
        (d / sub).mkdir()
    (d / MARKER).touch()
    cert: Path
    key: Path | None
    if config.cert is None:
        cert, key = _self_signed(d / "tls")
    else:
        cert, key = config.cert, config.key
    tlsa_hash = tlsa_3_1_1(cert.read_bytes())
    for zone in ZONES:
        (d / "zones" / f"{zone}.zone").write_text(
            zone_text(zone, config.auth, config.mx_address, tlsa_hash))
    anchors = [_sign(config, zone) for zone in SIGNED]
    bogus = d / "zones" / "bogus.test.signed"
    bogus.write_text(break_signatures(bogus.read_text()))
    (d / "trust-anchors.ds").write_text("".join(f"{ds}\n" for ds in anchors))
    config.conf("nsd").write_text(nsd_conf_text(config))
    config.conf("unbound").write_text(unbound_conf_text(config, anchors))
    _run("nsd-checkconf", str(config.conf("nsd")), cwd=d)
    _run("unbound-checkconf", str(config.conf("unbound")), cwd=d)
    _launch(config, "nsd", (config.auth, "secure.test", "SOA"))
    _launch(config, "unbound", (config.resolver, "secure.test", "SOA"))
    lab = RunningLab(config.resolver, config.auth, config.mx_address, cert, key,
                     f"3 1 1 {tlsa_hash}")
    (d / "lab.env").write_text(lab.env_text())
    return lab


def stop(config: LabConfig) -> None:
    """Stop both servers (nsd takes about 2 s); safe to run twice."""
    pids = [p for p in (_server_pid(config, s) for s in SERVERS) if p is not None]
    for pid in pids:  # both at once: their shutdowns overlap
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        terminate(pid, 5.0)
    for server in SERVERS:
        config.pid_file(server).unlink(missing_ok=True)


# -- checking it ------------------------------------------------------------------------------

# qname, type, expectation: every case the lab promises.
CASES = (
    ("secure.test", "MX", "secure"), ("mx.secure.test", "A", "secure"),
    ("_25._tcp.mx.secure.test", "TLSA", "secure"), ("nodane.secure.test", "MX", "secure"),
    ("_25._tcp.mx-nodane.secure.test", "TLSA", "secure-nx"),
    ("insecure.test", "MX", "insecure"), ("mx.insecure.test", "A", "insecure"),
    ("_25._tcp.mx.insecure.test", "TLSA", "insecure"),
    ("bogus.test", "MX", "secure"), ("mx.bogus.test", "A", "secure"),
    ("_25._tcp.mx.bogus.test", "TLSA", "bogus"), ("badmx.bogus.test", "MX", "bogus"),
    ("badaddr.bogus.test", "MX", "secure"), ("mx-badaddr.bogus.test", "A", "bogus"),
    ("example.com", "A", "refused"),
)


def check(lab: RunningLab) -> list[tuple[bool, str]]:
    """Ask the resolver every case (with DO and AD set); (ok, description) per case."""
    results: list[tuple[bool, str]] = []
    for qname, rdtype, want in CASES:
        query = dns.message.make_query(qname, rdtype, want_dnssec=True)
        query.flags |= dns.flags.AD
        reply = dns.query.udp(query, lab.resolver.address, port=lab.resolver.port, timeout=5)
        rcode, ad = dns.rcode.to_text(reply.rcode()), bool(reply.flags & dns.flags.AD)
        data = [rr.to_text() for rrset in reply.answer
                if rrset.rdtype == dns.rdatatype.from_text(rdtype) for rr in rrset]
        ok = {"secure": rcode == "NOERROR" and ad and bool(data),
              "secure-nx": rcode == "NXDOMAIN" and ad,
              "insecure": rcode == "NOERROR" and not ad and bool(data),
              "bogus": rcode == "SERVFAIL" and not ad,
              "refused": rcode == "REFUSED"}[want]
        if rdtype == "TLSA" and data:
            ok = ok and data == [lab.tlsa]
        results.append((ok, f"{qname:32} {rdtype:4} {rcode:8} AD={int(ad)} want={want}"))
    return results


def read_env(lab_dir: Path) -> RunningLab:
    values = dict(line.split("=", 1) for line in
                  (lab_dir / "lab.env").read_text().splitlines() if "=" in line)
    return RunningLab(Endpoint.parse(values["DNSSEC_LAB_RESOLVER"]),
                      Endpoint.parse(values["DNSSEC_LAB_AUTH"]), values["DNSSEC_LAB_MX_ADDR"],
                      Path(values["DNSSEC_LAB_CERT"]),
                      Path(values["DNSSEC_LAB_KEY"]) if values["DNSSEC_LAB_KEY"] else None,
                      values["DNSSEC_LAB_TLSA"].strip('"'))


# -- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deliverd_lab.dnssec",
                                     description="NSD + validating Unbound with DNSSEC zones")
    parser.add_argument("action", choices=("start", "check", "stop"))
    parser.add_argument("--lab-dir", type=Path, required=True)
    defaults = LabConfig(Path())
    parser.add_argument("--auth", type=Endpoint.parse, default=defaults.auth, metavar="IP:PORT")
    parser.add_argument("--resolver", type=Endpoint.parse, default=defaults.resolver,
                        metavar="IP:PORT")
    parser.add_argument("--mx-address", default=defaults.mx_address, metavar="IP")
    parser.add_argument("--cert", type=Path, help="PEM certificate the TLSA records name")
    parser.add_argument("--key", type=Path, help="its key (recorded in lab.env)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = LabConfig(args.lab_dir.resolve(), args.auth, args.resolver, args.mx_address,
                       args.cert, args.key)
    try:
        if args.action == "start":
            lab = start(config)
            print(lab.env_text(), end="")
        elif args.action == "stop":
            stop(config)
        else:
            results = check(read_env(config.lab_dir))
            for ok, text in results:
                print("ok " if ok else "BAD", text)
            failed = sum(not ok for ok, _ in results)
            print("all checks passed" if not failed else f"{failed} check(s) FAILED")
            return 1 if failed else 0
    except LabError as exc:
        print(f"dnssec lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
