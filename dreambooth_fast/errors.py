"""The one exception type for user mistakes: the CLI prints its message on one line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option, bad file). The message names it and says what to do."""


class Interrupted(UserError):
    """Ctrl-C stopped the run (what it made is kept and --resume continues it): a queue of runs stops too."""
