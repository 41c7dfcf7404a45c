"""YAML from users' files (config, presets, training configs), read with PyYAML's safe loader.

Three changes to it: a key given twice in one mapping is an error (the safe loader keeps the last one
silently, so a setting the user wrote is ignored), and dates stay text (``2024-01-01`` would otherwise
be a ``datetime.date`` and show as its Python repr in an error), and a number too long for ``int()``
is a ``yaml.YAMLError`` like any other fault of the text.

PyYAML parses nested collections recursively, so text nested thousands deep (``[[[[...``) raises
RecursionError; it is reported here as a ``yaml.YAMLError``, which every caller already turns into
a one-line message.
"""

from __future__ import annotations

import yaml
from yaml.constructor import ConstructorError


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the safe loader reports it itself
                continue
            if duplicate:
                raise ConstructorError("while reading a mapping", node.start_mark,
                                       f"the key {key!r} is given twice", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than int() takes (4300)
            raise ConstructorError(None, None, f"a number of {len(node.value)} characters is too long",
                                   node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def fault(exc: yaml.YAMLError) -> str:
    """Where and what is wrong, for "<file> is not valid YAML<fault>": " at line 3 (the key 'a' is given twice)"."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or (str(exc).split("\n")[0] if not mark else "")  # a ReaderError's
    # second line says where in "<unicode string>"
    return (f" at line {mark.line + 1}" if mark is not None else "") + (f" ({problem})" if problem else "")


def load(text: str) -> object:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
