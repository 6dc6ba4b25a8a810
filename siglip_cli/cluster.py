"""`siglip embed --engine ray`: one embedding run spread over the actors of a Ray cluster, with
the same rows, order and sidecars as a local run.

- The driver lists the inputs once and cuts the plan into **shards**: consecutive runs of
  `shard_size` images in plan order, then the texts. Each shard's file name is derived from the
  plan (`<out>.partial/shards/image-000012-<digest>.npz`), and the cut depends on the plan only,
  so a resumed run finds the same shards whatever the cluster looks like now.
- Ray Data hands the shards (names and paths, never image bytes: workers read the files
  themselves, so every node must see the same paths) to a pool of actors. Each actor loads our
  engine once and embeds a shard with our pipeline (the decode, preprocessing and model of a
  local run), then writes it with the store's writer: complete under a temporary name, then
  renamed.
- When every shard is there, the driver assembles the final output in plan order with
  `store.write_store`, as a local run does from its partial rows (embedding.EmbedRun.finish).

Faults: Ray restarts a killed actor and retries its shard (Ray Data's actor pools default to
unlimited restarts and task retries). A shard file that exists is finished, so a retry or a
`--resume` redoes only the shards that are missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .core.errors import BackendUnavailable, ModelUnavailable, SiglipError, UsageError
from .embedding import EmbedPlan, EmbedRun, image_results, stamp_of
from .safefiles import cannot_write, make_directory
from .sources import Source
from .store import NO_STAMP, Entry, open_store, write_store
from .urls import is_url

INSTALL_HINT = "pip install 'siglip-cli[ray]'"
SHARD_SUFFIX = ".npz"  # one file per shard (plus its meta.json), rows memory-mappable


# ============================================================================ the layout
@dataclass(frozen=True)
class ClusterOptions:
    """What the user may say about the cluster; None means the default."""

    workers_per_node: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    shard_size: int | None = None


@dataclass(frozen=True)
class Layout:
    """The actor pool: how many actors, and the CPUs and GPUs each one holds."""

    workers: int
    cpus: float
    gpus: float

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


def plan_layout(nodes: Sequence[dict], options: ClusterOptions, device: str = "auto") -> Layout:
    """The actor pool for a cluster whose alive nodes have these resources ({"CPU": 16,
    "GPU": 8}). Defaults: one actor per GPU, the node's cores shared among its GPUs (they decode
    the images); on CPU-only nodes one actor per node that uses all its cores (torch spreads one
    batch over the cores; two actors on two cores measured no faster, see docs/benchmarks.md)."""
    device = (device or "auto").lower()
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device}: with --engine ray use auto, cpu or cuda (Ray gives each actor its GPUs)")
    if not nodes:
        raise BackendUnavailable("the Ray cluster has no alive nodes")
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) > 0]
    use_gpus = device != "cpu" and options.gpus_per_worker != 0 and bool(gpu_nodes)
    if device == "cuda" and not use_gpus:
        raise BackendUnavailable("--device cuda: the Ray cluster has no GPUs; use --device cpu or auto")
    if use_gpus:
        gpus = options.gpus_per_worker or 1.0
        per_node = [options.workers_per_node or int(n["GPU"] // gpus) for n in gpu_nodes]
        if min(per_node) < 1:
            raise UsageError(f"--gpus-per-worker {gpus:g}: more than a node's {min(n['GPU'] for n in gpu_nodes):g} GPUs")
        cpus = options.cpus_per_worker or max(1, min(int(n.get("CPU", 1) // k) for n, k in zip(gpu_nodes, per_node)))
        return Layout(sum(per_node), float(cpus), float(gpus))
    per_node = options.workers_per_node or 1
    cpus = options.cpus_per_worker or max(1, min(int(n.get("CPU", 1)) for n in nodes) // per_node)
    return Layout(per_node * len(nodes), float(cpus), 0.0)


# ============================================================================ shards
@dataclass(frozen=True)
class Shard:
    """A run of consecutive plan entries, embedded and written as one file by one actor."""

    index: int
    kind: str  # "image" or "text"
    names: tuple[str, ...]
    values: tuple  # what an actor reads: paths or URLs for images, the texts for texts
    stamps: tuple[tuple, ...]
    file: str

    def __len__(self) -> int:
        return len(self.names)

    @property
    def finished(self) -> bool:
        return os.path.exists(self.file)


def default_shard_size(count: int) -> int:
    """About 256 shards for a small run (enough to balance any pool we would start on it), at
    most 4096 entries for a big one: a lost shard costs seconds on a GPU, and 100 M images make
    ~25,000 files, not millions."""
    return min(4096, max(16, math.ceil(count / 256)))


def cut_shards(plan: EmbedPlan, size: int, folder: Path) -> list[Shard]:
    """The plan in shards of `size`, images first, then the distinct texts, as a local run
    orders its rows. Names depend on the plan only: kind, position and a digest of the names."""
    stamps = [stamp_of(s, False) for s in plan.images]
    texts = list(dict.fromkeys(plan.texts))
    # Workers run in folders of their own (on other machines): they get absolute paths, and
    # rows keep the names as given.
    paths = [s.value if is_url(s.value) else os.path.abspath(s.value) for s in plan.images]
    runs = [("image", [s.name for s in plan.images], paths, stamps),
            ("text", texts, texts, [NO_STAMP] * len(texts))]
    shards = []
    for kind, names, values, kind_stamps in runs:
        for start in range(0, len(names), size):
            part = names[start : start + size]
            digest = hashlib.sha256("\0".join([kind, *part]).encode("utf-8", "surrogateescape")).hexdigest()[:12]
            file = folder / f"{kind}-{len(shards):06d}-{digest}{SHARD_SUFFIX}"
            shards.append(Shard(len(shards), kind, tuple(part), tuple(values[start : start + size]),
                                tuple(kind_stamps[start : start + size]), str(file)))
    return shards


# ============================================================================ the workers
@dataclass(frozen=True)
class WorkerSettings:
    """Everything an actor needs to make the rows a local run would make."""

    model: str
    revision: str
    device: str
    dtype: str
    attn: str
    offline: bool
    max_pixels: int | None
    batch_size: int | None
    decode_threads: int | None
    torch_threads: int
    normalized: bool
    templates: tuple[str, ...]
    out: str  # the final output: its format decides which names it can hold
    out_dtype: str
    decode: str = "exact"  # exact or fast, as resolved on the driver
    max_patches: int | None = None  # NaFlex: the patch budget


def shard_entries(engine, shard: Shard, settings: WorkerSettings) -> tuple[list[Entry], list[dict]]:
    """A shard's rows as store entries, and the inputs it skipped ({path, error})."""
    if shard.kind == "text":
        vectors = engine.embed_texts(list(shard.values), list(settings.templates) or None, normalize=settings.normalized)
        return [Entry("text", text, NO_STAMP, vectors, i) for i, text in enumerate(shard.names)], []
    sources = [Source(name, value) for name, value in zip(shard.names, shard.values)]
    kept, vectors, skipped = [], [], []
    for item in image_results(engine, sources, settings.normalized, Path(settings.out)):
        if item.error is not None:
            skipped.append({"path": item.name, "error": item.error})
        else:
            kept.append(item.index)
            vectors.append(item.vector)
    rows = np.stack(vectors) if vectors else np.zeros((0, engine.embed_dim), np.float32)
    return [Entry("image", shard.names[i], shard.stamps[i], rows, row) for row, i in enumerate(kept)], skipped


def write_shard(engine, shard: Shard, settings: WorkerSettings) -> dict:
    """Embed and write one shard, unless an earlier attempt already finished it (a retried
    task): each shard file is written once. Returns its meta."""
    path = Path(shard.file)
    if not path.exists():
        entries, skipped = shard_entries(engine, shard, settings)
        write_store(path, entries, engine.embed_dim, settings.out_dtype, {"shard": shard.index, "skipped": skipped})
    return open_store(path).meta


class ShardEmbedder:
    """A Ray actor: our engine, loaded once, embeds and writes one shard per call."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.error: SiglipError | None = None
        try:
            self.engine = self._load(settings)
        except SiglipError as exc:  # reported with the first shard (see __call__)
            self.error = exc

    @staticmethod
    def _load(settings: WorkerSettings):
        import torch

        from .engine import load
        from .runtime import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(settings.torch_threads)
        engine = load(
            settings.model, device=settings.device, dtype=settings.dtype, attn=settings.attn,
            offline=True if settings.offline else None, max_pixels=settings.max_pixels,
            batch_size=settings.batch_size, workers=settings.decode_threads, use_cache=False,
            decode=settings.decode, max_patches=settings.max_patches,
        )
        revision = engine.describe()["revision"]
        if revision != settings.revision:
            raise ModelUnavailable(
                f"{settings.model}: node {socket.gethostname()} reads revision {revision}, the driver {settings.revision}; "
                "every node must read the same checkpoint"
            )
        return engine

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Errors a user can fix come back as data, kind and message: Ray passes a remote
        exception on as text with a traceback, and the driver owes the user one line."""
        summaries = []
        for spec in batch["shard"]:
            shard = pickle.loads(spec)
            try:
                if self.error is not None:
                    raise self.error
                meta = write_shard(self.engine, shard, self.settings)
                summaries.append((shard.index, meta["image_rows"], len(meta["skipped"]), ""))
            except SiglipError as exc:
                summaries.append((shard.index, 0, 0, f"{type(exc).__name__}:{exc}"))
        index, images, skipped, error = zip(*summaries)
        return {"index": np.array(index), "images": np.array(images), "skipped": np.array(skipped), "error": np.array(error)}


# ============================================================================ the driver's side
def import_ray():
    quiet_ray_logs()  # before the import: Ray's C++ side reads its log level when it loads
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BackendUnavailable(f"--engine ray: Ray is not installed; {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def connected() -> Iterator[list[dict]]:
    """Ray for the length of a run: the cluster at RAY_ADDRESS, else a local one started here
    (and stopped at the end). Yields the alive nodes' resources."""
    ray = import_ray()
    address = os.environ.get("RAY_ADDRESS", "").strip()
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if not address:
        options["include_dashboard"] = False  # a local run needs no web UI (and its CPU)
    try:
        ray.init(address=address or "local", **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"RAY_ADDRESS={address}" if address else "a local Ray"
        raise BackendUnavailable(f"--engine ray: cannot start or reach {where} ({str(exc).splitlines()[0]})") from None
    try:
        yield [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    finally:
        ray.shutdown()


def quiet_ray_logs() -> None:
    """stderr is for our notes and one-line errors. Ray's own lines at start (token auth,
    progress bars off, a note that Ray Data keeps actor constructor arguments in the object
    store) say nothing a user of this command can act on; real failures still raise."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the C++ core worker's stderr lines
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_shards(shards: Sequence[Shard], settings: WorkerSettings, layout: Layout) -> Iterator[dict]:
    """Every shard embedded and written by the actor pool; yields each one's summary (index,
    image rows, skipped inputs) as it finishes, in no particular order. A worker's user error
    ends the run as that error."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver draws its own bar, over rows
    context.print_on_execution_start = False
    # One block per shard, one shard per call: an actor never holds shards that an idle one
    # could take, and a retried call redoes a single shard.
    # Shards travel pickled: Arrow cannot hold a path that is not valid UTF-8.
    items = [{"shard": pickle.dumps(shard)} for shard in shards]
    dataset = ray.data.from_items(items, override_num_blocks=len(shards))
    dataset = dataset.map_batches(
        ShardEmbedder,
        fn_constructor_kwargs={"settings": settings},
        batch_size=1,
        num_cpus=layout.cpus,
        num_gpus=layout.gpus,
        compute=ray.data.ActorPoolStrategy(size=min(layout.workers, len(shards)), max_tasks_in_flight_per_actor=1),
    )
    for row in dataset.iter_rows():
        if row["error"]:
            raise worker_error(row["error"])
        yield row


def worker_error(text: str) -> SiglipError:
    """A worker's "Kind:message" as the error kind it was (exit codes go by kind)."""
    from .core import errors

    name, _, message = text.partition(":")
    kind = getattr(errors, name, SiglipError)
    return kind(message) if isinstance(kind, type) and issubclass(kind, SiglipError) else SiglipError(text)


class StoredRows:
    """A finished shard's rows, read when the final file asks for them: holding a memory map
    per shard would run into the kernel's limit on maps for a run of 100,000 shards."""

    def __init__(self, path: str):
        self.path = path

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(open_store(self.path).rows[index])


class ClusterRun(EmbedRun):
    """An EmbedRun whose rows come from shards embedded on Ray: the plan, the partial folder and
    its resume checks, and the final assembly are EmbedRun's own."""

    def __init__(self, engine, plan: EmbedPlan, out: Path, out_dtype: str, normalized: bool, templates,
                 resume: bool = False, base=None, hash_files: bool = False, *,
                 settings: WorkerSettings, layout: Layout, shard_size: int | None = None):
        if base is not None or hash_files:
            raise UsageError("--update does not run with --engine ray; update with the local engine")
        self.shard_size = shard_size or default_shard_size(len(plan.images) + len(set(plan.texts)))
        self.shards = cut_shards(plan, self.shard_size, Path(os.path.abspath(out)).with_name(out.name + ".partial") / "shards")
        self.worker_settings = settings
        self.layout = layout
        self._shard_skipped: list[dict] = []
        super().__init__(engine, plan, out, out_dtype, normalized, templates, resume)
        try:
            make_directory(self.partial.folder / "shards")
        except OSError as exc:
            raise cannot_write(self.partial.folder / "shards", exc) from None

    def state(self) -> dict:
        return {**super().state(), "engine": "ray", "shard_size": self.shard_size}

    def done_rows(self) -> int:
        return sum(len(s) for s in self.shards if s.finished)

    def todo(self) -> tuple[list[Source], list[tuple], list[str]]:
        left = [s for s in self.shards if not s.finished]
        images = [Source(n, v) for s in left if s.kind == "image" for n, v in zip(s.names, s.values)]
        stamps = [stamp for s in left if s.kind == "image" for stamp in s.stamps]
        return images, stamps, [t for s in left if s.kind == "text" for t in s.names]

    def embed(self, on_progress=None, on_skip=None, strict: bool = False) -> bool:
        self.record_listing_failures(on_skip)
        self.partial.commit()
        left = [s for s in self.shards if not s.finished]
        if not left:
            return True
        for done in run_shards(left, self.worker_settings, self.layout):
            shard = self.shards[done["index"]]
            if shard.kind == "image":
                on_progress and on_progress(len(shard))
                self.computed += int(done["images"])
            if on_skip and done["skipped"]:
                for skipped in open_store(shard.file).meta["skipped"]:
                    on_skip(skipped["error"])
        return True

    def entries(self) -> list[Entry]:
        """Every shard's rows in plan order (and, kept for the meta, what each one skipped)."""
        entries: list[Entry] = []
        self._shard_skipped = []
        for shard in self.shards:
            store = open_store(shard.file)
            if not set(store.names) <= set(shard.names):
                raise UsageError(f"{shard.file}: holds rows of other inputs; delete {self.partial.folder} to start over")
            rows = StoredRows(shard.file)
            for i, name in enumerate(store.names):
                entries.append(Entry(store.kind(i), name, tuple(store.stamps[i].tolist()), rows, i))
            self._shard_skipped += store.meta["skipped"]
        return entries

    def skipped_inputs(self) -> list[dict]:
        return super().skipped_inputs() + self._shard_skipped
