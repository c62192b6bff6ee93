"""The API service's own plumbing that is not business logic: its client for the runner.

Torch-free, like all of the API's process; the business logic it serves is :mod:`logic`.
"""
