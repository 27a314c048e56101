# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""A DKIM key rotation planned from a delivery spec (the dkim_rotation and with_dkim_selector
filters).

A rotation moves ``dkim[]`` entries to a new selector with a new key (publish, wait, switch,
retire: playbooks/rotate-dkim.yml). ``dkim_rotation`` says which entries move and where their
new key lives (beside the old one, named after the new selector); ``with_dkim_selector`` is
the spec that signs with the new keys. Both refuse a rotation that would reuse a selector or
a key file, so a new key is never written over one in use. Errors are ``RotationError``; the
filters turn them into Ansible's.
"""

from __future__ import annotations

import copy
import posixpath


class RotationError(ValueError):
    """A rotation that cannot be done as asked."""


_ALGORITHM = "rsa-sha256"  # the schema's default


def _selected(spec, new_selector, old_selector, domains):
    if not isinstance(spec, dict):
        raise RotationError("the spec must be a mapping")
    if not isinstance(new_selector, str) or not new_selector:
        raise RotationError("the new selector must be a non-empty string")
    entries = spec.get("dkim") or []
    chosen = [
        (index, entry) for index, entry in enumerate(entries)
        if (old_selector is None or entry.get("selector") == old_selector)
        and (domains is None or entry.get("domain") in domains)
    ]
    if not chosen:
        raise RotationError(
            f"no dkim[] entry to rotate (selector {old_selector or 'any'},"
            f" domains {', '.join(domains) if domains else 'any'})")
    in_use = {(e.get("domain"), e.get("selector")) for e in entries}
    key_files = {e.get("key_file") for e in entries}
    for _index, entry in chosen:
        if entry.get("selector") == new_selector:
            raise RotationError(
                f"{new_selector}._domainkey.{entry.get('domain')} is already"
                " the selector in use: a rotation needs a new selector")
        if (entry.get("domain"), new_selector) in in_use:
            raise RotationError(
                f"dkim[] already has {new_selector}._domainkey."
                f"{entry.get('domain')}")
        if _new_key_file(entry, new_selector) in key_files:
            raise RotationError(
                f"the new key file {_new_key_file(entry, new_selector)} is"
                " already named by dkim[]: choose another selector")
    return chosen


def _new_key_file(entry, new_selector):
    return posixpath.join(posixpath.dirname(entry["key_file"]), f"{new_selector}.key")


def rotation(spec, new_selector, old_selector=None, domains=None):
    items = []
    for _index, entry in _selected(spec, new_selector, old_selector, domains):
        domain = str(entry["domain"]).rstrip(".")
        items.append({
            "domain": domain,
            "algorithm": entry.get("algorithm", _ALGORITHM),
            "old_selector": entry["selector"],
            "new_selector": new_selector,
            "old_key_file": entry["key_file"],
            "new_key_file": _new_key_file(entry, new_selector),
            "old_record": f"{entry['selector']}._domainkey.{domain}",
            "new_record": f"{new_selector}._domainkey.{domain}",
        })
    return items


def switched_spec(spec, new_selector, old_selector=None, domains=None):
    result = copy.deepcopy(spec)
    for index, entry in _selected(spec, new_selector, old_selector, domains):
        moved = result["dkim"][index]
        moved["selector"] = new_selector
        moved["key_file"] = _new_key_file(entry, new_selector)
    return result
