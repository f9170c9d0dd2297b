"""Machine facts install.sh needs, and the SIDECAR_ENABLED=auto decision (stdlib only).

Usage:
  sysinfo.py ram                               total RAM in bytes
  sysinfo.py sidecar-auto MODEL [MODELS_DIR]   prints "1 <reason>" or "0 <reason>"
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

GIB = 1024**3
# Approximate float32 footprint of the embedded models (their converted directories).
EMBEDDED_SIZES = {"smollm2-135m-instruct": int(0.55 * GIB), "gemma3-270m": int(1.1 * GIB)}


def ram_bytes() -> int:
    """Total physical memory (Linux /proc/meminfo, macOS sysctl); 0 when unknown."""
    try:
        if platform.system() == "Darwin":
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True)
            return int(out.stdout.strip())
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_bytes(model: str, models_dir: Path | None = None) -> int | None:
    """Best estimate of the sidecar model's weight bytes; None when nothing is known."""
    if model.startswith("embedded:"):
        name = model.split(":", 1)[1]
        if models_dir and (models_dir / name).is_dir():
            return _dir_bytes(models_dir / name)
        return EMBEDDED_SIZES.get(name)
    local = Path(model).expanduser()
    if local.is_dir():
        return _dir_bytes(local)
    # A Hugging Face id usually names its size: "...-35B-A3B-4bit" -> 35e9 params at 4 bits.
    params = re.search(r"(\d+(?:\.\d+)?)[Bb](?![a-z])", model)
    if not params:
        return None
    bits = re.search(r"(\d+)[-_]?bit", model)
    bytes_per_param = (int(bits.group(1)) if bits else 16) / 8
    return int(float(params.group(1)) * 1e9 * bytes_per_param)


def sidecar_auto(ram: int, size: int | None) -> tuple[bool, str]:
    """Decide SIDECAR_ENABLED=auto: on with >= 32 GB, or when the model is small for this RAM.

    The seed turns the sidecar off on machines under 32 GB because a large Ollama model and
    a large sidecar model do not fit together; a small model (under 1/8 of RAM) always fits.
    """
    gb = ram / GIB
    if ram >= 30 * GIB:  # a "32 GB" Linux machine reports ~31.3 GiB (the kernel keeps some)
        return True, f"{gb:.0f} GB RAM >= 32 GB"
    if size is not None and size * 8 <= ram:
        return True, f"model ~{size / GIB:.2f} GB is small for {gb:.0f} GB RAM"
    if size is None:
        return False, f"{gb:.0f} GB RAM < 32 GB and the model size is unknown"
    return False, f"{gb:.0f} GB RAM < 32 GB and the model needs ~{size / GIB:.1f} GB"


def main(argv: list[str] | None = None) -> int:
    """Command line used by install.sh and load-services.sh."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["ram"]:
        print(ram_bytes())
        return 0
    if args[:1] == ["sidecar-auto"] and len(args) >= 2:
        models_dir = Path(args[2]).expanduser() if len(args) > 2 and args[2] else None
        on, why = sidecar_auto(ram_bytes(), model_bytes(args[1], models_dir))
        print(f"{int(on)} {why}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
