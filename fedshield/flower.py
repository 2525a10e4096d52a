"""The Flower App's server component (``[tool.flwr.app.components] serverapp``) for ``flwr run``.

Orchestration layer: it registers the post-run hand-off hook (when the ``[deploy]`` extra is
installed; otherwise the run ends with a note that the hand-off was skipped) before Flower calls
the ServerApp, which itself never imports deployment/. The client component is
``fedshield.clientapp:app`` (fedshield/clientapp.py says why it is not ``fedshield.client.app``);
clients have no post-run step.
"""

from fedshield.deployment.hooks import install_post_run_hooks
from fedshield.server.app import build_server_app

install_post_run_hooks()
serverapp = build_server_app()
