#!/usr/bin/python
# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: queue
short_description: Flush the deliverd mail queue, or hold, release or delete a message
version_added: 0.1.0
description:
  - Flushes a deliverd engine's queue (every deferred recipient is retried now), or holds,
    releases or deletes one message by queue id.
  - Runs C(deliverd queue -c CONFIG ACTION --json) on the managed host, after listing the queue
    to decide whether anything changes.
  - To list the queue, use M(mailops.deliverd.queue_info).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - mailops.deliverd.engine
options:
  state:
    description:
      - V(flushed) makes every deferred recipient of every message that is not held due now,
        and wakes the running engine. It changes nothing when no recipient is waiting.
      - V(held) holds the message O(id) until it is released.
      - V(released) releases the held message O(id); it is due at once.
      - V(absent) deletes the message O(id) without sending a delivery status notification.
      - For V(released) and V(absent), a message no longer in the queue (delivered or deleted)
        is already in the state asked for. A message not in the queue cannot be held; the
        result then says so in RV(msg), without failing, since it was most likely delivered.
    type: str
    choices: [flushed, held, released, absent]
    required: true
  id:
    description:
      - Queue id of the message, required for V(held), V(released) and V(absent).
    type: str
attributes:
  check_mode:
    support: full
    details: In check mode the queue is listed and the result says what would change.
  diff_mode:
    support: none
  platform:
    platforms: posix
notes:
  - Deleting a message discards it without a DSN; it is the operator's decision.
seealso:
  - module: mailops.deliverd.queue_info
author:
  - deliverd maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Retry every deferred message now
  mailops.deliverd.queue:
    state: flushed

- name: Hold a message for inspection
  mailops.deliverd.queue:
    state: held
    id: 0ABCDEFGH1234

- name: Delete it without a DSN
  mailops.deliverd.queue:
    state: absent
    id: 0ABCDEFGH1234
"""

RETURN = r"""
entries:
  description:
    - The messages in the queue before the action, as M(mailops.deliverd.queue_info) returns
      them.
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
msg:
  description: Why nothing changed, when the message O(id) is not in the queue.
  returned: when the message is not in the queue
  type: str
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.mailops.deliverd.plugins.module_utils.deliverd_cli import (
    COMMON_ARGUMENT_SPEC,
    execute,
)
from ansible_collections.mailops.deliverd.plugins.module_utils.deliverd_queue import (
    STATE_ACTIONS,
    STATES_WITH_ID,
    apply_state,
    find_entry,
    list_queue,
    listing,
    would_change,
)


def run(cli, params, check_mode):
    entries = list_queue(cli)
    result = listing(entries)
    state = params["state"]
    entry = None
    if state in STATES_WITH_ID:
        entry = find_entry(entries, params["id"])
        if entry is None:
            result["changed"] = False
            result["msg"] = "no message %s in the queue" % params["id"]
            return result
    result["changed"] = would_change(state, entry, entries, time.time())
    if not result["changed"] or check_mode:
        return result
    applied = apply_state(cli, state, params["id"])
    if applied is None:
        result["changed"] = False
        result["msg"] = "no message %s in the queue" % params["id"]
    else:
        result["changed"] = applied
    return result


def main():
    argument_spec = dict(COMMON_ARGUMENT_SPEC)
    argument_spec.update(
        state={"type": "str", "required": True, "choices": list(STATE_ACTIONS)},
        id={"type": "str"},
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        required_if=[("state", name, ("id",)) for name in STATES_WITH_ID],
    )
    execute(module, lambda cli: run(cli, module.params, module.check_mode))


if __name__ == "__main__":
    main()
