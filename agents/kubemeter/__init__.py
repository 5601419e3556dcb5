"""kubemeter data plane: sources -> metering -> pipeline -> output.

The control plane (``kubemeter_operator``) imports only :mod:`kubemeter.api` from here; nothing in
this package imports the operator.
"""
