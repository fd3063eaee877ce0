"""Hippocampus segmentation model (2.5D UNet trained on MSD Task04)."""
from .segmenter import HippocampusSegmenter

__all__ = ["HippocampusSegmenter"]
