"""The CLI's sub-command groups (orchestration layer): they import the library, never the reverse.

``privacy`` (plan, ledger, audit) and ``deploy`` (registry, serve, monitor) are mounted by
fedshield/cli.py; each also runs alone with ``python -m fedshield.commands.<name>``.
"""
