"""The documentation's promises: the reference generated from the code (docs/hooks.py) covers every setting,
route, metric, audit event and command line and has a description for each, and the README is a short landing
page whose links lead into the site."""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import fields
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from inference.audit import EVENTS
from inference.config import Settings

spec = importlib.util.spec_from_file_location("docs_hooks", PROJECT_ROOT / "docs" / "hooks.py")
assert spec is not None and spec.loader is not None
hooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hooks)

#: Folders that hold no product code (test_layout.py's list, plus the site's own folder).
OUTSIDE = ("tests", "bench", "inference-test-tool", "docs", "site", ".venv", ".git")


def product_files() -> list[Path]:
    return [path for path in PROJECT_ROOT.rglob("*.py")
            if path.relative_to(PROJECT_ROOT).parts[0] not in OUTSIDE
            and not any(part.startswith(".") for part in path.relative_to(PROJECT_ROOT).parts)]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return hooks.build_app(tmp_path_factory.mktemp("docs-app"))


# -- settings -----------------------------------------------------------------------------------------------
def test_every_setting_is_in_the_reference_with_its_default_and_meaning():
    rows = {row["variable"]: row for row in hooks.setting_rows(hooks.command_line_flags())}
    assert list(rows) == [f.metadata["env"] for f in fields(Settings)]
    undescribed = [variable for variable, row in rows.items() if not row["meaning"]]
    assert not undescribed, f"write a #: comment above the field of {undescribed} in inference/config.py"
    assert rows["INFERENCE_HOST"]["default"] == "`127.0.0.1`" and rows["INFERENCE_PORT"]["default"] == "`8900`"
    assert rows["INFERENCE_OUTPUT_ROOT"]["default"] == "`output/jobs`"  # relative to the repository, no machine path
    assert rows["INFERENCE_MAX_REQUEST_BYTES"]["default"] == "`2147483648` (2 GiB)"
    assert "this machine only" in rows["INFERENCE_HOST"]["meaning"]
    assert rows["INFERENCE_PACS_AE_TITLE"]["flags"] == "`--ae-title`"  # the DICOM node's flag, from its --help
    assert "Masked" in rows["INFERENCE_API_TOKEN"]["meaning"]
    assert not any(str(PROJECT_ROOT) in value for row in rows.values() for value in row.values())


def test_a_setting_whose_comment_is_missing_has_no_meaning():
    """The check above finds an undescribed setting: the same file with one comment taken out."""
    source = (PROJECT_ROOT / "inference" / "config.py").read_text(encoding="utf-8")
    stripped = source.replace("    #: INFERENCE_PORT: TCP port.\n", "")
    assert stripped != source
    assert hooks.setting_comments(source)["port"] == "TCP port."
    assert hooks.setting_comments(stripped)["port"] == ""


# -- routes ---------------------------------------------------------------------------------------------------
def test_every_route_has_its_methods_role_and_summary(app):
    rows = {row["path"]: row for row in hooks.route_rows(app)}
    assert set(rows) == {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    undescribed = [path for path, row in rows.items() if not (row["summary"] and row["methods"] and row["role"])]
    assert not undescribed, f"give {undescribed} a summary in /openapi.json (inference/http/openapi.py) or a docstring"
    assert rows["/metrics"]["role"] == "admin" and rows["/audit"]["role"] == "admin"
    assert rows["/healthcheck"]["role"] == "none (open)" and rows["/healthcheck"]["methods"] == "GET, POST"
    assert rows["/reviews"]["role"] == "reviewer" and rows["/query/<uid>"]["role"] == "submitter"
    assert rows["/hippocampus"]["summary"].startswith("`get-hippocampus-volume`: ")
    segmentation = rows["/api/v2/Model/<model_id>/segmentation"]
    assert segmentation["methods"] == "POST" and "INFERENCE_RADIOMICS_NETWORKS" in segmentation["role"]
    assert rows["/job/<uid>/files"]["summary"]  # no OpenAPI entry: the view's docstring


# -- metrics --------------------------------------------------------------------------------------------------
def test_every_metric_served_is_in_the_reference_with_labels_and_help(app):
    rows = {row["name"]: row for row in hooks.metric_rows(app)}
    undescribed = [name for name, row in rows.items() if not row["help"]]
    assert not undescribed, f"give {undescribed} a help text where it is defined"
    scraped = app.test_client().get("/metrics").get_data(as_text=True)
    served = {name for name in re.findall(r"^# HELP (inference_\w+) ", scraped, re.MULTILINE)
              if not name.endswith("_created")}  # prometheus-client's creation time of a counter, outside gunicorn
    assert served and served <= set(rows), f"served but not in the reference: {served - set(rows)}"
    assert rows["inference_http_requests_total"]["labels"] == "route, command, status"
    assert rows["inference_review_decisions"]["labels"] == "family, version, decision"
    assert rows["inference_model_drift_psi"]["labels"] == "family, version, quantity"
    assert rows["inference_jobs"]["labels"] == "state" and rows["inference_job_store_up"]["labels"] == ""
    assert {f"inference_model_{name}" for name in ("intensity_mean", "uncertainty", "total_volume_mm3")} <= set(rows)


def test_every_inference_command_and_parameter_is_described():
    rows = {row["command"]: row for row in hooks.inference_command_rows()}
    assert {"get-hippocampus-volume", "gaussian-blur-3d", "get-probability-mask"} <= set(rows)
    undescribed = [command for command, row in rows.items() if not row["description"] or row["undescribed"]]
    assert not undescribed, f"describe {undescribed} (the handler's docstring, each Param's description)"
    blur = rows["gaussian-blur-3d"]
    assert blur["route"] == "/gaussian-blur" and "`sigma_mm`" in blur["parameters"]
    assert rows["get-probability-mask"]["mock"] == "yes" and rows["get-hippocampus-volume"]["mock"] == ""


# -- audit events ---------------------------------------------------------------------------------------------
EVENT = re.compile(r"^[a-z]+(?:-[a-z]+)+$")


def audit_events_in_code() -> dict[str, str]:
    """Event kinds the product's code appends: literal arguments of ``<...audit...>.append``, ``audit(...)``,
    ``audit_event(...)`` and the review routes' ``decided(...)``, with where each is."""
    found: dict[str, str] = {}
    for path in product_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            audited = (name in ("audit", "audit_event", "decided")
                       or (name == "append" and isinstance(func, ast.Attribute) and "audit" in ast.unparse(func.value)))
            if audited:
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and EVENT.match(arg.value):
                        found.setdefault(arg.value, f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    return found


def test_every_audit_event_the_code_records_is_described_and_none_is_dead():
    used = audit_events_in_code()
    assert {"study-received", "result-produced", "result-accepted", "user-created", "request-refused"} <= set(used)
    undescribed = {event: where for event, where in used.items() if event not in EVENTS}
    assert not undescribed, f"add these to inference.audit.EVENTS with what they record: {undescribed}"
    assert set(EVENTS) <= set(used), f"EVENTS names kinds no code records: {set(EVENTS) - set(used)}"
    assert all(meaning.strip() for meaning in EVENTS.values())
    assert [row["event"] for row in hooks.audit_rows()] == list(EVENTS)


# -- command lines --------------------------------------------------------------------------------------------
def test_every_argparse_program_is_in_the_reference():
    listed = {where.partition(":")[0] for _, where in hooks.COMMANDS}
    listed_files = {PROJECT_ROOT / name if name.endswith(".py") else
                    PROJECT_ROOT / (name.replace(".", "/") + ".py") for name in listed}
    programs = {path for path in PROJECT_ROOT.rglob("*.py")
                if path.relative_to(PROJECT_ROOT).parts[0] not in ("tests", "docs", ".venv", ".git")
                and "argparse.ArgumentParser(" in path.read_text(encoding="utf-8")}
    missing = sorted(str(path.relative_to(PROJECT_ROOT)) for path in programs - listed_files)
    assert not missing, f"add {missing} to COMMANDS in docs/hooks.py"
    assert all(path.is_file() for path in listed_files)


def test_each_command_line_help_is_the_one_it_prints():
    helps = {command["typed"]: command["helps"] for command in hooks.command_helps()}
    assert list(helps) == [typed for typed, _ in hooks.COMMANDS]
    for typed, texts in helps.items():
        assert texts[0].startswith(f"usage: {typed}"), (typed, texts[0][:80])
    assert len(helps["python -m models.registry"]) > 1  # its sub-commands' --help too
    assert "INFERENCE_PACS_AE_TITLE" in helps["python dicom_node.py"][0]


# -- the pages and the README ---------------------------------------------------------------------------------
def test_every_reference_table_is_on_a_page_and_every_marker_names_one():
    markers = {match for path in (PROJECT_ROOT / "docs").rglob("*.md")
               for match in hooks.MARKER.findall(path.read_text(encoding="utf-8"))}
    assert markers == set(hooks.TABLES)


def test_the_readme_is_a_landing_page_whose_links_lead_into_the_site():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert 100 <= len(readme.splitlines()) <= 250
    for text in ("make serve", "make test", "make docs", "Not for clinical use", "CC-BY-SA 4.0"):
        assert text in readme
    targets = [target for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme) if "://" not in target]
    assert len(targets) >= 20
    broken = [target for target in targets if not (PROJECT_ROOT / target).exists()]
    assert not broken, f"README links to {broken}"
    nav = (PROJECT_ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {target.removeprefix("docs/") for target in targets if target.endswith(".md")}
    assert all(page in nav for page in pages), "every page the README links to is in the site's nav"
