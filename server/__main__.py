"""``python -m server [--flags]``: serve the model over the OpenAI API.

Flags mirror the settings (``python -m server --help``); each is also an
environment variable ``QSERVE_<NAME>``.
"""

from __future__ import annotations

import logging
import signal
import sys

import uvicorn
from pydantic import ValidationError

from server.app import create_app
from server.engine.watchdog import ENGINE_DEAD_EXIT_CODE
from server.settings import Settings


def main(argv: list[str] | None = None) -> int:
    """Parse settings, build the app and serve until SIGINT/SIGTERM. Returns the exit code."""
    try:
        settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"error: {where}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except ValueError as exc:  # e.g. a malformed API keys file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # On SIGTERM uvicorn stops accepting, lets in-flight requests (streams included) finish for up
    # to shutdown_grace_s, then runs the lifespan's shutdown (engine closed). No per-request access
    # log line unless debugging: vLLM's own server runs with --disable-uvicorn-access-log in our argv
    # (server.engine.build.vllm_argv), and the load comparison (loadtests/compare_vllm.py) holds both to
    # the same work.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        # uvicorn's default 5 s equals httpx's pool expiry: a request sent on a connection the server is
        # closing fails with "Server disconnected" (seen once in 5081 requests of the 30-minute soak).
        timeout_keep_alive=settings.keep_alive_timeout_s,
        access_log=settings.log_level == "debug",
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal
    # under the handler that was installed before it started; with the default
    # handler the process would end "killed by SIGTERM" after a clean shutdown.
    # A no-op handler here makes a graceful stop exit with status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if app.state.qserve.engine_dead:  # server/engine/watchdog.py stopped us: a supervisor should restart
        return ENGINE_DEAD_EXIT_CODE
    # uvicorn returns normally when the lifespan failed; report that as failure.
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
