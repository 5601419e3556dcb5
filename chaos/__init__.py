"""``make chaos``: the end-to-end fault suite.

    chaos/run.py       the orchestration: set up the stack, run each fault with pod churn going on,
                       end every pod, wait for the sink, print the table, write results/latest.json
    chaos/faults.py    one function per fault: inject it, wait for the recovery a cluster brings
                       (a restarted process, a returning API), return what was measured
    chaos/churn.py     the pod churn and the ledger of what the API server recorded for each pod
    chaos/verdict.py   pure: the events the sink should hold (from the pods' timestamps alone) and
                       how the stored ones differ: lost, billed twice, wrong, flagged, per-pod error
    chaos/manifests.yaml  the Collector, Meters and Pipeline under test

The stack itself (control plane, sink, operator, gateway, agents) is :mod:`demo.harness`, shared
with ``make demo``.
"""
