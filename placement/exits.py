"""One error format and one set of exit codes for every `expertmesh` command (planning and stats).

    0 ok    1 failure (the command could not run: unreachable service, full disk)
    2 usage or invalid input (the message names the field)    3 infeasible request (no plan can exist)

An error is exactly one line on stderr, `error: <message>`: no exception class names, no boxes. Notes that
are not errors (`note: ...`) go to stderr too, so stdout carries results only.

    with exit_codes(infeasible=(InfeasibleError,)):   # in every command
        ...
    app = typer.Typer(cls=PlainErrors, ...)            # click's own usage errors in the same format
    sub = typer.Typer(cls=PlainGroup); @app.command(cls=PlainCommand)   # --help without a "<bool>" type
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INFEASIBLE", "fail", "note", "exit_codes", "PlainErrors",
           "PlainGroup", "PlainCommand", "CLICK_EXCEPTION"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INFEASIBLE = 0, 1, 2, 3

# click's base exception, whichever click typer uses (its own vendored copy, or the click package).
CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _one_line(message: str) -> str:
    return " ".join(message.split())


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print `error: <message>` on stderr and exit with `code`."""
    sys.stderr.write(f"error: {_one_line(message)}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def note(message: str) -> None:
    """Print `note: <message>` on stderr: something the user should know that is not an error."""
    sys.stderr.write(f"note: {_one_line(message)}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def exit_codes(*, usage: tuple[type[BaseException], ...] = (ValueError,),
               infeasible: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Exceptions to exit codes: `infeasible` -> 3, `usage` -> 2 (checked in that order, as infeasible
    errors are often ValueErrors too), anything else -> 1; each as one `error:` line."""
    try:
        yield
    except typer.Exit:
        raise
    except infeasible as exc:
        fail(f"infeasible: {exc}", EXIT_INFEASIBLE)
    except usage as exc:
        fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:  # the command could not run (connection, disk): no traceback, no class name
        fail(str(exc) or "the command failed without a message", EXIT_FAILURE)


def _plain_help(option):
    if option is not None:
        option.metavar = ""  # a flag takes no value: show no "<bool>" type after it
    return option


class PlainCommand(TyperCommand):
    """A command whose --help shows no value type."""

    def get_help_option(self, ctx):
        return _plain_help(super().get_help_option(ctx))


class PlainGroup(TyperGroup):
    """A command group whose --help shows no value type."""

    def get_help_option(self, ctx):
        return _plain_help(super().get_help_option(ctx))


class PlainErrors(PlainGroup):
    """The root command group: click's usage errors (unknown option, bad value) as one `error:` line with
    exit 2, like every other error, instead of a usage dump in a box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except CLICK_EXCEPTION as exc:
            if type(exc).__name__ != "NoArgsIsHelpError":  # (its help is printed already)
                ctx = getattr(exc, "ctx", None)
                hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                sys.stderr.write(f"error: {_one_line(exc.format_message())}{hint}\n")
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.stderr.write("error: aborted\n")
            sys.exit(EXIT_FAILURE)
        sys.exit(code if isinstance(code, int) else EXIT_OK)
