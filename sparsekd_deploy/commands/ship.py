"""``sparsekd-deploy ship`` / ``releases`` / ``rollback``: put a bundle on edge devices over SSH and switch what
they run. Exit 0: every device active on the bundle; 1: a device refused it or a step failed there (its `current`
unchanged); 2: usage, connection or host-key problem (nothing changed)."""

from __future__ import annotations

import sys

import click

from ..console import err_console, stdout_json
from .error_handling import handle_errors


def _host_options(fn):
    for opt in reversed([
        click.option("--host", "target", help="user@host of the device."),
        click.option("--port", type=int, default=None, help="SSH port. [default: 22]"),
        click.option("--identity", type=click.Path(), help="Private key file (default: ~/.ssh keys and the agent)."),
        click.option("--known-hosts", type=click.Path(), help="known_hosts file to verify the device's host key "
                     "against. [default: ~/.ssh/known_hosts]"),
        click.option("--accept-new-host-key", is_flag=True, help="Trust an UNKNOWN host's key on first use and "
                     "record it (a changed key is always refused)."),
    ]):
        fn = opt(fn)
    return fn


def _spec(target, port, identity, known_hosts, accept_new_host_key):
    from ..ship.remote import HostSpec

    return HostSpec.parse(target, port=port, identity=identity, known_hosts=known_hosts,
                          accept_new_host_key=accept_new_host_key)


def _run(coro):
    """Run a device operation; a link that fails half-way is one line, not a traceback."""
    import asyncio

    import asyncssh

    from ..ship.remote import ShipError

    try:
        return asyncio.run(coro)
    except asyncssh.Error as e:
        raise ShipError(f"the connection failed: {e.reason or type(e).__name__}; nothing was changed") from None
    except (ConnectionError, asyncio.TimeoutError, TimeoutError) as e:  # a link that drops outside asyncssh's own
        raise ShipError(f"the connection failed: {e.strerror or type(e).__name__}; nothing was changed") from None


@click.command("ship")
@click.argument("bundle", type=click.Path())
@_host_options
@click.option("--fleet", type=click.Path(), help="fleet.yaml naming many devices (instead of --host).")
@click.option("--path", "path", help="Where on the device. [default: sparsekd/<bundle name> in the login's home]")
@click.option("--build-engine", is_flag=True, help="Build the TensorRT engine on the device (its sparsekd-deploy).")
@click.option("--validate", "do_validate", is_flag=True, help="Validate on the device against the bundle's "
              "references and gates before activating.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "tensorrt"]), help="Runtime for --validate. "
              "[default: tensorrt with --build-engine, else onnxruntime]")
@click.option("--remote-bin", default="sparsekd-deploy", show_default=True,
              help="The device's sparsekd-deploy (e.g. a venv's bin/sparsekd-deploy).")
@click.option("--remote-trtexec", help="The device's trtexec, used by --build-engine where the device's Python has no "
              "TensorRT package. [default: trtexec on its PATH, else /usr/src/tensorrt/bin/trtexec]")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True,
              help="Releases to keep (current and the previous one are never removed).")
@click.option("--canary", type=click.IntRange(min=0), default=1, show_default=True,
              help="With --fleet: devices shipped, built and validated first; a failure stops the rollout.")
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="With --fleet: devices at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@handle_errors(interrupt_hint="the device's current release is untouched; ship again to resume the upload")
def ship_cmd(bundle, target, port, identity, known_hosts, accept_new_host_key, fleet, path, build_engine, do_validate,
             runtime, remote_bin, remote_trtexec, keep, canary, parallel, as_json):
    """Ship BUNDLE to a device (--host) or a fleet (--fleet): upload (resumable), verify every sha256 there, run the
    optional steps there, then switch `current` atomically. A failure leaves the active release untouched."""
    from ..ship.fleet import Device, fleet_exit_code, load_fleet, ship_fleet
    from ..ship.remote import ShipError
    from ..ship.ship import LocalBundle, ShipOptions

    if bool(target) == bool(fleet):
        raise ShipError("name the device with --host user@host, or many with --fleet fleet.yaml (one of the two)")
    if path is not None and not path.strip():
        raise ShipError("--path is empty; leave it out for the default (sparsekd/<bundle name> in the login's home)")
    if runtime and not do_validate:
        raise ShipError("--runtime chooses the runtime of --validate; add --validate (or drop --runtime)")
    if fleet and (port or identity):
        raise ShipError("--port/--identity are per device in --fleet's file (hosts: [{host:, port:, identity:}])")
    local = LocalBundle.open(bundle)
    opts = ShipOptions(path=path, build_engine=build_engine, validate=do_validate, runtime=runtime,
                       remote_bin=remote_bin, remote_trtexec=remote_trtexec, keep=keep)
    if fleet:
        devices = load_fleet(fleet, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key)
    else:
        devices = [Device(_spec(target, port, identity, known_hosts, accept_new_host_key), path)]
        canary = 0
    total = sum(f.bytes for f in local.files)
    with _upload_progress(total, quiet=as_json) as progress:
        results = _run(ship_fleet(local, devices, opts, canary=canary, parallel=parallel, progress=progress))
    if as_json:
        stdout_json({"bundle": str(local.dir), "version": local.version, "devices": [r.to_dict() for r in results]})
    else:
        _print_results(results)
    sys.exit(results[0].exit_code if len(results) == 1 else fleet_exit_code(results))


class _upload_progress:
    """One bar per device on stderr (bytes on the device, kept + resumed + sent)."""

    def __init__(self, total: int, quiet: bool):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.total = total
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=err_console, transient=True,
                            disable=quiet or not err_console.is_terminal)

    def __enter__(self):
        self.bar.start()

        def for_device(d):
            task = self.bar.add_task(d.spec.label, total=self.total)
            return lambda n: self.bar.update(task, advance=n)

        return for_device

    def __exit__(self, *exc):
        self.bar.stop()


def _print_results(results) -> None:
    from rich.table import Table

    from ..console import print_error

    if len(results) == 1 and results[0].verdict == "error":
        print_error(results[0].message)  # nothing happened on the device: the reason is the whole story
        return

    table = Table(title="ship", title_justify="left")
    for col in ("device", "path", "version", "steps", "verdict", "time"):
        table.add_column(col)
    for r in results:
        steps = ", ".join(f"{s.name} {'ok' if s.ok else 'FAILED'}" for s in r.steps) or "—"
        colour = "green" if r.ok else "red"
        table.add_row(r.host, r.path, r.version, steps, f"[{colour}]{r.verdict}[/{colour}]", f"{r.seconds:.1f}s")
    err_console.print(table)
    for r in results:
        for note in r.notes:
            err_console.print(f"[dim]•[/dim] {r.host}: {note}", soft_wrap=True)
        for s in r.steps:
            if s.name == "validate":
                err_console.print(f"[dim]•[/dim] {r.host}: validate {s.summary}", soft_wrap=True)
        if r.removed:
            err_console.print(f"[dim]•[/dim] {r.host}: removed old releases {', '.join(r.removed)}")
        if r.message:
            err_console.print(f"[red]error:[/red] {r.message}" if not r.ok else r.message, soft_wrap=True)


@click.command("releases")
@_host_options
@click.option("--path", "path", required=True, help="The device path given to ship.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def releases_cmd(target, port, identity, known_hosts, accept_new_host_key, path, as_json):
    """List the releases on a device: current, status (failed ones marked), validation verdict."""
    from ..ship.manage import device_releases
    from ..ship.remote import ShipError

    if not target:
        raise ShipError("--host user@host is required")
    root, releases = _run(device_releases(_spec(target, port, identity, known_hosts, accept_new_host_key), path))
    if as_json:
        stdout_json({"path": root, "releases": [r.to_dict() for r in releases]})
        return
    from rich.table import Table

    table = Table(title=f"{target}:{root}", title_justify="left")
    for col in ("", "version", "bundle", "status", "validation", "shipped"):
        table.add_column(col)
    for r in releases:
        v = r.record.get("validation") or {}
        table.add_row("→" if r.current else "", r.version, str(r.record.get("bundle") or "—"),
                      f"[red]{r.status}[/red]" if r.status == "failed" else r.status,
                      v.get("summary", "not validated on the device"), str(r.record.get("shipped_at") or "—"))
    err_console.print(table if releases else f"no releases under {root}")


@click.command("rollback")
@_host_options
@click.option("--path", "path", required=True, help="The device path given to ship.")
@click.option("--to", "to", help="Release to activate. [default: the one active before the current]")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def rollback_cmd(target, port, identity, known_hosts, accept_new_host_key, path, to, as_json):
    """Switch `current` back (atomically) after re-checking the release's files on the device."""
    from ..ship.manage import rollback
    from ..ship.remote import ShipError

    if not target:
        raise ShipError("--host user@host is required")
    done = _run(rollback(_spec(target, port, identity, known_hosts, accept_new_host_key), path, to))
    if as_json:
        stdout_json(done.to_dict())
    else:
        err_console.print(f"{done.host}:{done.path}: current {done.from_version or '—'} → {done.to_version}")
