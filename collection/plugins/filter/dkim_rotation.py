# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""``dkim_rotation``: the dkim[] entries a rotation to a new selector moves (see
module_utils/dkim_rotation.py)."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError
from ansible_collections.mailops.deliverd.plugins.module_utils.dkim_rotation import (
    RotationError,
    rotation,
)

DOCUMENTATION = r"""
name: dkim_rotation
short_description: The dkim[] entries a rotation to a new DKIM selector moves
version_added: 0.2.0
description:
  - Returns one item per rotated C(dkim[]) entry, with its old and new selector and key file.
  - The new key file is C(<directory of the old key>/<new selector>.key).
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
    description: Rotate only the entries with this selector (default every entry).
    type: str
  domains:
    description: Rotate only the entries of these domains (default every domain).
    type: list
    elements: str
"""

EXAMPLES = r"""
- name: What the rotation to selector s2026b changes
  ansible.builtin.set_fact:
    rotation: "{{ deliverd_spec | mailops.deliverd.dkim_rotation('s2026b') }}"
"""

RETURN = r"""
_value:
  description: One item per rotated entry with C(domain), C(algorithm), C(old_selector),
    C(new_selector), C(old_key_file), C(new_key_file), C(old_record), C(new_record) (the DNS
    names).
  type: list
  elements: dict
"""


def dkim_rotation(spec, new_selector, old_selector=None, domains=None):
    try:
        return rotation(spec, new_selector, old_selector, domains)
    except RotationError as exc:
        raise AnsibleFilterError(f"dkim_rotation: {exc}") from None


class FilterModule:
    def filters(self):
        return {"dkim_rotation": dkim_rotation}
