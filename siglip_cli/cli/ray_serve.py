"""`siglip serve` under Ray Serve: a thin wrapper, not a second server.

    serve run siglip_cli.cli.ray_serve:build model=google/siglip-base-patch16-224 indexes=photos.npy

Each replica loads the model as `siglip serve` does and builds the very same FastAPI app
(cli/serve.py's `served_app`: the served engine with its micro-batcher, the handlers, the
routes, auth and upload limits of serve/app.py); Ray Serve's proxy hands it the requests through
`serve.ingress`, with the app built on the replica (`__serve_build_asgi_app__`), so nothing
here parses HTTP or speaks ASGI. The server keeps no state but read-only indexes, so replicas
need nothing from each other.

The arguments (`KEY=VALUE` after the import path, or `args:` in a Serve config file) are
`siglip serve`'s options by their long names, `-` written `_`: model, indexes (comma-separated,
or a list in a config file), device, dtype, attn, decode, exact, batch_size, max_pixels,
offline, token, max_upload (MB), allow_urls, window_ms, queue_size. And three of Ray Serve's own
deployment options: num_replicas (a number or "auto"), num_cpus and num_gpus per replica (Ray
hides GPUs from a replica without num_gpus, which then runs on the CPU). The host and port are
Ray Serve's (`http_options`); a proxy that other machines reach needs `token=`.

Needs Ray Serve: pip install 'siglip-cli[ray-serve]'. This module is only imported by Ray.
"""

# No `from __future__ import annotations`: Ray Serve reads build()'s parameter annotation as a
# class to validate the arguments with.
import os
from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from .options import Attn, Decode, DType

# Requests one replica works on at once. Ray Serve's default (5) would let no more than five
# single-image requests meet in one micro-batch; the batcher's queue (queue_size) is the bound.
MAX_ONGOING_REQUESTS = 64


class Args(BaseModel):
    """The application's arguments; an unknown key is an error naming it."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, description="Folder or hub id (default: SIGLIP_MODEL, else the CLI's default)")
    indexes: List[str] = Field(default_factory=list, description="Indexes written by siglip embed")
    device: str = "auto"
    dtype: DType = DType.auto
    attn: Attn = Attn.auto
    decode: Decode = Decode.auto
    exact: bool = False
    batch_size: Optional[int] = Field(None, ge=1)
    max_pixels: int = Field(100_000_000, ge=1)
    offline: bool = False
    token: Optional[str] = None
    max_upload: float = Field(50.0, ge=0.001, description="Largest request body, MB")
    allow_urls: bool = False
    window_ms: float = Field(5.0, ge=0.0, le=1000.0)
    queue_size: int = Field(256, ge=1)
    # Ray Serve's own deployment options
    num_replicas: Optional[Union[int, Literal["auto"]]] = None
    num_cpus: Optional[float] = Field(None, ge=0)
    num_gpus: Optional[float] = Field(None, ge=0)

    @field_validator("indexes", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):  # `serve run ... indexes=a.npy,b.npy`
            return [part for part in value.split(",") if part]
        return value

    @field_validator("token")
    @classmethod
    def _not_empty(cls, value):
        if value is not None and not value.strip():
            raise ValueError("token is empty; give a secret, or leave it out on a proxy only this machine reaches")
        return value


RAY_OPTIONS = ("num_replicas", "num_cpus", "num_gpus")


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress()
class SiglipServe:
    """One replica: the model loaded as `siglip serve` loads it, and the same app over it."""

    def __init__(self, args: dict):
        from pathlib import Path

        from ..runtime import keep_freed_memory
        from ..serve.model import ServedIndexes
        from .app import load_engine
        from .options import ModelOptions
        from .serve import ServeSettings, import_server, served_app

        import_server()  # FastAPI and python-multipart: the serve extra, or one line naming it
        keep_freed_memory()
        options = ModelOptions(args["model"], args["device"], args["dtype"], args["attn"], batch_size=args["batch_size"],
                               offline=args["offline"], max_pixels=args["max_pixels"], decode=args["decode"],
                               exact=args["exact"])
        settings = ServeSettings(token=args["token"], max_upload=int(args["max_upload"] * 1_000_000),
                                 allow_urls=args["allow_urls"], batch_size=args["batch_size"], window_ms=args["window_ms"],
                                 queue_size=args["queue_size"])
        indexes = ServedIndexes([Path(p) for p in args["indexes"]])
        self._served, self._app = served_app(indexes, options, settings, load_engine)

    def __serve_build_asgi_app__(self):
        return self._app

    def __del__(self):
        served = getattr(self, "_served", None)
        if served is not None:
            served.close()


def build(args: Args):
    """The Ray Serve application: `serve run siglip_cli.cli.ray_serve:build KEY=VALUE ...`."""
    given = args.model_dump(mode="json")
    values = {key: value for key, value in given.items() if key not in RAY_OPTIONS}
    # Paths as the caller means them: replicas do not run in `serve run`'s folder
    values["indexes"] = [os.path.abspath(os.path.expanduser(p)) for p in values["indexes"]]
    if values["model"] and os.path.exists(os.path.expanduser(values["model"])):
        values["model"] = os.path.abspath(os.path.expanduser(values["model"]))
    deployment_options: dict = {}
    if args.num_replicas is not None:
        deployment_options["num_replicas"] = args.num_replicas
    actor = {key: given[key] for key in ("num_cpus", "num_gpus") if given[key] is not None}
    if actor:
        deployment_options["ray_actor_options"] = actor
    deployment = SiglipServe.options(**deployment_options) if deployment_options else SiglipServe
    return deployment.bind(values)
