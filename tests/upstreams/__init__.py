"""Loopback fakes of our two backends, with switchable faults, for tests and chaos runs.

    with FakeOllama() as ollama, FakeSidecar(architecture="hybrid") as sidecar:
        ollama.faults.update(die_after_chunks=2)   # or POST {url}/_control/faults
        ...
        ollama.journal.generations()               # or GET {url}/_control/state

``python -m tests.upstreams ollama|sidecar --port N`` runs one in the foreground.
"""

from .fake_ollama import FakeOllama
from .fake_sidecar import FakeSidecar
from .faults import Faults, Journal, Recorded
from .server import UpstreamServer, free_port

__all__ = [
    "Faults",
    "FakeOllama",
    "FakeSidecar",
    "Journal",
    "Recorded",
    "UpstreamServer",
    "free_port",
]
