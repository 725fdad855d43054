"""The ``xentd`` command: run, check-config, send, replay, top, keygen, version."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from xentd import config as config_mod
from xentd import preflight
from xentd._version import __version__
from xentd.errors import XentdError

if TYPE_CHECKING:
    from xentd.replay import Watch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xentd", description="Cross-entropy monitoring daemon.")
    p.add_argument("--version", action="version", version=f"xentd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground (logs to stderr)")
    run.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    run.add_argument("--ingest", metavar="ADDR", help="ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:5557")
    run.add_argument("--metrics", metavar="HOST:PORT", help="where to serve /metrics and /healthz")
    run.add_argument("--state-dir", metavar="DIR", help="where to snapshot state (overrides state.directory)")

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path", type=Path)

    send = sub.add_parser(
        "send",
        help="publish a dataset file (.npz or .csv, as for replay) as one batch; an .npz with ids and only "
        "predictions or only targets is one side of a delayed-label join",
    )
    send.add_argument("file", type=Path)
    send.add_argument("--model", required=True)
    send.add_argument("--to", required=True, metavar="ADDR", help="daemon ingest endpoint")
    send.add_argument("--input", default="probs", choices=["probs", "logits", "log_probs"])
    send.add_argument("--batch-id")
    send.add_argument("--pub", action="store_true", help="bind a PUB socket instead of connecting PUSH")
    send.add_argument("--curve-server-key", metavar="FILE", help="the daemon's public key file (CURVE)")
    send.add_argument("--curve-secret-key", metavar="FILE", help="this client's .key_secret file (CURVE)")
    _delivery_options(send)

    top = sub.add_parser("top", help="live view of the models in a running daemon (reads its /metrics)")
    top.add_argument("--url", default="http://127.0.0.1:9650", help="the daemon's metrics address")
    top.add_argument("--window", default="5m", help="which window's loss and accuracy to show (default 5m)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--sort", choices=["name", "rate", "loss"], default="name")
    top.add_argument("--limit", type=int, default=50, help="most models shown")
    top.add_argument("--once", action="store_true", help="print one view (two scrapes apart) and exit")
    top.add_argument("--auth", metavar="USER:PASSWORD", help="basic auth for /metrics")
    top.add_argument("--cafile", help="CA certificate for an https URL")

    replay = sub.add_parser(
        "replay",
        help="stream a dataset (.npz or .csv) to a daemon at a chosen rate; an .npz with ids and only "
        "predictions or only targets is one side of a delayed-label join",
    )
    replay.add_argument("file", type=Path)
    replay.add_argument("--model", required=True)
    replay.add_argument("--to", required=True, metavar="ADDR", help="daemon ingest endpoint")
    replay.add_argument("--input", default="probs", choices=["probs", "logits", "log_probs"])
    replay.add_argument("--batch-size", type=int, default=256, help="rows per batch (default 256)")
    replay.add_argument("--rate", type=float, default=0.0, help="batches per second (default 0: as fast as accepted)")
    replay.add_argument("--pub", action="store_true", help="bind a PUB socket instead of connecting PUSH")
    replay.add_argument("--curve-server-key", metavar="FILE")
    replay.add_argument("--curve-secret-key", metavar="FILE")
    _delivery_options(replay)

    keygen = sub.add_parser("keygen", help="create a CURVE key pair: NAME.key (public) and NAME.key_secret")
    keygen.add_argument("directory", type=Path)
    keygen.add_argument("--name", default="server", help="file name stem (default: server)")
    return p


def _delivery_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up (exit 2) when no daemon has accepted the connection (with --pub: subscribed) within this "
        "long, when a send blocks this long, or when --wait sees no progress for this long (default 5)",
    )
    p.add_argument(
        "--wait",
        metavar="URL",
        help="the daemon's metrics URL (http://127.0.0.1:9650/metrics): wait until it has accounted for every "
        "batch, then say how many were scored, duplicate or rejected (and why); exit 1 if any was rejected. "
        "Read from counter deltas: exact only while no other producer sends to that daemon",
    )
    p.add_argument("--auth", metavar="USER:PASSWORD", help="basic auth for --wait's /metrics")
    p.add_argument("--cafile", help="CA certificate for an https --wait URL")


def _watch(args: argparse.Namespace) -> Watch | None:
    from xentd.replay import Watch

    if not args.timeout > 0:
        raise XentdError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    return Watch(args.wait, auth=args.auth, cafile=args.cafile) if args.wait else None


def _load(path: Path | None) -> config_mod.Config:
    return config_mod.load(path) if path is not None else config_mod.Config()


def _run(args: argparse.Namespace) -> int:
    cfg = config_mod.with_overrides(
        _load(args.config), ingest=args.ingest, metrics=args.metrics, state_dir=args.state_dir
    )
    logging.basicConfig(
        stream=sys.stderr, level=cfg.log.level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Before the daemon's import (NumPy and Numba: a second or more): a busy port is an error at once.
    preflight.check_ports(cfg)
    from xentd.daemon import serve

    return serve(cfg)


def _check(args: argparse.Namespace) -> int:
    config_mod.load(args.path)
    print(f"{args.path}: ok")
    return 0


def _send(args: argparse.Namespace) -> int:
    import zmq

    from xentd import replay
    from xentd.client import open_publisher

    ds = replay.load(args.file)  # .npz or .csv, with the same checks and errors as replay
    watch = _watch(args)
    before = watch.scrape() if watch is not None else None
    timeout_ms = max(1, int(args.timeout * 1000))
    with open_publisher(
        args.to,
        socket="pub" if args.pub else "push",
        curve_server_key=args.curve_server_key,
        curve_secret_key=args.curve_secret_key,
        connect_timeout=args.timeout,
        send_timeout_ms=timeout_ms,
        linger_ms=timeout_ms,
    ) as pub:
        try:
            ds.send(pub, args.model, slice(None), input=args.input, batch_id=args.batch_id)
        except (TypeError, ValueError) as exc:
            raise XentdError(str(exc)) from None
        except zmq.Again:
            raise XentdError(f"{args.to}: the daemon took no batch for {args.timeout:g} s (send queue full)") from None
    print(f"sent {len(ds)} {ds.rows_named} for model {args.model!r} to {args.to}", flush=True)
    if watch is None or before is None:
        return 0
    return replay.report(
        replay.await_outcome(watch, before, model=args.model, sent=1, timeout=args.timeout, kind=ds.kind), sys.stdout
    )


def _keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    directory: Path = args.directory
    public, secret = directory / f"{args.name}.key", directory / f"{args.name}.key_secret"
    if public.exists() or secret.exists():
        raise XentdError(f"{public} or {secret} already exists; refusing to overwrite a key")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o077)  # the secret key is readable by its owner only, from the start
        try:
            zmq.auth.create_certificates(str(directory), args.name)
        finally:
            os.umask(old)
        public.chmod(0o644)
    except OSError as exc:
        raise XentdError(f"cannot write keys to {directory}: {exc.strerror or exc}") from None
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret: keep it here)")
    return 0


def _top(args: argparse.Namespace) -> int:
    from xentd import top

    if args.interval <= 0 or args.limit <= 0:
        raise XentdError("--interval and --limit must be positive")
    return top.run(
        args.url,
        window=args.window,
        interval=args.interval,
        once=args.once,
        sort=args.sort,
        limit=args.limit,
        auth=args.auth,
        cafile=args.cafile,
    )


def _replay(args: argparse.Namespace) -> int:
    from xentd import replay

    return replay.run(
        args.file,
        to=args.to,
        model=args.model,
        input=args.input,
        batch_size=args.batch_size,
        rate=args.rate,
        pub=args.pub,
        curve_server_key=args.curve_server_key,
        curve_secret_key=args.curve_secret_key,
        timeout=args.timeout,
        wait=_watch(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"run": _run, "check-config": _check, "send": _send, "keygen": _keygen, "top": _top, "replay": _replay}
    try:
        return handlers[args.command](args)
    except XentdError as exc:
        print(f"xentd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
