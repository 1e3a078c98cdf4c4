"""nestrec: sharded-embedding training (NestPipe) and generative recommendation (OxygenREC).

Importing the package registers the ``nestrec`` strategies in Lightning's ``StrategyRegistry``
(``Trainer(strategy="nestpipe")``); Lightning snapshots the registry when a Trainer is built, and
spawned or re-launched workers re-import this package, so registration happens here.
"""

__version__ = "0.1.0"

from nestrec import strategy as _strategy  # noqa: E402,F401  (registers "nestpipe", "nestpipe_spawn")
