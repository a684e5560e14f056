"""One exception family. The CLI prints the message (no traceback) and exits with `exit_code`."""


class SynthforgeError(Exception):
    """Base of every error synthforge raises on purpose."""

    exit_code = 1


class BadInput(SynthforgeError):
    """The user's input is wrong: a params key, a source line, a missing stage. Message names the place."""

    exit_code = 2


class LeakageError(SynthforgeError):
    """The same source or text would land in two splits."""

    exit_code = 2


class VersionExists(SynthforgeError):
    """A version is immutable: publishing over it is refused."""

    exit_code = 2
