"""Models trained and shipped by qsilk itself (see :mod:`qsilk.models.demo`)."""
