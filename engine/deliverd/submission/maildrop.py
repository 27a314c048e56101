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

A drop file is one JSON line (the envelope) followed by the message with CRLF line endings. It
is written under a dot-name, fsynced, checked against the queue's free-space reserve, and
renamed into place; the pickup ignores dot-names. The sender's identity is not in the file: the
pickup reads the owner of the file, which the submitter cannot forge.

This module is on the import path of every ``sendmail`` run: standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MAILDROP = "maildrop"
PUBLIC = "public"
PICKUP_FIFO = "pickup"
CORRUPT = "corrupt"

QUEUE_DIR_MODE = 0o711
MAILDROP_MODE = 0o1733
PUBLIC_MODE = 0o755
FIFO_MODE = 0o622
CORRUPT_MODE = 0o700
DROP_FILE_MODE = 0o640  # the group bits become the ACL mask: the daemon's read entry

# sysexits.h
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75

_TEMP_PREFIX = "."


class DropError(Exception):
    """Mail could not be left in the maildrop; ``exit_code`` is the sysexits code to use."""

    def __init__(self, exit_code: int, message: str) -> None:
        self.exit_code = exit_code
        super().__init__(message)


@dataclass(frozen=True)
class DropEnvelope:
    sender: str
    recipients: tuple[str, ...]
    # RFC 3461 (sendmail -N, -R, -V), kept with the message.
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None

    def to_line(self) -> bytes:
        data: dict[str, object] = {"v": 1, "sender": self.sender,
                                   "recipients": list(self.recipients)}
        for key in ("notify", "ret", "envid"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n"

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
    return name.startswith(_TEMP_PREFIX)


def write_drop(
    queue_path: str | Path, envelope: DropEnvelope, chunks: Iterable[bytes], *, min_free: int
) -> str:
    """Leave one message in the maildrop; returns its file name once it is durable.

    ``chunks`` is the message (CRLF line endings), read lazily: nothing holds the whole of it.
    Raises ``DropError`` (73 the maildrop cannot be written, 74 I/O error, 75 the queue's
    filesystem has less than ``min_free`` bytes left); an exception from ``chunks`` itself is
    passed on. Either way nothing is left behind.
    """
    directory = maildrop_dir(queue_path)
    # os.urandom rather than the secrets module: its hmac and hashlib imports cost more.
    name = f"{time.time_ns():x}.{os.getpid()}.{os.urandom(8).hex()}"
    temp = directory / f"{_TEMP_PREFIX}{name}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     DROP_FILE_MODE)
    except OSError as exc:
        raise DropError(
            EX_CANTCREAT,
            f"cannot create a file in {directory}: {exc.strerror or exc} (the deliverd daemon "
            "creates the maildrop when it starts; start it once)",
        ) from None
    try:
        try:
            _write_all(fd, envelope.to_line())
            for chunk in chunks:
                _write_all(fd, chunk)
            os.fsync(fd)
            free = _free_bytes(fd)
            if free < min_free:
                raise DropError(
                    EX_TEMPFAIL,
                    f"the queue's filesystem is short of space ({free} bytes free, "
                    f"{min_free} kept in reserve); try again later",
                )
            os.rename(temp, directory / name)
            # ext4 and xfs commit the rename with the journal transaction this fsync forces; a
            # submitter may not open the directory itself (no read permission) to fsync it.
            os.fsync(fd)
        except OSError as exc:
            code = EX_TEMPFAIL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else EX_IOERR
            raise DropError(code, f"writing to {directory}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir_if_allowed(directory)
    return name


def waiting_in_maildrop(queue_path: str | Path) -> int:
    """Files waiting for the pickup; 0 for whoever may not list the maildrop."""
    try:
        return sum(1 for name in os.listdir(maildrop_dir(queue_path)) if not is_temp_name(name))
    except OSError:
        return 0


def poke(queue_path: str | Path) -> bool:
    """Wake a running daemon's pickup; False when no daemon listens (the mail waits)."""
    try:
        fd = os.open(pickup_fifo(queue_path), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, b"w")
    except OSError:  # a full pipe: a wake-up is already pending
        pass
    finally:
        os.close(fd)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _free_bytes(fd: int) -> int:
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def _fsync_dir_if_allowed(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # not the owner: the fsync of the file above has to do
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
