"""Dagster wiring of the Hotspots pipeline: assets, checks, jobs, definitions.

Assets here are thin: they call :mod:`pipeline` and describe what it did.
"""
