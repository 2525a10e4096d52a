"""Benchmarks: scripts that print a table and write JSON/Markdown under runs/ (not run by CI).

Installed with fedshield so that ``fedshield bench aggregators`` can run from anywhere.
"""
