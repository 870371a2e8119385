"""Bearer tokens with roles, read from `EGLO_API_TOKENS_FILE`.

The file has one token per line, `name role token` separated by white space; a line starting
with `#` is a comment. Roles are ordered: `reader` < `submitter` < `operator`; a route asks for
the least role it needs. A presented token is compared with every known one in constant time
(hmac, over SHA-256 digests), so timing tells nothing about which one matched. Tokens are never
logged: only the name is kept.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, get_args

Role = Literal["reader", "submitter", "operator"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
_RANK: Final = {role: rank for rank, role in enumerate(ROLES)}
MIN_TOKEN_CHARS: Final = 16


class TokenFileError(ValueError):
    """The tokens file is unreadable or has a bad line (the message never contains a token)."""


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role

    def may(self, needed: Role) -> bool:
        return _RANK[self.role] >= _RANK[needed]


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest's time independent of token lengths.
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    def __init__(self, entries: list[tuple[str, Role, str]]) -> None:
        self._entries = [
            _Entry(_digest(token), Principal(name, role)) for name, role, token in entries
        ]
        self.tokens: tuple[str, ...] = tuple(token for _, _, token in entries)

    @classmethod
    def parse(cls, text: str) -> TokenTable:
        entries: list[tuple[str, Role, str]] = []
        names: set[str] = set()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):  # only whole-line comments: a token may hold #
                continue
            parts = line.split()
            if len(parts) != 3:
                raise TokenFileError(f"line {number}: expected `name role token`")
            name, role, token = parts
            if role not in ROLES:
                raise TokenFileError(f"line {number}: role {role!r} is not one of {ROLES}")
            if len(token) < MIN_TOKEN_CHARS:
                raise TokenFileError(f"line {number}: token shorter than {MIN_TOKEN_CHARS}")
            if name in names:
                raise TokenFileError(f"line {number}: name {name!r} appears twice")
            names.add(name)
            entries.append((name, role, token))
        return cls(entries)

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(f"cannot read {path}: {exc.strerror}") from None
        return cls.parse(text)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Principal | None:
        """The token's principal, or None; every entry is compared, matched or not."""
        presented = _digest(token)
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, presented):
                found = entry.principal
        return found
