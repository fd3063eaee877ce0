"""One DICOM instance of a request, as validation hands it to the pipeline and the handler.

``DicomInstance`` keeps together what used to travel on hidden attributes: where the instance
came from (a request part or a file), its header read once by validation
(``inference.dicom.header``), how messages name it, and its pydicom dataset, decoded on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileDataset

from inference.dicom.attributes import CheckedAttributes
from inference.dicom.header import InstanceHeader, open_source


@dataclass(eq=False)
class DicomInstance:
    """A checked instance: its source, header and name; ``dataset`` without pixels, ``read_full()`` with."""

    source: Any  # a request part (``inference.protocol.multipart_request.Part``) or a binary file
    header: InstanceHeader
    position: int  # among the parts after the request JSON, from 0
    #: The attribute values validation checked (``inference.dicom.attributes.CheckedAttributes``).
    attributes: CheckedAttributes | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """How messages name the instance: "part 3 (file 'IM0001.dcm')" (worked out only when needed)."""
        return describe_source(self.source, self.position)

    @cached_property
    def dataset(self) -> FileDataset:
        """The header as a pydicom dataset (no pixels; values decoded when read)."""
        return self.header.dataset

    def open(self) -> BinaryIO:
        """The instance's bytes, rewound for reading."""
        return open_source(self.source)

    def read_full(self) -> Dataset:
        """The whole instance, pixels included, read again from its source."""
        return pydicom.dcmread(self.open())


def describe_source(source: Any, position: int) -> str:
    """How messages name a request part (its ``describe()``: index and file name), else by its position."""
    return source.describe() if hasattr(source, "describe") else f"part {position + 1}"
