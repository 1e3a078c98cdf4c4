"""``python -m nestrec.serve artifact=DIR [key=value ...]``: serve an exported model over HTTP.

Loads and checks the artifact before binding the port (a bad artifact is a one-line error and exit
status 2, not a half-started server), then runs uvicorn. ``--help`` lists every setting.
"""

from __future__ import annotations

import sys

from nestrec.errors import UserInputError

__all__ = ["build_service", "main"]


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return device


def build_service(settings):
    """Artifact + instruction source + service for ``settings`` (raises UserInputError on bad input)."""
    import torch

    from nestrec.serve.artifact import load_artifact
    from nestrec.serve.instructions import InstructionSource
    from nestrec.serve.service import Service

    if not settings.artifact:
        raise UserInputError("artifact=DIR is required (a directory written by `python -m nestrec.export`)")
    for name in ("max_batch", "max_batch_beams", "max_queue", "deadline_ms", "max_body_bytes"):
        if getattr(settings, name) < 1:
            raise UserInputError(f"{name}={getattr(settings, name)} must be >= 1")
    if settings.max_wait_ms < 0:
        raise UserInputError(f"max_wait_ms={settings.max_wait_ms} must be >= 0")
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    artifact = load_artifact(settings.artifact, _device(settings.device), verify=settings.verify)
    cri = None if settings.cri.lower() == "none" else (settings.cri or artifact.cri_path)
    instructions = InstructionSource(artifact.text_encoder, artifact.text_dim, cri, settings.cri_refresh_s)
    return Service(artifact, instructions, settings)


def main(argv: list[str] | None = None) -> None:
    from nestrec.serve.settings import ServeSettings, parse_settings, usage

    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help", "help"} & set(argv):
        print(usage(ServeSettings, "python -m nestrec.serve"), end="")
        return
    try:
        settings = parse_settings(argv, ServeSettings)
        service = build_service(settings)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

    import uvicorn

    from nestrec.serve.app import create_app

    art = service.artifact
    print(
        f"nestrec.serve: model {art.model_version} ({art.num_items} items, {art.num_users} users, "
        f"{service.recommender.device}) from {art.path} on http://{settings.host}:{settings.port}",
        flush=True,
    )
    uvicorn.run(
        create_app(service),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
