"""Running the application on a local Ray: ``musar serve``, the tests and the load benchmark.

Serve's HTTP proxy is started once per Ray cluster with its host and port; a second ``serve.start``
with other options is ignored by Serve. :func:`start_local` therefore reuses a running proxy and
reports the address it really listens on.
"""

from __future__ import annotations

import socket
import time
import urllib.request

from .config import ServeAppConfig


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def running_http_address() -> tuple[str, int] | None:
    """(host, port) of the Serve proxy on this cluster, or None when Serve is not running."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:
        return None
    if client is None:
        return None
    http = client.http_config
    return http.host, http.port


def ensure_serve(host: str = "127.0.0.1", port: int | None = None) -> tuple[str, int]:
    """Start Serve's proxy on ``host:port`` (a free port if None) unless Serve runs already."""
    from ray import serve

    address = running_http_address()
    if address is not None:
        return address
    port = port or free_port(host)
    serve.start(http_options={"host": host, "port": port})
    return host, port


def start_local(cfg: ServeAppConfig, *, port: int | None = None) -> str:
    """Deploy the application on the current Ray (Serve started on cfg.host) and return its base URL."""
    from ray import serve

    from .app import build_app

    host, bound = ensure_serve(cfg.host, port if port is not None else cfg.port)
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    client_host = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1", "localhost") else host
    url = f"http://{client_host}:{bound}{cfg.route_prefix.rstrip('/')}"
    wait_healthy(url)
    return url


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
                if r.status == 200:
                    return
        except Exception as err:  # not up yet
            last = err
        time.sleep(0.25)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s}s (last: {last})")
