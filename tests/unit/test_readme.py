"""README.md stays in step with the code it documents."""

from __future__ import annotations

from pathlib import Path

from codetainer.settings import describe

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    for var, default, doc in describe():
        rows = [ln for ln in readme.splitlines() if ln.startswith(f"| `{var}` |")]
        assert rows, f"{var} missing from README's settings table"
        assert rows[0].endswith(f"| {doc} |"), f"{var}: README's description differs from the code's"
        if var != "CODETAINER_ROOT":
            assert f"| `{default}` |" in rows[0], f"{var}: README default differs from code"


def test_readme_gives_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./dev sandbox" in readme and "./dev test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev test" in ci
