"""The fleet page on the gateway's metrics port: `/` (static HTML that polls) and
`/api/fleet` (the fleet snapshot as JSON, built on the event loop)."""

from __future__ import annotations

import asyncio
import dataclasses
from importlib import resources
from typing import Any

from gateway.fleet import TrafficMeter, fleet_snapshot
from gateway.health import GatewayHealth
from gateway.router import Router
from gateway.routing import FleetView
from meshserve.httpd import Page, json_page, on_loop


def _html() -> bytes:
    return resources.files("gateway").joinpath("static/fleet.html").read_bytes()


def fleet_pages(
    loop: asyncio.AbstractEventLoop, view: FleetView, router: Router, health: GatewayHealth
) -> dict[str, Page]:
    meter = TrafficMeter()
    page = _html()  # read once: the page is static, the data comes from /api/fleet

    async def snapshot() -> dict[str, Any]:
        workers = fleet_snapshot(view.workers, router, meter)
        status = health.status()
        return {
            "status": dataclasses.asdict(status) | {"detail": status.detail},
            "workers": [
                dataclasses.asdict(w) | {"start_time": w.start_time.isoformat()} for w in workers
            ],
        }

    return {
        "/": Page("text/html; charset=utf-8", lambda: page),
        "/api/fleet": json_page(lambda: on_loop(loop, snapshot)),
    }
