"""The ``kubemeter`` command: a thin dispatcher that belongs to neither plane."""
