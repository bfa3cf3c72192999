"""The README documents what the code has."""

from pathlib import Path

from service.settings import Settings, markdown_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_the_configuration_table_is_the_settings_class():
    assert markdown_table() in README, "regenerate it with: python -m service.settings"
    for name in Settings.model_fields:
        assert f"`FER_{name.upper()}`" in README


def test_the_quick_start_is_make_serve_then_make_test():
    quick_start = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert quick_start.index("make serve") < quick_start.index("make test")
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "make test" in ci
