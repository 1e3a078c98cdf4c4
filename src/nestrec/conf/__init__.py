# Makes the shipped Hydra configs importable as ``pkg://nestrec.conf``.
