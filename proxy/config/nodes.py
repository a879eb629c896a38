"""YAML nodes that remember where they are: file, line and key path.

``yaml.safe_load`` returns plain dicts and loses line numbers, so the loader composes
the node tree instead and walks it through ``ConfigNode``. Every accessor either returns
the typed value or raises a ``ConfigError`` reading ``FILE:LINE: key.path: reason``.
Unknown and duplicate keys are caught here, once, for every section. ``${VAR}``
references are expanded in every string value as it is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.config.values import InvalidValue, did_you_mean, expand_env
from proxy.errors import ConfigError, os_error_reason

T = TypeVar("T")

_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass
class _Document:
    """What every node of one file shares."""

    file: str
    environ: Mapping[str, str]
    loader: yaml.SafeLoader  # constructs typed scalars (ints, bools, floats)
    lines: dict[str, int] = field(default_factory=dict)  # key path -> line, for `check`
    errors: list[ConfigError] = field(default_factory=list)  # collected so far (see ConfigNode.collect)


def compose_file(path: Path, environ: Mapping[str, str]) -> tuple[ConfigNode, dict[str, int]]:
    """Read and compose ``path``; return the root node and the (filling) key-line map.

    The file is named in errors as the user gave it.
    """
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(file, None, "", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(file, None, "", "is a directory, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(file, None, "", "is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(file, None, "", f"cannot read: {os_error_reason(exc)}") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(file, mark.line + 1 if mark else None, "", f"YAML syntax error: {reason}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, None, "", f"YAML syntax error: {exc}") from None
    document = _Document(file=file, environ=environ, loader=loader)
    if root is None:
        root = ScalarNode(_NULL_TAG, "", loader.get_mark(), loader.get_mark())
    return ConfigNode(root, "", document), document.lines


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL_TAG:
        return "nothing"
    return f"'{node.value}'"


class ConfigNode:
    """One YAML node plus its key path (``services[0].upstream``) and line."""

    __slots__ = ("node", "path", "line", "_doc")

    def __init__(self, node: Node, path: str, doc: _Document, line: int | None = None) -> None:
        self.node = node
        self.path = path
        self.line = line if line is not None else node.start_mark.line + 1
        self._doc = doc
        doc.lines.setdefault(path, self.line)

    # --- errors ---------------------------------------------------------------------

    def error(self, reason: str, *, key: str | None = None, line: int | None = None) -> ConfigError:
        """A ConfigError at this node (or at one of its keys, for missing/unknown keys)."""
        path = self.path if key is None else self.child_path(key)
        return ConfigError(self._doc.file, line or self.line, path, reason)

    def collect(self, build: Callable[[], T], fallback: T) -> T:
        """``build()``, or ``fallback`` after recording its ConfigError for the file's list:
        one wrong key must not hide the next one (``check`` reports every error in one run)."""
        try:
            return build()
        except ConfigError as exc:
            self._doc.errors.append(exc)
            return fallback

    @property
    def errors(self) -> list[ConfigError]:
        """The errors collected in this node's file so far."""
        return self._doc.errors

    def child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def parse(self, parser: Callable[[str], T]) -> T:
        """Read this node as a string and hand it to a ``values`` parser."""
        return self.check(parser, self.text())

    def check(self, parser: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Call ``parser(*args)``, turning its InvalidValue into an error at this node."""
        try:
            return parser(*args, **kwargs)
        except InvalidValue as exc:
            raise self.error(str(exc)) from None

    # --- shapes ---------------------------------------------------------------------

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, ScalarNode) and self.node.tag == _NULL_TAG

    @property
    def is_scalar(self) -> bool:
        return isinstance(self.node, ScalarNode)

    def mapping(self, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, ConfigNode]:
        """The children of a mapping, refusing unknown and duplicate keys.

        An empty value (``tls:`` with nothing after it) reads as an empty mapping.
        """
        allowed = tuple(allowed)
        if self.is_null:
            children: dict[str, ConfigNode] = {}
        elif not isinstance(self.node, MappingNode):
            raise self.error(f"expected a mapping (key: value), got {_describe(self.node)}")
        else:
            children = self._mapping_children(allowed)
        for key in required:
            if key not in children:
                raise self.error("required key is missing", key=key)
        return children

    def _mapping_children(self, allowed: tuple[str, ...]) -> dict[str, ConfigNode]:
        assert isinstance(self.node, MappingNode)
        children: dict[str, ConfigNode] = {}
        for key_node, value_node in self._key_value_pairs(self.node, set()):
            key = str(key_node.value)
            key_line = key_node.start_mark.line + 1
            if key not in allowed:  # reported, skipped: the keys beside it are still read
                self._doc.errors.append(
                    self.error(f"unknown key{did_you_mean(key, allowed)}", key=key, line=key_line)
                )
                continue
            # Point at the value when it is on its own; at the key for blocks and nulls.
            plain_value = isinstance(value_node, ScalarNode) and value_node.tag != _NULL_TAG
            line = value_node.start_mark.line + 1 if plain_value else key_line
            children[key] = ConfigNode(value_node, self.child_path(key), self._doc, line)
        return children

    def _key_value_pairs(self, node: MappingNode, seen: set[int]) -> list[tuple[ScalarNode, Node]]:
        """The pairs of a mapping with YAML merge keys (``<<: *base``) applied: keys
        written here win over merged ones; a key written twice here is an error.
        (``yaml.SafeLoader.flatten_mapping`` would rewrite shared anchor nodes in place,
        which hides duplicates when the anchor is read again.)"""
        if id(node) in seen:
            raise self.error("a merge key (<<) refers to itself", line=node.start_mark.line + 1)
        seen = seen | {id(node)}
        own: dict[str, tuple[ScalarNode, Node]] = {}
        merged: dict[str, tuple[ScalarNode, Node]] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, MappingNode):
                        raise self.error("'<<' merges a mapping or a list of mappings", line=key_line)
                    for pair in self._key_value_pairs(source, seen):
                        merged.setdefault(str(pair[0].value), pair)
                continue
            if not isinstance(key_node, ScalarNode):
                raise self.error("keys must be plain words", line=key_line)
            key = str(key_node.value)
            if key in own:
                first = own[key][0].start_mark.line + 1
                raise self.error(f"duplicate key (first at line {first})", key=key, line=key_line)
            own[key] = (key_node, value_node)
        return list({**merged, **own}.values())

    def pairs(self) -> list[tuple[str, ConfigNode]]:
        """A mapping with free-form keys (``set_headers``), in file order."""
        if self.is_null:
            return []
        if not isinstance(self.node, MappingNode):
            raise self.error(f"expected a mapping (key: value), got {_describe(self.node)}")
        return [
            (str(key_node.value), ConfigNode(value_node, self.child_path(str(key_node.value)), self._doc))
            for key_node, value_node in self._key_value_pairs(self.node, set())
        ]

    def sequence(self) -> list[ConfigNode]:
        """The items of a list; an empty value reads as an empty list."""
        if self.is_null:
            return []
        if not isinstance(self.node, SequenceNode):
            raise self.error(f"expected a list, got {_describe(self.node)}")
        return [ConfigNode(item, self.child_path(i), self._doc) for i, item in enumerate(self.node.value)]

    def one_or_more(self) -> list[ConfigNode]:
        """A list, or a single scalar standing for a one-item list (``listen: "h:p"``)."""
        if self.is_scalar and not self.is_null:
            return [self]
        return self.sequence()

    # --- scalars --------------------------------------------------------------------

    def _expanded(self) -> str:
        assert isinstance(self.node, ScalarNode)
        raw = str(self.node.value)
        if self.node.tag != _STR_TAG or "$" not in raw:
            return raw
        return self.check(expand_env, raw, self._doc.environ)

    def text(self) -> str:
        """A string value as written (numbers too: ``cn: 12345`` is the text "12345")."""
        if not isinstance(self.node, ScalarNode) or self.is_null:
            raise self.error(f"expected a string, got {_describe(self.node)}")
        return self._expanded()

    def value(self) -> object:
        """A typed scalar (int, float, bool, str, None) as YAML reads it.

        A value that came from ``${VAR}`` is typed after expansion, so
        ``workers: ${WORKERS:-2}`` is the number 2.
        """
        if not isinstance(self.node, ScalarNode):
            raise self.error(f"expected a single value, got {_describe(self.node)}")
        node = self.node
        if node.tag == _STR_TAG and "$" in str(node.value):
            text = self._expanded()
            tag = self._doc.loader.resolve(ScalarNode, text, (True, False))
            node = ScalarNode(tag, text, node.start_mark, node.end_mark)
        try:
            return self._doc.loader.construct_object(node)
        except yaml.YAMLError:
            raise self.error(f"cannot read {_describe(node)} (unsupported YAML tag {node.tag})") from None

    def boolean(self) -> bool:
        value = self.value()
        if not isinstance(value, bool):
            raise self.error(f"'{self.node.value}' is not true or false")
        return value

    def optional_text(self) -> str | None:
        """A string, or None for an explicit ``null`` / empty value."""
        return None if self.is_null else self.text()
