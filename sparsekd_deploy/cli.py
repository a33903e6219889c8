"""The ``sparsekd-deploy`` command line. Each command parses flags and hands over to a library function."""

from __future__ import annotations

import functools
import sys

import click

from . import __version__
from .console import print_error


def handle_errors(fn):
    """User mistakes print one line and exit with the error's code; Ctrl-C says how to resume."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import SparseKDError

        try:
            return fn(*args, **kwargs)
        except SparseKDError as e:
            print_error(str(e))
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print_error("interrupted; accepted stages are checkpointed: rerun with --resume to continue")
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="sparsekd-deploy")
def main():
    """Distill a transformer into a sparse, stable student and deploy it to edge runtimes."""


def _register():
    from .commands.build import build_cmd
    from .commands.distill import distill_cmd
    from .commands.engine import engine_group
    from .commands.export import export_cmd
    from .commands.inspect import inspect_cmd
    from .commands.profile import profile_cmd
    from .commands.validate import validate_cmd

    for cmd in (distill_cmd, build_cmd, export_cmd, validate_cmd, inspect_cmd, engine_group, profile_cmd):
        main.add_command(cmd)


_register()
