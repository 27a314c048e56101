"""Locate the files deliverd shares with the rest of the repo: the schema and the templates.

The wheel carries them under ``deliverd/_data``; a checkout (editable install) reads the one
copy at the repo's top level, so there is never a second copy to drift. The schema is read
through ``importlib.resources`` as well, so the wheel imported as a zip file (the Ansible
collection's bundled one, on a controller without deliverd) finds it without being unpacked.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parent.parent  # deliverd/, this module is in deliverd/spec/
_DATA = _PACKAGE / "_data"
_REPO = _PACKAGE.parent.parent

SCHEMA_NAME = "delivery-spec.schema.json"


def schema_path() -> Path:
    for candidate in (_DATA / SCHEMA_NAME, _REPO / "schemas" / SCHEMA_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{SCHEMA_NAME} is missing from the deliverd installation")


def templates_dir() -> Path:
    for candidate in (_DATA / "templates", _REPO / "roles" / "deliverd" / "templates"):
        if (candidate / "deliverd.toml.j2").is_file():
            return candidate
    raise FileNotFoundError("deliverd templates are missing from the installation")


@cache
def load_schema() -> dict[str, Any]:
    packaged = files("deliverd") / "_data" / SCHEMA_NAME
    source = packaged if packaged.is_file() else schema_path()
    schema: dict[str, Any] = json.loads(source.read_text(encoding="utf-8"))
    return schema
