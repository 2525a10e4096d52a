"""Placeholder reputation (replaced by the reputation module)."""


class Reputation:
    def __init__(self, threshold: float, patience: int) -> None:
        self.quarantined: set[int] = set()
        self.scores: dict[int, float] = {}

    def update(self, round, client_ids, suspicion):
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
