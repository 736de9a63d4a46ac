"""``falconlm serve --ray-replicas N``: N engine replicas on Ray behind one OpenAI endpoint.

Each replica is a Ray actor running a complete ``falconlm serve`` server (its own engine, ``--threads`` threads,
the same options) on a free port of its node; only the front knows the key the replicas ask for. The front, in
this process, is ``falconlm.server.replica_front``: it checks clients' keys, routes each request by its prompt's
prefix (``replica_routing``) to a ready replica and passes the answer through unchanged. Ray restarts a replica
that dies; the front's health checks take it out of routing meanwhile and find it again on its new port.

Without ``--ray`` a local Ray instance is started and stopped at exit; with ``--ray ADDRESS`` the replicas run on
that cluster (every node needs falconlm and the model folder at the same path). Ray is imported only here.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .options import positive_int
from .serve_http import positive_seconds, uvicorn_config

logger = logging.getLogger("falconlm.serve")

LOCATE_TIMEOUT = 3.0  # seconds one look-up of a replica's address may take (the actor may be restarting)
START_TIMEOUT = 60.0  # seconds a replica's HTTP server has to open its socket


def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-replicas",
        type=positive_int,
        default=None,
        metavar="N",
        help="run N engine replicas as Ray actors behind this endpoint, routing requests that share a prompt "
        "prefix to the same replica (needs the 'ray' extra)",
    )
    p.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="with --ray-replicas: the Ray cluster to run them on (default: start a local Ray instance)",
    )
    p.add_argument(
        "--replica-health-interval",
        type=positive_seconds,
        default=2.0,
        metavar="SECONDS",
        help="with --ray-replicas: seconds between health checks of each replica (default 2)",
    )


def import_ray() -> Any:
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray-replicas needs Ray: pip install 'falconlm[ray]'") from None
    return ray


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line error for a ``host:port`` (or ``ray://host:port``) nobody answers at; Ray itself retries for
    minutes. Other forms (``auto``) are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def connect_ray(ray: Any, address: str | None, num_cpus: int) -> bool:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else start a local instance with ``num_cpus`` CPUs
    (True: started here)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None  # Ray's own way to name a cluster
    if address is not None:
        check_reachable(address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return False
    # Local workers import this very falconlm, installed or not.
    path = os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        object_store_memory=100 * 2**20,  # requests and answers go over HTTP, not through the object store
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    return True


def check_resources(available: dict[str, float], count: int, cpus: int, gpus: int) -> None:
    """A one-line error when the Ray cluster cannot hold ``count`` replicas (they would wait forever)."""
    if gpus and available.get("GPU", 0) < count * gpus:
        have = int(available.get("GPU", 0))
        raise ValueError(f"--ray-replicas {count} needs {count * gpus} GPUs (one each); the Ray cluster has {have}")
    if available.get("CPU", 0) < count * cpus:
        have = int(available.get("CPU", 0))
        raise ValueError(
            f"--ray-replicas {count} with --threads {cpus} needs {count * cpus} CPUs; the Ray cluster has {have}"
        )


class ReplicaServer:
    """Runs inside a Ray actor: ``falconlm serve`` with ``args`` on ``host`` (None: this node's address) and a
    free port, accepting only ``replica_key``."""

    def __init__(self, args: argparse.Namespace, replica_key: str, host: str | None) -> None:
        from ..engine.async_engine import AsyncEngine
        from ..engine.factory import build_engine
        from .serve import engine_args, server_settings
        from .serve_http import build_server_app, uvicorn_server

        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        args = argparse.Namespace(**{**vars(args), "host": host, "port": 0})
        settings = server_settings(args, (replica_key,))
        settings_for_engine = engine_args(args)
        self.engine = AsyncEngine(lambda: build_engine(settings_for_engine))
        app = build_server_app(self.engine, settings, shutdown_timeout=min(args.shutdown_timeout, 5.0))
        self.server = uvicorn_server(app, args)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        port = self.socket.getsockname()[1]
        self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the replica's HTTP server did not start on {self._url}")
            time.sleep(0.02)

    def url(self) -> str:
        return self._url

    def stop(self, timeout: float) -> None:
        """Finish the running requests (``timeout`` s at most), then stop the server and the engine."""
        self.server.should_exit = True
        self.thread.join(timeout + 5)


class RayReplicas:
    """``count`` :class:`ReplicaServer` actors (Ray restarts one that dies); ``locators()`` feed a ReplicaPool."""

    def __init__(self, ray: Any, args: argparse.Namespace, count: int, replica_key: str, host: str | None) -> None:
        from ..engine.devices import resolve_device

        self.ray = ray
        cpus = args.threads or 1
        gpus = 1 if resolve_device(args.device).type == "cuda" else 0  # Ray shows each replica its own GPU
        check_resources(ray.cluster_resources(), count, cpus, gpus)
        actor = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=-1, scheduling_strategy="SPREAD")(ReplicaServer)
        self.actors = []
        for index in range(count):
            # Only replica 0 keeps the batch jobs' state directory: the front sends the batch API there.
            state_dir = args.state_dir if index == 0 else None
            device = "cuda" if gpus else args.device
            replica_args = argparse.Namespace(**{**vars(args), "state_dir": state_dir, "device": device})
            self.actors.append(actor.remote(replica_args, replica_key, host))

    def locators(self) -> list[Callable[[], str]]:
        return [self._locator(index, actor) for index, actor in enumerate(self.actors)]

    def _locator(self, index: int, actor: Any) -> Callable[[], str]:
        ray = self.ray
        reported: list[str] = []

        def locate() -> str:
            try:
                return ray.get(actor.url.remote(), timeout=LOCATE_TIMEOUT)
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"replica {index} is starting") from None
            except ray.exceptions.RayError as exc:
                message = " ".join(str(exc).split())[:300]
                if message not in reported:  # once per distinct failure, not every health check
                    reported.append(message)
                    logger.warning("replica %d cannot start: %s", index, message)
                raise

        return locate

    def kill(self, index: int) -> None:
        """End replica ``index``'s process the hard way; Ray restarts it."""
        self.ray.kill(self.actors[index], no_restart=False)

    def stop(self, timeout: float) -> None:
        """Stop every replica: its running requests get ``timeout`` seconds, then its actor ends."""
        ray = self.ray
        refs = [actor.stop.remote(timeout) for actor in self.actors]
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=timeout + 10)
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def run_replicas(args: argparse.Namespace, keys: tuple[str, ...]) -> int:
    """``serve --ray-replicas N``: start the replicas and serve the front until SIGTERM or Ctrl-C."""
    import uvicorn

    from ..server.replica_front import FrontSettings, build_front_app
    from ..server.replica_pool import ReplicaPool

    ray = import_ray()
    count, threads = args.ray_replicas, args.threads or 1
    started_here = connect_ray(ray, args.ray, num_cpus=max(os.cpu_count() or 1, count * threads))
    replicas = None
    try:
        replica_key = secrets.token_urlsafe(32)
        replicas = RayReplicas(ray, args, count, replica_key, host="127.0.0.1" if started_here else None)
        pool = ReplicaPool(
            replicas.locators(), health_interval=args.replica_health_interval, route_floor=args.max_num_seqs
        )
        settings = FrontSettings(
            replica_key=replica_key,
            api_keys=keys,
            max_body_bytes=args.max_body_bytes,
            max_upload_bytes=args.max_upload_bytes,
            bind_host=args.host,
            allowed_hosts=args.allowed_hosts,
            allowed_origins=args.allowed_origins,
        )
        config = uvicorn_config(build_front_app(pool, settings), args)
        logger.info("starting %d replicas on Ray; /health reports how many are ready", count)
        previous = signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises the SIGTERM it handled
        try:
            uvicorn.Server(config).run()
        except SystemExit as exc:
            if exc.code:
                raise OSError(f"could not serve on {args.host}:{args.port} (see the log above)") from None
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        if replicas is not None:
            replicas.stop(min(args.shutdown_timeout, 10.0))
        if started_here:
            ray.shutdown()
    return 0
