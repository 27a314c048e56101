"""The queue listing for every local user (``mailq``), like Postfix's showq service.

The queue database is readable by the daemon's user only. Others ask the running daemon over
the unix socket ``public/showq`` (mode 0666), which answers with the envelope and state of each
message as one JSON document and closes; bodies and headers are never sent. Whoever can read
the database (root, the daemon's user) reads it directly, daemon up or down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from deliverd.queue.database import (
    DB_NAME,
    QueueDB,
    QueuedMessage,
    QueuedRecipient,
    QueueError,
    QueueMissingError,
    RcptState,
)
from deliverd.queue.store import QueueStore

log = logging.getLogger(__name__)

PUBLIC = "public"
SHOWQ = "showq"
SOCKET_MODE = 0o666
TIMEOUT = 30.0


class ShowqUnavailable(Exception):
    """Neither the database nor a running daemon could be asked."""


def socket_path(queue_path: str | Path) -> Path:
    return Path(queue_path) / PUBLIC / SHOWQ


def to_json(messages: list[QueuedMessage]) -> bytes:
    out: list[dict[str, Any]] = []
    for msg in messages:
        item = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
        item["recipients"] = [
            {**{f.name: getattr(r, f.name) for f in dataclasses.fields(r)},
             "state": r.state.value}
            for r in msg.recipients
        ]
        out.append(item)
    return json.dumps(out).encode("utf-8")


def from_json(data: bytes) -> list[QueuedMessage]:
    messages = []
    for item in json.loads(data.decode("utf-8")):
        rcpts = tuple(
            QueuedRecipient(**{**r, "state": RcptState(r["state"])}) for r in item["recipients"]
        )
        messages.append(QueuedMessage(**{**item, "recipients": rcpts}))
    return messages


def read_queue(queue_path: str | Path) -> list[QueuedMessage]:
    """Every queued message (no bodies): from the database if readable, else the daemon."""
    db_file = Path(queue_path) / DB_NAME
    if os.access(db_file, os.R_OK | os.W_OK):
        try:
            db = QueueDB.open(queue_path, create=False)
        except QueueMissingError:
            return []
        except (QueueError, OSError):
            pass
        else:
            with db:
                return db.list_messages()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(socket_path(queue_path)))
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        raise ShowqUnavailable(f"the deliverd daemon is not running ({exc.strerror or exc})"
                               ) from None
    try:
        return from_json(b"".join(chunks))
    except (ValueError, KeyError, TypeError) as exc:
        raise ShowqUnavailable(f"bad answer from the daemon: {exc}") from None


async def serve(queue_path: str | Path, store: QueueStore) -> asyncio.AbstractServer | None:
    """Answer on ``public/showq`` until the returned server is closed; None (logged) when
    the socket cannot be made: delivery goes on, ``mailq`` works for the queue's owner only."""
    try:
        return await _serve(socket_path(queue_path), store)
    except OSError as exc:
        log.warning("showq: cannot serve %s: %s; mailq works for the queue's owner only",
                    socket_path(queue_path), exc)
        return None


def _clear(path: Path) -> None:
    """The socket's directory made, a socket left by an earlier daemon removed."""
    path.parent.mkdir(mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def _serve(path: Path, store: QueueStore) -> asyncio.AbstractServer:
    _clear(path)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(to_json(await store.list_messages()))
            await writer.drain()
        except (QueueError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(answer, path=str(path))
    os.chmod(path, SOCKET_MODE)
    return server
