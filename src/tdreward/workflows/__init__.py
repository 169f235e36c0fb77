"""Workflows: what the CLI runs (score, train-critic, compare, ...), above the library."""
