"""The README's Python example runs as written (the exact block under "## Python API")."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README's Python API section has no python block"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_python_api_snippet(), "README.md", "exec"), {"__name__": "__readme__"})
    printed = out.getvalue()
    assert "criterion q->g > q->q" in printed and re.search(r"M\(q->g\) recall@1 \d\.\d{3}", printed)
    assert (tmp_path / "runs" / "gallery" / "config.json").is_file()
    assert (tmp_path / "runs" / "query" / "config.json").is_file()
    assert (tmp_path / "runs" / "index").is_dir()


def test_every_public_name_resolves_and_survives_importing_its_module():
    import importlib

    import hvs

    for name in hvs.__all__:
        assert getattr(hvs, name) is not None, name
    importlib.import_module("hvs.train")
    importlib.import_module("hvs.evaluate")
    assert callable(hvs.train_model) and hvs.train_model.__name__ == "train"
    assert callable(hvs.evaluate_pair) and hvs.evaluate_pair.__name__ == "evaluate"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hvs.nope  # noqa: B018
