"""Segmentation models served by declaration: a manifest version says how to run its network, no code per model.

``schema`` reads and checks a version's declaration, ``runner`` executes it on a volume (orientation,
resampling, intensity, crop, padding, inference, postprocessing, back to the source grid), ``bundle``
imports a MONAI bundle's configs as such a declaration (read as data, never executed).
"""
