# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""``with_smarthost``: a delivery spec with one smart host changed, for a fleet-wide change.

The change is merged into ``routing.smarthost`` (or the smart host of the route named
``route``) the way ``combine(recursive=true)`` would, so a change that names only ``host``
keeps the host's own credentials, with one exception: ``host`` and ``hosts`` replace each
other, because a smart host has one or the other.
"""

from __future__ import annotations

import copy

from ansible.errors import AnsibleFilterError

DOCUMENTATION = r"""
name: with_smarthost
short_description: A delivery spec with routing.smarthost, or one route's smart host, changed
version_added: 0.2.0
description:
  - Merges a change into the smart host of a deliverd delivery spec and returns the new spec.
  - Nested mappings merge (a change naming only C(host) keeps C(auth)); C(host) and C(hosts)
    replace each other.
options:
  _input:
    description: The delivery spec (a host's C(deliverd_spec)).
    type: dict
    required: true
  change:
    description: The smart host settings to merge in.
    type: dict
    required: true
  route:
    description: The name of the route (C(routes[].name)) whose smart host changes; default
      C(routing.smarthost).
    type: str
"""

EXAMPLES = r"""
- name: The spec with the new smart host
  ansible.builtin.set_fact:
    next_spec: "{{ deliverd_spec | mailops.deliverd.with_smarthost(new_smarthost) }}"

- name: The spec with the billing route's smart host changed
  ansible.builtin.set_fact:
    next_spec: "{{ deliverd_spec
      | mailops.deliverd.with_smarthost(new_smarthost, route='billing') }}"
"""

RETURN = r"""
_value:
  description: A new spec; the input is not changed.
  type: dict
"""

_EXCLUSIVE = {"host": ("hosts",), "hosts": ("host", "port")}


def _merge(base, change):
    merged = copy.deepcopy(base)
    for key, value in change.items():
        for other in _EXCLUSIVE.get(key, ()):
            merged.pop(other, None)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def with_smarthost(spec, change, route=None):
    if not isinstance(spec, dict) or not isinstance(change, dict):
        raise AnsibleFilterError("with_smarthost: the spec and the change must be mappings")
    result = copy.deepcopy(spec)
    if route is None:
        routing = result.setdefault("routing", {})
        routing["smarthost"] = _merge(routing.get("smarthost") or {}, change)
        return result
    for entry in result.get("routes") or []:
        if isinstance(entry, dict) and entry.get("name") == route:
            entry["smarthost"] = _merge(entry.get("smarthost") or {}, change)
            return result
    names = ", ".join(str(r.get("name")) for r in result.get("routes") or []
                      if isinstance(r, dict)) or "none"
    raise AnsibleFilterError(f"with_smarthost: the spec has no route {route!r} (routes: {names})")


class FilterModule:
    def filters(self):
        return {"with_smarthost": with_smarthost}
