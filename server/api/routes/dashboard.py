"""GET /dashboard: a one-page live view of the server's metrics for a person with a browser."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from server.api.deps import StateDep

router = APIRouter(tags=["observability"])

PAGE = Path(__file__).resolve().parents[2] / "dashboard" / "dashboard.html"


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """Live dashboard: acceptance rate per adapter over time, TTFT/ITL percentiles, tokens/s,
    running/waiting requests, adapters resident. The page polls /metrics every 2 s."""
    return HTMLResponse(PAGE.read_text())


@router.get("/dashboard/history")
async def dashboard_history(state: StateDep) -> dict:
    """Draft and accepted token totals per model and adapter, sampled every few seconds (last 30 min),
    from which the dashboard draws acceptance rate over time."""
    return state.spec_history.to_json()
