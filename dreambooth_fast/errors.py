"""The exception types that end a command with one line: the CLI prints the message and exits with the code."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option, bad file). The message names it and says what to do."""

    exit_code = 2


class RunStopped(UserError):
    """The run stopped for a reason outside its options (another rank of a distributed run died, the launcher
    ended it); the message says how to continue. Exit code 1."""

    exit_code = 1


class ReportedByRank0(UserError):
    """A distributed run stops for an error rank 0 found and printed: the other ranks exit with the same code and
    print nothing, so the user reads it once."""


class Interrupted(UserError):
    """Ctrl-C stopped the run (what it made is kept and --resume continues it): a queue of runs stops too."""
