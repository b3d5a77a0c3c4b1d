"""Experiment specs: the TOML schema (``spec.py``) and the embedded demo (``demo.toml``)."""

from pathlib import Path

#: The experiment ``luigi --module tasks FullReport`` runs when none is named: the embedded demo.
#: Its only definition (absolute, so the default works from any folder).
DEFAULT_EXPERIMENT = str(Path(__file__).resolve().with_name("demo.toml"))
