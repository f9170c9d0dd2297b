"""Settings for every tqstack service, read from ``config.env`` plus the environment.

Precedence: explicit keyword arguments > environment variables > ``config.env`` >
defaults below. Keys are the upper-case field names (``ROUTER_PORT`` -> ``router_port``).
Every key is documented once, in ``docs/config.env.example`` (kept in sync by a test).
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path("~/ai/turboquant").expanduser()
EMBEDDED_DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost`` (the only binds allowed without a key)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_config_path() -> Path:
    """Where ``config.env`` lives: ``$TQSTACK_CONFIG`` or ``$TQSTACK_HOME/config.env``."""
    if os.environ.get("TQSTACK_CONFIG"):
        return Path(os.environ["TQSTACK_CONFIG"]).expanduser()
    home = Path(os.environ.get("TQSTACK_HOME", str(DEFAULT_HOME))).expanduser()
    return home / "config.env"


class Settings(BaseSettings):
    """All configuration keys with their defaults (see docs/config.env.example)."""

    model_config = SettingsConfigDict(
        env_file=None, env_file_encoding="utf-8", case_sensitive=False, extra="ignore"
    )

    # --- where things live
    tqstack_home: Path = DEFAULT_HOME
    models_dir: Path | None = None  # default: <tqstack_home>/models
    log_level: str = "INFO"

    # --- router
    router_host: str = "127.0.0.1"
    router_port: int = 8000
    tqstack_api_key: str | None = None
    max_request_bytes: int = 16 * 1024 * 1024
    prompt_token_threshold: int | Literal["auto"] = "auto"
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    health_failures_down: int = 2
    upstream_connect_timeout_s: float = 2.0
    upstream_read_timeout_s: float = 600.0
    memory_saver: Literal["auto", "0", "1"] = "auto"
    router_http: Literal["auto", "httptools", "h11"] = "auto"

    # --- backends as the router sees them
    ollama_url: str = "http://127.0.0.1:11434"
    ollama_model: str = "qwen3.5:35b-a3b-coding-nvfp4"
    sidecar_url: str | None = None  # default: http://<sidecar_host>:<sidecar_port>

    # --- sidecar
    sidecar_enabled: Literal["auto", "0", "1"] = "auto"
    sidecar_host: str = "127.0.0.1"
    sidecar_port: int = 8001
    sidecar_model: str = EMBEDDED_DEFAULT_MODEL
    sidecar_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    sidecar_max_queue: int = 8
    sidecar_kv_budget_mb: int = 0  # 0: no budget beyond the model's context
    sidecar_max_context: int = 0  # 0: the model's own context length
    sidecar_prompt_cache_entries: int = 4
    sidecar_keepalive_s: float = 5.0

    # --- TurboQuant KV cache
    tq_kv_bits: int = 4
    tq_kv_key_bits: int | None = None  # default: tq_kv_bits
    tq_kv_value_bits: int | None = None  # default: tq_kv_bits
    tq_kv_group_size: int = 128
    tq_quantizer: Literal["affine", "codebook"] = "affine"
    tq_use_rotation: bool = True
    tq_use_normalization: bool = True
    tq_boundary_layers: int = 0
    tq_boundary_bits: int = 8
    tq_rotation_seed: int = 0
    tq_center_keys: bool = True
    tq_key_quantizer: Literal["", "affine", "codebook", "channel"] = "channel"  # "": tq_quantizer
    tq_value_quantizer: Literal["", "affine", "codebook"] = ""  # "": tq_quantizer
    tq_sink_tokens: int = 1
    tq_window: int = 0
    tq_enabled: bool = True
    tq_warm_kernels: bool = True
    tq_fuse_rope: bool = True

    @field_validator("prompt_token_threshold", mode="before")
    @classmethod
    def _threshold(cls, v: object) -> object:
        if isinstance(v, str) and v.strip().lower() in ("", "auto"):
            return "auto"
        return v

    # An empty value in config.env ("KEY=") means "use the default", as the example file shows.
    @field_validator(
        "sidecar_url",
        "tqstack_api_key",
        "models_dir",
        "tq_kv_key_bits",
        "tq_kv_value_bits",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def sidecar_base_url(self) -> str:
        return (self.sidecar_url or f"http://{self.sidecar_host}:{self.sidecar_port}").rstrip("/")

    @property
    def ollama_base_url(self) -> str:
        return self.ollama_url.rstrip("/")

    @property
    def resolved_models_dir(self) -> Path:
        return Path(self.models_dir or self.tqstack_home.expanduser() / "models").expanduser()

    @property
    def key_bits(self) -> int:
        return self.tq_kv_key_bits or self.tq_kv_bits

    @property
    def value_bits(self) -> int:
        return self.tq_kv_value_bits or self.tq_kv_bits


def load_settings(config_path: Path | str | None = None, **overrides: object) -> Settings:
    """Build Settings from ``config_path`` (default: :func:`default_config_path`) + env."""
    path = Path(config_path).expanduser() if config_path else default_config_path()
    env_file = str(path) if path.is_file() else None
    return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built once on first use (FastAPI dependency)."""
    return load_settings()
