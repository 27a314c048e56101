"""Real mail servers for labs, tests, demos and benchmarks: Dovecot (POP3 + SASL) and Postfix.

Each class writes a complete, self-contained configuration into a work directory of its own and
starts and stops one server instance there, so many instances can run side by side on one
machine without touching the system's own configuration (apart from the one registration line
Postfix insists on, see ``deliverd_lab.postfix``).
"""

from __future__ import annotations

from deliverd_lab.common import LabError, traversable_workdir, wait_for_port
from deliverd_lab.dovecot import Dovecot, DovecotLogin
from deliverd_lab.postfix import PostfixRelay

__all__ = [
    "Dovecot",
    "DovecotLogin",
    "LabError",
    "PostfixRelay",
    "traversable_workdir",
    "wait_for_port",
]
