# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Controller side of ``mailops.deliverd.spec``: validate and normalise a delivery spec.

The engine's own validator judges the spec (one schema, one set of rules everywhere), so this
plugin only adapts Ansible values to plain Python and the validator's problems to a task result.
"""

from __future__ import annotations

import os
import posixpath
import sys
import zipfile
import zipimport
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as metadata_version
from pathlib import Path

from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase

SECRET_KEYS = frozenset(("password", "mail_password"))
MASK = "********"
INSTALL_HINT = (
    "the mailops.deliverd.spec action needs the deliverd Python package on the controller "
    "(the Python that runs ansible-playbook), or the engine's wheel that an installed collection "
    "tarball carries: install deliverd there, e.g. 'pip install deliverd' or 'pip install -e .' "
    "from a deliverd checkout, or install the collection from its tarball (make collection)"
)

COLLECTION = Path(__file__).resolve().parents[2]
# An installed collection tarball (make collection) carries the engine's pure-Python wheel here.
BUNDLED_WHEELS = COLLECTION / "wheels"
# What the validator imports beyond ansible-core and the standard library, declared for
# ansible-builder (meta/execution-environment.yml) and for a controller's pip alike.
REQUIREMENTS = COLLECTION / "requirements.txt"


class MissingRequirements(ImportError):
    """The controller's Python lacks packages the collection declares in requirements.txt."""


def bundled_wheel():
    found = sorted(BUNDLED_WHEELS.glob("deliverd-*.whl"))
    return found[-1] if found else None


def declared_requirements(text):
    """The requirements a requirements.txt text declares for this Python (markers applied)."""
    # packaging comes with ansible-core; imported here, where it is needed, because ansible-test's
    # import sanity test loads plugins with fewer packages than a controller has.
    from packaging.requirements import Requirement

    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate():
                found.append(requirement)
    return found


def unmet(requirements):
    """The requirements this controller's Python does not satisfy."""
    missing = []
    for requirement in requirements:
        try:
            installed = metadata_version(requirement.name)
        except PackageNotFoundError:
            missing.append(requirement)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(requirement)
    return missing


def missing_message(missing, requirements_file):
    """One message: what the controller lacks, and the command that installs it there."""
    return (
        "the mailops.deliverd.spec action needs %s in the Python that runs ansible-playbook "
        "(%s); the collection installs nothing on the controller: install its requirements "
        "with '%s -m pip install -r %s' (an execution environment built with ansible-builder "
        "has them)" % (", ".join(str(r) for r in missing), sys.executable, sys.executable,
                       requirements_file)
    )


def zip_finders(wheel):
    """zipimport's finder for the wheel and for each package folder in it, by path entry.

    The wheel lies inside the collections path, whose path hook (Ansible's collection loader)
    would claim these entries and look for files on disk: their finders are set beforehand.
    """
    with zipfile.ZipFile(wheel) as zf:
        packages = {posixpath.dirname(n) for n in zf.namelist() if n.endswith("/__init__.py")}
    entries = [str(wheel)] + [os.path.join(str(wheel), *p.split("/")) for p in sorted(packages)]
    return {entry: zipimport.zipimporter(entry) for entry in entries}


def import_check_spec():
    """deliverd's validator: the controller's own, else the collection's bundled wheel, imported
    from the wheel file itself (zipimport: nothing is unpacked or written on the controller)."""
    try:
        from deliverd.spec.validation import check_spec
        return check_spec
    except ImportError as exc:
        wheel = bundled_wheel()
        if wheel is None:
            raise
        first = exc
    missing = unmet(declared_requirements(REQUIREMENTS.read_text(encoding="utf-8")))
    if missing:
        raise MissingRequirements(missing_message(missing, REQUIREMENTS))
    for name in [n for n in sys.modules if n == "deliverd" or n.startswith("deliverd.")]:
        del sys.modules[name]
    sys.path_importer_cache.update(zip_finders(wheel))
    if str(wheel) not in sys.path:
        sys.path.insert(0, str(wheel))
    try:
        from deliverd.spec.validation import check_spec
    except ImportError as exc:
        raise ImportError("%s; with the collection's %s: %s" % (first, wheel.name, exc)) from exc
    return check_spec


def plain(value):
    """Ansible's (tagged, possibly vaulted) values as plain JSON-like Python values.

    Vaulted strings decrypt here, on the controller, as the validator must see them.
    """
    if isinstance(value, dict):
        return {to_text(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None:
        return None
    # bool before int: bool is an int subclass. The casts drop Ansible's tagged subclasses.
    for kind in (bool, int, float):
        if isinstance(value, kind):
            return kind(value)
    return to_text(value)


def secrets_in(value, found=None):
    """Every string held under a secret key (password, mail_password), at any depth."""
    found = set() if found is None else found
    if isinstance(value, dict):
        for key, item in value.items():
            if key in SECRET_KEYS and isinstance(item, str) and item:
                found.add(item)
            else:
                secrets_in(item, found)
    elif isinstance(value, list):
        for item in value:
            secrets_in(item, found)
    return found


def scrub(text, secrets):
    """``text`` with every secret masked: a validator message may quote an offending value."""
    # Longest first, so a secret containing another is masked whole.
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def problem_dict(problem, secrets):
    data = problem.as_dict()
    return {key: scrub(to_text(item), secrets) for key, item in data.items()}


def describe(problem):
    line = "%s: %s" % (problem["pointer"] or "/", problem["message"])
    return line + (" (hint: %s)" % problem["hint"] if problem["hint"] else "")


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("spec",))
    _requires_connection = False
    _supports_check_mode = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp  # nothing is transferred to the host
        _args, params = self.validate_argument_spec(
            argument_spec={"spec": {"type": "dict", "required": True}},
        )
        try:
            check_spec = import_check_spec()
        except ImportError as exc:
            # A failed result, not an exception: a caller that registers the result (the role,
            # under no_log) can still read and show this message, which holds no secret.
            result["failed"] = True
            result["problems"] = []
            if isinstance(exc, MissingRequirements):
                result["msg"] = str(exc)
            else:
                result["msg"] = "%s (import error: %s)" % (INSTALL_HINT, exc)
            return result

        spec = plain(params["spec"])
        secrets = secrets_in(spec)
        normalised, problems = check_spec(spec)
        found = [problem_dict(p, secrets) for p in problems]
        errors = [p for p in found if p["severity"] != "warning"]
        warnings = [p for p in found if p["severity"] == "warning"]

        result["changed"] = False
        result["problems"] = found
        if warnings:
            result["warnings"] = ["deliverd spec %s" % describe(p) for p in warnings]
        if errors or normalised is None:
            result["failed"] = True
            lines = [describe(p) for p in errors] or ["the validator returned no spec"]
            result["msg"] = "the delivery spec has %d problem%s:\n%s" % (
                len(errors), "" if len(errors) == 1 else "s", "\n".join(lines),
            )
            return result
        result["spec"] = normalised
        result["msg"] = "delivery spec is valid"
        return result
