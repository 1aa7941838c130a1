"""`python -m convert pull` and `ensure_model` against a fake hub on 127.0.0.1 (conftest.FakeHub)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, FakeRepo

from convert.pull import PullError, ensure_model, locate_model, pull_model, select_model_files
from registry.hub_cache import CacheLayout, HubLocation, find_cached_gguf, group_gguf_files, matches_pattern
from registry.models import Registry, RegistryError, load_registry, resolve_model

REPO = "test-org/Tiny-GGUF"
SHARD_1 = "Tiny-Q4_K_M-00001-of-00002.gguf"
SHARD_2 = "Tiny-Q4_K_M-00002-of-00002.gguf"
SINGLE = "Q8_0/Tiny-Q8_0.gguf"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _payload(n_bytes: int, seed: int) -> bytes:
    return bytes((i * 31 + seed * 7) % 251 for i in range(n_bytes))


def _files() -> dict[str, bytes]:
    return {
        SHARD_1: b"GGUF" + _payload(300_000, 1),
        SHARD_2: _payload(200_000, 2),
        SINGLE: b"GGUF" + _payload(50_000, 3),
        "README.md": b"# tiny\n",
    }


def _write_registry(tmp_path: Path, sha256_lines: str = "") -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        f"""default: tiny
models:
  tiny:
    description: a tiny test model
    hub:
      repo: {REPO}
      default_quant: Q4_K_M
      quants:
        Q4_K_M: "Tiny-Q4_K_M*.gguf"
        Q8_0: "Tiny-Q8_0.gguf"
        Q2_K: "Tiny-Q2_K.gguf"
{sha256_lines}    context: 2048
"""
    )
    return path


@pytest.fixture
def repo(fake_hub: FakeHub) -> FakeRepo:
    fake_hub.repos[REPO] = FakeRepo(files=_files())
    return fake_hub.repos[REPO]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return load_registry(_write_registry(tmp_path))


@pytest.fixture
def hub(fake_hub: FakeHub, hf_home: Path) -> HubLocation:
    return HubLocation(endpoint=fake_hub.endpoint, cache_dir=hf_home / "hub", offline=False)


def _cache_files(hub: HubLocation) -> list[str]:
    """Files in the hub cache, lock files aside."""
    found = (p.relative_to(hub.cache_dir) for p in hub.cache_dir.rglob("*") if p.is_file())
    return sorted(str(p) for p in found if p.parts[0] != ".locks")


# ---------------------------------------------------------------- choosing files


def test_pattern_matches_file_name_at_any_depth_or_the_full_path() -> None:
    assert matches_pattern("Q4_K_M/M-Q4_K_M-00001-of-00002.gguf", "M-Q4_K_M*.gguf")
    assert matches_pattern("M-Q4_K_M.gguf", "M-Q4_K_M*.gguf")
    assert not matches_pattern("Q8_0/M-Q8_0.gguf", "M-Q4_K_M*.gguf")
    assert matches_pattern("Q8_0/M-Q8_0.gguf", "Q8_0/*.gguf")
    assert not matches_pattern("M-Q8_0.gguf", "Q8_0/*.gguf")


def test_shards_group_into_one_model_and_gaps_are_refused() -> None:
    names = ["a-00001-of-00003.gguf", "a-00002-of-00003.gguf", "a-00003-of-00003.gguf", "b.gguf"]
    assert group_gguf_files(names, "a*.gguf") == [tuple(names[:3])]
    assert select_model_files("r/x", names, "a*.gguf") == tuple(names[:3])
    with pytest.raises(PullError, match=r"lacks shard\(s\) \[2\]"):
        select_model_files("r/x", [names[0], names[2]], "a*.gguf")
    with pytest.raises(PullError, match="matches 2 different models"):
        select_model_files("r/x", names, "*.gguf")


# ---------------------------------------------------------------- downloads


def test_pull_fetches_every_shard_verifies_and_fills_the_hub_cache(
    repo: FakeRepo, registry: Registry, hub: HubLocation, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = pull_model("tiny", registry=registry, hub=hub)

    assert first.name == SHARD_1
    assert first.read_bytes() == repo.files[SHARD_1]
    assert (first.parent / SHARD_2).read_bytes() == repo.files[SHARD_2]
    assert first.is_symlink()  # the hub cache layout: snapshots/<commit>/file -> ../../blobs/<sha256>
    assert first.resolve() == CacheLayout(hub.cache_dir, REPO).blob(repo.sha256(SHARD_1))
    assert not any(name.endswith(".part") for name in _cache_files(hub))
    assert find_cached_gguf(REPO, "Tiny-Q4_K_M*.gguf", cache_dir=hub.cache_dir) == first

    # huggingface-hub itself recognizes the cache entries as its own
    from huggingface_hub import hf_hub_download

    again = hf_hub_download(REPO, SHARD_2, cache_dir=hub.cache_dir, local_files_only=True)
    assert Path(again).read_bytes() == repo.files[SHARD_2]

    # resolve_model (the server's lookup) finds it through HF_HUB_CACHE read at call time
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.cache_dir))
    assert resolve_model("tiny", registry).path == first

    # a second pull downloads nothing
    n_gets = len([r for r in fake_hub.log if r.method == "GET" and "/resolve/" in r.path])
    assert pull_model("tiny", registry=registry, hub=hub) == first
    assert len([r for r in fake_hub.log if r.method == "GET" and "/resolve/" in r.path]) == n_gets


def test_pull_of_a_file_in_a_subfolder(repo: FakeRepo, registry: Registry, hub: HubLocation) -> None:
    path = pull_model("tiny", "Q8_0", registry=registry, hub=hub)
    assert path.parent.name == "Q8_0"
    assert path.read_bytes() == repo.files[SINGLE]


def test_pull_resumes_from_a_partial_file_left_by_an_earlier_run(
    repo: FakeRepo, registry: Registry, hub: HubLocation, fake_hub: FakeHub
) -> None:
    layout = CacheLayout(hub.cache_dir, REPO)
    partial = layout.partial(repo.sha256(SHARD_1))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(repo.files[SHARD_1][:123_456])

    first = pull_model("tiny", registry=registry, hub=hub)

    assert first.read_bytes() == repo.files[SHARD_1]
    assert [r.range for r in fake_hub.downloads(SHARD_1)] == ["bytes=123456-"]
    assert [r.range for r in fake_hub.downloads(SHARD_2)] == [None]
    assert not partial.exists()


def test_pull_reports_progress_over_every_shard_counting_resumed_bytes(
    repo: FakeRepo, registry: Registry, hub: HubLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16_384)  # many chunks: many reports
    partial = CacheLayout(hub.cache_dir, REPO).partial(repo.sha256(SHARD_1))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(repo.files[SHARD_1][:123_456])
    total = len(repo.files[SHARD_1]) + len(repo.files[SHARD_2])
    reports: list[tuple[int, int]] = []

    pull_model("tiny", registry=registry, hub=hub, progress=lambda done, of: reports.append((done, of)))

    assert reports[0] == (123_456, total)  # the resumed bytes count from the start
    assert reports[-1] == (total, total)
    assert {of for _, of in reports} == {total}
    done = [done for done, _ in reports]
    assert done == sorted(done) and len(set(done)) > 20
    assert (len(repo.files[SHARD_1]), total) in reports  # shard 1 complete, shard 2 not started

    reports.clear()
    pull_model("tiny", registry=registry, hub=hub, progress=lambda done, of: reports.append((done, of)))
    assert reports and set(reports) == {(total, total)}  # nothing left to fetch


def test_locate_model_never_downloads_and_says_what_can_never_resolve(
    repo: FakeRepo, registry: Registry, hub: HubLocation, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.cache_dir))
    assert locate_model("tiny", allow_download=True, registry=registry, hub=hub) is None  # to be downloaded
    assert fake_hub.log == []
    with pytest.raises(RegistryError, match="unknown model 'nope'"):
        locate_model("nope", allow_download=True, registry=registry, hub=hub)
    offline = HubLocation(endpoint=hub.endpoint, cache_dir=hub.cache_dir, offline=True)
    with pytest.raises(RegistryError, match=r"offline mode is on .*run: python -m convert pull tiny"):
        locate_model("tiny", allow_download=True, registry=registry, hub=offline)
    with pytest.raises(RegistryError, match="downloads are turned off"):
        locate_model("tiny", allow_download=False, registry=registry, hub=hub)
    path = pull_model("tiny", registry=registry, hub=hub)
    located = locate_model("tiny", allow_download=False, registry=registry, hub=offline)
    assert located is not None and located.path == path


def test_interrupted_download_fails_in_one_line_keeps_no_final_file_and_resumes(
    repo: FakeRepo, registry: Registry, hub: HubLocation, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # huggingface-hub writes whole chunks (10 MB by default); small ones make a 300 kB file resumable
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16_384)
    repo.cut_after[SHARD_1] = 100_000  # the connection drops after 100 kB, then the hub answers 503

    with pytest.raises(PullError, match="run the same command again to resume") as failure:
        pull_model("tiny", registry=registry, hub=hub)

    assert "\n" not in str(failure.value)
    layout = CacheLayout(hub.cache_dir, REPO)
    assert not layout.blob(repo.sha256(SHARD_1)).exists()
    assert not layout.pointer(repo.commit, SHARD_1).exists()
    kept = layout.partial(repo.sha256(SHARD_1)).stat().st_size
    assert 50_000 < kept <= 100_000

    repo.cut_after.clear()  # the hub is back
    first = pull_model("tiny", registry=registry, hub=hub)

    assert first.read_bytes() == repo.files[SHARD_1]
    assert fake_hub.downloads(SHARD_1)[-1].range == f"bytes={kept}-"


def test_corrupt_download_is_refused_and_deleted(repo: FakeRepo, registry: Registry, hub: HubLocation) -> None:
    repo.corrupt.add(SHARD_2)

    with pytest.raises(PullError, match=f"{SHARD_2} is corrupt: sha256 [0-9a-f]{{64}} != expected"):
        pull_model("tiny", registry=registry, hub=hub)

    names = _cache_files(hub)
    assert not any(SHARD_2 in n or repo.sha256(SHARD_2) in n for n in names)
    assert find_cached_gguf(REPO, "Tiny-Q4_K_M*.gguf", cache_dir=hub.cache_dir) is None


def test_models_yaml_sha256_must_agree_with_the_hub(repo: FakeRepo, tmp_path: Path, hub: HubLocation) -> None:
    pinned = "a" * 64
    registry = load_registry(_write_registry(tmp_path, f"      sha256:\n        {SHARD_1}: {pinned}\n"))

    with pytest.raises(PullError, match=f"differs from models.yaml's {pinned}"):
        pull_model("tiny", registry=registry, hub=hub)
    assert _cache_files(hub) == []


def test_a_quantization_the_repository_lacks(repo: FakeRepo, registry: Registry, hub: HubLocation) -> None:
    with pytest.raises(PullError, match=f"no file in {REPO} matches 'Tiny-Q2_K.gguf'.*Tiny-Q4_K_M-00001"):
        pull_model("tiny", "Q2_K", registry=registry, hub=hub)
    with pytest.raises(PullError, match=r"no quantization 'IQ1_S'.*known: Q2_K, Q4_K_M, Q8_0"):
        pull_model("tiny", "IQ1_S", registry=registry, hub=hub)


def test_a_listed_file_the_hub_cannot_serve(repo: FakeRepo, registry: Registry, hub: HubLocation) -> None:
    repo.unavailable.add(SHARD_2)
    with pytest.raises(PullError, match=f"download of {REPO}/{SHARD_2} stopped: .*404"):
        pull_model("tiny", registry=registry, hub=hub)
    assert find_cached_gguf(REPO, "Tiny-Q4_K_M*.gguf", cache_dir=hub.cache_dir) is None


def test_unknown_repository(fake_hub: FakeHub, registry: Registry, hub: HubLocation) -> None:
    with pytest.raises(PullError, match=f"cannot list {REPO}@main on {fake_hub.endpoint}"):
        pull_model("tiny", registry=registry, hub=hub)


def test_too_little_disk_is_refused_before_downloading(
    repo: FakeRepo, registry: Registry, hub: HubLocation, fake_hub: FakeHub
) -> None:
    def tiny_disk(path: Path) -> int:
        return 400_000  # the two shards need 500_004 bytes

    with pytest.raises(PullError, match=r"not enough disk space .*0\.00 GB free under"):
        pull_model("tiny", registry=registry, hub=hub, free_bytes=tiny_disk)
    assert fake_hub.downloads(SHARD_1) == [] and fake_hub.downloads(SHARD_2) == []
    assert _cache_files(hub) == []


def test_disk_check_counts_only_what_is_still_missing(repo: FakeRepo, registry: Registry, hub: HubLocation) -> None:
    partial = CacheLayout(hub.cache_dir, REPO).partial(repo.sha256(SHARD_1))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(repo.files[SHARD_1][:200_000])
    still_needed = len(repo.files[SHARD_1]) - 200_000 + len(repo.files[SHARD_2])

    def just_enough(path: Path) -> int:
        return still_needed

    assert pull_model("tiny", registry=registry, hub=hub, free_bytes=just_enough).is_file()


# ---------------------------------------------------------------- offline and first use


def test_offline_pull_uses_the_cache_or_says_what_to_run(
    repo: FakeRepo, registry: Registry, hub: HubLocation, fake_hub: FakeHub
) -> None:
    offline = HubLocation(endpoint=hub.endpoint, cache_dir=hub.cache_dir, offline=True)
    with pytest.raises(PullError, match=r"offline mode is on .*run: python -m convert pull tiny"):
        pull_model("tiny", registry=registry, hub=offline)
    assert fake_hub.log == []

    online_path = pull_model("tiny", registry=registry, hub=hub)
    n_requests = len(fake_hub.log)
    assert pull_model("tiny", registry=registry, hub=offline) == online_path
    assert len(fake_hub.log) == n_requests


def test_ensure_model_pulls_on_first_use_only_when_allowed(
    repo: FakeRepo, registry: Registry, hub: HubLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.cache_dir))
    with pytest.raises(RegistryError, match=r"not downloaded yet .*run: python -m convert pull tiny"):
        ensure_model("tiny", allow_download=False, registry=registry, hub=hub)
    offline = HubLocation(endpoint=hub.endpoint, cache_dir=hub.cache_dir, offline=True)
    with pytest.raises(RegistryError, match=r"HF_HUB_OFFLINE=1\); run: python -m convert pull tiny"):
        ensure_model("tiny", allow_download=True, registry=registry, hub=offline)

    resolved = ensure_model("tiny", allow_download=True, registry=registry, hub=hub)

    assert resolved.name == "tiny" and resolved.context == 2048
    assert resolved.path.read_bytes() == repo.files[SHARD_1]
    assert ensure_model("tiny", allow_download=False, registry=registry, hub=offline).path == resolved.path


def test_ensure_model_passes_paths_and_packaged_models_through(tmp_path: Path) -> None:
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert ensure_model(str(gguf_file), allow_download=False).path == gguf_file.resolve()
    assert ensure_model("smollm2-135m-instruct", allow_download=False).path.name.endswith(".gguf")
    with pytest.raises(RegistryError, match="unknown model 'nope'"):
        ensure_model("nope", allow_download=True)


# ---------------------------------------------------------------- the CLI


def _cli(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env_extra}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", "convert", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_pull_prints_the_path_and_fails_in_one_line(
    repo: FakeRepo, tmp_path: Path, fake_hub: FakeHub, hf_home: Path
) -> None:
    models = str(_write_registry(tmp_path))
    env = {"HF_ENDPOINT": fake_hub.endpoint, "HF_HOME": str(hf_home)}

    offline = _cli(["pull", "tiny", "--registry", models], {**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode != 0
    assert offline.stderr.strip().count("\n") == 0
    assert "python -m convert pull tiny" in offline.stderr

    repo.corrupt.add(SINGLE)
    corrupt = _cli(["pull", "tiny", "--quant", "Q8_0", "--registry", models], env)
    assert corrupt.returncode != 0
    assert corrupt.stderr.strip().count("\n") == 0 and "is corrupt" in corrupt.stderr

    done = _cli(["pull", "tiny", "--registry", models], env)
    assert done.returncode == 0, done.stderr
    printed = Path(done.stdout.strip().splitlines()[-1])
    assert printed.read_bytes() == repo.files[SHARD_1]
    assert printed.is_relative_to(hf_home / "hub")
