"""The daemon's event loop: uvloop when it is installed (the ``fast`` extra), else asyncio's.

uvloop runs the same coroutines with its transports and selector in C: in the relay benchmark
it cuts the daemon's CPU per message noticeably (see docs/performance.md). It is optional; the
standard loop is the fallback, and ``DELIVERD_EVENT_LOOP=asyncio`` forces it (to compare, or
to rule uvloop out when debugging).
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV_VAR = "DELIVERD_EVENT_LOOP"


def loop_policy(choice: str | None = None) -> asyncio.AbstractEventLoopPolicy | None:
    """uvloop's policy when chosen (default ``auto``) and importable; None = asyncio's."""
    choice = (choice if choice is not None else os.environ.get(ENV_VAR, "auto")).lower()
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    policy: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
    return policy


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    policy = loop_policy()
    if policy is None:
        return asyncio.run(main)
    loop = policy.new_event_loop()
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        return runner.run(main)
