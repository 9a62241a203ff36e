"""The list query language: grammar, precedence, positions in errors, limits, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yun.proto.errors import BadRequest
from yun.proto.query import (
    And,
    Comparison,
    Not,
    Or,
    QueryError,
    SortKey,
    TagMatch,
    parse_query,
    parse_sort,
)


def C(field: str, op: str, value: str | tuple[str, ...], position: int) -> Comparison:
    return Comparison(field, op, value, position)


def error(text: str) -> QueryError:
    with pytest.raises(QueryError) as info:
        parse_query(text)
    return info.value


# -- grammar ---------------------------------------------------------------------------------

def test_empty_is_none() -> None:
    assert parse_query("") is None
    assert parse_query("  \t\n ") is None


@pytest.mark.parametrize(
    ("text", "op"),
    [("a=1", "eq"), ("a==1", "eq"), ("a!=1", "ne"), ("a<1", "lt"), ("a<=1", "le"),
     ("a>1", "gt"), ("a>=1", "ge"), ("a eq 1", "eq"), ("a ne 1", "ne"), ("a lt 1", "lt"),
     ("a le 1", "le"), ("a gt 1", "gt"), ("a GE 1", "ge"), ("a = 1", "eq"), ("a >=  1", "ge")],
)
def test_every_operator(text: str, op: str) -> None:
    assert parse_query(text) == C("a", op, "1", 0)


def test_word_operators_need_spaces() -> None:
    # `vcpusge2` is a single word, not a comparison.
    assert "expected an operator" in error("vcpusge2").detail
    assert parse_query("vcpus ge 2") == C("vcpus", "ge", "2", 0)


def test_in_and_like() -> None:
    assert parse_query("state in (running, stopped)") == C(
        "state", "in", ("running", "stopped"), 0)
    assert parse_query("state NOT IN ( a ,'b c' )") == C("state", "not_in", ("a", "b c"), 0)
    assert parse_query("state in (one)") == C("state", "in", ("one",), 0)
    assert parse_query("name like web%") == C("name", "like", "web%", 0)
    assert parse_query("name Not Like 'w_b%'") == C("name", "not_like", "w_b%", 0)


def test_examples_of_the_spec() -> None:
    assert parse_query("vcpus>=2 and state in (running,stopped) and tag:env=prod") == And((
        C("vcpus", "ge", "2", 0),
        C("state", "in", ("running", "stopped"), 13),
        TagMatch("env", "eq", "prod", 44),
    ))
    assert parse_query("(state=error or state=unknown) and not tag:sys:ha") == And((
        Or((C("state", "eq", "error", 1), C("state", "eq", "unknown", 16))),
        Not(TagMatch("sys:ha", None, None, 39)),
    ))
    assert parse_query("created_at>=2026-11-01T00:00:00Z") == C(
        "created_at", "ge", "2026-11-01T00:00:00Z", 0)


def test_and_binds_tighter_than_or() -> None:
    assert parse_query("a=1 or b=2 and c=3") == Or((
        C("a", "eq", "1", 0), And((C("b", "eq", "2", 7), C("c", "eq", "3", 15)))))
    assert parse_query("a=1 and b=2 or c=3") == Or((
        And((C("a", "eq", "1", 0), C("b", "eq", "2", 8))), C("c", "eq", "3", 15)))
    assert parse_query("a=1 and (b=2 or c=3)") == And((
        C("a", "eq", "1", 0), Or((C("b", "eq", "2", 9), C("c", "eq", "3", 16)))))


def test_keywords_are_case_insensitive_and_chains_flatten() -> None:
    assert parse_query("a=1 AND b=2 And (c=3 and d=4)") == And((
        C("a", "eq", "1", 0), C("b", "eq", "2", 8), C("c", "eq", "3", 17),
        C("d", "eq", "4", 25)))
    assert parse_query("a=1 OR b=2 or c=3") == Or((
        C("a", "eq", "1", 0), C("b", "eq", "2", 7), C("c", "eq", "3", 14)))


def test_not() -> None:
    assert parse_query("not a=1") == Not(C("a", "eq", "1", 4))
    assert parse_query("not not a=1") == C("a", "eq", "1", 8)
    assert parse_query("NOT (a=1 or b=2)") == Not(Or((C("a", "eq", "1", 5),
                                                      C("b", "eq", "2", 12))))
    assert parse_query("not a=1 and b=2") == And((Not(C("a", "eq", "1", 4)),
                                                  C("b", "eq", "2", 12)))


def test_values() -> None:
    assert parse_query("uuid=0b7f3c1e-8a4b-4e0a-9a51-3f5f0d8b2c11").value == (  # type: ignore[union-attr]
        "0b7f3c1e-8a4b-4e0a-9a51-3f5f0d8b2c11")
    assert parse_query("t>=2026-11-01T00:00:00+02:00") == C(
        "t", "ge", "2026-11-01T00:00:00+02:00", 0)
    assert parse_query("ip=fe80::1") == C("ip", "eq", "fe80::1", 0)
    assert parse_query("mail=a.b+c@example.org") == C("mail", "eq", "a.b+c@example.org", 0)
    assert parse_query("p=a/b/c") == C("p", "eq", "a/b/c", 0)
    assert parse_query("n>-5.5") == C("n", "gt", "-5.5", 0)
    assert parse_query("name='and'") == C("name", "eq", "and", 0)
    assert parse_query("name in ('or', 'Not')") == C("name", "in", ("or", "Not"), 0)
    assert "quote a keyword to use it as a value" in error("name=and").detail


def test_quoted_strings() -> None:
    assert parse_query("name='my vm'") == C("name", "eq", "my vm", 0)
    assert parse_query('name="a\\"b"') == C("name", "eq", 'a"b', 0)
    assert parse_query("name='it\\'s'") == C("name", "eq", "it's", 0)
    assert parse_query("name='back\\\\slash'") == C("name", "eq", "back\\slash", 0)
    assert parse_query("name=''") == C("name", "eq", "", 0)
    assert parse_query("name='(and) or, \"x\"'") == C("name", "eq", '(and) or, "x"', 0)
    assert parse_query("name='雲'") == C("name", "eq", "雲", 0)


def test_tags() -> None:
    assert parse_query("tag:env") == TagMatch("env", None, None, 0)
    assert parse_query("tag:sys:ha") == TagMatch("sys:ha", None, None, 0)
    assert parse_query("tag:env=prod") == TagMatch("env", "eq", "prod", 0)
    assert parse_query("tag:env == prod") == TagMatch("env", "eq", "prod", 0)
    assert parse_query("tag:env!=prod") == TagMatch("env", "ne", "prod", 0)
    assert parse_query("tag:env ne prod") == TagMatch("env", "ne", "prod", 0)
    assert parse_query("tag:env in (a,b)") == TagMatch("env", "in", ("a", "b"), 0)
    assert parse_query("tag:env not in (a)") == TagMatch("env", "not_in", ("a",), 0)
    assert parse_query("tag:env like 'p%'") == TagMatch("env", "like", "p%", 0)
    assert parse_query("tag:env not like p%") == TagMatch("env", "not_like", "p%", 0)
    assert parse_query("TAG:a.b_c-d/e:f='x y'") == TagMatch("a.b_c-d/e:f", "eq", "x y", 0)
    assert parse_query("(tag:a) and tag:b or tag:c") == Or((
        And((TagMatch("a", None, None, 1), TagMatch("b", None, None, 12))),
        TagMatch("c", None, None, 21)))
    assert parse_query("tag:" + "k" * 64) == TagMatch("k" * 64, None, None, 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tag:", "q: expected a tag key after 'tag:' at position 0"),
        ("a=1 and tag:" + "k" * 65, "q: invalid tag key"),
        ("tag:a%b", "q: invalid tag key 'a%b' at position 0"),
        ("tag:env<3", "q: operator '<' at position 7 is not supported for tags"),
        ("tag:env ge 3", "q: operator 'ge' at position 8 is not supported for tags"),
        ("tag:a tag:b", "at position 6, found 'tag:b'"),
    ],
)
def test_bad_tags(text: str, message: str) -> None:
    assert message in error(text).detail


# -- errors name the problem and the position ------------------------------------------------

@pytest.mark.parametrize(
    ("text", "message", "position", "token"),
    [
        ("(a=1 and b=2))", "q: unexpected ')' at position 13", 13, ")"),
        ("state=error) or (x=1", "q: unexpected ')' at position 11", 11, ")"),
        ("a=1 and (((b=2) or c=3", "q: unbalanced '(' opened at position 9", 9, "("),
        ("x in (a, b", "q: unbalanced '(' opened at position 5", 5, "("),
        ("vcpus>=", "q: expected a value after '>=' at position 7", 7, None),
        ("vcpus >= and x=1", "q: expected a value after '>=' at position 9, found 'and'", 9,
         "and"),
        ("a=1 b=2", "q: expected 'and', 'or' or the end of the query at position 4, found 'b'",
         4, "b"),
        ("a=1 and", "q: expected a field name, 'tag:KEY', 'not' or '(' at position 7", 7, None),
        ("a=1 or or b=2", "found 'or'", 7, "or"),
        ("=1", "q: expected a field name, 'tag:KEY', 'not' or '(' at position 0, found '='", 0,
         "="),
        ("9a=1", "at position 0, found '9a'", 0, "9a"),
        ("a", "q: expected an operator", 1, None),
        ("a ~ 1", "q: unexpected '~' at position 2", 2, "~"),
        ("a ! 1", "q: unexpected '!' at position 2", 2, "!"),
        ("name='abc", "q: unterminated string opened at position 5", 5, "'"),
        ("name='abc\\", "q: unterminated string opened at position 5", 5, "'"),
        ("a=1\x00", "q: unexpected control character U+0000 at position 3", 3, "\x00"),
        ("a='x\x07y'", "q: control character U+0007 in a string at position 4", 4, "\x07"),
        ("x not = 3", "q: expected 'in' or 'like' after 'not' at position 6", 6, "="),
        ("x in a", "q: expected '(' after 'in' at position 5, found 'a'", 5, "a"),
        ("x in ()", "q: expected a value after '(' at position 6", 6, ")"),
        ("x in (a,)", "q: expected a value after ',' at position 8", 8, ")"),
        ("x in (a b)", "q: expected ',' or ')' in the value list at position 8", 8, "b"),
        ("()", "q: unexpected ')' at position 1", 1, ")"),
        (")", "q: unexpected ')' at position 0", 0, ")"),
    ],
)
def test_error_positions(text: str, message: str, position: int, token: str | None) -> None:
    err = error(text)
    assert message in err.detail
    assert err.position == position
    assert err.token == token
    assert isinstance(err, BadRequest) and err.status == 400
    assert err.errors == [{"parameter": "q", "position": position, "token": token}]


# -- limits ----------------------------------------------------------------------------------

def test_length_limit() -> None:
    ok = "name='" + "x" * (4096 - 7) + "'"
    assert len(ok) == 4096
    assert parse_query(ok) is not None
    assert "longer than 4096 characters" in error(ok + " ").detail


def test_comparison_limit() -> None:
    fifty = " and ".join(f"f{i}=1" for i in range(50))
    assert isinstance(parse_query(fifty), And)
    err = error(fifty + " or tag:x")
    assert "more than 50 comparisons" in err.detail
    assert err.position == len(fifty) + 4


def test_depth_limit() -> None:
    assert parse_query("(" * 20 + "a=1" + ")" * 20) == C("a", "eq", "1", 20)
    err = error("(" * 21 + "a=1" + ")" * 21)
    assert err.detail == "q: parentheses nested deeper than 20 at position 20"
    assert "nested deeper" in error("(" * 4000).detail
    assert "longer than" in error("(" * 10_000).detail
    assert "nested deeper" in error("not (" * 800).detail


def test_in_list_limit() -> None:
    hundred = ",".join(str(i) for i in range(100))
    assert parse_query(f"x in ({hundred})") == C("x", "in", tuple(str(i) for i in range(100)), 0)
    err = error(f"x in ({hundred},100)")
    assert "more than 100 values in the list opened at position 5" in err.detail


# -- fuzzing: only QueryError ever escapes ---------------------------------------------------

NASTIES = [
    "'; drop table vms; --",
    "name='x'; drop table vms; --'",
    "name = 'x' or 1=1 --",
    "name=x' or '1'='1",
    "1=1",
    "name=\"\\\"",
    "((((((",
    "))))))",
    "(" * 10_000,
    ")" * 5000,
    "\x00",
    "name=\x00",
    "\x1b[31m",
    "a=1 and\u202e b=2",
    "a=\ud800",
    "tag:" + ":" * 65,
    "tag:=",
    "tag:k in (" + ",".join("v" * 3 for _ in range(200)) + ")",
    "a in (" * 100,
    "not " * 2000,
    "a like",
    "a not",
    "a not in",
    "'",
    '"',
    "\\",
    "a=1 ; a=2",
    "a=`ls`",
    "a=$(reboot)",
    "a=1 /* x */",
    "a=1 -- x",
    "a=%00",
    "𝓪=1",
    "a" * 5000,
]

ALPHABET = st.sampled_from(
    [*"abcxyz019 _-.:%+@/'\"\\(),=!<>~;*\t\n\x00\x7f雲",
     "and ", "or ", "not ", " in ", " like ", "tag:", "eq ", ">=", "!=", "( ", " )"]
)


@pytest.mark.parametrize("text", NASTIES)
def test_nasty_inputs_only_raise_query_error(text: str) -> None:
    try:
        parse_query(text)
    except QueryError as err:
        assert err.detail.startswith("q: ")
        assert isinstance(err.position, int)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(ALPHABET, max_size=60).map("".join)))
def test_fuzz_only_query_error(text: str) -> None:
    try:
        parse_query(text)
    except QueryError as err:
        assert err.detail.startswith("q: ")
        assert 0 <= err.position <= max(len(text), 4096)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=100))
def test_fuzz_sort_only_query_error(text: str) -> None:
    try:
        parse_sort(text)
    except QueryError as err:
        assert err.detail.startswith("sort: ")


# -- sort ------------------------------------------------------------------------------------

def test_parse_sort() -> None:
    assert parse_sort("") == ()
    assert parse_sort("   ") == ()
    assert parse_sort("name") == (SortKey("name", False),)
    assert parse_sort("-created_at,name") == (SortKey("created_at", True),
                                              SortKey("name", False))
    assert parse_sort(" -created_at , +name ") == (SortKey("created_at", True),
                                                   SortKey("name", False))


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("name,", "sort: expected a field name at position 5", 5),
        ("name,,x", "sort: expected a field name at position 5", 5),
        ("-", "sort: expected a field name at position 0", 0),
        ("name, 9x", "sort: invalid field name '9x' at position 6", 6),
        ("name desc", "sort: invalid field name 'name desc' at position 0", 0),
        ("a;drop", "sort: invalid field name", 0),
        ("a,-a", "sort: field 'a' named twice (at position 2)", 2),
        (",".join(f"f{i}" for i in range(17)), "sort: more than 16 fields", 54),
    ],
)
def test_sort_errors(text: str, message: str, position: int) -> None:
    with pytest.raises(QueryError) as info:
        parse_sort(text)
    assert message in info.value.detail
    assert info.value.position == position
    assert info.value.parameter == "sort"
