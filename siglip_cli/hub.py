"""Model reference (local folder or hub id) -> local folder with the checkpoint files.

A local folder is used as it is. A hub id is looked up in the Hugging Face cache first (no
network at all when it is there, so repeated runs start fast and work offline); otherwise the
files this tool reads -- and only those: never pickled `.bin` weights or tokenizer pickles --
are downloaded with `huggingface_hub`, which honours `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN` and
`HF_ENDPOINT`. Which tokenizer files those are depends on the checkpoint (`spiece.model` for
SigLIP, `tokenizer.json` for SigLIP 2), so the small configuration files come first and say.
Offline (`--offline`, `HF_HUB_OFFLINE=1`) nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .core.errors import ModelUnavailable

DEFAULT_MODEL = "google/siglip-base-patch16-224"
MODEL_FILES = ("config.json", "model.safetensors")
# Required too, after the tokenizer's files: its resize filter (bicubic for SigLIP, bilinear for
# SigLIP 2 at a fixed resolution) cannot be told from config.json, whose model_type is "siglip" for
# both, so a guess would silently give other pixels. transformers' own pipeline needs it as well.
PREPROCESSOR_FILE = "preprocessor_config.json"
# Read when present: tokenizer settings and special tokens. (The preprocessor file stays in this
# list, which orders local_fingerprint, so that a folder's revision does not change with it.)
OPTIONAL_FILES = (PREPROCESSOR_FILE, "tokenizer_config.json", "special_tokens_map.json")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for
    folder: Path
    revision: str  # hub commit, or a fingerprint of a local folder's weights


def offline_from_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def _model_and_tokenizer_files(folder: Path) -> tuple[str, ...]:
    from .core.config import read_model_type
    from .core.tokenizer import tokenizer_family

    if not (folder / "config.json").is_file():
        return MODEL_FILES
    return MODEL_FILES + tokenizer_family(folder, read_model_type(folder)).files


def required_files(folder: Path) -> tuple[str, ...]:
    """config.json, the weights, the files of the checkpoint's tokenizer family (decided by the
    folder's config.json and tokenizer_config.json, once those are there) and
    preprocessor_config.json."""
    return _model_and_tokenizer_files(folder) + (PREPROCESSOR_FILE,)


def missing_files(folder: Path) -> list[str]:
    return [name for name in required_files(folder) if not (folder / name).is_file()]


def local_fingerprint(folder: Path) -> str:
    """Identity of a local checkpoint that changes when its files change, without reading
    gigabytes: the safetensors header (names, dtypes, offsets), sizes and modification times."""
    digest = hashlib.sha256()
    for name in _model_and_tokenizer_files(folder) + OPTIONAL_FILES:  # this order: revisions stay as before
        path = folder / name
        if not path.is_file():
            continue
        stat = path.stat()
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    weights = folder / "model.safetensors"
    if weights.is_file():
        with open(weights, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(min(header_len, 1 << 24)))
    return "local-" + digest.hexdigest()[:16]


def _path_like(name: str) -> bool:
    """A value meant as a folder: `./ck`, `../ck`, `/data/ck`, `~/ck` (a hub id never starts so)."""
    return name.startswith((".", "/", "~", os.sep)) or (os.altsep is not None and os.altsep in name)


def resolve_model(name: str, offline: bool | None = None, revision: str | None = None) -> ResolvedModel:
    path = Path(name).expanduser()
    if path.is_dir():
        missing = missing_files(path)
        if missing:
            raise ModelUnavailable(
                f"{path}: missing {', '.join(missing)} (this checkpoint needs "
                f"{', '.join(required_files(path))}); copy them from the model's hub repository"
            )
        return ResolvedModel(name=name, folder=path, revision=local_fingerprint(path))
    if path.exists():
        raise ModelUnavailable(f"{name}: is a file; --model takes a checkpoint folder or a hub id")
    if _path_like(name):
        raise ModelUnavailable(f"{name}: no such folder")
    if not _REPO_ID.match(name):
        raise ModelUnavailable(f"{name}: no such folder, and not a Hugging Face hub id (owner/name)")
    if offline is None:
        offline = offline_from_env()
    try:
        return _resolve_hub(name, offline, revision)
    except ModelUnavailable as exc:
        if path.parent.is_dir() and path.parent != Path("."):
            # `models/ck` where ./models exists was most likely meant as a folder.
            raise ModelUnavailable(f"{name}: no such folder (its parent {path.parent} exists); as a hub id: {exc}") from None
        raise


def _snapshot(repo_id: str, revision: str | None, local_only: bool) -> Path:
    """The snapshot folder holding the configuration files, then every file the checkpoint
    needs (which depends on them). Raises the hub's own errors."""
    from huggingface_hub import snapshot_download

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_only))

    configs = ["config.json", *OPTIONAL_FILES]
    folder = fetch(configs)
    return fetch(configs + list(required_files(folder)))


def _resolve_hub(repo_id: str, offline: bool, revision: str | None) -> ResolvedModel:
    cached = None
    try:
        cached = _snapshot(repo_id, revision, local_only=True)
    except ModelUnavailable:
        raise
    except Exception:  # not cached (LocalEntryNotFoundError and friends across hub versions)
        cached = None
    if cached is not None and not missing_files(cached):
        return ResolvedModel(repo_id, cached, cached.name)
    if offline:
        raise ModelUnavailable(_not_cached_message(repo_id, "offline mode is on (--offline or HF_HUB_OFFLINE)"))
    try:
        folder = _snapshot(repo_id, revision, local_only=False)
    except ModelUnavailable:
        raise
    except Exception as exc:
        raise ModelUnavailable(_download_failure(repo_id, exc)) from None
    missing = missing_files(folder)
    if missing:
        raise ModelUnavailable(
            f"{repo_id}: the repository has no {', '.join(missing)}; siglip-cli reads SigLIP checkpoints "
            "in the Hugging Face layout with safetensors weights"
        )
    return ResolvedModel(repo_id, folder, folder.name)


def _not_cached_message(repo_id: str, why: str) -> str:
    return (
        f"{repo_id}: not in the local Hugging Face cache and {why}; download it once where the hub "
        f"is reachable, or pass --model /path/to/folder holding {', '.join(MODEL_FILES)}, {PREPROCESSOR_FILE} and "
        "the tokenizer (spiece.model for SigLIP, tokenizer.json for SigLIP 2)"
    )


def _download_failure(repo_id: str, exc: Exception) -> str:
    kind = type(exc).__name__
    if kind == "HFValidationError":
        return f"{repo_id}: no such folder, and not a valid Hugging Face hub id"
    if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return f"{repo_id}: not found on the Hugging Face hub, or gated/private ({kind}); check the name or log in with HF_TOKEN"
    if kind in ("LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "OfflineModeIsEnabled") or "connect" in str(exc).lower():
        return _not_cached_message(repo_id, "the hub cannot be reached")
    return _not_cached_message(repo_id, f"the download failed ({kind}: {str(exc).splitlines()[0] if str(exc) else ''})")
