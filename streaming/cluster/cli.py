"""``mimo-voice engines [list|start|stop]``: the engine actors of a Ray cluster, as the front-ends see them."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from mimo_voice.configs import Config

from .pool import ENGINE_PREFIX, EnginePool, connect_ray

STATUS_TIMEOUT_SECS = 5.0
COLUMNS = ("name", "state", "sessions", "active", "device", "pid")


def list_engines(config: Config) -> list[dict[str, Any]]:
    """Every engine actor of ``engine.ray_namespace`` and what it says about itself (or that it does not)."""
    import ray

    connect_ray(config)
    names = sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == config.engine.ray_namespace and actor["name"].startswith(ENGINE_PREFIX)
    )
    rows: list[dict[str, Any]] = []
    for name in names:
        handle = ray.get_actor(name, namespace=config.engine.ray_namespace)
        try:
            status = cast(dict[str, Any], ray.get(handle.status.remote(), timeout=STATUS_TIMEOUT_SECS))
            rows.append({"state": "ready", **status})
        except (ray.exceptions.RayError, TimeoutError) as exc:
            rows.append({"name": name, "state": f"not answering ({type(exc).__name__})"})
    return rows


def stop_engines(config: Config) -> list[str]:
    """Kills every engine actor of the namespace (for good: Ray does not restart them)."""
    import ray

    stopped = []
    for row in list_engines(config):
        ray.kill(ray.get_actor(row["name"], namespace=config.engine.ray_namespace), no_restart=True)
        stopped.append(row["name"])
    return stopped


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[str(row.get(column, "")) for column in COLUMNS] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(COLUMNS)]
    for line in [list(COLUMNS), *cells]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def main(config: Config, argv: list[str]) -> int:
    action = argv[0] if argv else "list"
    if action == "start":  # what a front-end does on start-up, without serving: engines up and loaded
        pool = EnginePool.connect(config)
        pool.wait_ready(len(pool.members), 600)
        asyncio.run(pool.aclose())
    elif action == "stop":
        stopped = stop_engines(config)
        print(f"stopped {len(stopped)} engine(s): {', '.join(stopped) or 'none'}")
        return 0
    rows = list_engines(config)
    if not rows:
        print(f"no engines in Ray namespace {config.engine.ray_namespace!r} (start them: mimo-voice engines start)")
        return 1
    print_table(rows)
    return 0
