"""What produced an eval: versions, git commit, a checkpoint fingerprint, the run's settings.

A score is only citable with the exact model, data and settings beside it. `environment()` is
recorded in every summary; `model_fingerprint()` identifies a checkpoint by content so a resumed
eval can refuse predictions made by another model, and two reports can say why they differ.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

#: Files up to this size are hashed whole; larger ones by size, head and tail (see docs).
WHOLE_FILE_LIMIT = 256 * 2**20
EDGE_BYTES = 8 * 2**20
_SKIP_DIRS = {"__pycache__", ".git"}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        else:  # multi-GB weights: size + first and last 8 MiB (safetensors headers included)
            digest.update(str(size).encode())
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over a model folder's files (relative path + content digest), order-independent."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if _SKIP_DIRS.intersection(relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{_file_digest(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def module_fingerprint(model: Any) -> str:
    """sha256 of a model's parameters and buffers (for adapters not loaded from a folder)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


def git_commit(start: Path | None = None) -> dict[str, Any]:
    """The commit of the vlmkit checkout in use (and whether it has local changes), if it is one."""
    where = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def environment() -> dict[str, Any]:
    """Versions of vlmkit and what it computes with, the Python, the platform, the git commit."""
    import vlmkit

    return {
        "vlmkit": vlmkit.__version__,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **git_commit(),
    }


def digest(value: Any) -> str:
    """Short stable hash of a JSON-able value (canonical JSON)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = ["digest", "environment", "git_commit", "model_fingerprint", "module_fingerprint"]
