"""Measurements on a model that choose a method's settings (calibration) or describe it."""
