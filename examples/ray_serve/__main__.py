"""falconlm on Ray Serve: each Serve replica runs the complete falconlm server app (every route, streams, errors).

    python -m examples.ray_serve --model ./falcon-7b --num-replicas 2 --port 8000 [-- more serve options]

Ray Serve balances requests over the replicas (power of two choices) and restarts unhealthy ones; it does not
know prompts, so requests that share a prefix are not kept together. ``falconlm serve --ray-replicas N`` routes by
prefix instead. Options after ``--`` are ``falconlm serve`` options for every replica (``--api-key``, ``--dtype``,
``--max-num-seqs`` ...). SIGTERM or Ctrl-C stops Serve and the local Ray instance.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from ray import serve

from falconlm.cli import build_parser


def replica_args(argv: list[str]) -> argparse.Namespace:
    """The ``falconlm serve`` options of each replica."""
    args = build_parser().parse_args(["serve", *argv])
    if args.model is None:
        from falconlm.default_model import default_model_path

        args.model = default_model_path()
    return args


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=5, max_ongoing_requests=64)
@serve.ingress()
class FalconLMServer:
    """One replica: a falconlm engine and the server app over it (Serve runs the app's lifespan)."""

    def __init__(self, argv: list[str]) -> None:
        from falconlm.cli.serve import engine_args, read_api_keys, server_settings
        from falconlm.engine.async_engine import AsyncEngine
        from falconlm.engine.factory import build_engine

        args = replica_args(argv)
        settings_for_engine = engine_args(args)
        self.engine = AsyncEngine(lambda: build_engine(settings_for_engine))
        self.settings = server_settings(args, read_api_keys(args))

    def __serve_build_asgi_app__(self):
        from falconlm.cli.serve_http import build_server_app

        return build_server_app(self.engine, self.settings)

    def check_health(self) -> None:
        """Serve restarts a replica whose model failed to load."""
        if self.engine.load_error is not None:
            raise RuntimeError(f"the model failed to load: {self.engine.load_error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.ray_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--num-replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per replica (default 1)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("serve_options", nargs="*", help="falconlm serve options for every replica (after --)")
    args = parser.parse_args(argv)
    import ray

    # The replicas import this checkout's falconlm and examples.
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    replica_argv = [*(["--model", str(args.model)] if args.model else []), "--threads", str(args.threads)]
    replica_argv += args.serve_options
    replica_args(replica_argv)  # bad options: argparse's one line here, not in every replica
    deployment = FalconLMServer.options(num_replicas=args.num_replicas, ray_actor_options={"num_cpus": args.threads})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment.bind(replica_argv), name="falconlm", route_prefix="/")
        print(f"serving on http://{args.host}:{args.port} with {args.num_replicas} replicas", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
