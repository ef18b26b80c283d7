"""Data files shipped with hpcdiff: the demo job and the constraints (lock) files.

A package (not a bare folder) so that setuptools ships it without warnings.
"""
