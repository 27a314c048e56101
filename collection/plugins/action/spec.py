# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Controller side of ``mailops.deliverd.spec``: validate and normalise a delivery spec.

The engine's own validator judges the spec (one schema, one set of rules everywhere), so this
plugin only adapts Ansible values to plain Python and the validator's problems to a task result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as metadata_version
from pathlib import Path

from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase

SECRET_KEYS = frozenset(("password", "mail_password"))
MASK = "********"
INSTALL_HINT = (
    "the mailops.deliverd.spec action needs the deliverd Python package on the controller "
    "(the Python that runs ansible-playbook), or the collection's bundled wheel with jsonschema "
    "installable by the controller's pip: install deliverd there, e.g. 'pip install deliverd' "
    "or 'pip install -e .' from a deliverd checkout"
)


# An installed collection tarball (make collection) carries the engine's pure-Python wheel here.
BUNDLED_WHEELS = Path(__file__).resolve().parents[2] / "wheels"
# What deliverd.spec imports beyond the standard library. ansible-core brings Jinja2 and PyYAML;
# a controller with only ansible-core lacks jsonschema (and rpds-py, a compiled extension, below
# it), which the action then installs from the wheel's own requirements.
VALIDATOR_DEPENDENCIES = frozenset(("jsonschema", "jinja2", "pyyaml"))


def bundled_wheel():
    found = sorted(BUNDLED_WHEELS.glob("deliverd-*.whl"))
    return found[-1] if found else None


def _cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mailops.deliverd"


def unpacked(wheel):
    """The wheel unpacked once into a per-user cache (the engine reads its schema from files)."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:16]
    target = _cache_dir() / ("%s-%s" % (wheel.stem, digest))
    if not target.is_dir():
        partial = target.with_name(target.name + ".%d" % os.getpid())
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(partial)
        with contextlib.suppress(OSError):  # another run may have unpacked it first
            partial.rename(target)
        shutil.rmtree(partial, ignore_errors=True)
    return target


def validator_requirements(wheel_dir):
    """The wheel's own requirements (Requires-Dist) on what the validator imports."""
    # packaging comes with ansible-core; imported here, where it is needed, because ansible-test's
    # import sanity test loads plugins with fewer packages than a controller has.
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    (metadata,) = Path(wheel_dir).glob("*.dist-info/METADATA")
    found = []
    for line in metadata.read_text(encoding="utf-8").splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            name = canonicalize_name(requirement.name)
            if requirement.marker is None and name in VALIDATOR_DEPENDENCIES:
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


def installed_dependencies(wheel_dir, missing):
    """``missing`` installed once with the controller's pip into a per-user cache folder.

    Only that folder is written: the Python running ansible-playbook stays as it was. pip
    reads its usual configuration (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX for an offline
    controller with a folder of wheels).
    """
    wanted = sorted(str(r) for r in missing)
    key = hashlib.sha256(
        ("%s|%s|%s" % (sys.version, platform.machine(), " ".join(wanted))).encode()
    ).hexdigest()[:16]
    target = Path("%s-deps-%s" % (wheel_dir, key))
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one pip per controller; parallel forks wait, then reuse
        if target.is_dir():
            return target
        partial = target.with_name(target.name + ".%d" % os.getpid())
        shutil.rmtree(partial, ignore_errors=True)
        argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                "--no-input", "--target", str(partial), *wanted]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImportError("could not run %s: %s" % (" ".join(argv[:4]), exc)) from exc
        if proc.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            output = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            raise ImportError("installing %s for the validator with the controller's pip "
                              "(%s -m pip) failed: %s"
                              % (", ".join(wanted), sys.executable, " / ".join(output)))
        partial.rename(target)
    return target


def import_check_spec():
    """deliverd's validator: the controller's own, else the collection's bundled wheel (with
    the validator's dependencies that the controller lacks installed beside it)."""
    try:
        from deliverd.spec.validation import check_spec
        return check_spec
    except ImportError as exc:
        wheel = bundled_wheel()
        if wheel is None:
            raise
        first = exc
    for name in [n for n in sys.modules if n == "deliverd" or n.startswith("deliverd.")]:
        del sys.modules[name]
    try:
        wheel_dir = unpacked(wheel)
        missing = unmet(validator_requirements(wheel_dir))
        paths = [str(wheel_dir)]
        if missing:
            paths.append(str(installed_dependencies(wheel_dir, missing)))
        sys.path[:0] = [p for p in paths if p not in sys.path]
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
