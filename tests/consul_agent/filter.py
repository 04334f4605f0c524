"""Filter expressions: go-bexpr, the ``?filter=`` language of Consul's list endpoints.

The subset Consul's docs show: ``==``, ``!=``, ``in``, ``not in``, ``contains``, ``matches``,
``is empty``, ``and``, ``or``, ``not`` and parentheses, over selectors like ``Service.Meta.team``.
"""

from __future__ import annotations

import re
from typing import Any


class FilterError(ValueError):
    pass


_FILTER_TOKEN = re.compile(
    r"""\s*(?:
        (?P<lparen>\() | (?P<rparen>\)) | (?P<op>==|!=) |
        "(?P<dq>(?:[^"\\]|\\.)*)" | `(?P<bq>[^`]*)` |
        (?P<word>[A-Za-z0-9_\-.:/\[\]"]+)
    )""",
    re.VERBOSE,
)
_MISSING = object()


def _filter_tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _FILTER_TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise FilterError(f"1:{pos + 1}: invalid input {text[pos:].strip()[:1]!r}")
        kind = match.lastgroup or ""
        value = match.group(kind)
        if kind == "dq":
            value = bytes(value, "utf-8").decode("unicode_escape")
            kind = "str"
        elif kind == "bq":
            kind = "str"
        tokens.append((kind, value))
        pos = match.end()
    return tokens


class Filter:
    """A parsed filter expression: ``Filter(text).matches(item)``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _filter_tokens(text)
        self.pos = 0
        if not self.tokens:
            raise FilterError("1:1: no match found, expected: expression")
        self.tree = self._or()
        if self.pos != len(self.tokens):
            raise FilterError(f"1:1: unexpected {self.tokens[self.pos][1]!r}")

    def _peek(self, offset: int = 0) -> tuple[str, str] | None:
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def _word(self, offset: int = 0) -> str | None:
        token = self._peek(offset)
        return token[1].lower() if token and token[0] == "word" else None

    def _take(self) -> tuple[str, str]:
        token = self._peek()
        if token is None:
            raise FilterError("1:1: unexpected end of expression")
        self.pos += 1
        return token

    def _or(self) -> Any:
        node = self._and()
        while self._word() == "or":
            self.pos += 1
            node = ("or", node, self._and())
        return node

    def _and(self) -> Any:
        node = self._not()
        while self._word() == "and":
            self.pos += 1
            node = ("and", node, self._not())
        return node

    def _not(self) -> Any:
        if self._word() == "not":
            self.pos += 1
            return ("not", self._not())
        token = self._peek()
        if token and token[0] == "lparen":
            self.pos += 1
            node = self._or()
            if self._take()[0] != "rparen":
                raise FilterError("1:1: expected ')'")
            return node
        return self._match()

    def _value(self) -> str:
        kind, value = self._take()
        if kind not in ("str", "word"):
            raise FilterError(f"1:1: expected a value, got {value!r}")
        return value

    def _selector(self) -> list[str]:
        kind, value = self._take()
        if kind != "word" or not re.match(r"[A-Za-z_]", value):
            raise FilterError(f"1:1: invalid selector {value!r}")
        parts: list[str] = []
        for piece in re.finditer(r'\[\s*"([^"]*)"\s*\]|\[([^\]]*)\]|([^.\[]+)', value):
            parts.append(next(g for g in piece.groups() if g is not None))
        return parts

    def _match(self) -> Any:
        token = self._peek()
        if token is None:
            raise FilterError("1:1: unexpected end of expression")
        second = self._word(1)
        if token[0] == "str" or second in ("in", "not"):
            value = self._value()
            negate = False
            if self._word() == "not":
                self.pos += 1
                negate = True
            if self._word() != "in":
                raise FilterError(f'1:1: expected "in" after {value!r}')
            self.pos += 1
            return ("in", self._selector(), value, negate)
        selector = self._selector()
        kind, op = self._take()
        op = op.lower() if kind == "word" else op
        if kind == "op":
            return (op, selector, self._value())
        if op == "is":
            negate = self._word() == "not"
            if negate:
                self.pos += 1
            if self._word() != "empty":
                raise FilterError('1:1: expected "empty"')
            self.pos += 1
            return ("empty", selector, negate)
        negate = False
        if op == "not":
            negate = True
            op = self._take()[1].lower()
        if op in ("contains", "matches"):
            value = self._value()
            if op == "matches":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise FilterError(f"1:1: invalid regular expression: {exc}") from None
            return (op, selector, value, negate)
        raise FilterError(f"1:1: unexpected {op!r}")

    def matches(self, item: Any) -> bool:
        return self._eval(self.tree, item)

    def _eval(self, node: Any, item: Any) -> bool:
        op = node[0]
        if op == "or":
            return self._eval(node[1], item) or self._eval(node[2], item)
        if op == "and":
            return self._eval(node[1], item) and self._eval(node[2], item)
        if op == "not":
            return not self._eval(node[1], item)
        target = _select(item, node[1])
        if op in ("==", "!="):
            equal = _filter_equal(target, node[2])
            return equal if op == "==" else not equal
        if op == "empty":
            empty = target is _MISSING or target is None or (hasattr(target, "__len__") and len(target) == 0)
            return not empty if node[2] else empty
        if op == "in" or op == "contains":
            found = _filter_contains(target, node[2])
            return not found if node[3] else found
        if op == "matches":
            found = isinstance(target, str) and re.search(node[2], target) is not None
            return not found if node[3] else found
        raise FilterError(f"unknown operator {op}")


def _select(item: Any, path: list[str]) -> Any:
    current = item
    for part in path:
        if isinstance(current, list):
            current = [_select(x, [part]) for x in current]
            current = [x for x in current if x is not _MISSING]
            continue
        if not isinstance(current, dict):
            return _MISSING
        if part in current:
            current = current[part]
            continue
        lowered = {k.lower(): k for k in current}
        if part.lower() not in lowered:
            return _MISSING
        current = current[lowered[part.lower()]]
    return current


def _filter_equal(target: Any, value: str) -> bool:
    if target is _MISSING or target is None:
        return value == ""
    if isinstance(target, bool):
        return value.lower() == str(target).lower()
    if isinstance(target, int | float):
        try:
            return float(value) == float(target)
        except ValueError:
            return False
    if isinstance(target, str):
        return target == value
    return False


def _filter_contains(target: Any, value: str) -> bool:
    if isinstance(target, dict):
        return value in target
    if isinstance(target, list):
        return any(_filter_equal(x, value) for x in target)
    if isinstance(target, str):
        return value in target
    return False
