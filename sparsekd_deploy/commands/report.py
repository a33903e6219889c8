"""``sparsekd-deploy report RUN_OR_BUNDLE``: one self-contained HTML page (and a Markdown twin) a person can read."""

from __future__ import annotations

from pathlib import Path

import click

from ..console import err_console, stdout_json
from .error_handling import handle_errors


@click.command("report")
@click.argument("source", type=click.Path())
@click.option("--out", type=click.Path(), help="The HTML page. [default: <SOURCE>.report.html beside it]")
@click.option("--md", "md", type=click.Path(), help="The Markdown twin (figures in <name>_files/ beside it). "
              "[default: the page's name with .md for .html]")
@click.option("--no-md", is_flag=True, help="Write only the HTML page.")
@click.option("--json", "as_json", is_flag=True, help="Print the claims and written files as JSON.")
@handle_errors
def report_cmd(source, out, md, no_md, as_json):
    """Report on a distill run or a bundle: what was distilled and how, sparsity per layer, validation, the stability
    measurements with intervals, and plain sentences on which claims held."""
    from ..errors import OutputExistsError
    from ..report.claims import claims
    from ..report.collect import collect
    from ..report.render import write_report

    data = collect(source)
    src = Path(source)
    html = Path(out) if out else src.with_name(src.name.rstrip("/") + ".report.html")
    md_path = None if no_md else (Path(md) if md else html.with_suffix(".md"))
    for flag, path in (("--out", html), ("--md", md_path)):
        if path is not None and path.is_dir():  # else the atomic rename fails on it, naming only its .tmp file
            raise OutputExistsError(f"{flag} {path} is a directory; name the file to write")
    written = write_report(data, html, md_path)
    verdicts = [{"claim": c.name, "verdict": c.verdict, "evidence": c.sentence} for c in claims(data)]
    if as_json:
        stdout_json({"source": str(src), "stopped_early": data.stopped_early, "claims": verdicts,
                     "written": [str(p) for p in written]})
        return
    if data.stopped_early:
        err_console.print(f"[yellow]note:[/yellow] this run stopped early ({data.status})")
    for c in verdicts:
        err_console.print(f"• {c['claim']}: [bold]{c['verdict']}[/bold]")
    err_console.print(f"wrote {html}" + (f" and {md_path}" if md_path else ""))
