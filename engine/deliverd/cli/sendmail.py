"""``deliverd sendmail``, run as ``sendmail`` and ``mailq``: the host's sendmail interface.

What cron, PHP's mail(), git send-email, mailx and Symfony run. The message goes into the
maildrop (``deliverd.sendmail.submit``), so it works for any local user while the daemon is up
or down, with no setuid and no secrets: only the world-readable ``deliverd.toml`` is read
(``deliverd.config.config_file``). The flags and the exit codes are
``deliverd.sendmail.command_line``'s; ``-bs`` is ``deliverd.sendmail.smtp_stdio``, and ``-bp``
(= ``mailq``) and ``-q`` are here, over the queue commands' listing and wake-up.

Every message from those callers starts a new interpreter, so what a submission imports is paid
per message: this module and the ones it imports at the top load nothing beyond what the
interpreter loads at start-up (``python -X importtime``;
``tests/unit/cli/test_sendmail_fast.py`` checks), and ``-bs``, ``-bp`` and ``-q`` import what
they need when they run. Run as
``python -I -S`` on a launcher that puts the package on ``sys.path`` and calls ``entry`` (the
role's wrapper; ``launcher`` writes one), or through ``deliverd sendmail``.
"""

from __future__ import annotations

import posix
import sys

from deliverd.config.config_file import ConfigFileError, read_sendmail_settings
from deliverd.sendmail.command_line import (
    EX_CONFIG,
    EX_NOPERM,
    EX_OK,
    EX_UNAVAILABLE,
    Failure,
    parse_args,
)
from deliverd.sendmail.submit import send
from deliverd.submission.message_input import InputError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from deliverd.config.config_file import SendmailSettings
    from deliverd.submission.message_input import LineSource

DEFAULT_CONFIG = "/etc/deliverd/deliverd.toml"
CONFIG_ENV = "DELIVERD_CONFIG"


def main(argv: Sequence[str], prog: str = "sendmail", stdin: LineSource | None = None,
         config: str | None = None) -> int:
    """``sendmail ARGS``; ``stdin`` is where the message or the ``-bs`` dialogue is read.
    ``config``: the config to read when neither ``-C`` nor ``DELIVERD_CONFIG`` names one (the
    launcher's; else the default)."""
    stream = sys.stdin.buffer if stdin is None else stdin
    try:
        opts = parse_args(argv)
        path = opts.config or _environ(CONFIG_ENV) or config or DEFAULT_CONFIG
        try:
            settings = read_sendmail_settings(path)
        except ConfigFileError as exc:
            raise Failure(EX_CONFIG, str(exc)) from None
        if opts.mode == "list":
            return list_queue(settings)
        if opts.mode == "flush":
            return flush_queue(settings)
        if opts.mode == "smtp":
            from deliverd.sendmail.smtp_stdio import SmtpSession

            return SmtpSession(settings, stream, sys.stdout.buffer).run()
        return send(opts, settings, stream)
    except Failure as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    except InputError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def entry(prog: str, argv: Sequence[str], config: str | None = None) -> int:
    """``sendmail ARGS`` and ``mailq ARGS`` (= ``sendmail -bp``) by the name they were run as;
    ``config`` as for ``main``."""
    if prog == "mailq":
        return main(["-bp", *argv], prog, config=config)
    return main(argv, prog, config=config)


def _environ(name: str) -> str | None:
    """An environment variable, decoded as ``os.environ`` decodes it (``os`` costs a few
    milliseconds to import under ``python -S``: this path reads ``posix.environ``)."""
    value = posix.environ.get(name.encode())
    return None if value is None else value.decode(sys.getfilesystemencoding(), "surrogateescape")


# ---------------------------------------------------------------------------------------------
# -bp and -q


def list_queue(settings: SendmailSettings) -> int:
    from deliverd.cli.queue import format_table
    from deliverd.queue.showq import ShowqUnavailable, read_queue
    from deliverd.submission.maildrop import waiting_in_maildrop

    try:
        messages = read_queue(settings.queue_path)
    except ShowqUnavailable as exc:
        raise Failure(EX_UNAVAILABLE, f"queue report unavailable: {exc}") from None
    sys.stdout.write(format_table(messages))
    waiting = waiting_in_maildrop(settings.queue_path)
    if waiting:
        sys.stdout.write(f"-- {waiting} more in the maildrop, not yet queued "
                         "(the daemon takes them in when it runs)\n")
    return EX_OK


def flush_queue(settings: SendmailSettings) -> int:
    from deliverd.cli.queue import wake_daemon
    from deliverd.queue.database import QueueDB, QueueError, QueueMissingError

    try:
        db = QueueDB.open(settings.queue_path, create=False)
    except QueueMissingError:
        return EX_OK
    except (QueueError, OSError) as exc:
        raise Failure(EX_NOPERM, f"only the queue's owner can flush it ({exc})") from None
    with db:
        db.flush()
    wake_daemon(settings.queue_path)
    return EX_OK


# ---------------------------------------------------------------------------------------------
# The programs the role installs


# Where a venv's interpreter finds its packages when started with -S (site.py is what would add
# them): the venv is the parent of sys.executable's bin/, which -S leaves as it was run.
VENV_PACKAGES = ('"%s/lib/python%d.%d/site-packages" % (sys.executable.rpartition("/bin/")[0], '
                 "*sys.version_info[:2])")


def launcher(python: str, paths: Sequence[str] | None, prog: str, config: str | None = None,
             comment: str | None = None) -> str:
    """A ``sendmail`` (or ``mailq``) program: ``python -I -S`` with the package on ``sys.path``
    (``paths``, or None: the site-packages of the venv ``python`` belongs to), so start-up
    reads no site-packages and runs no console script. The role's wrappers are these."""
    lines = [f"#!{python} -IS"]
    if comment is not None:
        lines.append(f"# {comment}")
    # After the standard library, as site.py puts them: its imports look nowhere else first.
    lines += ["import sys",
              f"sys.path.append({VENV_PACKAGES})" if paths is None
              else f"sys.path += {list(paths)!r}"]
    lines += ["from deliverd.cli.sendmail import entry",
              f"sys.exit(entry({prog!r}, sys.argv[1:]))" if config is None
              else f"sys.exit(entry({prog!r}, sys.argv[1:], {config!r}))", ""]
    return "\n".join(lines)
