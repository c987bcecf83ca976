"""Integrations of QSilk with sampling frameworks. ``qsilk.integrations.diffusers``: ``enable`` / ``disable``."""
