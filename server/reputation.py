"""Per-client reputation across rounds, from the aggregation rule's own evidence (pure).

Each round a participating client gets a suspicion in [0, 1] from the robust rule (1.0 when
screening rejected its update). Its score is an exponential moving average over the rounds it took
part in: ``score = decay * score + (1 - decay) * suspicion``, starting at its first suspicion, so
one noisy round neither condemns nor clears it. A client whose score is above ``threshold`` after
``patience`` consecutive participating rounds is quarantined: the caller stops sampling it. Rounds a
client sits out leave its score and streak unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from fedshield.schema import ReputationConfig


class Reputation:
    """Per-client suspicion moving averages; quarantine after ``patience`` rounds above
    threshold."""
    def __init__(self, threshold: float, patience: int, decay: float = 0.5) -> None:
        if not 0.0 <= threshold <= 1.0 or patience < 1 or not 0.0 <= decay < 1.0:
            raise ValueError(f"need threshold in [0, 1], patience >= 1, decay in [0, 1); got "
                             f"{threshold}, {patience}, {decay}")
        self.threshold, self.patience, self.decay = threshold, patience, decay
        self.scores: dict[int, float] = {}
        self.streaks: dict[int, int] = {}  # consecutive participating rounds above threshold
        self.quarantined_at: dict[int, int] = {}  # client -> round it was quarantined
        self.last_round = -1

    @classmethod
    def from_config(cls, cfg: ReputationConfig) -> Reputation:
        """The tracker a ``[reputation]`` config section describes."""
        return cls(cfg.threshold, cfg.patience, cfg.decay)

    @property
    def quarantined(self) -> set[int]:
        """The clients quarantined so far."""
        return set(self.quarantined_at)

    def update(self, round: int, client_ids: Sequence[int], suspicion: Sequence[float],
               rejected: Iterable[int] = ()) -> list[int]:
        """Fold in one round's evidence; return the clients quarantined by it (sorted).

        ``suspicion[k]`` belongs to ``client_ids[k]``; ``rejected`` clients (refused by screening)
        count as suspicion 1.0.
        """
        if round <= self.last_round:
            raise ValueError(f"round {round} was already recorded (last round {self.last_round})")
        if len(client_ids) != len(suspicion):
            raise ValueError(f"{len(client_ids)} clients but {len(suspicion)} suspicion values")
        observed = {int(c): float(s) for c, s in zip(client_ids, suspicion, strict=True)}
        bad = {c: s for c, s in observed.items() if not (math.isfinite(s) and 0.0 <= s <= 1.0)}
        if bad:
            raise ValueError(f"suspicion must be in [0, 1]; got {bad}")
        observed.update({int(c): 1.0 for c in rejected})

        newly = []
        for client, s in sorted(observed.items()):
            previous = self.scores.get(client)
            score = s if previous is None else self.decay * previous + (1.0 - self.decay) * s
            self.scores[client] = score
            self.streaks[client] = self.streaks.get(client, 0) + 1 if score > self.threshold else 0
            if self.streaks[client] >= self.patience and client not in self.quarantined_at:
                self.quarantined_at[client] = round
                newly.append(client)
        self.last_round = round
        return newly

    def state_dict(self) -> dict:
        """JSON-serialisable state (client ids as list entries, not object keys)."""
        return {
            "threshold": self.threshold, "patience": self.patience, "decay": self.decay,
            "last_round": self.last_round,
            "clients": [[c, self.scores[c], self.streaks[c]] for c in sorted(self.scores)],
            "quarantined": [[c, r] for c, r in sorted(self.quarantined_at.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved."""
        self.threshold, self.patience = float(state["threshold"]), int(state["patience"])
        self.decay, self.last_round = float(state["decay"]), int(state["last_round"])
        self.scores = {int(c): float(s) for c, s, _ in state["clients"]}
        self.streaks = {int(c): int(k) for c, _, k in state["clients"]}
        self.quarantined_at = {int(c): int(r) for c, r in state["quarantined"]}


def false_quarantine_rate(quarantined: Iterable[int], byzantine_ids: Iterable[int],
                          num_clients: int) -> float:
    """Fraction of honest clients quarantined (0 when there is no honest client)."""
    byzantine = set(byzantine_ids)
    honest = num_clients - len(byzantine)
    return len(set(quarantined) - byzantine) / honest if honest > 0 else 0.0


def detection_rate(quarantined: Iterable[int], byzantine_ids: Iterable[int]) -> float:
    """Fraction of Byzantine clients quarantined (1 when there is none)."""
    byzantine = set(byzantine_ids)
    return len(set(quarantined) & byzantine) / len(byzantine) if byzantine else 1.0
