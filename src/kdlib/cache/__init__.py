"""The offline teacher cache: teacher outputs stored once, reused by every run that needs them.

``teacher.cache=DIR`` (see store.py for the layout and fingerprint.py for what decides reuse).
Imports stay in the submodules so that computing a sample key does not load torch.
"""
