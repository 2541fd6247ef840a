"""Hydra configuration groups of kdlib, shipped inside the package as ``kdlib.conf``."""
