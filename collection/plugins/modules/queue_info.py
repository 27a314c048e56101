#!/usr/bin/python
# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: queue_info
short_description: List the messages in the deliverd mail queue
version_added: 0.1.0
description:
  - Returns the messages in a deliverd engine's queue, each with its recipients and their state.
  - Runs C(deliverd queue -c CONFIG list --json) on the managed host; changes nothing.
  - To flush the queue or hold, release or delete a message, use M(mailops.deliverd.queue).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - mailops.deliverd.engine
attributes:
  check_mode:
    support: full
    details: It only reads the queue, so it runs the same in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
seealso:
  - module: mailops.deliverd.queue
author:
  - deliverd maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: List the queue
  mailops.deliverd.queue_info:
  register: deliverd_queue

- name: Show the ids of held messages
  ansible.builtin.debug:
    msg: "{{ deliverd_queue.entries | selectattr('held') | map(attribute='queue_id') }}"
"""

RETURN = r"""
entries:
  description: The messages in the queue, as C(deliverd queue list --json) prints them.
  returned: always
  type: list
  elements: dict
  contains:
    queue_id:
      description: The message's queue id.
      type: str
    sender:
      description: The envelope sender (empty for the null sender).
      type: str
    held:
      description: Whether the message is held.
      type: bool
    recipients:
      description: Each recipient with its C(address), C(state) and C(attempts).
      type: list
      elements: dict
count:
  description: Number of messages in the queue.
  returned: always
  type: int
ids:
  description: Queue ids of the messages in the queue.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.mailops.deliverd.plugins.module_utils.deliverd_cli import (
    COMMON_ARGUMENT_SPEC,
    execute,
)
from ansible_collections.mailops.deliverd.plugins.module_utils.deliverd_queue import (
    list_queue,
    listing,
)


def run(cli):
    result = listing(list_queue(cli))
    result["changed"] = False
    return result


def main():
    module = AnsibleModule(argument_spec=dict(COMMON_ARGUMENT_SPEC), supports_check_mode=True)
    execute(module, run)


if __name__ == "__main__":
    main()
