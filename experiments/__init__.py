"""Reproducible jaxkd experiments, each runnable as ``python -m experiments.NAME --workdir DIR``."""
