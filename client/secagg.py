"""Client side of the SecAgg+ run mode: Flower's ``secaggplus_mod`` around a legacy fit handler.

Flower 1.42 has secure aggregation only in its legacy-compat path (``SecAggPlusWorkflow`` on the
server, ``flwr.client.mod.secaggplus_mod`` on the client); there is no Message-API version yet.
So in this mode the server sends legacy ``FitIns`` records and the client answers with a legacy
``FitRes`` holding its update (trained - global weights; clipped to an L2 bound under central DP
or the "clip" rule), which the mod scales by the client's weight, quantizes, masks and uploads in
the protocol's stage 2. The cryptography is Flower's; nothing here touches it.

Why a dispatcher rather than ``ClientApp(mods=[secaggplus_mod])``: Flower loads ``client.app:app``
once for every run, and a mod intercepts every training message, expecting SecAgg+ stage records
that plain runs do not send. So ``client.app``'s train handler reads the run config and, for
SecAgg+ runs, calls Flower's mod exactly as a mod chain would (``secagg_train`` below).

A client that must not train (invalid data, privacy budget spent) raises: it drops out of the
round, and SecAgg+ removes its masks from the sum with its neighbours' key shares.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from fedshield.client.fit import DataLoader, fit_locally
from fedshield.privacy.central import clip_updates
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedshield import schema
from fedshield.errors import ConfigError


def secagg_train(msg: Message, context: Context, cfg: schema.Config,
                 load_data: DataLoader) -> Message:
    """Answer one SecAgg+ protocol message; local training happens in its masking stage."""
    return secaggplus_mod(msg, context, partial(legacy_fit, cfg=cfg, load_data=load_data))


def legacy_fit(msg: Message, context: Context, *, cfg: schema.Config,
               load_data: DataLoader) -> Message:
    """The plain path's local training, read from a legacy FitIns and answered as a FitRes
    whose parameters are the client's update (trained - global), clipped where the rule says."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    global_arrays = parameters_to_ndarrays(fitins.parameters)
    model, metrics = fit_locally(context, cfg, load_data, global_arrays, dict(fitins.config))
    update = [v.detach().numpy() - g for v, g in zip(model.state_dict().values(), global_arrays,
                                                     strict=True)]
    bound = update_bound(cfg)
    if bound:
        update = clip_to(update, bound)
    weight = 1 if bound or cfg.aggregation.weighting == "uniform" else int(metrics["num-examples"])
    check_quantizable(update, weight, cfg.secagg)
    fitres = FitRes(status=Status(Code.OK, "ok"), parameters=ndarrays_to_parameters(update),
                    num_examples=weight, metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def update_bound(cfg: schema.Config) -> float:
    """The L2 bound a client applies to its own update (0 = none): central DP's clip norm, or the
    "clip" rule's. Clipped updates are summed with equal weights, as both mechanisms assume."""
    if cfg.central_dp.enabled:
        return cfg.central_dp.clip_norm
    return cfg.aggregation.clip_norm if cfg.aggregation.rule == "clip" else 0.0


def clip_to(arrays: list[np.ndarray], bound: float) -> list[np.ndarray]:
    """``arrays`` as one vector, scaled to L2 norm at most ``bound`` (privacy.central's clip)."""
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.float64))
    # Clipped in float64 a hair inside the bound: the cast back to float32 rounds each value by
    # <= 2^-24 relative, so the sent update's norm stays <= bound (2^-20 covers it 16x).
    clipped = clip_updates(flat.unsqueeze(0), bound * (1 - 2**-20))[0][0].numpy()
    out, start = [], 0
    for a in arrays:
        out.append(clipped[start:start + a.size].reshape(a.shape).astype(a.dtype))
        start += a.size
    return out


def check_quantizable(arrays: list[np.ndarray], weight: int, secagg: schema.SecAggConfig) -> None:
    """Flower clips ``weight / max_weight * value`` to the clipping range without a word; a
    clipped value would silently corrupt the sum, so refuse instead."""
    largest = max(float(abs(a).max()) for a in arrays if a.size) * weight / secagg.max_weight
    if largest > secagg.clipping_range:
        raise ConfigError(
            f"SecAgg+ would clip this client's update: num-examples / secagg.max_weight x "
            f"max |value| = {largest:.3g} > secagg.clipping_range = {secagg.clipping_range:g}; "
            "raise secagg.max_weight or secagg.clipping_range")
