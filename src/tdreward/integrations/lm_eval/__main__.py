"""`python -m tdreward.integrations.lm_eval ARGS`: lm-eval's own command line (the same ARGS as
`lm_eval`), with the `tdreward` model registered.

A module of its own: lm-eval 0.4.13 looks models up only in its registry, and its console
script never imports tdreward. Running the package imports `tdreward.integrations.lm_eval`
once, by its real name, so the task YAML's `!function tdreward.integrations.lm_eval...` finds
the same module and `tdreward` is registered exactly once.
"""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

import tdreward.integrations.lm_eval  # noqa: F401  (registers the `tdreward` model)

if __name__ == "__main__":
    cli_evaluate()
