# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""``with_dkim_selector``: a delivery spec whose rotated dkim[] entries sign with the new
selector's keys (see module_utils/dkim_rotation.py)."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError
from ansible_collections.mailops.deliverd.plugins.module_utils.dkim_rotation import (
    RotationError,
    switched_spec,
)

DOCUMENTATION = r"""
name: with_dkim_selector
short_description: A delivery spec with dkim[] entries moved to a new selector and key
version_added: 0.2.0
description:
  - Returns a new spec whose rotated C(dkim[]) entries have the new selector and the key file
    C(<directory of the old key>/<new selector>.key); the other entries are kept as they are.
  - Chooses the entries as C(mailops.deliverd.dkim_rotation) does, and refuses the same cases
    (a selector or key file already in use).
options:
  _input:
    description: The delivery spec (a host's C(deliverd_spec)).
    type: dict
    required: true
  new_selector:
    description: The selector the keys move to.
    type: str
    required: true
  old_selector:
    description: Move only the entries with this selector (default every entry).
    type: str
  domains:
    description: Move only the entries of these domains (default every domain).
    type: list
    elements: str
"""

EXAMPLES = r"""
- name: The spec that signs with the new keys
  ansible.builtin.set_fact:
    next_spec: "{{ deliverd_spec | mailops.deliverd.with_dkim_selector('s2027') }}"
"""

RETURN = r"""
_value:
  description: A new spec; the input is not changed.
  type: dict
"""


def with_dkim_selector(spec, new_selector, old_selector=None, domains=None):
    try:
        return switched_spec(spec, new_selector, old_selector, domains)
    except RotationError as exc:
        raise AnsibleFilterError(f"with_dkim_selector: {exc}") from None


class FilterModule:
    def filters(self):
        return {"with_dkim_selector": with_dkim_selector}
