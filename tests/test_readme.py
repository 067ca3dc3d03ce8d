"""The README stays true: every config field documented, the two commands as CI runs them."""

from __future__ import annotations

from pathlib import Path

from node.config import CONFIG_FIELDS, config_reference_markdown

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_config_reference_is_current() -> None:
    start = README.index("<!-- config-reference")
    end = README.index("<!-- end config-reference -->")
    section = README[start:end]
    assert config_reference_markdown().strip() in section
    for spec in CONFIG_FIELDS:
        assert f"`{spec.name}`" in section


def test_readme_names_the_install_and_test_commands() -> None:
    assert "cpnode-supervisor --workers 2 --local-master" in README
    assert ".venv/bin/python -m pytest" in README
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "-m pytest" in ci
