"""Simulated adversaries: one registry keyed by the config name ``attack.name``.

Simulation only: server/ and client/ never import this package. The runner:

1. ``select_byzantine(...)`` once per run;
2. on a Byzantine client with ``attack.poison_data``: poison its local data before honest training;
3. after each round's honest training, if ``attack.craft``: replace the Byzantine clients' updates
   with ``attack.craft(own (b, d), honest (h, d), cfg.attack, generator)`` (omniscient attackers
   see the round's honest updates, as in the literature).

Config names are validated on load by ``fedshield.validation``, against ``ATTACKS`` itself, so
no separate validation call is needed.
"""

from __future__ import annotations

from fedshield.simulations.attacks.alie import alie, alie_z_max
from fedshield.simulations.attacks.base import Attack
from fedshield.simulations.attacks.data_poisoning import (
    apply_trigger,
    backdoor,
    label_flip,
    triggered_test_set,
)
from fedshield.simulations.attacks.ipm import ipm
from fedshield.simulations.attacks.mimic import mimic
from fedshield.simulations.attacks.minmax import minmax, minsum
from fedshield.simulations.attacks.selection import select_byzantine
from fedshield.simulations.attacks.simple import gaussian, scaling, sign_flip

ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("label_flip", "data", "labels y -> num_classes - 1 - y", poison_data=label_flip),
    Attack("backdoor", "both", "pixel/feature trigger -> target_label on poison_fraction of the "
           "data, update boosted by scale (model replacement)", poison_data=backdoor,
           craft=scaling),
    Attack("sign_flip", "update", "-sign_flip_scale * own update", craft=sign_flip),
    Attack("gaussian", "update", "N(0, noise_std^2) vectors", craft=gaussian),
    Attack("scaling", "update", "own update * scale", craft=scaling),
    Attack("alie", "update", "mean - z * std of honest updates (Baruch et al. 2019)", craft=alie),
    Attack("ipm", "update", "-ipm_epsilon * mean of honest updates (Xie et al. 2020)", craft=ipm),
    Attack("minmax", "update", "mean + gamma * p within the honest max distance "
           "(Shejwalkar & Houmansadr 2021)", craft=minmax),
    Attack("minsum", "update", "mean + gamma * p within the honest max sum of squared distances "
           "(Shejwalkar & Houmansadr 2021)", craft=minsum),
    Attack("mimic", "update", "copy the honest update furthest along the top principal direction "
           "(Karimireddy et al. 2022)", craft=mimic),
)}

__all__ = ["ATTACKS", "Attack", "alie_z_max", "apply_trigger", "select_byzantine",
           "triggered_test_set"]
