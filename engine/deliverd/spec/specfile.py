"""Read a delivery spec file (YAML, or JSON, which YAML reads too) into plain Python values.

Reading is strict where YAML is lenient in ways that hide mistakes: a key written twice (YAML
keeps the last one silently) and a key that is not a string (``on:``/``yes:`` read as booleans
under YAML 1.1) are refused with the line they were written on. Everything else about the
content (is it a mapping, are the keys known) is the validator's business, so that every spec,
whether it came from a file or from Ansible variables, is judged by the same code.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode

_MERGE_TAG = "tag:yaml.org,2002:merge"


class SpecFileError(Exception):
    """A spec file that cannot be read or parsed; the message names the file and the place."""


class StrictSafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing duplicate and non-string mapping keys."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[object, object]:
        self._check_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _check_keys(self, node: MappingNode) -> None:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            # Keys merged in with "<<" may legitimately be overridden by the mapping itself.
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found a key that is not a string ({_describe_key(key_node)}); "
                    "quote it (YAML reads yes/no/on/off as booleans)",
                    key_node.start_mark,
                )
            if key in seen:
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first written on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = line


def _describe_key(node: Node) -> str:
    if isinstance(node, ScalarNode):
        return repr(node.value)
    return "a " + ("mapping" if isinstance(node, MappingNode) else "list")


def load_spec_text(text: str, source: str = "<spec>") -> object:
    """Parse spec text; ``source`` names it in error messages."""
    try:
        documents = list(yaml.load_all(text, Loader=StrictSafeLoader))
    except yaml.MarkedYAMLError as exc:
        raise SpecFileError(f"{source}: {_describe_yaml_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise SpecFileError(f"{source}: not valid YAML ({exc})") from None
    except RecursionError:
        raise SpecFileError(f"{source}: the document is nested too deeply") from None
    if not documents:
        raise SpecFileError(f"{source}: the file contains no YAML document")
    if len(documents) > 1:
        raise SpecFileError(
            f"{source}: the file contains {len(documents)} YAML documents; a spec is one"
        )
    return documents[0]


def load_spec_file(path: str | Path) -> object:
    """The parsed content of a YAML or JSON spec file; ``SpecFileError`` when it cannot be."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SpecFileError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise SpecFileError(f"{source}: is a directory, not a spec file") from None
    except OSError as exc:
        raise SpecFileError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecFileError(
            f"{source}: is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    return load_spec_text(text, source)


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    """``line L, column C: problem`` from PyYAML's marks, without its multi-line snippet."""
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid YAML"
    if mark is None:
        return f"not valid YAML: {problem}"
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    context = ""
    if exc.context and exc.problem and exc.context_mark is not None:
        context = f" ({exc.context} at line {exc.context_mark.line + 1})"
    return f"not valid YAML at {where}: {problem}{context}"
