"""The one error base class of the project, and the exit codes the runner gives its subclasses.

Every documented error (bad config, missing prompt file, LoRA that does not fit, a run that trained
nothing, ...) is a :class:`SpoError`; its message is one line naming the problem and the fix.
:func:`spo_core.runner.run_entrypoint` prints that line and exits with ``exit_code``: 2 for bad
input (the user must change something), 1 for a failure of the run itself.
"""

from __future__ import annotations

BAD_INPUT = 2
FAILURE = 1


class SpoError(Exception):
    """Base class of every error the project raises on purpose."""

    exit_code: int = FAILURE

    def __init__(self, *args, exit_code: int | None = None):
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(SpoError):
    """Input the user has to change (configuration, files, models, data)."""

    exit_code = BAD_INPUT
