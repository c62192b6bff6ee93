"""BentoML glue both services share: the places this project leans on BentoML's private
parts or patches them, the Bentos' image, log set-up and the ``/metrics`` key.

- :mod:`glue.bento`: what BentoML does not expose (the runner mapping it hands each worker,
  the model version a built Bento recorded);
- :mod:`glue.request_timeout`: a fix for BentoML's request-timeout middleware;
- :mod:`glue.image`: the image every Bento builds on;
- :mod:`glue.logs`: JSON logs with the request id;
- :mod:`glue.auth`: Bearer keys, and the ``/metrics`` guard;
- :mod:`glue.settings`: the build's own settings.

No torch and no business logic: the API and the runner both import it.
"""
