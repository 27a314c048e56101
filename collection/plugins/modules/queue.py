#!/usr/bin/python
# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: queue
short_description: List and manage the deliverd mail queue
version_added: 0.1.0
description:
  - Lists the messages in a deliverd engine's queue, or flushes the queue (retry every deferred
    message now), holds, releases or deletes one message by queue id.
  - Runs C(deliverd queue -c CONFIG ... --json) on the managed host.
options:
  state:
    description:
      - V(list) returns the queue and never changes anything.
      - V(flush) asks the running engine to retry every queued message now.
      - V(hold), V(release), V(delete) act on the message O(id).
    type: str
    choices: [list, flush, hold, release, delete]
    default: list
  id:
    description:
      - Queue id of the message, required for V(hold), V(release) and V(delete).
    type: str
  prefix:
    description:
      - The C(deliverd_prefix) the engine was installed under; the defaults of O(executable)
        and O(config) are taken under it.
    type: path
    default: /
  executable:
    description:
      - Path of the C(deliverd) command.
      - Default C(<prefix>/opt/deliverd/venv/bin/deliverd).
    type: path
  config:
    description:
      - Path of the engine config.
      - Default C(<prefix>/etc/deliverd/deliverd.toml).
    type: path
attributes:
  check_mode:
    support: full
    details: In check mode the queue is listed and the result says what would change.
  diff_mode:
    support: none
notes:
  - Deleting a message discards it without a DSN; it is the operator's decision.
author:
  - deliverd maintainers
"""

EXAMPLES = r"""
- name: List the queue
  mailops.deliverd.queue:
    prefix: /
  register: deliverd_queue

- name: Retry every deferred message now
  mailops.deliverd.queue:
    state: flush

- name: Hold a message for inspection
  mailops.deliverd.queue:
    state: hold
    id: 0ABCDEFGH1234
"""

RETURN = r"""
entries:
  description: The messages in the queue (before the action), as C(deliverd queue list --json)
    prints them.
  returned: always
  type: list
  elements: dict
count:
  description: Number of messages in the queue before the action.
  returned: always
  type: int
ids:
  description: Queue ids of the messages in the queue before the action.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.mailops.deliverd.plugins.module_utils.deliverd_cli import (
    COMMON_ARGUMENT_SPEC,
    DeliverdCliError,
    execute,
)

ACTIONS_WITH_ID = ("hold", "release", "delete")


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


def would_change(state, entry, entries):
    """Whether ``state`` changes anything, judged from the queue listing alone (pure)."""
    if state == "flush":
        return bool(entries)
    if entry is None:
        return False
    held = bool(entry.get("held"))
    if state == "hold":
        return not held
    if state == "release":
        return held
    return True  # delete


def run(cli, params, check_mode):
    _rc, data = cli.run_json(["queue", "-c", cli.config, "list", "--json"])
    entries = entries_of(data)
    ids = [entry_id(e) for e in entries]
    result = {"changed": False, "entries": entries, "count": len(entries), "ids": ids}
    state = params["state"]
    if state == "list":
        return result
    entry = None
    if state in ACTIONS_WITH_ID:
        entry = next((e for e in entries if entry_id(e) == params["id"]), None)
        if entry is None:
            # Gone already (delivered or deleted): nothing to do, which is not an error for
            # release/delete, but a hold that cannot happen is worth saying.
            result["msg"] = "no message %s in the queue" % params["id"]
            return result
    result["changed"] = would_change(state, entry, entries)
    if result["changed"] and not check_mode:
        argv = ["queue", "-c", cli.config, state]
        if state in ACTIONS_WITH_ID:
            argv.append(params["id"])
        cli.run(argv)
    return result


def main():
    argument_spec = dict(COMMON_ARGUMENT_SPEC)
    argument_spec.update(
        state={"type": "str", "default": "list", "choices": ["list", "flush", *ACTIONS_WITH_ID]},
        id={"type": "str"},
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        required_if=[("state", name, ("id",)) for name in ACTIONS_WITH_ID],
    )
    execute(module, lambda cli: run(cli, module.params, module.check_mode))


if __name__ == "__main__":
    main()
