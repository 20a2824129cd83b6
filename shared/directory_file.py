"""`dealstream user add`: a user added to the directory in `dealstream.toml` (SPEC §4, §7).

The file is the operators' own, with their comments and layout: the user is appended as a
`[[directory.users]]` table (and its team as a `[[directory.teams]]` table when the file has
none of that id), never rewritten. The whole new file is read back and validated as the services
will read it before it replaces the old one, in one rename, so a service reloading its rules
never reads half of it and never an invalid one."""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.settings import Team, User, rules_of


class DirectoryError(ValueError):
    """Why the user could not be added; the file is unchanged."""


def add_user(path: Path, user: User, manager: str | None = None) -> str:
    """Append `user` (and its team, if new, managed by `manager`) to the directory in `path`;
    what was done, in a line."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    before = rules_of(tomllib.loads(text)).directory
    if before.user(user.id) is not None:
        raise DirectoryError(f"user {user.id} is in the directory already ({path})")
    blocks = [_table("directory.users", user.model_dump(exclude_defaults=True) | {"id": user.id})]
    team = before.team(user.team)
    if user.team is not None and team is None:
        blocks.append(_table("directory.teams", Team(id=user.team, manager=manager)
                             .model_dump(exclude_defaults=True) | {"id": user.team}))  # fmt: skip
    elif manager is not None and team is not None and team.manager != manager:
        raise DirectoryError(
            f"team {team.id} is managed by {team.manager or 'nobody'} in {path}, not {manager}:"
            " change its [[directory.teams]] entry there"
        )
    if manager is not None and user.team is None:
        raise DirectoryError("a manager is a team's: give the user's --team")
    new = text + ("\n" if text and not text.endswith("\n") else "") + "".join(blocks)
    try:
        after = rules_of(tomllib.loads(new))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:  # e.g. users written inline
        raise DirectoryError(f"{path} would not read back with the user in it: {exc}") from exc
    kept = all(after.directory.user(u.id) == u for u in before.users) and all(
        after.directory.team(t.id) == t for t in before.teams
    )
    if not kept or after.directory.user(user.id) is None:  # e.g. written under [rules.directory]
        raise DirectoryError(f"{path} keeps its directory where a user cannot be appended:"
                             " add the user there by hand")  # fmt: skip
    _replace(path, new)
    team_text = f"team {user.team}" if user.team else "no team"
    return f"user {user.id} added to {path} ({user.role}, {team_text})"


def _table(name: str, fields: dict[str, Any]) -> str:
    """A TOML array-of-tables entry; values are strings, written as JSON strings (valid TOML
    basic strings: the same escapes)."""
    lines = [f"\n[[{name}]]"]
    ordered = sorted(fields.items(), key=lambda item: item[0] != "id")  # the id first
    lines += [f"{key} = {json.dumps(str(value), ensure_ascii=False)}"
              for key, value in ordered if value is not None]  # fmt: skip
    return "\n".join(lines) + "\n"


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` in one rename (same directory, same permissions)."""
    path = path.resolve()
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
