"""The Hugging Face hub's local cache, read without huggingface_hub: where a repository's files live
(models--owner--name/blobs, snapshots/<commit>, refs), which files a models.yaml pattern names, and whether a
complete GGUF (all shards) is already there. convert/pull.py writes this layout; the registry reads it.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class HubLocation:
    """Where the hub is and where its cache lives, read from the environment when asked (not at import)."""

    endpoint: str
    cache_dir: Path
    offline: bool

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> HubLocation:
        env = dict(os.environ if environ is None else environ)
        home = Path(env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or str(home / "hub")
        offline_flag = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
        return cls(
            endpoint=(env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
            cache_dir=Path(os.path.expandvars(cache)).expanduser(),
            offline=offline_flag.strip().upper() in {"1", "ON", "YES", "TRUE"},
        )


@dataclass(frozen=True)
class CacheLayout:
    """Paths of one repository inside the huggingface-hub cache (models--owner--name/...)."""

    cache_dir: Path
    repo: str

    @property
    def storage(self) -> Path:
        return self.cache_dir / ("models--" + self.repo.replace("/", "--"))

    def blob(self, sha256: str) -> Path:
        return self.storage / "blobs" / sha256

    def partial(self, sha256: str) -> Path:
        # Named after the content hash: a partial file is only ever resumed with bytes of the same file.
        return self.storage / "blobs" / f"{sha256}.part"

    def lock(self, sha256: str) -> Path:
        return self.cache_dir / ".locks" / self.storage.name / f"{sha256}.lock"

    def snapshot(self, commit: str) -> Path:
        return self.storage / "snapshots" / commit

    def pointer(self, commit: str, repo_path: str) -> Path:
        return self.snapshot(commit).joinpath(*PurePosixPath(repo_path).parts)

    def ref(self, revision: str) -> Path:
        return self.storage / "refs" / revision

    def commit_for(self, revision: str) -> str | None:
        """The commit a branch/tag last resolved to here, or the revision itself if it is a cached commit."""
        if self.snapshot(revision).is_dir():
            return revision
        ref = self.ref(revision)
        return ref.read_text().strip() if ref.is_file() else None


def matches_pattern(repo_path: str, pattern: str) -> bool:
    """A pattern with a '/' is matched against the whole repository path, otherwise against the file name.

    So "Model-Q4_K_M*.gguf" finds the file at the top level and inside a "Q4_K_M/" folder alike.
    """
    target = repo_path if "/" in pattern else PurePosixPath(repo_path).name
    return fnmatch.fnmatchcase(target, pattern)


def group_gguf_files(repo_paths: Iterable[str], pattern: str) -> list[tuple[str, ...]]:
    """Matching files grouped into models: each shard set is one group, each single file another."""
    groups: dict[str, list[str]] = {}
    for repo_path in sorted(set(repo_paths)):
        if not matches_pattern(repo_path, pattern):
            continue
        shard = SHARD_NAME.match(repo_path)
        key = f"{shard['stem']}-of-{shard['count']}" if shard else repo_path
        groups.setdefault(key, []).append(repo_path)
    return [tuple(files) for _, files in sorted(groups.items())]


def missing_shards(files: Sequence[str]) -> list[int]:
    """Shard numbers (1-based) absent from a shard set; [] for a single, unsharded file."""
    shard = SHARD_NAME.match(files[0])
    if shard is None:
        return []
    present = {int(m["index"]) for f in files if (m := SHARD_NAME.match(f))}
    return [i for i in range(1, int(shard["count"]) + 1) if i not in present]


def find_cached_gguf(repo: str, pattern: str, revision: str = "main", cache_dir: Path | None = None) -> Path | None:
    """The first GGUF (or first shard of a complete shard set) matching `pattern` in the local hub cache."""
    layout = CacheLayout(cache_dir or HubLocation.from_environment().cache_dir, repo)
    commit = layout.commit_for(revision)
    if commit is None:
        return None
    snapshot = layout.snapshot(commit)
    present = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf") if p.is_file()]
    for files in group_gguf_files(present, pattern):
        if not missing_shards(files):
            return layout.pointer(commit, files[0])
    return None
