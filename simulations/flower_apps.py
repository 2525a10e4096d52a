"""Flower App components for simulated attacks under ``flwr run`` (a simulation federation).

``[tool.flwr.app.components]`` points at ``fedshield.flower:serverapp`` and
``fedshield.client.app:app``: honest apps, which refuse a run config with ``attack.name`` set
(the ServerApp finds no attack hook registered). A simulation that wants its adversary names
these instead::

    serverapp = "fedshield.simulations.flower_apps:serverapp"
    clientapp = "fedshield.simulations.flower_apps:clientapp"

The server registers the omniscient attacker (adversary.install_attack_hook) before Flower calls
it; every client loads the data the run config's attack gives its partition.
"""

from fedshield.client.app import make_client_app
from fedshield.deployment.hooks import install_post_run_hooks
from fedshield.server.app import build_server_app
from fedshield.simulations.adversary import install_attack_hook, simulated_client_data

install_post_run_hooks()
install_attack_hook()
serverapp = build_server_app()
clientapp = make_client_app(load_data=simulated_client_data)
