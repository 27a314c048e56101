# Copyright: deliverd maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations


class ModuleDocFragment:
    # The options every module shares to find the engine on the host
    # (module_utils/deliverd_cli.py COMMON_ARGUMENT_SPEC).
    DOCUMENTATION = r"""
options:
  prefix:
    description:
      - The C(deliverd_prefix) the engine was installed under; the defaults of O(executable)
        and O(config) are taken under it.
    type: path
    default: /
  executable:
    description:
      - Path of the C(deliverd) command.
      - Default C(<prefix>/opt/deliverd/venv/bin/deliverd).
    type: path
  config:
    description:
      - Path of the engine config.
      - Default C(<prefix>/etc/deliverd/deliverd.toml).
    type: path
"""
