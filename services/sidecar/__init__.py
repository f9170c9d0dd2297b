"""The MLX sidecar on 127.0.0.1:8001: one mlx-lm model behind OpenAI-compatible endpoints.

- ``app.py``: FastAPI routes, request -> limits -> queue -> JSON answer or SSE stream.
- ``engine.py``: the only thread that touches MLX (load, warm-up, prefix cache, generation).
- ``schemas.py``: request models (bad types -> 400) and their GenParams.
- ``output.py``: stop strings, reasoning and tool-call parsing of the generated text.
- ``kv.py``: the per-request cache seam (TurboQuant or mlx-lm's plain cache).
- ``loader.py``: resolve and load the model in the right dtype.
- ``__main__.py``: ``tqstack-sidecar`` / ``python -m services.sidecar``.
"""
