"""The drop file: what ``sendmail`` writes into the maildrop, written one way by every writer.

Both ``sendmail`` paths (``deliverd.cli.sendmail_fast`` for the common invocations, and
``deliverd.cli.sendmail`` for the rest) leave mail through ``write_drop`` here, so the format
cannot drift between them; the daemon reads it back (``maildrop.DropEnvelope.from_line``).

A drop file is one JSON line (the envelope: ``v``, ``sender``, ``recipients`` and the RFC 3461
fields that are set) followed by the message with CRLF line endings. It is written under a
dot-name, fsynced, checked against the queue's free-space reserve, and renamed into place; the
pickup ignores dot-names. The sender's identity is not in the file: the pickup reads the owner
of the file, which the submitter cannot forge.

Every ``sendmail`` run imports this module: it uses only ``os``, ``time`` and ``errno`` (not
``json``, whose decoder imports ``re``: the envelope's strings are escaped as json escapes them).
"""

from __future__ import annotations

import errno
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

MAILDROP = "maildrop"
PUBLIC = "public"
PICKUP_FIFO = "pickup"
DROP_FILE_MODE = 0o640  # the group bits become the ACL mask: the daemon's read entry
TEMP_PREFIX = "."
DSN_FIELDS = ("notify", "ret", "envid")

# sysexits.h
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75


# What json.dumps(..., ensure_ascii=False) escapes in a string, and how.
_JSON_ESCAPES = {**{code: f"\\u{code:04x}" for code in range(32)},
                 **{ord(c): e for c, e in (('"', '\\"'), ("\\", "\\\\"), ("\n", "\\n"),
                                           ("\r", "\\r"), ("\t", "\\t"), ("\b", "\\b"),
                                           ("\f", "\\f"))}}


class DropError(Exception):
    """Mail could not be left in the maildrop; ``exit_code`` is the sysexits code to use."""

    def __init__(self, exit_code: int, message: str) -> None:
        self.exit_code = exit_code
        super().__init__(message)


def json_string(text: str) -> str:
    """``text`` as a JSON string, as ``json.dumps(text, ensure_ascii=False)`` writes it."""
    return '"' + text.translate(_JSON_ESCAPES) + '"'


def envelope_line(sender: str, recipients: Sequence[str], notify: str | None = None,
                  ret: str | None = None, envid: str | None = None) -> bytes:
    """The envelope line; the same bytes as ``json.dumps(..., ensure_ascii=False)`` + LF."""
    items = [f'"v": 1, "sender": {json_string(sender)}, "recipients": ['
             + ", ".join(json_string(r) for r in recipients) + "]"]
    for key, value in zip(DSN_FIELDS, (notify, ret, envid), strict=True):
        if value is not None:
            items.append(f'"{key}": {json_string(value)}')
    return ("{" + ", ".join(items) + "}\n").encode("utf-8")


def write_drop(queue_path: str | os.PathLike[str], envelope: bytes, chunks: Iterable[bytes],
               *, min_free: int) -> str:
    """Leave one message in the maildrop; returns its file name once it is durable.

    ``envelope`` is its ``envelope_line``; ``chunks`` is the message (CRLF line endings), read
    lazily: nothing holds the whole of it. Raises ``DropError`` (73 the maildrop cannot be
    written, 74 I/O error, 75 the queue's filesystem has less than ``min_free`` bytes left);
    an exception from ``chunks`` itself is passed on. Either way nothing is left behind.
    """
    directory = os.path.join(queue_path, MAILDROP)
    # os.urandom rather than the secrets module: its hmac and hashlib imports cost more.
    name = f"{time.time_ns():x}.{os.getpid()}.{os.urandom(8).hex()}"
    temp = os.path.join(directory, f"{TEMP_PREFIX}{name}.tmp")
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
            _write_all(fd, envelope)
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
            os.rename(temp, os.path.join(directory, name))
            _fsync_rename(directory, fd)
        except OSError as exc:
            code = EX_TEMPFAIL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else EX_IOERR
            raise DropError(code, f"writing to {directory}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
    except BaseException:
        try:  # noqa: SIM105 (contextlib is not on sendmail's import path)
            os.unlink(temp)
        except OSError:
            pass
        raise
    return name


def poke(queue_path: str | os.PathLike[str]) -> bool:
    """Wake a running daemon's pickup; False when no daemon listens (the mail waits)."""
    try:
        fd = os.open(os.path.join(queue_path, PUBLIC, PICKUP_FIFO),
                     os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
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


def _fsync_rename(directory: str, fd: int) -> None:
    """Make the rename durable: the directory's fsync where the submitter may open it (root,
    the daemon's user); else the file's again, since a submitter may not read the maildrop:
    ext4 and xfs commit the rename with the journal transaction that fsync forces."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        os.fsync(fd)
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
