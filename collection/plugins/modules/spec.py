#!/usr/bin/python
# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: spec
short_description: Validate and normalise a deliverd delivery spec on the controller
version_added: 0.1.0
description:
  - Validates a delivery spec with the deliverd engine's own validator (the same JSON Schema and
    rules as C(deliverd validate)) and returns it normalised, with every default filled in.
  - Fails listing every problem at once, each with its JSON pointer, message and hint.
  - Runs on the controller only (an action plugin), with the C(deliverd) Python package of the
    Python that runs Ansible, or else the engine's wheel that the installed collection carries.
  - Installs nothing on the controller. When the Python that runs Ansible lacks a package of the
    collection's C(requirements.txt), fails with one message naming what is missing and the
    command that installs it (C(python -m pip install -r <collection path>/requirements.txt)),
    in check mode too.
requirements:
  - jsonschema >= 4.20 on the controller (the collection's C(requirements.txt); an execution
    environment built with ansible-builder installs it from C(meta/execution-environment.yml)).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.conn
  - ansible.builtin.action_common_attributes.flow
options:
  spec:
    description:
      - The delivery spec as a mapping (as read from YAML or inventory variables).
    type: dict
    required: true
attributes:
  check_mode:
    support: full
    details: Validation changes nothing, so it runs the same in check mode.
  diff_mode:
    support: none
  action:
    support: full
  async:
    support: none
  bypass_host_loop:
    support: none
  become:
    support: none
  connection:
    support: none
  delegation:
    support: none
    details: It always runs on the controller.
  platform:
    platforms: all
    details: It runs on the controller; the managed host is not contacted.
notes:
  - >-
    The result holds the normalised spec, passwords included. When the spec has secrets, use
    C(no_log: true) on the task (the C(deliverd) role does, through C(deliverd_secure_logging)).
    Messages, warnings and problems never contain a password: any secret a validator message
    quotes is masked.
author:
  - deliverd maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Validate the spec before deploying it
  mailops.deliverd.spec:
    spec: "{{ deliverd_spec }}"
  register: deliverd_checked
  no_log: true

- name: Use the normalised spec
  ansible.builtin.debug:
    msg: "mode is {{ deliverd_checked.spec.routing.mode }}"
"""

RETURN = r"""
spec:
  description: The normalised spec (every default filled in). Contains the passwords.
  returned: success
  type: dict
problems:
  description: Every problem found, errors and warnings.
  returned: always
  type: list
  elements: dict
  contains:
    pointer:
      description: JSON pointer of the offending field (empty for the whole spec).
      type: str
    message:
      description: What is wrong.
      type: str
    hint:
      description: How to fix it.
      type: str
    severity:
      description: V(error) or V(warning).
      type: str
msg:
  description: "Every error, one per line, as C(pointer: message (hint: ...))."
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule


def main():
    # Only reached when the action plugin is bypassed: the validation needs the controller.
    # supports_check_mode matches the documented check_mode support of the action plugin.
    module = AnsibleModule(
        argument_spec={"spec": {"type": "dict", "required": True}},
        supports_check_mode=True,
    )
    module.fail_json(msg="mailops.deliverd.spec runs on the controller through its action plugin")


if __name__ == "__main__":
    main()
