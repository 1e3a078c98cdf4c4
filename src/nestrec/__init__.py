"""nestrec: sharded-embedding training (NestPipe) and generative recommendation (OxygenREC).

Importing the package is cheap on purpose: subpackages pull in Lightning/Hydra only when used.
"""

__version__ = "0.1.0"
