"""Routing rules of the DICOM node: which inference command runs on a complete study, from a YAML file.

See ``deploy/routing-rules.yaml`` (the shipped default) for the format. A rule matches a study
when one of its series satisfies every condition given (Modality, SeriesDescription regular
expression, calling AE title regular expression).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONDITIONS = ("modality", "series_description", "calling_ae")
#: What a rule's ``review`` may say (``inference.jobs.reviews.REVIEW_MODES``: the pacs layer sits below jobs).
REVIEW_MODES = ("required", "flagged")


@dataclass(frozen=True)
class ReceivedSeries:
    """What the rules look at in one received series."""

    modality: str
    description: str
    calling_ae: str


@dataclass(frozen=True)
class Rule:
    """Run ``command`` with ``params`` on a study that has a series matching every condition."""

    name: str
    command: str
    params: dict = field(default_factory=dict)
    modality: str | None = None
    series_description: str | None = None
    calling_ae: str | None = None
    #: ``required``: every result waits for a reviewer; ``flagged``: the ones the quality check flagged; None: none
    review: str | None = None

    def matches_series(self, series: ReceivedSeries) -> bool:
        if self.modality is not None and series.modality.upper() != self.modality.upper():
            return False
        if self.series_description is not None and not re.search(self.series_description, series.description,
                                                                   re.IGNORECASE):
            return False
        return self.calling_ae is None or re.fullmatch(self.calling_ae, series.calling_ae.strip()) is not None

    def matches(self, study: Iterable[ReceivedSeries]) -> bool:
        return any(self.matches_series(series) for series in study)


def parse_rules(document: object, source: str = "rules") -> list[Rule]:
    """Rules from a parsed YAML document; ``ValueError`` saying which rule and key is wrong."""
    if not isinstance(document, dict) or not isinstance(document.get("rules"), list):
        raise ValueError(f"{source}: expected a mapping with a list under 'rules'")
    rules = []
    for index, entry in enumerate(document["rules"]):
        where = f"{source}: rule {index + 1}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping with 'command' and optionally 'name', 'match', 'params'")
        unknown = set(entry) - {"name", "match", "command", "params", "review"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        command, match, params = entry.get("command"), entry.get("match") or {}, entry.get("params") or {}
        if not isinstance(command, str) or not command:
            raise ValueError(f"{where}: 'command' must name an inference command")
        if not isinstance(match, dict) or set(match) - set(CONDITIONS):
            raise ValueError(f"{where}: 'match' may only hold {', '.join(CONDITIONS)}")
        if not isinstance(params, dict):
            raise ValueError(f"{where}: 'params' must be a mapping of request JSON keys")
        params = dict(params)
        review = entry.get("review", params.pop("review", None))  # a rule's key, or its request's option
        if review not in (None, *REVIEW_MODES):
            raise ValueError(f"{where}: review must be one of {', '.join(REVIEW_MODES)}, got {review!r}")
        for key in ("series_description", "calling_ae"):
            if key in match:
                try:
                    re.compile(str(match[key]))
                except re.error as exc:
                    raise ValueError(f"{where}: {key} {match[key]!r} is not a regular expression: {exc}") from None
        rules.append(Rule(name=str(entry.get("name", f"rule {index + 1}")), command=command, params=params,
                          review=review,
                          **{key: str(value) for key, value in match.items()}))
    return rules


def load_rules(path: str | Path) -> list[Rule]:
    """The rules of a YAML file (``ValueError`` naming the file when it is missing or malformed)."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"routing rules file {path} does not exist; pass --rules FILE") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"routing rules file {path} is not valid YAML: {exc}") from None
    return parse_rules(document, str(path))


def matching_rules(rules: Sequence[Rule], study: Sequence[ReceivedSeries]) -> list[Rule]:
    """The rules that match ``study``, in file order."""
    return [rule for rule in rules if rule.matches(study)]
