"""Verified GGUF downloads from the Hugging Face hub into its standard cache.

Why not plain `hf_hub_download`: huggingface-hub (2.x) downloads into a process-unique temporary file and
deletes it when the process fails, so an interrupted 48 GB download restarts from zero, and it checks only
the size, never the sha256. Here the hub's own pieces do the talking (`HfApi.model_info` for the file list
and LFS sha256, `http_get` for the ranged, retried, progress-barred transfer), while this module keeps a
stable `<sha256>.part` file to resume from, verifies the sha256, and only then renames the blob into the
cache layout huggingface-hub itself uses (blobs/, snapshots/<commit>/, refs/), so `scan_cache_dir`,
`hf_hub_download` and `find_cached_gguf` all see the result. A file under its final name is always complete
and verified. An optional callback hears the progress (bytes done and total over every shard), which the
server's /health reports while it downloads a model.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

from registry.hub_cache import (
    CacheLayout,
    HubLocation,
    find_cached_gguf,
    group_gguf_files,
    missing_shards,
)
from registry.models import (
    HubSource,
    Registry,
    RegistryError,
    ResolvedModel,
    load_registry,
    resolve_model,
)

_HASH_CHUNK_BYTES = 8 << 20

FreeBytes = Callable[[Path], int]
# Told how a pull goes: (bytes_done, bytes_total) over every file of the model, bytes already on disk (complete
# files, partial ones being resumed) counted as done. Called from the downloading thread after each chunk.
PullProgress = Callable[[int, int], None]


class PullError(RegistryError):
    """A download could not be planned, completed or verified; the message says what to do."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a hub repository, as the hub describes it."""

    path: str  # path inside the repository, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class PullPlan:
    """The files to fetch for one quantization, pinned to one commit."""

    repo: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


# ---------------------------------------------------------------- choosing files


def select_model_files(repo: str, repo_paths: Iterable[str], pattern: str) -> tuple[str, ...]:
    """The one complete model (single file or full shard set) that `pattern` names in a repository."""
    all_paths = list(repo_paths)
    groups = group_gguf_files(all_paths, pattern)
    if not groups:
        ggufs = sorted(p for p in all_paths if p.endswith(".gguf"))
        listing = ", ".join(ggufs[:8]) + (" ..." if len(ggufs) > 8 else "") if ggufs else "no .gguf files"
        raise PullError(f"no file in {repo} matches {pattern!r} (the repository has: {listing})")
    if len(groups) > 1:
        firsts = ", ".join(g[0] for g in groups)
        raise PullError(f"{pattern!r} matches {len(groups)} different models in {repo} ({firsts}); narrow it")
    files = groups[0]
    if absent := missing_shards(files):
        raise PullError(f"{repo} lacks shard(s) {absent} of {files[0]}; the upload looks incomplete")
    return files


# ---------------------------------------------------------------- planning (network: model info only)


def plan_pull(
    hub: HubLocation,
    repo: str,
    pattern: str,
    revision: str = "main",
    pinned_sha256: dict[str, str] | None = None,
) -> PullPlan:
    """Ask the hub which files make up the model and what their sizes and sha256 are."""
    from huggingface_hub import HfApi

    if hub.offline:
        raise PullError(f"cannot list {repo}: offline mode is on (HF_HUB_OFFLINE=1)")
    try:
        info = HfApi(endpoint=hub.endpoint).model_info(repo, revision=revision, files_metadata=True)
    except _network_errors() as exc:
        raise PullError(f"cannot list {repo}@{revision} on {hub.endpoint}: {_first_line(exc)}") from exc
    if not info.sha:
        raise PullError(f"{hub.endpoint} did not say which commit {repo}@{revision} is")
    siblings = {s.rfilename: s for s in info.siblings or []}
    pinned = pinned_sha256 or {}
    files = []
    for repo_path in select_model_files(repo, siblings, pattern):
        sibling = siblings[repo_path]
        hub_sha = sibling.lfs.sha256 if sibling.lfs is not None else None
        size = sibling.lfs.size if sibling.lfs is not None else sibling.size
        expected = pinned.get(repo_path) or pinned.get(PurePosixPath(repo_path).name) or hub_sha
        if expected is None or size is None:
            raise PullError(f"{repo}/{repo_path} has no sha256/size on the hub and none in models.yaml")
        if hub_sha is not None and hub_sha != expected:
            raise PullError(
                f"{repo}/{repo_path}: the hub's sha256 {hub_sha} differs from models.yaml's {expected}; "
                "the file changed upstream (update models.yaml if that is expected)"
            )
        files.append(RemoteFile(path=repo_path, size=size, sha256=expected))
    return PullPlan(repo=repo, revision=revision, commit=info.sha, files=tuple(files))


# ---------------------------------------------------------------- disk


def free_bytes_at(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(Path.cwd()).free


def bytes_still_needed(plan: PullPlan, layout: CacheLayout) -> int:
    """Bytes left to download: complete blobs count 0, partial ones count what they lack."""
    return sum(remote.size - _bytes_present(layout, remote) for remote in plan.files)


def _bytes_present(layout: CacheLayout, remote: RemoteFile) -> int:
    """What of one file is already here: all of a complete blob, the usable prefix of a partial one."""
    if _blob_is_complete(layout, remote):
        return remote.size
    partial = layout.partial(remote.sha256)
    return min(partial.stat().st_size, remote.size) if partial.is_file() else 0


def check_free_space(plan: PullPlan, layout: CacheLayout, free_bytes: FreeBytes = free_bytes_at) -> None:
    needed = bytes_still_needed(plan, layout)
    free = free_bytes(layout.cache_dir)
    if needed > free:
        raise PullError(
            f"not enough disk space for {plan.repo}: {_gb(needed)} still to download, "
            f"{_gb(free)} free under {layout.cache_dir} (set HF_HOME or HF_HUB_CACHE to a bigger disk)"
        )


# ---------------------------------------------------------------- transfer + verification


def execute_pull(
    hub: HubLocation, plan: PullPlan, free_bytes: FreeBytes = free_bytes_at, progress: PullProgress | None = None
) -> Path:
    """Download every file of the plan (resuming partial ones), verify each, link them; return the first."""
    from filelock import FileLock  # a huggingface-hub dependency

    layout = CacheLayout(hub.cache_dir, plan.repo)
    check_free_space(plan, layout, free_bytes)
    present = {remote.path: _bytes_present(layout, remote) for remote in plan.files}

    def report(remote: RemoteFile, n_bytes: int) -> None:
        present[remote.path] = n_bytes
        if progress is not None:
            progress(sum(present.values()), plan.total_bytes)

    if progress is not None:
        progress(sum(present.values()), plan.total_bytes)
    for remote in plan.files:
        layout.lock(remote.sha256).parent.mkdir(parents=True, exist_ok=True)
        # Two pulls of the same file must not append to one partial file; the second waits.
        with FileLock(layout.lock(remote.sha256)):
            if not _blob_is_complete(layout, remote):
                _download_blob(hub, plan, remote, layout, on_size=partial(report, remote))
            _link_pointer(layout, plan.commit, remote)
        report(remote, remote.size)
    if plan.revision != plan.commit:
        layout.ref(plan.revision).parent.mkdir(parents=True, exist_ok=True)
        layout.ref(plan.revision).write_text(plan.commit)
    return layout.pointer(plan.commit, plan.files[0].path)


def _blob_is_complete(layout: CacheLayout, remote: RemoteFile) -> bool:
    blob = layout.blob(remote.sha256)
    return blob.is_file() and blob.stat().st_size == remote.size


class _SizeReportingFile:
    """The partial file as http_get sees it: after every write, the file's new size goes to `on_size`."""

    def __init__(self, file: BinaryIO, on_size: Callable[[int], None]) -> None:
        self._file = file
        self._on_size = on_size

    def write(self, data: bytes) -> int:
        written = self._file.write(data)
        self._on_size(self._file.tell())
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)  # tell, seek, truncate, flush: the file's own


def _download_blob(
    hub: HubLocation,
    plan: PullPlan,
    remote: RemoteFile,
    layout: CacheLayout,
    on_size: Callable[[int], None] | None = None,
) -> None:
    from huggingface_hub import get_token, hf_hub_url
    from huggingface_hub.file_download import http_get

    partial = layout.partial(remote.sha256)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if partial.is_file() and partial.stat().st_size > remote.size:
        partial.unlink()  # longer than the file can be: not a prefix of it
    url = hf_hub_url(plan.repo, remote.path, revision=plan.commit, endpoint=hub.endpoint)
    with partial.open("ab") as sink:
        resume_from = sink.tell()
        if resume_from < remote.size:
            target = cast(BinaryIO, _SizeReportingFile(sink, on_size)) if on_size is not None else sink
            try:
                http_get(
                    url,
                    target,
                    resume_size=resume_from,
                    headers={"authorization": f"Bearer {token}"} if (token := get_token()) else {},
                    expected_size=remote.size,  # the whole file: http_get counts resumed bytes too
                    displayed_filename=PurePosixPath(remote.path).name,
                )
            except _network_errors() as exc:
                raise PullError(
                    f"download of {plan.repo}/{remote.path} stopped: {_first_line(exc)}; "
                    "run the same command again to resume"
                ) from exc
    actual = sha256_of_file(partial, label=PurePosixPath(remote.path).name)
    if actual != remote.sha256:
        partial.unlink()
        raise PullError(
            f"{plan.repo}/{remote.path} is corrupt: sha256 {actual} != expected {remote.sha256}; "
            "the bad download was deleted, run the command again"
        )
    os.replace(partial, layout.blob(remote.sha256))


def sha256_of_file(path: Path, label: str = "") -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    size = path.stat().st_size
    # Same switch as huggingface-hub's own download bar; None: shown on a terminal only.
    hidden = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in {"1", "ON", "YES", "TRUE"}
    with (
        path.open("rb") as source,
        tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {label}", leave=False, disable=hidden or None) as bar,
    ):
        while chunk := source.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _link_pointer(layout: CacheLayout, commit: str, remote: RemoteFile) -> None:
    pointer = layout.pointer(commit, remote.path)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(layout.blob(remote.sha256), pointer.parent)
    if pointer.is_symlink() or pointer.exists():
        if pointer.is_symlink() and os.readlink(pointer) == target:
            return
        pointer.unlink()
    tmp = pointer.with_name(pointer.name + ".link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, pointer)


# ---------------------------------------------------------------- cache lookup (no network)


# ---------------------------------------------------------------- entry points


def pull_model(
    name: str,
    quant: str | None = None,
    *,
    registry: Registry | None = None,
    hub: HubLocation | None = None,
    free_bytes: FreeBytes = free_bytes_at,
    progress: PullProgress | None = None,
) -> Path:
    """Make sure the models.yaml model `name` (quantization `quant`) is in the hub cache; return its path."""
    entry = (registry or load_registry()).entry(name)
    if entry.hub is None:
        raise PullError(f"model {name!r} has no hub source in models.yaml; nothing to pull")
    source = entry.hub
    pattern = _quant_pattern(name, source, quant)
    hub = hub or HubLocation.from_environment()
    if hub.offline:
        cached = find_cached_gguf(source.repo, pattern, source.revision, hub.cache_dir)
        if cached is not None:
            return cached
        raise PullError(
            f"model {name!r} is not in the cache and offline mode is on (HF_HUB_OFFLINE=1); "
            f"unset it and run: python -m convert pull {name}"
        )
    plan = plan_pull(hub, source.repo, pattern, source.revision, source.sha256)
    return execute_pull(hub, plan, free_bytes, progress)


def locate_model(
    name_or_path: str,
    *,
    allow_download: bool,
    registry: Registry | None = None,
    hub: HubLocation | None = None,
) -> ResolvedModel | None:
    """A name or path as a local GGUF, without downloading anything; None for a models.yaml hub model that
    is not downloaded yet and may be (downloads allowed, hub not offline). RegistryError for what can never
    resolve here: an unknown name, a missing file, or a model to download while downloads cannot happen."""
    try:
        return resolve_model(name_or_path, registry)
    except RegistryError:
        registry = registry or load_registry()
        entry = registry.models.get(name_or_path)
        if entry is None or entry.hub is None:
            raise
    hub = hub or HubLocation.from_environment()
    if not allow_download or hub.offline:
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if hub.offline else "downloads are turned off"
        raise RegistryError(
            f"model {name_or_path!r} is not downloaded yet and {why}; run: python -m convert pull {name_or_path}"
        )
    return None


def ensure_model(
    name_or_path: str,
    *,
    allow_download: bool,
    registry: Registry | None = None,
    hub: HubLocation | None = None,
    progress: PullProgress | None = None,
) -> ResolvedModel:
    """Resolve a name or path to a local GGUF, pulling a models.yaml hub model on first use when allowed."""
    hub = hub or HubLocation.from_environment()
    found = locate_model(name_or_path, allow_download=allow_download, registry=registry, hub=hub)
    if found is not None:
        return found
    registry = registry or load_registry()
    entry = registry.entry(name_or_path)
    path = pull_model(name_or_path, registry=registry, hub=hub, progress=progress)
    return ResolvedModel(name=entry.name, path=path, context=entry.context, chat_template=entry.chat_template)


def _quant_pattern(name: str, source: HubSource, quant: str | None) -> str:
    chosen = quant or source.default_quant
    if chosen not in source.quants:
        known = ", ".join(sorted(source.quants))
        raise PullError(f"model {name!r} has no quantization {chosen!r} in models.yaml (known: {known})")
    return source.quants[chosen]


def _network_errors() -> tuple[type[BaseException], ...]:
    """OSError (hub HTTP errors derive from it) plus the HTTP client's transport errors: huggingface-hub 2.x
    uses httpx2, 1.x httpx."""
    errors: list[type[BaseException]] = [OSError]
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module_name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB"
