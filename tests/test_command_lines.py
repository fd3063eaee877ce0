"""Every command line of the project, as a person meets it: ``--help`` names the command as it is typed,
explains every option and shows an example; ``make serve`` stays on this machine unless told otherwise."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from inference.config import Settings

#: (how it is typed, how to load it, the example its --help must show)
ENTRY_POINTS = [
    ("python -m models.evaluate", "models.evaluate",
     "python -m models.evaluate --data ../shared/data/hippocampus --split test"),
    ("python -m models.train_hippocampus", "models.train_hippocampus",
     ("python -m models.train_hippocampus --data ../shared/data/hippocampus \\\n"
      "        --out models/hippocampus_unet.pt")),
    ("python -m handlers.hippocampus", "handlers.hippocampus.cli",
     "python -m handlers.hippocampus ../shared/data/studies/Study1"),
    ("python -m inference.dicom.volume_io", "inference.dicom.volume_io",
     "python -m inference.dicom.volume_io dicom-to-hdf5 -i DICOM_DIR"),
    ("python -m models.registry", "models.registry", "python -m models.registry verify"),
    ("python -m bench.run", "bench.run", "python -m bench.run --only small"),
    ("python -m bench.blur", "bench.blur", "python -m bench.blur --repeats 5"),
    ("python mock_server.py", "mock_server", "python mock_server.py -s3D"),
    ("send-inference-request.sh", "inference-test-tool/send_inference_request.py",
     "send-inference-request.sh -i ../shared/data/studies/Study1 -c get-hippocampus-volume"),
]


def load(target: str):
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location("tool_for_cli_test", PROJECT_ROOT / target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(target)


def parsers_of(module, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parser ``module.main`` builds (and its sub-command parsers), caught as it parses ``--help``."""
    caught: list[argparse.ArgumentParser] = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    try:
        module.main(["--help"])
    except SystemExit:
        pass  # the test tool turns argparse's exit into its return value; the others exit
    parser = caught[0]
    subparsers = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return [parser, *(sub for action in subparsers for sub in action.choices.values())]


@pytest.mark.parametrize("typed, target, example", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_help_names_the_command_explains_every_option_and_shows_an_example(typed, target, example, monkeypatch):
    parsers = parsers_of(load(target), monkeypatch)
    main = parsers[0]
    assert main.prog == typed
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"{parser.prog}: {action.option_strings or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, where
    assert main.formatter_class is argparse.RawDescriptionHelpFormatter  # examples keep their lines
    assert example in main.format_help()


@pytest.mark.parametrize("typed", ["python -m models.evaluate", "python -m inference.dicom.volume_io"])
def test_help_runs_as_typed(typed):
    """Two of them for real, as a process (the rest are checked in-process above)."""
    command = [sys.executable, *typed.split()[1:], "--help"]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {typed}")


def test_bench_help_needs_only_the_runtime_packages():
    """``make serve`` installs requirements.txt only; ``python -m bench.run --help`` must still answer."""
    code = ("import sys; sys.modules['psutil'] = None; sys.modules['scipy'] = None\n"
            "from bench import run\nrun.main(['--help'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m bench.run" in done.stdout


def test_the_bench_target_installs_the_bench_dependencies():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    bench_rule = next(line for line in makefile.splitlines() if line.startswith("bench:"))
    assert "$(VENV)/.dev" in bench_rule  # requirements-dev.txt: psutil, scipy
    dev = (PROJECT_ROOT / "requirements-dev.txt").read_text()
    assert "psutil" in dev and "scipy" in dev


def test_the_server_listens_on_this_machine_only_unless_told(monkeypatch):
    monkeypatch.delenv("INFERENCE_HOST", raising=False)
    assert Settings.from_env().host == "127.0.0.1"
    monkeypatch.setenv("INFERENCE_HOST", "0.0.0.0")
    assert Settings.from_env().host == "0.0.0.0"
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert "INFERENCE_HOST=0.0.0.0" in dockerfile  # the container must listen on its own interface
    docs_page = (PROJECT_ROOT / "docs" / "reference" / "settings.md").read_text()
    assert "<!-- reference: settings -->" in docs_page  # the table there is made from inference/config.py
    comment = "#: INFERENCE_HOST: address the server binds to; this machine only unless set"
    assert comment in (PROJECT_ROOT / "inference" / "config.py").read_text()


def test_gunicorn_binds_the_configured_host(monkeypatch):
    monkeypatch.delenv("INFERENCE_HOST", raising=False)
    config = {}
    code = (Path(PROJECT_ROOT) / "gunicorn.conf.py").read_text()
    monkeypatch.chdir(PROJECT_ROOT)
    import inference.config

    inference.config.get_settings.cache_clear()
    try:
        exec(compile(code, "gunicorn.conf.py", "exec"), config)
    finally:
        inference.config.get_settings.cache_clear()
    assert config["bind"].startswith("127.0.0.1:")


# -- the console scripts of pyproject.toml ---------------------------------------------------------
def console_scripts() -> dict[str, str]:
    import tomllib

    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def resolve(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def test_every_console_script_names_a_function_of_the_project():
    scripts = console_scripts()
    assert {"inference-mock-server", "inference-dicom-node", "inference-volume-io", "inference-model-registry",
            "inference-evaluate", "inference-train", "inference-hippocampus-batch"} <= set(scripts)
    for name, target in scripts.items():
        assert callable(resolve(target)), f"{name} = {target}"


@pytest.mark.parametrize("name", ["inference-evaluate", "inference-train"])
def test_model_console_scripts_exit_0_where_main_returns_its_figures(name, monkeypatch):
    """``main`` returns a dict of figures: given to ``sys.exit`` it would print it and exit 1."""
    target = console_scripts()[name]
    module = importlib.import_module({"inference-evaluate": "models.evaluate",
                                      "inference-train": "models.train_hippocampus"}[name])
    monkeypatch.setattr(module, "main", lambda argv=None: {"dice": 0.9})
    assert resolve(target)([]) == 0


def test_installed_console_script_answers_help():
    """The package is installed (pip install -e .): its scripts sit next to this Python."""
    script = Path(sys.executable).parent / "inference-volume-io"
    if not script.exists():
        pytest.skip(f"{script} is missing: install the project with pip install -e .")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "dicom-to-hdf5" in done.stdout
