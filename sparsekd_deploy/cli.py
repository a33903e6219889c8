"""The ``sparsekd-deploy`` command line: the click group only. Each command (``commands/``) parses flags and hands
over to one library call; nothing in the library imports this module."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="sparsekd-deploy")
def main():
    """Distill a transformer into a sparse, stable student and deploy it to edge runtimes."""


def _register():
    from .commands.analyze import analyze_cmd
    from .commands.build import build_cmd
    from .commands.distill import distill_cmd
    from .commands.engine import engine_group
    from .commands.export import export_cmd
    from .commands.inspect import inspect_cmd
    from .commands.profile import profile_cmd
    from .commands.report import report_cmd
    from .commands.ship import releases_cmd, rollback_cmd, ship_cmd
    from .commands.validate import validate_cmd

    for cmd in (distill_cmd, build_cmd, export_cmd, validate_cmd, inspect_cmd, engine_group, profile_cmd, analyze_cmd,
                ship_cmd, releases_cmd, rollback_cmd, report_cmd):
        main.add_command(cmd)


_register()
