"""The maildrop: where ``deliverd sendmail`` leaves mail for the daemon, which may be down.

Postfix's maildrop without its setgid ``postdrop``. Inside ``queue.path`` (mode 0711: anyone may
pass through, no one else may list it or open the database, which is 0600):

- ``maildrop/`` (mode 1733, owned by the daemon's user): every user may create files in it, no
  user may list it, and the sticky bit keeps anyone but the owner from renaming or deleting a
  file. Its default ACL gives the daemon's user read access to each new file and nobody else
  any: a file created with mode 0640 ends up ``user::rw-, user:<daemon>:r--, group::---,
  other::---`` whatever the submitter's umask. So one user cannot read another's submission.
- ``public/pickup``, a FIFO (mode 0622): one byte written to it wakes the daemon's pickup. With
  no daemon reading it the write fails at once (ENXIO), and the mail waits in the maildrop.

A drop file is one JSON line (the envelope) followed by the message; ``dropfile`` writes it,
for every writer, and ``DropEnvelope.from_line`` here reads its envelope back.

The full ``sendmail`` path imports this module (standard library only); the fast path needs
only ``dropfile``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from deliverd.submission import dropfile
from deliverd.submission.dropfile import (
    DROP_FILE_MODE,
    MAILDROP,
    PICKUP_FIFO,
    PUBLIC,
    TEMP_PREFIX,
    DropError,
    poke,
)

__all__ = ["DROP_FILE_MODE", "DropEnvelope", "DropError", "poke", "prepare", "write_drop"]

CORRUPT = "corrupt"

QUEUE_DIR_MODE = 0o711
MAILDROP_MODE = 0o1733
PUBLIC_MODE = 0o755
FIFO_MODE = 0o622
CORRUPT_MODE = 0o700


@dataclass(frozen=True)
class DropEnvelope:
    sender: str
    recipients: tuple[str, ...]
    # RFC 3461 (sendmail -N, -R, -V), kept with the message.
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None

    def to_line(self) -> bytes:
        return dropfile.envelope_line(self.sender, self.recipients, self.notify, self.ret,
                                      self.envid)

    @classmethod
    def from_line(cls, line: bytes) -> DropEnvelope:
        """The envelope of a drop file; ValueError for anything malformed."""
        data = json.loads(line.decode("utf-8"))
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("not a version 1 drop file")
        sender, rcpts = data.get("sender"), data.get("recipients")
        if not isinstance(sender, str) or not isinstance(rcpts, list) or not rcpts:
            raise ValueError("no sender or no recipients")
        if not all(isinstance(r, str) and r for r in rcpts):
            raise ValueError("bad recipient")
        extra = {k: data.get(k) for k in ("notify", "ret", "envid")}
        if not all(v is None or isinstance(v, str) for v in extra.values()):
            raise ValueError("bad DSN fields")
        return cls(sender, tuple(rcpts), **extra)


def maildrop_dir(queue_path: str | Path) -> Path:
    return Path(queue_path) / MAILDROP


def pickup_fifo(queue_path: str | Path) -> Path:
    return Path(queue_path) / PUBLIC / PICKUP_FIFO


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def write_drop(
    queue_path: str | Path, envelope: DropEnvelope, chunks: Iterable[bytes], *, min_free: int
) -> str:
    """``dropfile.write_drop`` with the envelope as a ``DropEnvelope``."""
    return dropfile.write_drop(queue_path, envelope.to_line(), chunks, min_free=min_free)


def waiting_in_maildrop(queue_path: str | Path) -> int:
    """Files waiting for the pickup; 0 for whoever may not list the maildrop."""
    try:
        return sum(1 for name in os.listdir(maildrop_dir(queue_path)) if not is_temp_name(name))
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# The daemon's side: making the layout


# linux/posix_acl_xattr.h
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def _default_acl(reader_uid: int) -> bytes:
    entries = [
        (_ACL_USER_OBJ, 0o6, _ACL_UNDEFINED_ID),
        (_ACL_USER, 0o4, reader_uid),
        (_ACL_GROUP_OBJ, 0o0, _ACL_UNDEFINED_ID),
        (_ACL_MASK, 0o4, _ACL_UNDEFINED_ID),
        (_ACL_OTHER, 0o0, _ACL_UNDEFINED_ID),
    ]
    return struct.pack("<I", _ACL_VERSION) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries
    )


def prepare(queue_path: str | Path) -> None:
    """Create (or repair the modes of) the maildrop layout; run as the daemon's user.

    Raises OSError when it cannot be made, e.g. a filesystem without POSIX ACLs.
    """
    queue = Path(queue_path)
    # The queue's own files stay the daemon's alone once others may pass through the
    # directory: SQLite made the first write-ahead log and shared-memory files with the umask.
    for entry in os.scandir(queue):
        if entry.name.startswith("queue.db") and entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, 0o600)
    os.chmod(queue, QUEUE_DIR_MODE)
    for sub, mode in ((MAILDROP, MAILDROP_MODE), (PUBLIC, PUBLIC_MODE), (CORRUPT, CORRUPT_MODE)):
        path = queue / sub
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=mode)
        os.chmod(path, mode)  # mkdir's mode went through the umask
    os.setxattr(queue / MAILDROP, "system.posix_acl_default", _default_acl(os.geteuid()))
    fifo = pickup_fifo(queue)
    try:
        info = os.lstat(fifo)
    except FileNotFoundError:
        os.mkfifo(fifo, FIFO_MODE)
    else:
        if not stat.S_ISFIFO(info.st_mode):
            fifo.unlink()
            os.mkfifo(fifo, FIFO_MODE)
    os.chmod(fifo, FIFO_MODE)
