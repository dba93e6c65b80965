"""The one exception type for bad user input.

Anything a user can get wrong (a task file, a dataset root, episode sizes, a NaN loss) raises
:class:`InputError` with a one-line message naming the problem; ``metadyn`` on the command line turns
it into exit code 2 and that line, never a traceback.
"""


class InputError(ValueError):
    """Bad input: a malformed task file, a wrong key or type, a missing dataset, impossible sizes, NaNs."""


class NonFiniteLossError(InputError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""
