# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Running the ``deliverd`` command on a managed host, shared by the collection's modules.

The modules stay thin: they say which subcommand to run and what its JSON means; finding the
binary, running it, parsing its JSON and turning failures into one clear ``fail_json`` live here.
"""

from __future__ import annotations

import json
import os

# Where the role installs the engine, relative to ``deliverd_prefix``.
VENV_BIN_DELIVERD = "opt/deliverd/venv/bin/deliverd"
CONFIG_FILE = "etc/deliverd/deliverd.toml"

# Options every module shares; merged into each module's argument_spec.
COMMON_ARGUMENT_SPEC = {
    "prefix": {"type": "path", "default": "/"},
    "executable": {"type": "path"},
    "config": {"type": "path"},
}


class DeliverdCliError(Exception):
    """The command could not be run or did not answer with the JSON it promises."""

    def __init__(self, msg, rc=None, stdout="", stderr=""):
        super().__init__(msg)
        self.msg = msg
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr

    def result(self):
        """Keyword arguments for ``fail_json``."""
        return {"msg": self.msg, "rc": self.rc, "stdout": self.stdout, "stderr": self.stderr}


def under_prefix(prefix, relative):
    """``relative`` placed under ``prefix`` (``/`` gives the plain absolute path)."""
    return os.path.join(prefix or "/", relative)


def executable_path(params):
    """The ``deliverd`` binary: the ``executable`` option, else the role's venv under prefix."""
    return params.get("executable") or under_prefix(params.get("prefix"), VENV_BIN_DELIVERD)


def config_path(params):
    """The engine config: the ``config`` option, else the role's config under prefix."""
    return params.get("config") or under_prefix(params.get("prefix"), CONFIG_FILE)


class DeliverdCli:
    """One module's view of the ``deliverd`` command on this host."""

    def __init__(self, module):
        self.module = module
        self.executable = executable_path(module.params)
        self.config = config_path(module.params)

    def check_installed(self):
        if not os.access(self.executable, os.X_OK):
            raise DeliverdCliError(
                "deliverd executable not found or not executable: %s (install the engine with "
                "the mailops.deliverd.deliverd role, or set 'executable')" % self.executable
            )

    def run(self, args, ok_codes=(0,)):
        """(rc, stdout, stderr) of ``deliverd ARGS -c CONFIG``; raise unless rc in ok_codes."""
        self.check_installed()
        argv = [self.executable, *args]
        rc, out, err = self.module.run_command(argv, check_rc=False, environ_update={"LC_ALL": "C"})
        if rc not in ok_codes:
            raise DeliverdCliError(
                "%s failed (exit %s): %s" % (" ".join(args[:3]), rc, (err or out).strip()[-2000:]),
                rc=rc, stdout=out, stderr=err,
            )
        return rc, out, err

    def run_json(self, args, ok_codes=(0,)):
        """(rc, parsed JSON) of a ``--json`` subcommand."""
        rc, out, err = self.run(args, ok_codes)
        try:
            return rc, json.loads(out)
        except ValueError:
            raise DeliverdCliError(
                "%s did not print JSON: %s" % (" ".join(args[:3]), out.strip()[-500:]),
                rc=rc, stdout=out, stderr=err,
            ) from None


def execute(module, action):
    """Run ``action(cli)`` -> result dict; every DeliverdCliError becomes one fail_json."""
    cli = DeliverdCli(module)
    try:
        result = action(cli)
    except DeliverdCliError as exc:
        module.fail_json(**exc.result())
    module.exit_json(**result)
