"""`dealstream user add` (SPEC §7): a user appended to the directory in dealstream.toml, the
operators' comments and layout kept, the file read back before it replaces the old one."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import main
from shared.settings import load_rules

CONFIG = """# our directory
[rules]
recycle_days = 45  # slower here

[[directory.teams]]
id = "xian"
manager = "wang"
timezone = "Asia/Shanghai"

[[directory.users]]
id = "wang"
team = "xian"
role = "manager"
"""


def run(config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        *args: str) -> tuple[int, str]:  # fmt: skip
    monkeypatch.setenv("DEALSTREAM_CONFIG_FILE", str(config))
    status = main(["user", "add", *args])
    out = capsys.readouterr()
    return status, (out.out + out.err).strip()


def test_users_are_added_to_the_directory_and_read_back_by_the_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "dealstream.toml"
    config.write_text(CONFIG, encoding="utf-8")
    status, said = run(config, monkeypatch, capsys, "li", "--team", "xian", "--email",
                       "li@example.cn", "--name", "李 \"小\" 伟", "--manager", "wang")  # fmt: skip
    assert (status, said) == (0, f"user li added to {config} (rep, team xian)")
    anna = ["anna", "--team", "berlin", "--role", "rep", "--manager", "karl", "--locale", "en",
            "--timezone", "Europe/Berlin"]  # fmt: skip
    status, said = run(config, monkeypatch, capsys, *anna)
    assert status == 0, said
    text = config.read_text(encoding="utf-8")
    assert text.startswith(CONFIG)  # comments and layout kept: appended, never rewritten
    rules = load_rules(config)
    assert rules.recycle_days == 45
    li, anna = rules.directory.user("li"), rules.directory.user("anna")
    assert li is not None and (li.team, li.role, li.email, li.name) == (
        "xian",
        "rep",
        "li@example.cn",
        '李 "小" 伟',
    )
    assert anna is not None and (anna.locale, anna.timezone) == ("en", "Europe/Berlin")
    berlin = rules.directory.team("berlin")
    assert berlin is not None and berlin.manager == "karl"  # a new team, with its manager
    assert [r.id for r in rules.directory.reps("xian")] == ["li"]


@pytest.mark.parametrize(("args", "why"), [
    (["wang", "--team", "xian"], "user wang is in the directory already"),
    (["zhao", "--team", "xian", "--manager", "sun"], "team xian is managed by wang"),
    (["zhao", "--manager", "sun"], "give the user's --team"),
    (["zhao", "--timezone", "Mars/Base"], "not an IANA time zone"),
    (["zhao zhao"], "id: String should match pattern"),
])  # fmt: skip
def test_a_user_the_directory_cannot_take_is_refused_and_the_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    args: list[str], why: str,
) -> None:  # fmt: skip
    config = tmp_path / "dealstream.toml"
    config.write_text(CONFIG, encoding="utf-8")
    status, said = run(config, monkeypatch, capsys, *args)
    assert status == 2 and why in said, said
    assert config.read_text(encoding="utf-8") == CONFIG


def test_a_file_whose_users_are_written_inline_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "dealstream.toml"
    inline = '[directory]\nusers = [{id = "wang", role = "manager"}]\n'
    config.write_text(inline, encoding="utf-8")
    status, said = run(config, monkeypatch, capsys, "li")
    assert status == 2 and "would not read back" in said, said
    assert config.read_text(encoding="utf-8") == inline
    nested = '[rules.directory]\nusers = [{id = "wang", role = "manager"}]\n'
    config.write_text(nested, encoding="utf-8")  # appending would hide wang: refused
    status, said = run(config, monkeypatch, capsys, "li")
    assert status == 2 and "add the user there by hand" in said, said
    assert config.read_text(encoding="utf-8") == nested
    missing = tmp_path / "new" / "dealstream.toml"  # no file yet: made with the user
    missing.parent.mkdir()
    assert run(missing, monkeypatch, capsys, "li")[0] == 0
    assert load_rules(missing).directory.user("li") is not None
