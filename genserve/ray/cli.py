"""`genserve serve --ray`: the command line's way into genserve.ray.deploy."""

from __future__ import annotations

import importlib.util
from typing import Any

import typer

from genserve.config import ServerConfig


def serve_with_ray(
    config: ServerConfig, replicas: int, address: str | None, log_level: str = "info",
    replica_gpus: float = 1.0, **placement: Any,  # RayOptions' placement fields
) -> None:  # fmt: skip
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise typer.BadParameter("--ray needs Ray Serve: pip install 'genserve[ray]'")
    from genserve.ray.deploy import RayOptions, serve_on_ray

    try:
        options = RayOptions(
            replicas=replicas, address=address, log_level=log_level, replica_gpus=replica_gpus,
            **placement,
        )  # fmt: skip
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    serve_on_ray(config, options)
