"""TaggedLogger: tags on every message and on the record, children that do not leak tags back."""

from __future__ import annotations

import logging

from inference.logs import TaggedLogger


def test_tags_prefix_messages_and_ride_on_the_record(caplog):
    log = TaggedLogger(logging.getLogger("inference.test"))
    log.add_tags({"input_hash": "abc"})
    with caplog.at_level(logging.INFO, logger="inference.test"):
        log.info("parsed %d parts", 3)
    record = caplog.records[-1]
    assert record.getMessage() == "[input_hash=abc] parsed 3 parts"
    assert record.tags == {"input_hash": "abc"}


def test_child_adds_tags_without_changing_its_parent(caplog):
    parent = TaggedLogger(logging.getLogger("inference.test"), {"a": 1})
    child = parent.tag({"b": 2})
    with caplog.at_level(logging.INFO, logger="inference.test"):
        child.warning("x")
        parent.warning("y")
    assert [r.getMessage() for r in caplog.records[-2:]] == ["[a=1 b=2] x", "[a=1] y"]


def test_untagged_logger_leaves_messages_alone(caplog):
    with caplog.at_level(logging.INFO, logger="inference.test"):
        TaggedLogger(logging.getLogger("inference.test")).info("plain")
    assert caplog.records[-1].getMessage() == "plain"
