"""The custom resources' API: one pydantic module per kind, and the files the operator renders.

- :mod:`kubemeter.api.common`: quantities, selectors, Secret references, the base model.
- :mod:`kubemeter.api.meter`, :mod:`kubemeter.api.pipeline`, :mod:`kubemeter.api.collector`: the spec
  of each custom resource kind; the operator generates the CRD schemas from them.
- :mod:`kubemeter.api.rendered`: ``agent.yaml`` and ``gateway.yaml`` (the ConfigMap the operator
  renders, parsed by the agent and the gateway with the same models) and the status reports.

Field names are camelCase on the wire (``windowSeconds``) and snake_case in Python
(``window_seconds``). Rules that span fields are written twice on purpose: as CEL
(``x-kubernetes-validations``, enforced by the API server at ``kubectl apply``) and as pydantic
validators (enforced when a process parses a rendered file). Both messages name the field and the
fix. No I/O happens in this package.
"""
