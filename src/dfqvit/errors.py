"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """A bad model name, missing dataset, bad setting, unreadable file...

    The message must say what to do. The CLI prints it on stderr and exits with status 2.
    """


def require_finite(x, what: str, hint: str = "") -> None:
    """Stop a run on NaN / ±Inf in ``x`` (a tensor): they never fail loudly by themselves,
    they turn every later figure into garbage (a 10 % top-1, a KL of nan)."""
    import torch

    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise UserError(f"{what} hold NaN or infinite values" + (f"; {hint}" if hint else ""))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name (an empty file's EOFError has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
