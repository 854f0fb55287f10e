"""GET /dashboard: a one-page live view of the server's metrics for a person with a browser."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["observability"])

PAGE = Path(__file__).resolve().parents[1] / "static" / "dashboard.html"


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """Live dashboard: acceptance rate per adapter over time, TTFT/ITL percentiles, tokens/s,
    running/waiting requests, adapters resident. The page polls /metrics every 2 s."""
    return HTMLResponse(PAGE.read_text())
