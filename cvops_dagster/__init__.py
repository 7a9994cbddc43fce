"""cvops-dagster's domain library: one sub-package per lifecycle stage, no Dagster.

Stages, in the order they may import each other (a later stage may use an earlier one,
never the reverse; ``tests/test_layout.py`` enforces it):

``core`` < ``ingestion`` < ``imaging`` < ``datasets`` < ``training`` < ``registry`` <
``serving`` < ``monitoring`` < ``review``.

``bench`` holds the ``cvops bench`` benchmarks and is never imported by a stage.
``definitions.py`` (the Dagster composition root) and ``cli.py`` (the ``cvops`` command line)
are the only modules that import Dagster.
"""
