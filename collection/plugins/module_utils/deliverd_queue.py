# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The deliverd queue as the ``queue`` and ``queue_info`` modules see it.

Reading the listing and deciding whether a desired state changes anything are pure functions
here, so both modules share them and they are tested without a host.
"""

from __future__ import annotations

import json

from ansible_collections.mailops.deliverd.plugins.module_utils.deliverd_cli import (
    DeliverdCliError,
)

# The module's desired state -> the ``deliverd queue`` action that reaches it.
STATE_ACTIONS = {
    "flushed": "flush",
    "held": "hold",
    "released": "release",
    "absent": "delete",
}
STATES_WITH_ID = ("held", "released", "absent")

# ``deliverd queue`` exits 1 for a queue id it does not know.
EXIT_UNKNOWN_ID = 1


def entries_of(data):
    """The message list from ``queue list --json`` (a list, or an object wrapping one)."""
    if isinstance(data, dict):
        for key in ("messages", "entries", "queue"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DeliverdCliError("unexpected JSON from 'deliverd queue list': %r" % sorted(data))
    if isinstance(data, list):
        return data
    raise DeliverdCliError("unexpected JSON from 'deliverd queue list'")


def entry_id(entry):
    return str(entry.get("queue_id", entry.get("id", "")))


def find_entry(entries, queue_id):
    return next((e for e in entries if entry_id(e) == queue_id), None)


def listing(entries):
    """The result keys both modules return for a queue listing."""
    return {"entries": entries, "count": len(entries), "ids": [entry_id(e) for e in entries]}


def list_queue(cli):
    """The queue's entries, read with ``deliverd queue list --json``."""
    _rc, data = cli.run_json(["queue", "-c", cli.config, "list", "--json"])
    return entries_of(data)


def waiting_recipients(entries, now):
    """Deferred recipients of messages not held whose next attempt is still ahead.

    These are exactly the recipients ``deliverd queue flush`` makes due now.
    """
    return [
        r
        for e in entries
        if not e.get("held")
        for r in e.get("recipients") or ()
        if r.get("state") == "deferred" and float(r.get("next_attempt") or 0) > now
    ]


def would_change(state, entry, entries, now):
    """Whether reaching ``state`` changes anything, judged from the listing alone (pure)."""
    if state == "flushed":
        return bool(waiting_recipients(entries, now))
    if entry is None:
        # Gone already (delivered or deleted): absent and released hold; nothing can be held.
        return False
    held = bool(entry.get("held"))
    if state == "held":
        return not held
    if state == "released":
        return held
    return True  # absent, and the message is there


def apply_state(cli, state, queue_id):
    """Run the ``deliverd queue`` action for ``state``: whether it changed anything.

    None when the message is gone: the engine may deliver (and forget) it between the listing
    and the action.
    """
    argv = ["queue", "-c", cli.config, STATE_ACTIONS[state], "--json"]
    if state in STATES_WITH_ID:
        argv.append(queue_id)
    rc, out, _err = cli.run(argv, ok_codes=(0, EXIT_UNKNOWN_ID))
    if rc == EXIT_UNKNOWN_ID:
        return None
    if state == "flushed":
        # The engine's own count: a recipient may have become due since the listing.
        try:
            return int(json.loads(out)["flushed"]) > 0
        except (ValueError, KeyError, TypeError):
            raise DeliverdCliError("unexpected JSON from 'deliverd queue flush'", rc=rc,
                                   stdout=out) from None
    return True
