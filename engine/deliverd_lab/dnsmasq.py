"""A real dnsmasq on a free port of 127.0.0.1: the lab's DNS (tests, demo, benchmarks).

``LAB_ZONE`` is a standard zone covering every case of docs/delivery.md (names under ``.test``
that are not listed are NXDOMAIN through ``local=/test/``; every answer has TTL 60):

=================  ==========================================================================
``mx.test``        MX 10 ``mx1.mx.test`` (127.0.0.11), 10 ``mx2.mx.test`` (127.0.0.12),
                   20 ``mx3.mx.test`` (127.0.0.13)
``equal.test``     MX 10 ``a.equal.test`` (127.0.0.15), 10 ``b.equal.test`` (127.0.0.16)
``nomx.test``      no MX; A 127.0.0.14 (implicit MX)
``nullmx.test``    null MX (RFC 7505: ``MX 0 .``)
``nxdomain.test``  nothing: NXDOMAIN
``servfail.example``  outside every local zone, no upstream: REFUSED at once (temp failure)
``v6.test``        AAAA ::1 only
``dual.test``      A 127.0.0.17 and AAAA ::1
``mxnoaddr.test``  MX 10 ``noaddr.mxnoaddr.test``, a name that exists (TXT) without addresses
=================  ==========================================================================
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from deliverd_lab.common import LabError


class DnsmasqMissing(LabError):
    """The dnsmasq binary is not installed."""


LOOPBACK = "127.0.0.1"

LAB_ZONE: tuple[str, ...] = (
    "mx-host=mx.test,mx1.mx.test,10",
    "mx-host=mx.test,mx2.mx.test,10",
    "mx-host=mx.test,mx3.mx.test,20",
    "host-record=mx1.mx.test,127.0.0.11",
    "host-record=mx2.mx.test,127.0.0.12",
    "host-record=mx3.mx.test,127.0.0.13",
    "mx-host=equal.test,a.equal.test,10",
    "mx-host=equal.test,b.equal.test,10",
    "host-record=a.equal.test,127.0.0.15",
    "host-record=b.equal.test,127.0.0.16",
    "host-record=nomx.test,127.0.0.14",
    "mx-host=nullmx.test,.,0",
    "host-record=v6.test,::1",
    "host-record=dual.test,127.0.0.17,::1",
    "mx-host=mxnoaddr.test,noaddr.mxnoaddr.test,10",
    'txt-record=noaddr.mxnoaddr.test,"exists without addresses"',
)

_BASE_CONFIG = (
    "bind-interfaces",
    "no-resolv",
    "no-hosts",
    "local=/test/",
    "local-ttl=60",
)


@dataclass
class DnsServer:
    host: str
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)
    stderr_path: Path = field(repr=False)

    @property
    def nameserver(self) -> str:
        """The ``ip:port`` form that ``dns.nameservers`` and ``Resolver`` accept."""
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _free_udp_and_tcp_port(address: str = LOOPBACK) -> int:
    """A port free for both TCP and UDP on ``address`` (dnsmasq needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((address, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((address, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no port free for both TCP and UDP on {address}")


def _answers(address: str, port: int) -> bool:
    query = dns.message.make_query("probe.test.", "A")
    try:
        response = dns.query.udp(query, address, port=port, timeout=0.2)
    except (dns.exception.DNSException, OSError):
        return False
    return response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)


def start_dnsmasq(
    directory: Path, lines: Sequence[str], *, listen: str = LOOPBACK, port: int | None = None
) -> DnsServer:
    """Start dnsmasq serving ``lines`` on ``listen`` (an address assigned to an interface: the
    network namespace lab passes its bridge-side address), on ``port`` or a free one."""
    binary = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if binary is None:
        raise DnsmasqMissing("dnsmasq is not installed (Debian package dnsmasq-base)")
    failures: list[str] = []
    fixed = port
    for attempt in range(3):  # another process may take the port between probe and bind
        port = fixed if fixed is not None else _free_udp_and_tcp_port(listen)
        conf = directory / f"dnsmasq-{port}.conf"
        settings = (f"port={port}", f"listen-address={listen}", *_BASE_CONFIG, *lines)
        conf.write_text("\n".join(settings) + "\n")
        stderr_path = directory / f"dnsmasq-{port}.stderr"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [binary, f"--conf-file={conf}", "--keep-in-foreground", "--user=root",
                 f"--pid-file={directory / f'dnsmasq-{port}.pid'}"],
                stdout=subprocess.DEVNULL, stderr=stderr,
            )
        server = DnsServer(listen, port, process, stderr_path)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(listen, port):
                return server
            time.sleep(0.05)
        server.stop()
        failures.append(f"attempt {attempt + 1}: {stderr_path.read_text(errors='replace')}")
    raise LabError("dnsmasq did not start:\n" + "\n".join(failures))
