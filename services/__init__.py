"""tqstack: one OpenAI-compatible endpoint over Ollama and a TurboQuant MLX sidecar."""

__version__ = "0.1.0"
