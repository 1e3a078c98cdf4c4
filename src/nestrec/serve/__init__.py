"""OxygenREC real-time serving: a checked artifact, micro-batched beam search, an HTTP API.

``python -m nestrec.export`` writes the artifact; ``python -m nestrec.serve artifact=DIR`` serves
it. Modules, one job each: :mod:`~nestrec.serve.artifact` (format, loading, checks),
:mod:`~nestrec.serve.engine` (batched decoding with
:mod:`~nestrec.oxygen.shared_memory_decoder`, which validation and test use too),
:mod:`~nestrec.serve.instructions` (cached reasoning
instructions, query encoding), :mod:`~nestrec.serve.resolve` (request -> model query),
:mod:`~nestrec.serve.batching` (micro-batching, deadlines), :mod:`~nestrec.serve.metrics`,
:mod:`~nestrec.serve.schema`, :mod:`~nestrec.serve.settings` (``key=value`` settings),
:mod:`~nestrec.serve.service` (the request path), :mod:`~nestrec.serve.app` (HTTP routes).
See docs/serving.md.
"""
