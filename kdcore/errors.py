"""User-facing errors.

`KdError` carries one line that says what is wrong and how to fix it. The CLIs catch it,
print the line (no traceback) and exit with status 2. Raise it for anything the user can fix:
bad flags, bad files, a dataset that fails verification. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class KdError(Exception):
    """A problem the user can fix; `str(err)` is the whole message."""


class ConfigError(KdError):
    """Several problems with the given options, collected so the user sees them all at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def collect(problems: list[str]) -> None:
    """Raise one `ConfigError` naming every problem, if there are any."""
    if problems:
        raise ConfigError(problems)


def run_cli(app, prog: str, interrupted: str) -> None:
    """Run a typer app as a console script: a `KdError` or a usage error (an unknown option, a
    missing value) becomes one line on stderr and exit 2 (no traceback); Ctrl-C prints
    `interrupted` and exits 130. Shared by kdgen, kdtrain, kdeval."""
    import sys

    import typer

    usage_error = typer.BadParameter.__mro__[1]  # click's UsageError, as the click typer runs on has it
    try:
        code = app(standalone_mode=False)  # click's errors come here instead of as a framed box
    except usage_error as e:
        print(f"{prog}: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except KdError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not _unreachable(e):
            raise
        print(
            f"{prog}: error: cannot reach the store: {e}; check the URL, the network, and the endpoint settings "
            f"(AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL for S3, STORAGE_EMULATOR_HOST for a GCS emulator)",
            file=sys.stderr,
        )
        sys.exit(2)
    if code == 130:  # typer turns Ctrl-C into exit status 130
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


# connection failures of the store clients fsspec drives (botocore, httpx, aiohttp); not all are OSErrors
_UNREACHABLE = {"EndpointConnectionError", "ConnectError", "ConnectTimeout", "ClientConnectorError", "ServerTimeoutError"}


def _unreachable(e: BaseException) -> bool:
    """Whether `e`, or an exception it was raised from, is a failure to connect to a remote store."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionError) or any(c.__name__ in _UNREACHABLE for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False
