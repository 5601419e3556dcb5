"""The local Kubernetes cluster kubemeter is tested, demonstrated and benchmarked on: a real control
plane as local processes with kwok nodes (:mod:`testbed.controlplane`). Used by ``tests/``, ``demo/``,
``chaos/``, ``bench/`` and ``make cluster-up``."""
