"""The query language of every list endpoint: ``q`` filter expressions and ``sort`` specs.

This module only parses; ``yun.control.db.query`` turns the result into SQL. Grammar::

    query      := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := unary ("and" unary)*
    unary      := "not"* primary
    primary    := "(" or_expr ")" | tag | comparison
    comparison := FIELD OP VALUE
                | FIELD ["not"] "in" "(" VALUE ("," VALUE)* ")"
                | FIELD ["not"] "like" VALUE
    tag        := "tag:" KEY [("=" | "==" | "eq" | "!=" | "ne") VALUE
                              | ["not"] "in" "(" VALUE ("," VALUE)* ")" | ["not"] "like" VALUE]
    OP         := "=" | "==" | "!=" | "<" | "<=" | ">" | ">=" | eq | ne | lt | le | gt | ge

Keywords are case-insensitive. VALUE is a bare word (letters, digits and ``.-_:%+@/``, but
not a keyword) or a string in single or double quotes, where a backslash takes the next
character literally.
Every error is a :class:`QueryError` whose message names the problem and its 0-based position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias

from yun.proto.errors import BadRequest

MAX_QUERY_LENGTH = 4096
MAX_COMPARISONS = 50
MAX_DEPTH = 20
MAX_IN_VALUES = 100
MAX_TAG_KEY_LENGTH = 64
MAX_SORT_LENGTH = 1024
MAX_SORT_KEYS = 16

_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TAG_KEY_RE = re.compile(r"[A-Za-z0-9._\-/:]+\Z")
_WORD_PUNCTUATION = frozenset(".-_:%+@/")
_SYMBOL_OPS = {"==": "eq", "=": "eq", "!=": "ne", "<=": "le", ">=": "ge", "<": "lt", ">": "gt"}
_WORD_OPS = {"eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge"}
_TAG_OPS = frozenset({"eq", "ne"})
_KEYWORDS = frozenset({"and", "or", "not", "in", "like"})


class QueryError(BadRequest):
    """A ``q``, ``sort`` or ``cursor`` parameter that cannot be understood (HTTP 400).

    ``position`` is the 0-based character offset of the problem in the parameter and ``token``
    the text found there (None at the end of the text or when no single token is to blame).
    """

    def __init__(
        self, detail: str, *, position: int = 0, token: str | None = None,
        parameter: str = "q",
    ) -> None:
        super().__init__(
            detail, errors=[{"parameter": parameter, "position": position, "token": token}]
        )
        self.position = position
        self.token = token
        self.parameter = parameter


@dataclass(frozen=True)
class Comparison:
    """``field op value``; ``value`` is a tuple for ``in``/``not_in``. Values stay strings:
    the SQL layer converts them to the field's type."""

    field: str
    op: str  # eq ne lt le gt ge in not_in like not_like
    value: str | tuple[str, ...]
    position: int


@dataclass(frozen=True)
class TagMatch:
    """``tag:key`` (``op`` None: the tag exists) or ``tag:key op value``."""

    key: str
    op: str | None  # None, eq ne in not_in like not_like
    value: str | tuple[str, ...] | None
    position: int


@dataclass(frozen=True)
class And:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Not:
    item: Expr


Expr: TypeAlias = Comparison | TagMatch | And | Or | Not


@dataclass(frozen=True)
class SortKey:
    """One key of a sort spec: an API field name and its direction."""

    field: str
    descending: bool = False


# Token kinds.
_WORD = "word"
_STRING = "string"
_OP = "op"
_LPAREN = "("
_RPAREN = ")"
_COMMA = ","
_END = "end"


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str  # as written (quotes included for strings)
    value: str  # the unescaped value for strings, else == text
    position: int

    def shown(self) -> str:
        return "end of query" if self.kind == _END else repr(self.text)


def _describe_char(ch: str) -> str:
    if ch.isprintable():
        return repr(ch)
    return f"control character U+{ord(ch):04X}"


def _is_word_char(ch: str) -> bool:
    return ch in _WORD_PUNCTUATION or (ch.isalnum() and ch.isprintable())


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
        elif ch in "(),":
            tokens.append(_Token(ch, ch, ch, i))
            i += 1
        elif ch in "=!<>":
            two = text[i:i + 2]
            if two in _SYMBOL_OPS:
                tokens.append(_Token(_OP, two, two, i))
                i += 2
            elif ch in _SYMBOL_OPS:
                tokens.append(_Token(_OP, ch, ch, i))
                i += 1
            else:
                raise QueryError(
                    f"q: unexpected '!' at position {i} (did you mean '!='?)",
                    position=i, token=ch,
                )
        elif ch in "'\"":
            tokens.append(_read_string(text, i))
            i += len(tokens[-1].text)
        elif _is_word_char(ch):
            start = i
            while i < n and _is_word_char(text[i]):
                i += 1
            word = text[start:i]
            tokens.append(_Token(_WORD, word, word, start))
        else:
            raise QueryError(
                f"q: unexpected {_describe_char(ch)} at position {i}", position=i, token=ch
            )
    tokens.append(_Token(_END, "", "", n))
    return tokens


def _read_string(text: str, start: int) -> _Token:
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if not ch.isprintable() and ch != " ":
            raise QueryError(
                f"q: {_describe_char(ch)} in a string at position {i}", position=i, token=ch
            )
        if ch == "\\":
            if i + 1 >= len(text):
                break
            nxt = text[i + 1]
            if not nxt.isprintable() and nxt != " ":
                raise QueryError(
                    f"q: {_describe_char(nxt)} in a string at position {i + 1}",
                    position=i + 1, token=nxt,
                )
            out.append(nxt)
            i += 2
            continue
        if ch == quote:
            return _Token(_STRING, text[start:i + 1], "".join(out), start)
        out.append(ch)
        i += 1
    raise QueryError(
        f"q: unterminated string opened at position {start}", position=start, token=quote
    )


class _Parser:
    """Recursive descent whose recursion is bounded by MAX_DEPTH parentheses."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.i = 0
        self.comparisons = 0
        self.depth = 0

    # -- token helpers -------------------------------------------------------------------
    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        if tok.kind != _END:
            self.i += 1
        return tok

    def at_keyword(self, word: str) -> bool:
        tok = self.peek()
        return tok.kind == _WORD and tok.text.lower() == word

    def at_keyword_after(self, offset: int, word: str) -> bool:
        tok = self.tokens[min(self.i + offset, len(self.tokens) - 1)]
        return tok.kind == _WORD and tok.text.lower() == word

    @staticmethod
    def fail(what: str, tok: _Token, hint: str = "") -> QueryError:
        found = "" if tok.kind == _END else f", found {tok.shown()}"
        return QueryError(
            f"q: {what} at position {tok.position}{found}{hint}",
            position=tok.position, token=None if tok.kind == _END else tok.text,
        )

    def count_comparison(self, position: int) -> None:
        self.comparisons += 1
        if self.comparisons > MAX_COMPARISONS:
            raise QueryError(
                f"q: more than {MAX_COMPARISONS} comparisons (the one at position {position} "
                "is one too many)", position=position,
            )

    # -- grammar -------------------------------------------------------------------------
    def parse(self) -> Expr:
        expr = self.or_expr()
        tok = self.peek()
        if tok.kind == _RPAREN:
            raise QueryError(
                f"q: unexpected ')' at position {tok.position}", position=tok.position, token=")"
            )
        if tok.kind != _END:
            raise self.fail("expected 'and', 'or' or the end of the query", tok)
        return expr

    def or_expr(self) -> Expr:
        items = [self.and_expr()]
        while self.at_keyword("or"):
            self.take()
            items.append(self.and_expr())
        return _flatten(Or, items)

    def and_expr(self) -> Expr:
        items = [self.unary()]
        while self.at_keyword("and"):
            self.take()
            items.append(self.unary())
        return _flatten(And, items)

    def unary(self) -> Expr:
        negate = False
        while self.at_keyword("not"):
            self.take()
            negate = not negate  # `not not x` is x, also in SQL's three-valued logic
        item = self.primary()
        return Not(item) if negate else item

    def primary(self) -> Expr:
        tok = self.peek()
        if tok.kind == _LPAREN:
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise QueryError(
                    f"q: parentheses nested deeper than {MAX_DEPTH} at position {tok.position}",
                    position=tok.position, token="(",
                )
            expr = self.or_expr()
            close = self.peek()
            if close.kind != _RPAREN:
                if close.kind == _END:
                    raise QueryError(
                        f"q: unbalanced '(' opened at position {tok.position}",
                        position=tok.position, token="(",
                    )
                raise self.fail("expected 'and', 'or' or ')'", close)
            self.take()
            self.depth -= 1
            return expr
        if tok.kind == _WORD and tok.text[:4].lower() == "tag:":
            return self.tag()
        if tok.kind == _WORD and _FIELD_RE.match(tok.text) and tok.text.lower() not in _KEYWORDS:
            return self.comparison()
        if tok.kind == _RPAREN:
            raise QueryError(
                f"q: unexpected ')' at position {tok.position}", position=tok.position, token=")"
            )
        raise self.fail("expected a field name, 'tag:KEY', 'not' or '('", tok)

    def comparison(self) -> Comparison:
        field_tok = self.take()
        self.count_comparison(field_tok.position)
        op, value = self.operator_and_value(field_tok, for_tag=False)
        assert op is not None and value is not None
        return Comparison(field_tok.text, op, value, field_tok.position)

    def tag(self) -> TagMatch:
        tok = self.take()
        key = tok.text[4:]
        if not key:
            raise QueryError(
                f"q: expected a tag key after 'tag:' at position {tok.position}",
                position=tok.position, token=tok.text,
            )
        if len(key) > MAX_TAG_KEY_LENGTH or not _TAG_KEY_RE.match(key):
            raise QueryError(
                f"q: invalid tag key {key!r} at position {tok.position} (at most "
                f"{MAX_TAG_KEY_LENGTH} letters, digits and . _ - / :)",
                position=tok.position, token=tok.text,
            )
        self.count_comparison(tok.position)
        nxt = self.peek()
        ends_term = nxt.kind in (_END, _RPAREN) or (
            nxt.kind == _WORD and nxt.text.lower() in ("and", "or")
        )
        if ends_term:
            return TagMatch(key, None, None, tok.position)
        op, value = self.operator_and_value(tok, for_tag=True)
        return TagMatch(key, op, value, tok.position)

    def operator_and_value(
        self, subject: _Token, *, for_tag: bool
    ) -> tuple[str, str | tuple[str, ...]]:
        tok = self.take()
        negated = False
        if tok.kind == _WORD and tok.text.lower() == "not":
            negated = True
            tok = self.take()
            if not (tok.kind == _WORD and tok.text.lower() in ("in", "like")):
                raise self.fail("expected 'in' or 'like' after 'not'", tok)
        word = tok.text.lower() if tok.kind == _WORD else ""
        if word == "in":
            values = self.value_list(tok)
            return ("not_in" if negated else "in"), values
        if word == "like":
            return ("not_like" if negated else "like"), self.value(tok)
        if tok.kind == _OP:
            op = _SYMBOL_OPS[tok.text]
        elif word in _WORD_OPS:
            op = _WORD_OPS[word]
        else:
            expected = (
                "expected '=', '!=', 'in', 'like', 'and', 'or' or ')'" if for_tag
                else "expected an operator (= != < <= > >= eq ne lt le gt ge in like)"
            )
            raise self.fail(f"{expected} after {subject.text!r}", tok)
        if for_tag and op not in _TAG_OPS:
            raise QueryError(
                f"q: operator {tok.text!r} at position {tok.position} is not supported for tags "
                "(use =, !=, in, like)", position=tok.position, token=tok.text,
            )
        return op, self.value(tok)

    def value(self, after: _Token) -> str:
        tok = self.take()
        if tok.kind == _STRING or (tok.kind == _WORD and tok.text.lower() not in _KEYWORDS):
            return tok.value
        hint = " (quote a keyword to use it as a value)" if tok.kind == _WORD else ""
        raise self.fail(f"expected a value after {after.text!r}", tok, hint)

    def value_list(self, after: _Token) -> tuple[str, ...]:
        open_tok = self.take()
        if open_tok.kind != _LPAREN:
            raise self.fail(f"expected '(' after {after.text!r}", open_tok)
        values = [self.value(open_tok)]
        while True:
            tok = self.take()
            if tok.kind == _RPAREN:
                return tuple(values)
            if tok.kind == _END:
                raise QueryError(
                    f"q: unbalanced '(' opened at position {open_tok.position}",
                    position=open_tok.position, token="(",
                )
            if tok.kind != _COMMA:
                raise self.fail("expected ',' or ')' in the value list", tok)
            if len(values) >= MAX_IN_VALUES:
                raise QueryError(
                    f"q: more than {MAX_IN_VALUES} values in the list opened at position "
                    f"{open_tok.position}", position=open_tok.position, token="(",
                )
            values.append(self.value(tok))


def _flatten(cls: type[And] | type[Or], items: list[Expr]) -> Expr:
    if len(items) == 1:
        return items[0]
    flat: list[Expr] = []
    for item in items:
        # (a and b) and c is a and b and c: keeps trees shallow for the SQL compiler.
        if isinstance(item, cls):
            flat.extend(item.items)
        else:
            flat.append(item)
    return cls(tuple(flat))


def parse_query(text: str) -> Expr | None:
    """Parse a ``q`` filter expression; None when ``text`` is empty or only whitespace.

    Raises :class:`QueryError` (and nothing else) for any text that is not a valid query.
    """
    if not isinstance(text, str):
        raise QueryError("q: must be a string")
    if len(text) > MAX_QUERY_LENGTH:
        raise QueryError(
            f"q: longer than {MAX_QUERY_LENGTH} characters ({len(text)})",
            position=MAX_QUERY_LENGTH,
        )
    tokens = _tokenize(text)
    if tokens[0].kind == _END:
        return None
    return _Parser(tokens).parse()


def parse_sort(text: str) -> tuple[SortKey, ...]:
    """Parse a ``sort`` spec: comma-separated field names, ``-`` before one sorts it descending.

    ``""`` gives ``()``. Raises :class:`QueryError` naming ``sort`` for anything else invalid,
    including a field named twice.
    """
    if not isinstance(text, str):
        raise QueryError("sort: must be a string", parameter="sort")
    if len(text) > MAX_SORT_LENGTH:
        raise QueryError(
            f"sort: longer than {MAX_SORT_LENGTH} characters ({len(text)})",
            position=MAX_SORT_LENGTH, parameter="sort",
        )
    if not text.strip():
        return ()
    keys: list[SortKey] = []
    seen: set[str] = set()
    position = 0
    for part in text.split(","):
        lead = len(part) - len(part.lstrip())
        item = part.strip()
        at = position + lead
        descending = item.startswith("-")
        name = item[1:] if item[:1] in ("-", "+") else item
        if not name:
            raise QueryError(
                f"sort: expected a field name at position {at}",
                position=at, token=item or None, parameter="sort",
            )
        if not _FIELD_RE.match(name):
            raise QueryError(
                f"sort: invalid field name {name!r} at position {at}",
                position=at, token=item, parameter="sort",
            )
        if name in seen:
            raise QueryError(
                f"sort: field {name!r} named twice (at position {at})",
                position=at, token=item, parameter="sort",
            )
        if len(keys) >= MAX_SORT_KEYS:
            raise QueryError(
                f"sort: more than {MAX_SORT_KEYS} fields", position=at, token=item,
                parameter="sort",
            )
        seen.add(name)
        keys.append(SortKey(name, descending))
        position += len(part) + 1
    return tuple(keys)
