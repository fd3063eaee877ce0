"""Review decisions as data: one entry per decision in the feedback store the Radiomics door keeps its
Feedback and Telemetry in (``inference.radiomics.records``), and the figures per model version.

An entry holds the model (family, version, weights hash), the input hash, the decision, who made it
and, for a correction, the Dice and volume change per structure. ``version_figures`` counts them per
version (accepted, rejected, corrected, mean Dice of corrections) next to the Radiomics feedback
and telemetry received; ``GET /models/<family>`` and ``/metrics`` serve them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inference.jobs.reviews import ACCEPTED, AWAITING, CORRECTED, DECISIONS, REJECTED, Review, ReviewRecords
from inference.radiomics.records import FEEDBACK, TELEMETRY, RadiomicsRecords

log = logging.getLogger("inference.review")

#: The kind of a review decision's entry in the feedback store (beside ``feedback`` and ``telemetry``).
DECISION = "review"


def decision_entry(review: Review) -> dict:
    """The feedback entry of a decided review."""
    correction = review.correction or {}
    structures = correction.get("structures", {})
    return {"received": review.decided or time.time(), "job": review.uid, "decision": review.status,
            "user": review.decided_by, "reason": review.reason, "family": review.model.get("family"),
            "model_version": review.model.get("version"), "weights_sha256": review.model.get("sha256"),
            "input_hash": review.input_hash, "study_uid": review.study_uid, "flagged": review.flagged,
            "structures": structures}


def mean_dice(structures: dict) -> float | None:
    """The mean Dice over a correction's structures; None without any."""
    values = [float(item["dice"]) for item in structures.values() if item.get("dice") is not None]
    return sum(values) / len(values) if values else None


def version_figures(records: RadiomicsRecords, family: str | None = None) -> dict[str, dict[str, dict]]:
    """family -> version -> {accepted, rejected, corrected, mean_dice_corrected, feedback, telemetry}."""
    figures: dict[str, dict[str, dict]] = {}

    def slot(entry: dict) -> dict | None:
        name, version = entry.get("family"), entry.get("model_version")
        if not name or not version or (family is not None and name != family):
            return None
        return figures.setdefault(name, {}).setdefault(str(version), {
            ACCEPTED: 0, REJECTED: 0, CORRECTED: 0, "mean_dice_corrected": None, "feedback": 0, "telemetry": 0,
            "_dice": []})

    for entry in records.entries(DECISION):
        counts = slot(entry)
        if counts is not None and entry.get("decision") in DECISIONS:
            counts[entry["decision"]] += 1
            if entry["decision"] == CORRECTED and (dice := mean_dice(entry.get("structures") or {})) is not None:
                counts["_dice"].append(dice)
    for kind in (FEEDBACK, TELEMETRY):
        for entry in records.entries(kind):
            counts = slot(entry)
            if counts is not None:
                counts[kind] += 1
    for versions in figures.values():
        for counts in versions.values():
            dice = counts.pop("_dice")
            counts["mean_dice_corrected"] = round(sum(dice) / len(dice), 4) if dice else None
    return figures


def is_overdue(review: Review, overdue_seconds: float, now: float | None = None) -> bool:
    """Whether a held result has waited longer than ``overdue_seconds`` without a decision."""
    return review.status == AWAITING and (now or time.time()) - review.held > overdue_seconds


class ReviewCollector(Collector):
    """``/metrics``: results awaiting review and overdue ones, decisions and mean correction Dice per version."""

    def __init__(self, reviews: ReviewRecords, records: Callable[[], RadiomicsRecords],
                 overdue_seconds: float) -> None:
        self.reviews = reviews
        self.records = records
        self.overdue_seconds = overdue_seconds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            held = self.reviews.all()
            figures = version_figures(self.records())
        except Exception as exc:  # the store unreachable: the other metrics are still served
            log.warning("review metrics left out of this scrape: %s", exc)
            return
        now = time.time()
        waiting = [review for review in held if review.status == AWAITING]
        yield GaugeMetricFamily("inference_reviews_awaiting", "Results held, awaiting a reviewer's decision (read "
                                "from the job store at each scrape)",
                                value=len(waiting))
        yield GaugeMetricFamily("inference_reviews_overdue", "Results awaiting review longer than "
                                "INFERENCE_REVIEW_OVERDUE_SECONDS (never released without a decision)",
                                value=sum(is_overdue(r, self.overdue_seconds, now) for r in waiting))
        decisions = GaugeMetricFamily("inference_review_decisions", "Review decisions (accepted, rejected, "
                                      "corrected), by model version (the feedback store)",
                                      labels=["family", "version", "decision"])
        dice = GaugeMetricFamily("inference_review_correction_dice_mean", "Mean Dice between the model's and the "
                                 "reviewers' corrected segmentations, by model version", labels=["family", "version"])
        for family, versions in sorted(figures.items()):
            for version, counts in sorted(versions.items()):
                for decision in DECISIONS:
                    decisions.add_metric([family, version, decision], counts[decision])
                if counts["mean_dice_corrected"] is not None:
                    dice.add_metric([family, version], counts["mean_dice_corrected"])
        yield decisions
        yield dice
