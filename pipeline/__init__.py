"""Hotspots engine: pure functions from reports to heatmap cells and tiles.

Nothing in this package imports dagster; ``assets/`` wires these functions
into Dagster assets, and ``tests/test_purity.py`` keeps it that way.
"""
