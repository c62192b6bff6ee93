"""GPU-bound services. Importing this package must not import torch (the API process
imports it for ``bentoml.depends``); torch is imported inside the runner's ``__init__``."""
