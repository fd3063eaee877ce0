"""Image algorithms with no protocol in them: the 3D Gaussian blur and the rendering of slices,
masks and overlays (PNGs of the test tool, report images)."""
