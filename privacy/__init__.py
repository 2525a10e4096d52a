"""Differential privacy: accounting on plain events (accounting), noise planning (planner, cli),
per-client persistent budgets (ledger) and central user-level DP (central). No Flower imports."""
