"""deploy/alert-rules.yml: its expressions name metrics the gateway exports, and promtool (when installed) fires
each alert on a drifting series and not on a quiet one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from inference import metrics
from models.monitoring import DriftCollector
from models.registry import registry_for
from tests.conftest import PROJECT_ROOT

RULES = PROJECT_ROOT / "deploy" / "alert-rules.yml"


def exported_names() -> set[str]:
    """Metric names the gateway serves for the drift watch (the counters' ``_total`` included)."""
    collector = DriftCollector(registry_for(PROJECT_ROOT / "models" / "manifest.yaml"),
                               lambda: metrics.watched_counts(None))
    names = {family.name for family in collector.collect()}
    for collector in (metrics.RESULTS, metrics.FLAG_REASONS, *metrics.WATCHED.values()):
        for family in collector.describe():
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_every_metric_the_rules_name_is_exported():
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == {"ModelInputDrift", "ModelFlagShareRising"}
    served = exported_names()
    for rule in rules:
        named = set(re.findall(r"\b(inference_[a-z_]+)", rule["expr"]))
        assert named, rule["alert"]
        assert named <= served, f"{rule['alert']} names metrics nobody exports: {named - served}"


def test_the_example_prometheus_config_loads_the_rules():
    config = yaml.safe_load((PROJECT_ROOT / "deploy" / "prometheus.yml").read_text())
    assert [(RULES.parent / name).resolve() for name in config["rule_files"]] == [RULES.resolve()]


def promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed (Debian's prometheus package, or PROMTOOL=path): the rules' firing "
                    "is not tested")
    return found


UNIT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'inference_model_drift_psi{{family="hippocampus",version="1.0",quantity="intensity_mean"}}'
        values: '0.4x2000'
      - series: 'inference_model_drift_psi{{family="hippocampus",version="1.0",quantity="voxel_size_mm"}}'
        values: '0.05x2000'
      - series: 'inference_model_expected_flag_share{{family="hippocampus",version="1.0"}}'
        values: '0.1x2000'
      - series: 'inference_model_expected_flag_share{{family="hippocampus",version="1.0-fast"}}'
        values: '0.1x2000'
      - series: 'inference_model_results_total{{family="hippocampus",version="1.0",flagged="true"}}'
        values: '0+1x2000'
      - series: 'inference_model_results_total{{family="hippocampus",version="1.0",flagged="false"}}'
        values: '0+1x2000'
      - series: 'inference_model_results_total{{family="hippocampus",version="1.0-fast",flagged="true"}}'
        values: '0+1x2000'
      - series: 'inference_model_results_total{{family="hippocampus",version="1.0-fast",flagged="false"}}'
        values: '0+9x2000'
    alert_rule_test:
      - eval_time: 5h
        alertname: ModelInputDrift
      - eval_time: 7h
        alertname: ModelInputDrift
        exp_alerts:
          - exp_labels: {{severity: warning, family: hippocampus, version: "1.0", quantity: intensity_mean}}
            exp_annotations:
              summary: "hippocampus 1.0: intensity_mean drifts from the training split"
              description: "Population stability index 0.40 (> 0.25) for intensity_mean. Compare the histograms at GET /models/hippocampus/monitoring: a new scanner, protocol or site may be sending studies the model was not validated on."
      - eval_time: 26h
        alertname: ModelFlagShareRising
        exp_alerts:
          - exp_labels: {{severity: warning, family: hippocampus, version: "1.0"}}
            exp_annotations:
              summary: "hippocampus 1.0: more results flagged than calibrated"
              description: "50% of the last day's results were flagged, over twice the share the calibration flagged on the test split. See the flag reasons in inference_model_flag_reasons_total and GET /models/hippocampus/monitoring."
"""  # noqa: E501  (promtool compares the rendered annotations whole)


def test_promtool_checks_the_rules_and_each_alert_fires_only_on_its_case(tmp_path):
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = tmp_path / "alert-rules.test.yml"
    tests.write_text(UNIT_TESTS.format(rules=RULES))
    run = subprocess.run([tool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    # the example scrape config with its rule file (its token file left out: it exists only where deployed)
    config = yaml.safe_load((PROJECT_ROOT / "deploy" / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        job.pop("authorization", None)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(RULES, tmp_path / RULES.name)
    checked = subprocess.run([tool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                             text=True)
    assert checked.returncode == 0 and "SUCCESS: 2 rules found" in checked.stdout, checked.stdout + checked.stderr
