"""``kubemeter report``: a chargeback report (quantities and cost per customer, namespace, meter,
GPU model or day) from a ``kubemeter sink`` or any OpenMeter-compatible usage API."""
