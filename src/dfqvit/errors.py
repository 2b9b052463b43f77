"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """A bad model name, missing dataset, bad setting, unreadable file...

    The message must say what to do. The CLI prints it on stderr and exits with status 2.
    """
