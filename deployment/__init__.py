"""Deployment stage: what happens to a federated run's global model after the last round.

``handoff(run_dir, cfg)`` (deployment.handoff) runs after the last round as the ServerApp's
post-run hook, registered by deployment.hooks when this package's extra ``[deploy]`` is installed:
export (safetensors + ONNX + int8, parity-checked; export.py) -> model card with privacy provenance
and Integrated Gradients explanations (card.py, explain.py) -> MLflow registry (registry.py) ->
promotion gate (gate.py: ``champion`` or ``candidate`` with reasons). Then ``serve`` (serving.py:
FastAPI + onnxruntime, bearer token, integrity check against the registry, Prometheus metrics)
feeds a ``DriftMonitor`` (drift.py) whose reference comes from DP client histograms
(reference_stats.py) and which emits ``RetrainTrigger`` records. CLI commands live in
fedshield/commands/deploy.py (orchestration layer).
"""
