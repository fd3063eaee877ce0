"""The site's reference tables, generated from the code when the site is built, so that they cannot drift.

mkdocs loads this file (``hooks:`` in mkdocs.yml). A page holds a line ``<!-- reference: NAME -->`` and the
hook replaces it with the table NAME: ``settings`` (inference/config.py), ``routes`` (the production app's
URL map, roles from its route table, summaries from ``/openapi.json``), ``inference-commands`` (the handler
registry: every command, its route and parameters), ``commands`` (every command line's ``--help``), ``metrics``
(every Prometheus metric of ``/metrics``) and ``audit-events`` (inference.audit.EVENTS). Building fails when a
setting, route, metric or command has no description.
The tables are made by this file run in a child process, which prints them as JSON: building the
app configures logging and imports the models' code, and neither belongs in the process mkdocs runs in.
tests/test_docs.py calls the row functions below directly.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from functools import partial
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- reference: ([a-z-]+) -->$", re.MULTILINE)
#: The tables a page can ask for.
TABLES = ("settings", "routes", "inference-commands", "commands", "metrics", "audit-events")

#: Every command line, as typed, and where its ``main(argv)`` is (a path for the test tool's script).
COMMANDS: list[tuple[str, str]] = [
    ("python mock_server.py", "mock_server:main"),
    ("python dicom_node.py", "dicom_node:main"),
    ("python -m inference.users", "inference.users.__main__:main"),
    ("python -m inference.audit", "inference.audit.__main__:main"),
    ("python -m inference.storage", "inference.storage.__main__:main"),
    ("python -m inference.dicom.volume_io", "inference.dicom.volume_io:main"),
    ("python -m handlers.hippocampus", "handlers.hippocampus.cli:main"),
    ("python -m models.registry", "models.registry:main"),
    ("python -m models.evaluate", "models.evaluate:main"),
    ("python -m models.calibrate", "models.calibrate:main"),
    ("python -m models.train_hippocampus", "models.train_hippocampus:main"),
    ("python -m models.distil_hippocampus", "models.distil_hippocampus:main"),
    ("python -m models.flag_quality", "models.flag_quality:main"),
    ("send-inference-request.sh", "inference-test-tool/send_inference_request.py:main"),
    ("python -m bench.run", "bench.run:main"),
    ("python -m bench.soak", "bench.soak:main"),
    ("python -m bench.blur", "bench.blur:main"),
    ("python -m bench.dicom_header", "bench.dicom_header:main"),
    ("python -m bench.job_backend", "bench.job_backend:main"),
    ("python -m bench.keepalive", "bench.keepalive:main"),
    ("python -m bench.model_versions", "bench.model_versions:main"),
    ("python -m bench.pacs", "bench.pacs:main"),
    ("python -m bench.pacs_reopen", "bench.pacs_reopen:main"),
    ("python -m bench.review", "bench.review:main"),
    ("python -m bench.audit_users", "bench.audit_users:main"),
    ("python -m bench.model_memory", "bench.model_memory:main"),
    ("python -m bench.capacity", "bench.capacity:main"),
]


# -- settings -------------------------------------------------------------------------------------------
def setting_comments(source: str | None = None) -> dict[str, str]:
    """Field name -> the ``#:`` comment above it in ``Settings`` (``source``, else inference/config.py), without
    the leading ``VARIABLE:``."""
    if source is None:
        source = (PROJECT_ROOT / "inference" / "config.py").read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    settings = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Settings")
    out = {}
    for node in settings.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment: list[str] = []
            index = node.lineno - 2
            while index >= 0 and lines[index].strip().startswith("#:"):
                comment.insert(0, lines[index].strip()[2:].strip())
                index -= 1
            text = " ".join(comment)
            out[node.target.id] = re.sub(r"^[A-Z_]+:\s*", "", text)
    return out


def _human(value: int) -> str:
    for unit, size in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return str(value)


def show_default(variable: str, value: Any) -> str:
    """A setting's default as a reader types it: paths relative to the repository, sizes in binary units."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if isinstance(value, tuple):
        return ", ".join(f"`{item}`" for item in value) if value else "none"
    if isinstance(value, Path):
        try:
            return f"`{value.relative_to(PROJECT_ROOT).as_posix()}`"
        except ValueError:
            return f"`{value}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and value >= 1024**2:
        human = _human(value)
        return f"`{value}` ({human}B)" if "BYTES" in variable and human != str(value) else f"`{value}` ({human})"
    return f"`{value}`"


def command_line_flags() -> dict[str, list[str]]:
    """Variable -> the DICOM node's flags that set it (its ``--help`` names the variable of each)."""
    out: dict[str, list[str]] = {}
    for parser in parsers_of("dicom_node:main"):
        for action in parser._actions:  # argparse keeps its actions only here
            for variable in re.findall(r"\b(INFERENCE_[A-Z_]+)\b", action.help or ""):
                out.setdefault(variable, []).extend(action.option_strings)
    return out


def setting_rows(flags: dict[str, list[str]] | None = None) -> list[dict[str, str]]:
    """One row per setting: variable, default, meaning (and the command-line flags that set it, if any)."""
    from inference.config import Settings

    comments = setting_comments()
    rows = []
    for f in fields(Settings):
        variable = f.metadata["env"]
        default = f.default if f.default is not MISSING else None
        meaning = comments.get(f.name, "")
        if f.metadata.get("secret") and meaning:
            meaning += " Masked (``***``) in the start-up log."
        rows.append({"variable": variable, "default": show_default(variable, default), "meaning": meaning,
                     "flags": ", ".join(f"`{flag}`" for flag in (flags or {}).get(variable, []))})
    return rows


# -- routes and metrics: read from the production app ------------------------------------------------
def build_app(state: Path):
    """The production app as ``make serve`` builds it, without loading the models, its stores in the folder ``state``,
    ``INFERENCE_RADIOMICS_NETWORKS`` set so that the routes open to those networks show."""
    from inference.config import Settings

    overrides = {"INFERENCE_OUTPUT_ROOT": state / "jobs", "INFERENCE_PACS_ROOT": state / "pacs",
                 "INFERENCE_MODEL_CACHE": state / "model-cache", "INFERENCE_RADIOMICS_NETWORKS": "192.0.2.0/24",
                 "INFERENCE_API_TOKEN": "", "INFERENCE_JOB_BACKEND": "local"}
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update({name: str(value) for name, value in overrides.items()})
    try:
        settings = Settings.from_env()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    import server

    return server.create_app(settings=settings, load_models=False)


def _path_key(path: str) -> str:
    """A route's path as both Flask and OpenAPI spell it: parameters as ``{}``, any case, no trailing slash."""
    return re.sub(r"<[^<>]+>|\{[^{}]+\}", "{}", path).rstrip("/").lower() or "/"


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n\n")[0].replace("\n", " ").strip()


#: A route accepting all of these answers the ones it does not serve itself (the Radiomics API's 403).
EVERY_METHOD = {"GET", "POST", "PUT", "PATCH", "DELETE"}


def route_rows(app) -> list[dict[str, str]]:
    """One row per route: its methods, the role it needs, a summary (``/openapi.json``'s, else the view's
    docstring; a model's own route: its command and the handler's description)."""
    from inference.http.roles import PUBLIC, role_of, token_free_networks_of

    operations: dict[str, dict[str, Any]] = {}
    for path, methods in app.test_client().get("/openapi.json").get_json()["paths"].items():
        operations.setdefault(_path_key(path), {}).update(methods)
    rows = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule.lower(), r.endpoint)):
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        role = role_of(view)  # the role the view declares (inference.http.roles); undeclared: admin
        if role == PUBLIC:
            role = "none (open)"
        elif token_free_networks_of(view):
            role += ", or none from `INFERENCE_RADIOMICS_NETWORKS`"
        methods = sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})
        described = operations.get(_path_key(rule.rule), {})
        summaries = [described[m.lower()]["summary"] for m in methods if described.get(m.lower(), {}).get("summary")]
        if EVERY_METHOD <= set(methods) and summaries:
            methods = [m for m in methods if described.get(m.lower(), {}).get("summary")]
            summaries[-1] += " (any other method: 403)"
        if isinstance(view, partial) and len(view.args) == 2 and view.args[1] is not None:
            command = view.args[1]
            summaries = [f"`{command}`: {_first_line(app.pipeline.spec(command).description)}"]
        elif not summaries:
            summaries = [_first_line((view.func if isinstance(view, partial) else view).__doc__)]
        rows.append({"path": rule.rule, "methods": ", ".join(methods), "role": role,
                     "summary": " / ".join(dict.fromkeys(summaries))})
    return rows


def metric_rows(app) -> list[dict[str, str]]:
    """One row per metric ``/metrics`` serves (names starting ``inference_``): name, type, labels, help."""
    from prometheus_client import metrics as prometheus_metrics

    from inference import metrics

    found: dict[str, dict[str, str]] = {}
    wrappers = [value for value in vars(metrics).values() if isinstance(value, prometheus_metrics.MetricWrapperBase)]
    wrappers += list(metrics.WATCHED.values())
    for wrapper in wrappers:
        (family,) = wrapper.describe()
        name = family.name + ("_total" if family.type == "counter" else "")
        # prometheus-client keeps label names on this attribute only (its wrappers and its metric families alike)
        found[name] = {"name": name, "type": family.type, "labels": ", ".join(wrapper._labelnames),
                       "help": family.documentation}
    for collector in app.metrics_collectors:
        for family in collector.collect():
            found[family.name] = {"name": family.name, "type": family.type,
                                  "labels": ", ".join(getattr(family, "_labelnames", ())),
                                  "help": family.documentation}
    return [found[name] for name in sorted(found) if name.startswith("inference_")]


def inference_command_rows() -> list[dict[str, str]]:
    """One row per inference command (mocks included): its route, what it returns and its parameters."""
    from handlers import load_handlers

    rows = []
    for spec in sorted(load_handlers(), key=lambda spec: spec.mock):  # the real handlers first
        described = spec.describe()
        parameters = "; ".join(f"`{p['name']}` ({p['allowed']}, default `{json.dumps(p['default'])}`): "
                               f"{p['description']}" for p in described["parameters"])
        rows.append({"command": described["inference_command"], "route": described["route"],
                     "mock": "yes" if described["mock"] else "", "description": _first_line(described["description"]),
                     "parameters": parameters, "undescribed": ", ".join(p["name"] for p in described["parameters"]
                                                                         if not p["description"])})
    return rows


def audit_rows() -> list[dict[str, str]]:
    """One row per audit event kind: the kind and what it records."""
    from inference.audit import EVENTS

    return [{"event": event, "meaning": meaning} for event, meaning in EVENTS.items()]


# -- command lines --------------------------------------------------------------------------------------
def load_main(target: str) -> Callable[[Sequence[str]], Any]:
    """The ``main`` function ``module:attribute`` (or ``path/file.py:attribute``) names."""
    where, _, attribute = target.partition(":")
    if where.endswith(".py"):  # its folder is on the import path: pytest's settings, or generated()'s PYTHONPATH
        spec = importlib.util.spec_from_file_location(Path(where).stem, PROJECT_ROOT / where)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, attribute)


def parsers_of(target: str) -> list[argparse.ArgumentParser]:
    """The parser a command line builds, caught as it parses ``--help``, and its sub-commands' parsers."""
    caught: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = catch  # type: ignore[assignment,method-assign]
    try:
        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            load_main(target)(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    if not caught:
        raise RuntimeError(f"{target} built no argument parser")
    parser = caught[0]
    subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return [parser, *(sub for action in subcommands for sub in action.choices.values())]


def command_helps() -> list[dict[str, Any]]:
    """Per command line: how it is typed and the ``--help`` of it and of each of its sub-commands."""
    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal's width: the same text on every machine
    return [{"typed": typed, "helps": [parser.format_help() for parser in parsers_of(target)]}
            for typed, target in COMMANDS]


# -- markdown -------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    """Table-cell text: docstring-style ``code`` as Markdown code, pipes escaped, one line."""
    return re.sub(r"``([^`]+)``", r"`\1`", text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_all(state: Path) -> dict[str, str]:
    """Every reference table as Markdown, by marker name (the app's stores in the folder ``state``)."""
    app = build_app(state)
    settings = setting_rows(command_line_flags())
    routes, metric_list, handlers = route_rows(app), metric_rows(app), inference_command_rows()
    undescribed = ([row["variable"] for row in settings if not row["meaning"]]
                   + [row["command"] for row in handlers if not row["description"] or row["undescribed"]]
                   + [row["path"] for row in routes if not row["summary"]]
                   + [row["name"] for row in metric_list if not row["help"]])
    if undescribed:
        raise ValueError(f"no description in the code for {undescribed}: write one where it is defined")
    commands = []
    for command in command_helps():
        commands.append(f"## `{command['typed']}`\n")
        for text in command["helps"]:
            commands.append("```text\n" + text.rstrip() + "\n```\n")
    tables = {
        "settings": _table(["variable", "default", "meaning"],
                           [(f"`{r['variable']}`", r["default"],
                             r["meaning"] + (f" Flag of `python dicom_node.py`: {r['flags']}." if r["flags"] else ""))
                            for r in settings]),
        "routes": _table(["path", "method", "role", "summary"],
                         [(f"`{r['path']}`", r["methods"], r["role"], r["summary"]) for r in routes]),
        "inference-commands": _table(
            ["command", "route", "mock", "returns", "parameters"],
            [(f"`{r['command']}`", f"`{r['route']}`", r["mock"], r["description"], r["parameters"]) for r in handlers]),
        "metrics": _table(["metric", "type", "labels", "help"],
                          [(f"`{r['name']}`", r["type"], r["labels"], r["help"]) for r in metric_list]),
        "audit-events": _table(["event", "recorded when"],
                               [(f"`{r['event']}`", r["meaning"]) for r in audit_rows()]),
        "commands": "\n".join(commands),
    }
    assert set(tables) == set(TABLES)
    return tables


_generated: dict[str, str] = {}


def on_pre_build(config: Any) -> None:
    """mkdocs hook: every build reads the code again (``make docs`` rebuilds on each save)."""
    _generated.clear()


def generated() -> dict[str, str]:
    """The tables, made once per build by this file run as a program."""
    if not _generated:
        # run from the repository root (bench/ is importable there, as under pytest), with the test tool's folder
        # on the import path (its script imports its own modules, as pyproject.toml's pytest settings allow)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT / "inference-test-tool"),
                                                                          os.environ.get("PYTHONPATH")]))}
        code = f"import runpy; runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')"
        done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"docs/hooks.py could not generate the reference:\n{done.stderr}")
        _generated.update(json.loads(done.stdout))
    return _generated


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs hook: each ``<!-- reference: NAME -->`` line becomes the table NAME."""
    if not MARKER.search(markdown):
        return markdown
    tables = generated()

    def table(match: re.Match) -> str:
        if match.group(1) not in tables:
            raise ValueError(f"{page.file.src_path}: no reference table {match.group(1)!r}; known: {sorted(tables)}")
        return tables[match.group(1)]

    return MARKER.sub(table, markdown)


if __name__ == "__main__":  # run by generated(), from the repository root
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="docs-reference-") as folder:
        tables = render_all(Path(folder))  # anything printed meanwhile goes to the log, not into the JSON
    print(json.dumps(tables))
