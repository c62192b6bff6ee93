"""The model service: the runner (``runners.llm.LLMRunner``), its engines, the model import.

It speaks token ids (:mod:`contract`) and imports nothing of the business logic. Importing
this package, or :mod:`runners.llm` and :mod:`runners.settings`, does not import torch:
``service.py`` declares the runner as a dependency in processes that never load the model;
the engines import torch when the runner builds one.
"""
