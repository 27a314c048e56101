"""deliverd: declarative outbound mail delivery."""

from __future__ import annotations

__version__ = "0.1.0"
