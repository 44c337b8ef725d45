"""`jtrail serve` and `jtrail route`: run the server (gRPC + OpenAI-compatible HTTP on one engine), or a
router in front of several (the clients, `jtrail client` and `jtrail chat`, are in client_cli.py).

    jtrail serve --host 127.0.0.1 --port 50051 --http-port 8000 --policy trail

`python -m jtrail.serve ...` runs `serve` directly (the tests start the server this way).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from jtrail.serving.brain.scheduler.trail import TrailPolicy
from jtrail.serving.engine.config import PREEMPTION_MODES
from jtrail.serving.engine.llm_engine import EngineConfig  # plain Python: no JAX until a model loads
from jtrail.serving.engine_api import AsyncEngine

log = logging.getLogger("jtrail.serve")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one")
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health, /metrics); 0 picks a free one")
    p.add_argument("--no-http", action="store_true", help="serve gRPC only")
    p.add_argument("--no-grpc", action="store_true", help="serve the HTTP API only")
    p.add_argument("--model", default=None, help="GGUF file, HF directory or named shape (default: "
                   "the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--policy", default="trail",
                   help="scheduling policy: trail (default; uses the probe), fcfs, priority, gittins, ...")
    p.add_argument("--probe", default=None,
                   help="probe head directory, or a shipped probe by name: 'default' (trained on the model's "
                        "own answers; the default) or 'replay' (trained on recorded ShareGPT answers, for "
                        "replay workloads); 'none' disables")
    p.add_argument("--num-slots", "--slots", dest="num_slots", type=int, default=EngineConfig.num_slots,
                   help="batch slots (--slots: the older name)")
    p.add_argument("--pages", type=int, default=512, help="KV cache pages")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--max-model-len", "--max-context", dest="max_model_len", type=int,
                   default=EngineConfig.max_model_len,
                   help="max prompt + output tokens (--max-context: the older name)")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests before RESOURCE_EXHAUSTED")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus HTTP port (0: free port)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain streams on shutdown")
    p.add_argument("--log-stats-interval", type=float, default=10.0, metavar="SECONDS",
                   help="log prompt/generation tokens/s, running, waiting, KV use and preemptions every "
                        "SECONDS while busy (logger jtrail.stats); 0: off")
    p.add_argument("--tensor-parallel", type=int, default=1, help="devices to shard the model over")
    p.add_argument("--aging", type=float, default=None,
                   help="trail/gittins/srpt-oracle anti-starvation: rank credit per second waited, in tokens "
                        "(--aging-form linear) or as a rate (exp: the rank halves every ln2/RATE s); 0: off; "
                        "default: the policy's own, trail linear 100 tok/s, chosen on the simulator: "
                        "benchmarks/results/tune_preemption.json)")
    p.add_argument("--aging-form", choices=("linear", "exp"), default=None,
                   help="how --aging credits a wait (default: the policy's own; trail: linear)")
    p.add_argument("--arrival-estimate", choices=("probe", "host"), default=None,
                   help="trail: where a waiting request's first length estimate comes from: 'probe' "
                        "(default: a probe-only prefill, device time) or 'host' (the prompt estimator "
                        "shipped beside the probe, prompt_estimator.npz: no device time)")
    p.add_argument("--probe-hold-s", type=float, default=None,
                   help="trail with --arrival-estimate probe: seconds a waiting request's probe-only prefill "
                        "may wait for a step that prefills an admitted prompt anyway, sharing its device "
                        f"call (default: trail's own, {TrailPolicy.DEFAULT_PROBE_HOLD_S:g} s; 0: the next "
                        "step, a call of its own; benchmarks/results/tune_probe_hold.json)")
    p.add_argument("--preemption-mode", choices=PREEMPTION_MODES, default=EngineConfig.preemption_mode,
                   help="what a preempted request's KV becomes: recompute (dropped), swap (to host memory) "
                        "or keep (left in its pages, only the batch slot freed: a length-aware policy's "
                        "preemption costs no recompute; pages short, kept KV goes first)")
    p.add_argument("--decode-steps", type=int, default=1,
                   help="decode tokens per jitted call (higher: less host overhead, chunkier streams)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   default=EngineConfig.async_scheduling,
                   help="schedule and dispatch step N+1 while step N runs on the device (same outputs; "
                        "--no-async-scheduling: each step waits for its own outputs)")
    p.add_argument("--no-warmup", action="store_true",
                   help="report ready before compiling (the first requests then wait for XLA)")
    p.add_argument("--mock", action="store_true", help="the engine over a fake runner (no model)")
    p.add_argument("--mock-step-delay", type=float, default=0.002, help="mock engine seconds per step")


def check_policy(name: str) -> None:
    """Fail fast, before loading any model, on a policy name the scheduler does not know."""
    from jtrail.serving.brain.scheduler.registry import make_policy

    try:
        make_policy(name)
    except (KeyError, ValueError) as e:
        raise ValueError(f"unknown policy {name!r}: {e}") from None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The one EngineConfig the flags describe (the model-backed and the --mock engine both run it)."""
    from jtrail.serving.brain.scheduler.registry import make_policy

    # Aging applies to the length-ranked policies; fcfs and priority take no options.
    ranked = args.policy in ("trail", "gittins", "srpt-oracle")
    given = {"aging": args.aging, "aging_form": args.aging_form}
    opts = {k: v for k, v in given.items() if v is not None} if ranked else {}
    if args.policy == "trail" and getattr(args, "arrival_estimate", None) is not None:
        opts["arrival_estimate"] = args.arrival_estimate
    if args.policy == "trail" and getattr(args, "probe_hold_s", None) is not None:
        opts["probe_hold_s"] = args.probe_hold_s
    return EngineConfig(num_slots=args.num_slots, num_pages=args.pages, page_size=args.page_size,
                        max_model_len=args.max_model_len, policy=make_policy(args.policy, **opts),
                        max_queue=args.max_queue, decode_steps_per_call=args.decode_steps,
                        tensor_parallel=args.tensor_parallel, async_scheduling=args.async_scheduling,
                        preemption_mode=args.preemption_mode)


def build_engine(args: argparse.Namespace) -> AsyncEngine:
    if args.mock:
        from jtrail.serving.engine.fake_runner import mock_engine

        # the real engine and policy over a fake runner (no model; fake probe = exact lengths)
        return mock_engine(config=engine_config(args), step_delay_s=args.mock_step_delay)
    return build_real_engine(args)


def build_real_engine(args: argparse.Namespace) -> AsyncEngine:
    """The model-backed engine: loader -> LLMEngine -> AsyncLLMEngine (imported lazily: JAX is slow)."""
    from jtrail.models.loader import load_model
    from jtrail.serving.engine.async_engine import AsyncLLMEngine
    from jtrail.serving.engine.llm_engine import LLMEngine

    loaded = load_model(args.model)
    probe, predictor = _load_probe(args.probe, default_model=args.model is None)
    # The engine's model runner shards weights and KV pages itself when tensor_parallel > 1.
    cfg = engine_config(args)
    estimator = None
    if predictor is not None and cfg.policy.arrival_estimate == "host":  # preflight checked its file
        from jtrail.shipped import prompt_estimator_beside, resolve_probe_path

        estimator = prompt_estimator_beside(resolve_probe_path(args.probe))
    engine = LLMEngine(loaded.model, loaded.tokenizer, cfg, probe=probe, predictor=predictor,
                       prompt_estimator=estimator)
    if not args.no_warmup:  # compile every prefill shape and the decode step before "serving"
        engine.warmup(report=log.info)
    return AsyncLLMEngine(engine, model_name=loaded.cfg.name)


def _load_probe(spec: str | None, default_model: bool) -> tuple[object | None, object | None]:
    """(probe head, TRAIL predictor) from `spec`; with no spec, the shipped probe for the embedded model.

    `--probe none` turns length prediction off (fcfs/priority do not need it); `--probe replay` picks the
    shipped probe trained on recorded answers."""
    from jtrail.models.probe_io import load_probe
    from jtrail.serving.brain.predictor import TrailPredictor
    from jtrail.shipped import resolve_probe_path

    if spec is not None and spec.lower() == "none":
        return None, None
    path = resolve_probe_path(spec)
    if spec is None and (not default_model or not path.exists()):
        log.warning("no probe: length prediction is off (pass --probe PATH)")
        return None, None
    head, pcfg, _ = load_probe(path)
    return head, TrailPredictor(pcfg.bin_edges, pcfg.midpoints)


async def _serve(args: argparse.Namespace) -> BaseException | None:
    """One engine, two front doors: gRPC (`--port`) and the OpenAI-compatible HTTP API (`--http-port`),
    sharing the engine's queue and policy and one Prometheus registry. Serves until SIGTERM/SIGINT, or
    until the engine loop dies: then returns why (the caller exits non-zero)."""
    from jtrail.serving.frontdoor.metrics import ServerMetrics
    from jtrail.serving.frontdoor.server import JtrailServer, ServerConfig

    engine = build_engine(args)
    metrics = ServerMetrics(model_name=engine.info().model_name)
    grpc_server = http = stats_task = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if not args.no_grpc:
            grpc_server = JtrailServer(engine, ServerConfig(
                host=args.host, port=args.port, metrics_port=args.metrics_port, grace_s=args.grace,
                default_max_tokens=args.max_tokens, max_queue=args.max_queue), metrics=metrics)
            await grpc_server.start()  # starts the engine
        else:
            await engine.start()
            if args.metrics_port is not None:
                metrics.start_http(args.metrics_port, args.host)
        # The engine loop died: the gRPC server (if any) has marked NOT_SERVING and failed its streams
        # with UNAVAILABLE; HTTP /health answers 503. Give clients a moment to see it, then stop.
        fatal: list[BaseException] = []
        on_fatal = getattr(engine, "on_fatal", None)

        def engine_died(exc: BaseException) -> None:
            fatal.append(exc)
            log.critical("engine loop died (%r): stopping", exc)
            if on_fatal is not None:
                on_fatal(exc)
            loop.call_later(1.0, stop.set)

        if hasattr(engine, "on_fatal"):
            engine.on_fatal = engine_died
        if not args.no_http:
            from jtrail.serving.frontdoor.http_server import HttpConfig, HttpServer

            http = HttpServer(engine, metrics, HttpConfig(
                host=args.host, port=args.http_port, default_max_tokens=args.max_tokens,
                max_queue=args.max_queue, grace_s=args.grace))
            await http.start()
        grpc_addr = f"{args.host}:{grpc_server.port}" if grpc_server else "-"
        http_addr = http.address if http else "-"
        mport = grpc_server.metrics_port if grpc_server else args.metrics_port
        from jtrail.warmup import banner

        for line in banner(engine, {"gRPC (jtrail.v1)": grpc_addr,
                                    "OpenAI-compatible HTTP": f"http://{http_addr}/v1" if http else "-",
                                    "metrics": f"http://{args.host}:{mport}/metrics" if mport else "-"}):
            log.info("%s", line)
        if args.log_stats_interval > 0:
            from jtrail.serving.frontdoor.stats_log import StatsLogger

            stats_task = asyncio.create_task(StatsLogger(engine.stats, args.log_stats_interval).run(),
                                             name="jtrail-stats-log")
        # one parseable line: scripts and tests wait for it
        print(f"jtrail: serving on {grpc_addr} metrics_port={mport} http={http_addr}", flush=True)
        await stop.wait()
        if not fatal:
            log.info("shutting down: draining in-flight requests for up to %.1fs", args.grace)
    finally:
        if stats_task is not None:
            stats_task.cancel()
        # Both doors drain at once; the engine stops only after both are done.
        await asyncio.gather(*([http.stop()] if http else []),
                             *([grpc_server.stop(stop_engine=False)] if grpc_server else []))
        await engine.shutdown(grace_s=0.0)
        if grpc_server is None:
            metrics.stop_http()
    return fatal[0] if fatal else None


def run_serve(args: argparse.Namespace) -> int:
    from jtrail.log_setup import quiet_library_logs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_library_logs()  # Orbax/absl, JAX and libtpu INFO lines; our INFO and everyone's warnings stay
    try:
        check_policy(args.policy)
        if args.no_http and args.no_grpc:
            raise ValueError("--no-http and --no-grpc leave nothing to serve")
        for name in ("num_slots", "pages", "page_size", "max_queue", "max_model_len", "tensor_parallel",
                     "decode_steps"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not args.log_stats_interval >= 0:  # also refuses nan
            raise ValueError(f"--log-stats-interval must be >= 0 (0: off), got {args.log_stats_interval}")
        from jtrail.preflight import check_serve_args

        check_serve_args(args)  # ports, host, probe, devices: before the model loads
        fatal = asyncio.run(_serve(args))
        if fatal is not None:  # non-zero, so that a supervisor restarts the server
            print(f"jtrail serve: error: the engine stopped: {fatal!r}", file=sys.stderr)
            return 1
    except (ValueError, OSError, RuntimeError) as e:
        print(f"jtrail serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    """Register `jtrail serve` on the CLI's subparsers."""
    p = sub.add_parser("serve", help="run the server: gRPC on 127.0.0.1:50051 and the OpenAI-compatible HTTP "
                                      "API on 127.0.0.1:8000 (default model: embedded SmolLM2)")
    add_serve_args(p)
    p.set_defaults(func=run_serve)


def main(argv: list[str] | None = None) -> int:
    from jtrail.help_format import Parser

    p = Parser(prog="jtrail serve", description="Run the jtrail server (gRPC + HTTP).")
    add_serve_args(p)
    return run_serve(p.parse_args(argv))


def run_route(args: argparse.Namespace) -> int:
    from jtrail.log_setup import quiet_library_logs
    from jtrail.serving.brain.router import make_router
    from jtrail.serving.frontdoor.router_server import ReplicaSet, RouterServicer
    from jtrail.serving.frontdoor.server import JtrailServer, ServerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_library_logs()
    try:
        opts = {"page_size": args.page_size, "expected_tokens": args.expected_tokens}
        router = make_router(args.router, **(opts if args.router == "token-aware" else {}))
        replicas = ReplicaSet([t.strip() for t in args.replicas.split(",") if t.strip()], router,
                              expected_tokens=args.expected_tokens)
    except ValueError as e:
        print(f"jtrail route: error: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        server = JtrailServer(replicas, ServerConfig(host=args.host, port=args.port,
                                                     metrics_port=args.metrics_port, grace_s=args.grace),
                              servicer=RouterServicer(replicas))
        server.on_started = lambda: print(
            f"jtrail: routing on {args.host}:{server.port} metrics_port={server.metrics_port}", flush=True)
        await server.serve_forever()

    import grpc

    try:
        asyncio.run(main())
    except grpc.aio.AioRpcError as e:  # a replica did not answer ServerInfo at start
        print(f"jtrail route: error: cannot reach every replica of {args.replicas}: {e.code().name}",
              file=sys.stderr)
        return 2
    return 0


def add_route(sub: argparse._SubParsersAction) -> None:
    """Register `jtrail route`: one gRPC endpoint in front of several `jtrail serve` replicas."""
    p = sub.add_parser("route", help="route requests across jtrail servers (data-parallel replicas)")
    p.add_argument("--replicas", required=True, help="comma-separated host:port of the jtrail servers")
    p.add_argument("--router", default="token-aware",
                   help="round-robin, least-requests, power-of-two or token-aware (default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50050)
    p.add_argument("--page-size", type=int, default=16, help="the replicas' KV page size (token-aware)")
    p.add_argument("--expected-tokens", type=float, default=256.0,
                   help="output tokens assumed for a new request (token-aware: KV pages it needs, and the "
                        "slot it takes until the next load poll)")
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--grace", type=float, default=10.0)
    p.set_defaults(func=run_route)


if __name__ == "__main__":
    sys.exit(main())
