"""The console answer pattern of ``yun.testing.console`` (used by the system tests)."""

from __future__ import annotations

from yun.testing.console import answer_pattern


def test_the_answer_matches_and_the_typed_line_does_not() -> None:
    pattern = answer_pattern("Yab12cd")
    typed = "~ # echo Yab12cd=$(cat /sys/block/vdb/size 2>&1|tr '\\n' ' ')\r\n"
    assert pattern.search(typed) is None
    found = pattern.search(typed + "Yab12cd=4194304 \r\n~ # ")
    assert found is not None and found.group(1) == "4194304 "


def test_an_empty_answer_and_another_tag() -> None:
    pattern = answer_pattern("Y000001")
    assert pattern.search("Y000002=x\n") is None
    found = pattern.search("boot\nY000001=\r\n")
    assert found is not None and found.group(1) == ""
    # The tag must start the line: output that merely contains it does not count.
    assert pattern.search("xY000001=y\n") is None
