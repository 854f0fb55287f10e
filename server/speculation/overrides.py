"""Per-adapter speculation overrides: an operator fixes the draft tokens per step (k) of one adapter.

The adaptive policy learns each adapter's k from its live acceptance; an operator who knows better (an
adapter whose drafts are known useless before its traffic arrives, or a latency target that wants
speculation off for one tenant) fixes it with ``PUT /v1/adapters/{name}/speculation`` (admin scope) and
gives it back to the policy with ``DELETE``. The override holds under both policies (under ``fixed`` the
other requests keep the maximum k) and is applied in the scheduler by
``server/speculation/hooks/adaptive_k.py`` (reached by ``calls.set_overrides``).

Stored as ``.speculation_overrides.json`` (``{"name": k}``) in the adapter store's folder, replaced
atomically (write, fsync, rename), so a crash leaves the old map or the new one; read at start and
pushed to the engine. The engine gets the whole map on every change, so it never holds an override the
file lacks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from server.adapters.store import fsync_dir
from server.errors import BadRequest, Conflict
from server.speculation.calls import set_overrides

log = logging.getLogger(__name__)
FILE = ".speculation_overrides.json"  # dot-named: the store's scan of adapter folders skips it


class SpeculationOverrides:
    """The persisted map adapter name -> k (0..``k_max``) and its copy in the engine core.

    ``engine`` is vLLM's ``EngineClient`` (its ``engine_core.call_utility_async`` reaches the scheduler);
    ``k_max`` is the server's draft tokens per step (0: speculation off, nothing can be overridden).
    """

    def __init__(self, store_dir: Path, engine: Any, k_max: int) -> None:
        self.path = Path(store_dir) / FILE
        self.engine = engine
        self.k_max = k_max
        self.by_name: dict[str, int] = self._read()
        self._lock = asyncio.Lock()  # one change at a time: a rollback never undoes another request's change

    def _read(self) -> dict[str, int]:
        """The stored map; an unreadable or malformed file is logged and read as empty (the policy decides)."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("speculation overrides in %s not readable (%s); none applied", self.path, e)
            return {}
        ok = (
            {n: k for n, k in raw.items() if isinstance(k, int) and 0 <= k <= self.k_max}
            if isinstance(raw, dict)
            else {}
        )
        if ok != raw:
            log.error(
                "speculation overrides in %s: kept %s of %s (k must be an integer in 0..%d)",
                self.path,
                ok,
                raw,
                self.k_max,
            )
        return ok

    def get(self, name: str) -> int | None:
        """The override of adapter ``name``, None when the policy decides."""
        return self.by_name.get(name)

    def check(self, k: int) -> None:
        """Raises Conflict when speculation is off, BadRequest when ``k`` is outside 0..k_max."""
        if self.k_max <= 0:
            raise Conflict("speculation is off on this server (--no-speculation): there is no k to override", param="k")
        if not 0 <= k <= self.k_max:
            raise BadRequest(
                f"k must be an integer from 0 (no drafting) to {self.k_max} (this server's --num-speculative-tokens); got {k}",
                param="k",
            )

    async def set(self, name: str, k: int | None) -> None:
        """Fix adapter ``name``'s k (None: give it back to the policy), on disk first, then in the engine.

        Raises:
            Conflict / BadRequest: see :meth:`check` (nothing is changed).
            OSError: the map could not be written; or the engine's error (nothing is changed either way).
        """
        if k is not None:
            self.check(k)
        async with self._lock:
            old = self.by_name
            new = {n: v for n, v in old.items() if n != name} | ({} if k is None else {name: k})
            if new == old:
                return
            self._write(new)
            self.by_name = new
            try:
                await self.push()
            except BaseException:
                self._write(old)  # the file never says what the engine does not do
                self.by_name = old
                raise

    def _write(self, by_name: dict[str, int]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(by_name, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    async def push(self) -> None:
        """Send the whole map to the engine core (nothing to send with speculation off). Raises the engine's error."""
        if self.k_max <= 0:
            return
        await set_overrides(self.engine, self.by_name)
