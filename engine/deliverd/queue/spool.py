"""A message body on its way into the queue, held in bounded memory.

The listener writes a message into a ``BodySpool`` as DATA arrives; up to ``BODY_CHUNK`` bytes
stay in memory (a small message costs what it did before streaming), past that the spool rolls
over to an unnamed temporary file in the queue's directory (``O_TMPFILE``: a crash leaves
nothing behind). The spool is only a buffer: the message is queued, and durable, when the
writer has copied it into the database in ``BODY_CHUNK`` rows and the transaction committed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

# One row of ``body_chunks`` and the unit every body is read and written in.
BODY_CHUNK = 1024 * 1024


class BodySpool:
    """Bytes appended in order; read back once, from the start, in ``BODY_CHUNK`` pieces."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed by close())
            max_size=BODY_CHUNK, mode="w+b", dir=None if directory is None else str(directory)
        )
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._file.write(data)
        self.size += len(data)

    @property
    def in_memory(self) -> bool:
        return not self._file._rolled  # type: ignore[attr-defined]

    def getvalue(self) -> bytes:
        """The whole body (for one that stayed in memory: at most ``BODY_CHUNK`` bytes)."""
        self._file.seek(0)
        return self._file.read()

    def chunks(self, size: int = BODY_CHUNK) -> Iterator[bytes]:
        self._file.seek(0)
        while chunk := self._file.read(size):
            yield chunk

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BodySpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
