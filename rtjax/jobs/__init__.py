"""Prepared accelerator jobs: one time-budgeted function per learned model that trains,
measures and packs its results for the trip back from a lent device (`scripts/device_*.py`)."""
