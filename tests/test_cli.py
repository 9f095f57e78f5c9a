"""The ``hvs`` command line as a package: errors, the one gallery-model flag, lazy commands."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from hvs import cli
from hvs.cli import COMMANDS, build_parser, main
from hvs.errors import HVSError, UsageError

CLI_DIR = Path(cli.__file__).parent


def _raising(exc: BaseException):
    def cmd(args):
        raise exc

    return cmd


@pytest.mark.parametrize(
    "exc",
    [
        HVSError("the model folder x has no config.json\nsecond line"),
        UsageError("expected KEY=VALUE, got 'width'"),
        FileNotFoundError(2, "No such file or directory", "x.png"),
    ],
)
def test_expected_errors_are_one_line(monkeypatch, capsys, exc):
    monkeypatch.setattr(cli, "cmd_models", _raising(exc))
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hvs models: error: ") and err.count("\n") == 1
    assert str(exc).splitlines()[0] in err


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), ValueError("a bug that is not an HVSError"), KeyError("a bug")])
def test_unexpected_errors_keep_their_traceback(monkeypatch, exc):
    monkeypatch.setattr(cli, "cmd_models", _raising(exc))
    with pytest.raises(type(exc)):
        main(["models"])


def test_a_malformed_key_value_is_a_usage_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--model-arg", "width"]) == 2
    assert "expected KEY=VALUE, got 'width'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unknown_model_is_a_one_line_error(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--out",
                str(tmp_path / "run"),
                "--model",
                "no-such-model",
                "--data",
                "synthetic:classes=3,train_per_class=4,test_per_class=2,size=8",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'; registered:" in err and err.count("\n") == 1


# Every command that takes the gallery model folder, with the arguments it needs besides it.
GALLERY_MODEL_COMMANDS = [
    ["train"],
    ["evaluate", "--query-model", "q"],
    ["index", "build", "--out", "i"],
    ["index", "add", "--index", "i", "--label", "x", "a.png"],
    ["export", "onnx", "--query-model", "q", "--out", "q.onnx"],
    ["nas", "train-supernet"],
    ["nas", "search"],
    ["nas", "export", "--supernet", "s", "--arch", "a.json", "--out", "o"],
]


@pytest.mark.parametrize("argv", GALLERY_MODEL_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_one_gallery_model_flag_with_a_hidden_alias(argv, capsys):
    cut = 2 if argv[0] in ("index", "export", "nas") else 1
    parser = build_parser(argv)
    for flag in ("--gallery-model", "--gallery"):  # the old spelling still works in scripts
        assert parser.parse_args([*argv, flag, "G"]).gallery_model == "G"
    with pytest.raises(SystemExit):
        parser.parse_args([*argv[:cut], "--help"])
    usage = capsys.readouterr().out
    assert "--gallery-model" in usage and "--gallery " not in usage and "--gallery\n" not in usage
    with pytest.raises(SystemExit):  # both spellings at once is an error, not a silent choice
        parser.parse_args([*argv, "--gallery-model", "G", "--gallery", "H"])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_registered_command_builds_its_parser(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0 and f"usage: hvs {name}" in capsys.readouterr().out


def test_help_imports_no_command_module():
    code = (
        "import sys\nfrom hvs.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('hvs') or m in ('torch', 'numpy')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(cli.__file__).parents[2]
    ).stdout
    *help_text, modules = out.strip().splitlines()
    assert modules == "['hvs', 'hvs.cli', 'hvs.cli._common', 'hvs.errors']"
    assert all(name in "\n".join(help_text) for name in COMMANDS)  # every command still listed


def test_command_modules_never_import_the_main_cli_module():
    """hvs.cli imports the command modules (lazily); they share hvs.cli._common, so no cycle."""
    siblings = {p.stem for p in CLI_DIR.glob("*.py")} - {"__init__"}
    for path in sorted(CLI_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {a.name for a in node.names}
                package = (
                    node.level == 1
                    and node.module is None
                    and names - siblings
                    or node.level == 0
                    and node.module == "hvs.cli"
                    or node.level == 2
                    and (node.module == "cli" or node.module is None and "cli" in names)
                )
                assert not package, f"{path.name} imports hvs.cli"
            elif isinstance(node, ast.Import):
                assert all(a.name != "hvs.cli" for a in node.names), f"{path.name} imports hvs.cli"


def test_python_dash_m_hvs_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "hvs", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(cli.__file__).parents[2],
    ).stdout
    assert out.startswith("usage: hvs")
