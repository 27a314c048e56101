#!/usr/bin/python
# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: probe
short_description: Preflight a deliverd smart host configuration from the managed host
version_added: 0.1.0
description:
  - Runs C(deliverd probe -c CONFIG --json) on the managed host; the engine connects to every
    smart host of that config (C(routing.smarthost), each host of a failover list, each route's),
    negotiates TLS, authenticates (SMTP AUTH, POP-before-SMTP) and sends no mail.
  - Fails when any step of any smart host fails, listing the failed steps of the first failing
    host.
  - The config may be one that is not deployed yet (for example rendered into a temporary
    directory), so a change can be proven to work from each host before any host changes.
options:
  config:
    description:
      - Path of the engine config to probe; its secrets are read from C(secrets.toml) beside it.
      - Default C(<prefix>/etc/deliverd/deliverd.toml).
    type: path
  route:
    description:
      - Probe only the smart host of this route (C(routes[].name)); default every smart host.
    type: str
    version_added: 0.2.0
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - mailops.deliverd.engine
attributes:
  check_mode:
    support: full
    details: The probe changes nothing and sends no mail, so it also runs in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
author:
  - deliverd maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Prove the deployed smart host settings work from this host
  mailops.deliverd.probe:

- name: Probe a config rendered into a temporary directory before deploying it
  mailops.deliverd.probe:
    config: /tmp/deliverd-next/deliverd.toml
"""

RETURN = r"""
ok:
  description: Whether every step succeeded.
  returned: always
  type: bool
steps:
  description: Each step of the probe (connect, TLS, AUTH, POP) in order.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The step.
      type: str
    ok:
      description: Whether it succeeded.
      type: bool
    detail:
      description: What happened (server reply, certificate problem); never a password.
      type: str
hosts:
  description: Every smart host probed, in order, each with its own C(steps).
  returned: always
  type: list
  elements: dict
  version_added: 0.2.0
  contains:
    route:
      description: The route whose smart host this is; null for C(routing.smarthost).
      type: str
    smarthost:
      description: The host and port probed.
      type: str
    ok:
      description: Whether every step for this host succeeded.
      type: bool
    steps:
      description: Its steps, as in C(steps).
      type: list
      elements: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.mailops.deliverd.plugins.module_utils.deliverd_cli import (
    COMMON_ARGUMENT_SPEC,
    DeliverdCliError,
    execute,
)


def summarise(report):
    """(ok, steps, message) from the probe's JSON report (pure)."""
    if not isinstance(report, dict) or not isinstance(report.get("steps"), list):
        raise DeliverdCliError("unexpected JSON from 'deliverd probe'")
    steps = report["steps"]
    ok = bool(report.get("ok")) and all(bool(s.get("ok")) for s in steps)
    failed = [s for s in steps if not s.get("ok")]
    if ok:
        return ok, steps, "probe passed: %s" % ", ".join(str(s.get("name")) for s in steps)
    detail = "; ".join("%s: %s" % (s.get("name"), s.get("detail", "")) for s in failed)
    where = report.get("smarthost")
    if len(report.get("hosts") or []) > 1 and where:
        route = report.get("route")
        detail = "%s%s: %s" % (where, " (route %s)" % route if route else "", detail)
    return ok, steps, "probe failed: %s" % (detail or "engine reported failure")


def run(cli):
    argv = ["probe", "-c", cli.config, "--json"]
    if cli.module.params.get("route"):
        argv += ["--route", cli.module.params["route"]]
    # Exit 1 is the engine's "probe failed" answer, still with the JSON report.
    _rc, report = cli.run_json(argv, ok_codes=(0, 1))
    ok, steps, msg = summarise(report)
    hosts = report.get("hosts") or []
    if not ok:
        raise ProbeFailed(msg, steps, hosts)
    return {"changed": False, "ok": ok, "steps": steps, "hosts": hosts, "msg": msg}


class ProbeFailed(DeliverdCliError):
    def __init__(self, msg, steps, hosts):
        super().__init__(msg)
        self.steps = steps
        self.hosts = hosts

    def result(self):
        return {"msg": self.msg, "ok": False, "steps": self.steps, "hosts": self.hosts}


def main():
    module = AnsibleModule(
        argument_spec=dict(COMMON_ARGUMENT_SPEC, route={"type": "str"}), supports_check_mode=True
    )
    execute(module, run)


if __name__ == "__main__":
    main()
