"""Routing rules: the shipped default, matching by modality / description / calling AE, clear errors."""

from __future__ import annotations

import pytest

from inference.config import Settings
from inference.pacs.routing import ReceivedSeries, load_rules, matching_rules, parse_rules

CROP = ReceivedSeries("MR", "HippoCrop", "ORTHANC")
T1 = ReceivedSeries("MR", "T1post", "ORTHANC")


def test_shipped_rules_send_a_hippocrop_study_to_the_hippocampus_model():
    rules = load_rules(Settings().pacs_rules)
    chosen = matching_rules(rules, [T1, CROP])
    assert [(r.command, r.params) for r in chosen] == [("get-hippocampus-volume", {"dicom_outputs": ["seg", "sr"]})]
    assert matching_rules(rules, [T1]) == []
    assert matching_rules(rules, [ReceivedSeries("CT", "HippoCrop", "X")]) == []


def test_conditions_must_hold_for_one_series():
    rules = parse_rules({"rules": [{"command": "c",
                                    "match": {"series_description": "^crop$", "calling_ae": "PACS.*"}}]})
    assert matching_rules(rules, [ReceivedSeries("MR", "Crop", "PACS1")])
    assert not matching_rules(rules, [ReceivedSeries("MR", "crop", "OTHER"), ReceivedSeries("MR", "T1", "PACS1")])
    assert not matching_rules(rules, [ReceivedSeries("MR", "my crop", "PACS1")])


@pytest.mark.parametrize("document, message", [
    ({"rule": []}, "list under 'rules'"),
    ({"rules": [{"match": {}}]}, "rule 1: 'command'"),
    ({"rules": [{"command": "c", "match": {"colour": "red"}}]}, "'match' may only hold"),
    ({"rules": [{"command": "c", "match": {"series_description": "("}}]}, "not a regular expression"),
    ({"rules": [{"command": "c", "params": [1]}]}, "'params' must be a mapping"),
])
def test_malformed_rules_say_what_is_wrong(document, message):
    with pytest.raises(ValueError, match=message):
        parse_rules(document)


def test_missing_rules_file_names_it(tmp_path):
    with pytest.raises(ValueError, match="nothing.yaml does not exist"):
        load_rules(tmp_path / "nothing.yaml")


def test_a_rule_can_ask_for_review_itself_or_through_its_request_option():
    rules = parse_rules({"rules": [{"command": "c", "review": "required"},
                                   {"command": "c", "params": {"review": "flagged", "sigma_mm": 2}},
                                   {"command": "c"}]})
    assert [(r.review, r.params) for r in rules] == [("required", {}), ("flagged", {"sigma_mm": 2}), (None, {})]
    assert load_rules(Settings().pacs_rules)[0].review is None, "the shipped rule sends at once"
    with pytest.raises(ValueError, match="rule 1: review must be one of required, flagged, got 'later'"):
        parse_rules({"rules": [{"command": "c", "review": "later"}]})
