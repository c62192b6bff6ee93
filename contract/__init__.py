"""The runner's published contract: what the API and the runner agree on, and nothing else.

- :mod:`contract.tokens`: a generation's parameters and its streamed chunks (token ids);
- :mod:`contract.engine`: the interface every engine behind the runner implements;
- :mod:`contract.errors`: the one error family of a generation, and its wire encoding;
- :mod:`contract.settings`: what both sides read alike (the model, logs, the metrics key).

Plain pydantic: no torch, no BentoML, no business logic. Both sides import it; neither
imports the other (docs/architecture.md, enforced by tests/unit/test_architecture.py).
"""
