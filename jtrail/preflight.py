"""Start-up checks that need no model: run before the 15-75 s model load, so that a mistake in the
command line is reported in about a second, as one line naming the flag.

Every check raises `PreflightError` (a ValueError) whose message starts with the flag it is about.
The port checks bind and release a socket, so another process can still take the port in between;
the servers' own binds report that race with the same kind of message.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from jtrail.models.errors import JtrailError


class PreflightError(JtrailError, ValueError):
    """A start-up input that cannot work; the message names the flag."""


def check_port_range(flag: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise PreflightError(f"{flag} {port}: a port is 0..65535 (0 picks a free one)")


def check_bindable(flag: str, host: str, port: int) -> None:
    """Bind host:port once and release it: fails on a host that is not an address of this machine and
    on a port another process listens on (with SO_REUSEADDR, as the servers bind: a port left in
    TIME_WAIT is free; without SO_REUSEPORT, so a port held by another server is busy)."""
    check_port_range(flag, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise PreflightError(f"--host {host!r}: cannot resolve it ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == 98:  # EADDRINUSE
                raise PreflightError(f"{flag} {port}: already in use on {host}") from None
            if e.errno == 99:  # EADDRNOTAVAIL
                raise PreflightError(f"--host {host!r}: not an address of this machine") from None
            raise PreflightError(f"{flag} {port}: cannot bind {host}:{port}: {e.strerror}") from None


def check_ports(host: str, ports: dict[str, int]) -> None:
    """`ports`: flag -> port of every listener `jtrail serve` will open."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        check_port_range(flag, port)
        if port and port in seen:
            raise PreflightError(f"{flag} {port}: the same port as {seen[port]}")
        seen[port] = flag
    for flag, port in ports.items():
        check_bindable(flag, host, port)


def check_probe(spec: str | None) -> None:
    """`--probe`: 'none', a shipped name, or a directory saved by `save_probe` (meta JSON + weights)."""
    if spec is None or spec.lower() == "none":
        return
    from jtrail.models.probe_io import (
        META_FILE,
        PARAMS_DIR,
        ProbeFileError,
        read_probe_meta,
    )
    from jtrail.shipped import resolve_probe_path

    try:
        path = resolve_probe_path(spec)
        if not path.exists():
            raise ProbeFileError(f"{path} does not exist (shipped probes: 'default', 'replay'; or 'none')")
        read_probe_meta(path)
        if not (Path(path) / PARAMS_DIR).is_dir():
            raise ProbeFileError(f"{path} has {META_FILE} but no {PARAMS_DIR}/ checkpoint")
    except ProbeFileError as e:
        raise PreflightError(f"--probe {spec!r}: {e}") from None


def check_arrival_estimate(args: argparse.Namespace) -> None:
    """`--arrival-estimate host`: trail only, and the model-backed engine needs the prompt estimator
    file beside the probe; found out before the model loads, not after (the engine would refuse it)."""
    choice = getattr(args, "arrival_estimate", None)
    if choice is None:
        return
    if args.policy != "trail":
        raise PreflightError(f"--arrival-estimate applies to --policy trail, not {args.policy!r}")
    if choice != "host":
        return
    if args.mock:  # its fake probe installs exact lengths; there is no prompt estimator to run
        raise PreflightError("--arrival-estimate host needs the model-backed engine, not --mock (the "
                             "mock's fake probe gives every request its exact length)")
    if args.probe is not None and args.probe.lower() == "none":
        raise PreflightError("--arrival-estimate host needs a probe (its length bins) and the prompt "
                             "estimator beside it; --probe none turns prediction off")
    from jtrail.shipped import PROMPT_ESTIMATOR_FILE, resolve_probe_path

    path = resolve_probe_path(args.probe) / PROMPT_ESTIMATOR_FILE
    if not path.is_file():
        raise PreflightError(f"--arrival-estimate host: no prompt estimator at {path} (the shipped 'replay' "
                             "probe has one; or make it with `jtrail train-prompt-estimator`, or use "
                             "--arrival-estimate probe)")


def check_tensor_parallel(n: int) -> None:
    """`--tensor-parallel N` needs N devices; checked before the weights are built (JAX imported only
    when N > 1, as only then can it fail)."""
    if n < 1:
        raise PreflightError(f"--tensor-parallel {n}: must be >= 1")
    if n == 1:
        return
    import jax

    have = jax.device_count()
    if have < n:
        raise PreflightError(f"--tensor-parallel {n}: only {have} {jax.default_backend()} device(s) here")


def check_file(flag: str, path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise PreflightError(f"{flag} {path!r}: no such file")


def check_serve_args(args: argparse.Namespace) -> None:
    """Everything `jtrail serve` can check before it builds an engine."""
    ports: dict[str, int] = {}
    if not args.no_grpc:
        ports["--port"] = args.port
    if not args.no_http:
        ports["--http-port"] = args.http_port
    if args.metrics_port is not None:
        ports["--metrics-port"] = args.metrics_port
    check_ports(args.host, ports)
    check_probe(args.probe)
    check_arrival_estimate(args)
    check_tensor_parallel(args.tensor_parallel)
