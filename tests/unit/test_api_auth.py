"""The API's token table (no services needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.api.auth import Principal, TokenFileError, TokenTable

TEXT = """
# comment
ana reader   0123456789abcdef-reader
sam submitter 0123456789abcdef#submitter
olga operator 0123456789abcdef-operator
"""


def test_lookup_finds_each_token_and_only_whole_tokens() -> None:
    table = TokenTable.parse(TEXT)
    assert len(table) == 3
    assert table.lookup("0123456789abcdef-reader") == Principal("ana", "reader")
    # `#` inside a token is part of it, not a comment.
    assert table.lookup("0123456789abcdef#submitter") == Principal("sam", "submitter")
    assert table.lookup("0123456789abcdef") is None
    assert table.lookup("0123456789abcdef-operatorX") is None
    assert table.lookup("") is None


def test_roles_are_ordered() -> None:
    reader, submitter, operator = (
        Principal("a", "reader"),
        Principal("b", "submitter"),
        Principal("c", "operator"),
    )
    assert reader.may("reader") and not reader.may("submitter")
    assert submitter.may("reader") and submitter.may("submitter")
    assert not submitter.may("operator")
    assert operator.may("operator") and operator.may("reader")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ana reader", "expected `name role token`"),
        ("ana admin 0123456789abcdefgh", "role 'admin'"),
        ("ana reader short", "shorter than 16"),
        ("ana reader 0123456789abcdefgh\nana operator 0123456789abcdefXY", "appears twice"),
    ],
)
def test_bad_lines_are_refused_without_showing_the_token(text: str, message: str) -> None:
    with pytest.raises(TokenFileError, match=message) as caught:
        TokenTable.parse(text)
    assert "0123456789abcdef" not in str(caught.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read"):
        TokenTable.load(tmp_path / "missing")
