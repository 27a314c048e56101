"""The drop file: what ``sendmail`` writes into the maildrop, written one way by every writer.

``sendmail`` (``deliverd.sendmail.submit``, for its own submissions and ``-bs``'s) leaves mail
through ``write_drop`` here, and so does every other writer, so the format cannot drift between
them; the daemon reads it back (``maildrop.DropEnvelope.from_line``).

A drop file is one JSON line (the envelope: ``v``, ``sender``, ``recipients`` and the RFC 3461
fields that are set) followed by the message with CRLF line endings. It is written under a
dot-name, fsynced, checked against the queue's free-space reserve, and renamed into place; the
pickup ignores dot-names. The sender's identity is not in the file: the pickup reads the owner
of the file, which the submitter cannot forge.

Every ``sendmail`` run imports this module: it uses only ``posix``, ``time`` and ``errno``, which
the interpreter has built in (not ``os``, whose import under ``python -S`` costs a few
milliseconds of every call, nor ``json``, whose decoder imports ``re``: the envelope's strings
are escaped as json escapes them).
"""

from __future__ import annotations

import errno
import posix
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from os import PathLike

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


def write_drop(queue_path: str | PathLike[str], envelope: bytes, chunks: Iterable[bytes],
               *, min_free: int) -> str:
    """Leave one message in the maildrop; returns its file name once it is durable.

    ``envelope`` is its ``envelope_line``; ``chunks`` is the message (CRLF line endings), read
    lazily: nothing holds the whole of it. Raises ``DropError`` (73 the maildrop cannot be
    written, 74 I/O error, 75 the queue's filesystem has less than ``min_free`` bytes left);
    an exception from ``chunks`` itself is passed on. Either way nothing is left behind.
    """
    directory = _join(queue_path, MAILDROP)
    # urandom rather than the secrets module: its hmac and hashlib imports cost more.
    name = f"{time.time_ns():x}.{posix.getpid()}.{posix.urandom(8).hex()}"
    temp = _join(directory, f"{TEMP_PREFIX}{name}.tmp")
    try:
        fd = posix.open(temp, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW
                        | posix.O_CLOEXEC, DROP_FILE_MODE)
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
            posix.fsync(fd)
            free = _free_bytes(fd)
            if free < min_free:
                raise DropError(
                    EX_TEMPFAIL,
                    f"the queue's filesystem is short of space ({free} bytes free, "
                    f"{min_free} kept in reserve); try again later",
                )
            posix.rename(temp, _join(directory, name))
            _fsync_rename(directory, fd)
        except OSError as exc:
            code = EX_TEMPFAIL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else EX_IOERR
            raise DropError(code, f"writing to {directory}: {exc.strerror or exc}") from None
        finally:
            posix.close(fd)
    except BaseException:
        try:  # noqa: SIM105 (contextlib is not on sendmail's import path)
            posix.unlink(temp)
        except OSError:
            pass
        raise
    return name


def poke(queue_path: str | PathLike[str]) -> bool:
    """Wake a running daemon's pickup; False when no daemon listens (the mail waits)."""
    try:
        fd = posix.open(_join(queue_path, PUBLIC, PICKUP_FIFO),
                        posix.O_WRONLY | posix.O_NONBLOCK | posix.O_CLOEXEC)
    except OSError:
        return False
    try:
        posix.write(fd, b"w")
    except OSError:  # a full pipe: a wake-up is already pending
        pass
    finally:
        posix.close(fd)
    return True


def _join(first: str | PathLike[str], *names: str) -> str:
    """``os.path.join`` of a directory and plain relative names (``os.path`` is not on this
    import path)."""
    path = str(posix.fspath(first))
    for name in names:
        path = f"{path}{name}" if not path or path.endswith("/") else f"{path}/{name}"
    return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view):]


def _free_bytes(fd: int) -> int:
    st = posix.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def _fsync_rename(directory: str, fd: int) -> None:
    """Make the rename durable: the directory's fsync where the submitter may open it (root,
    the daemon's user); else the file's again, since a submitter may not read the maildrop:
    ext4 and xfs commit the rename with the journal transaction that fsync forces."""
    try:
        dir_fd = posix.open(directory, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
    except OSError:
        posix.fsync(fd)
        return
    try:
        posix.fsync(dir_fd)
    finally:
        posix.close(dir_fd)
