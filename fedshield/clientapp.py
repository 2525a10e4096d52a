"""The Flower App's client component (``[tool.flwr.app.components] clientapp``) for ``flwr run``.

A module directly in ``fedshield/`` rather than ``fedshield.client.app``: Flower's simulation
runtime checks the client component's module with ``importlib.util.find_spec`` outside its import
lock, while its ServerApp thread may still be running ``fedshield/__init__.py``. A top-level
module is found through ``fedshield.__path__`` alone; ``fedshield.client`` needs the source
checkout's finder (fedshield/layout.py), which a half-initialised ``fedshield`` has not installed
yet (measured: "No module named 'fedshield.client'", exit code 607, on some import timings).
"""

from fedshield.client.app import app

__all__ = ["app"]
