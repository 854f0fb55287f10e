"""The adapter registry: validated uploads become stored versions and servable model ids.

Serving reuses vLLM's model registry (``OpenAIServingModels.lora_requests``, written only
through ``server/catalog.py``): an adapter name maps to a ``LoRARequest`` that vLLM's
completion and chat handlers resolve per request, so requests for different adapters and
for the base share batches. Every stored version gets its own ``lora_int_id``,
so no engine cache (LoRA slots, CPU LRU, prefix cache) can serve a previous
version's weights under the new one; requests already running keep the
``LoRARequest`` they resolved and finish on their version.

An upload may carry a paired draft adapter (``server/adapters/staging.py``); it is
stored in the version folder's ``draft/`` (:meth:`AdapterRegistry.draft_path`).
vLLM loads the adapter from the version folder by its two file names only, so
the subfolder does not affect loading; the draft adapter itself is not applied
while serving (vLLM applies no LoRA to the draft model).
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from pathlib import Path

from server.adapters.staging import NO_DRAFT_MODEL, DraftInvalid, Rules, Staged, Upload, stage
from server.adapters.store import AdapterRecord, AdapterStore
from server.adapters.validate import AdapterInvalid, BaseShape
from server.catalog import ModelCatalog
from server.errors import ApiError, NotFound
from server.metrics import ServerMetrics
from server.peft import CONFIG_FILE, DRAFT_DIR, WEIGHTS_FILE
from server.speculation.overrides import SpeculationOverrides

log = logging.getLogger(__name__)


class PayloadTooLarge(ApiError):
    """413: an uploaded file or archive is over the configured limit."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def _read_folder(folder: Path) -> list[Upload]:
    """The PEFT files of an adapter folder as uploads."""
    return [Upload(f.name, f.read_bytes()) for f in folder.iterdir() if f.name in (CONFIG_FILE, WEIGHTS_FILE)]


class AdapterRegistry:
    """Adapters of one server: the store on disk plus their registration in the engine."""

    def __init__(
        self,
        store: AdapterStore,
        catalog: ModelCatalog,
        engine,
        base_shape: BaseShape,
        max_rank: int,
        max_upload_bytes: int,
        metrics: ServerMetrics | None = None,
        draft_shape: BaseShape | None = None,
        draft_tokens_per_step: int = 0,
    ) -> None:
        """``catalog`` owns the model-id namespace the adapter names live in: the registry publishes and
        withdraws names there (server/app.py sets the registry on it). ``draft_shape``: the draft model's
        shape, which draft adapters must fit; None when the server has no draft model (draft adapters are
        then refused). ``max_upload_bytes`` bounds an upload (adapter and draft together) and each archive's
        expansion. ``draft_tokens_per_step``: the most an adapter's k may be overridden to (0: speculation
        off, no overrides)."""
        self.store = store
        self.catalog = catalog
        self.engine = engine  # vllm EngineClient
        self.base_shape = base_shape
        self.draft_shape = draft_shape
        self.base_name = catalog.base_id
        self.max_rank = max_rank
        self.max_upload_bytes = max_upload_bytes
        self.records: dict[str, AdapterRecord] = {}
        self.metrics = metrics
        self.overrides = SpeculationOverrides(store.root, engine, draft_tokens_per_step)
        self._resident: set[int] = set()  # lora_int_ids in the engine at the last look (plus loads since)
        self._lock = asyncio.Lock()  # one writer at a time: versions and engine ids stay ordered

    async def restore(self) -> None:
        """Serve every adapter already in the store (after a restart), newest intact version each, and give
        the engine the stored speculation overrides (an engine without the adaptive_k patch cannot take them:
        logged, the server still starts)."""
        if self.overrides.by_name:
            try:
                await self.overrides.push()
            except Exception as e:  # noqa: BLE001 (the overrides are an operator's tuning, not a reason to refuse start)
                log.error("speculation overrides %s not applied: %s", self.overrides.by_name, e)
        for rec in self.store.load_all():
            try:
                await self._activate(rec)
            except AdapterInvalid as exc:
                log.error("stored adapter %s v%d not served: %s", rec.name, rec.version, exc.message)

    async def seed(self, folder: Path, skip: frozenset[str] = frozenset()) -> None:
        """Store and serve each adapter folder under ``folder`` whose name is not stored yet (nor in ``skip``).

        A ``draft/`` subfolder holding a draft adapter is stored with it when the server has a
        draft model. An adapter that does not fit this base is logged and skipped, not fatal; a
        draft adapter that does not fit the draft model is logged and the adapter stored without it.
        """
        if not folder.is_dir():
            return
        for d in sorted(p for p in folder.iterdir() if (p / CONFIG_FILE).is_file()):
            if d.name in self.records or d.name in skip:
                continue
            uploads = _read_folder(d)
            drafts = _read_folder(d / DRAFT_DIR) if (d / DRAFT_DIR / CONFIG_FILE).is_file() else None
            if drafts and self.draft_shape is None:
                log.info("shipped adapter %s: draft adapter not stored (no draft model)", d.name)
                drafts = None
            try:
                try:
                    rec = await self.upload(d.name, uploads, drafts)
                except DraftInvalid as exc:
                    log.error("shipped adapter %s stored without its draft adapter: %s", d.name, exc.message)
                    rec = await self.upload(d.name, uploads)
            except AdapterInvalid as exc:  # e.g. the shipped adapters beside another base model
                log.error("shipped adapter %s not served on %s: %s", d.name, self.base_name, exc.message)
                continue
            log.info("seeded adapter %s v%d from %s (draft: %s)", rec.name, rec.version, d, rec.draft is not None)

    def card(self, name: str) -> dict:
        """What ``GET /v1/adapters/{name}`` shows: the stored record and ``speculation_k_override`` (the
        operator's k for this adapter's requests, None when the policy decides). Raises NotFound."""
        return self.get(name).to_json() | {"speculation_k_override": self.overrides.get(name)}

    def list(self) -> list[AdapterRecord]:
        return [self.records[n] for n in sorted(self.records)]

    def get(self, name: str) -> AdapterRecord:
        """Raises NotFound naming the known adapters."""
        try:
            return self.records[name]
        except KeyError:
            known = ", ".join(sorted(self.records)) or "none"
            raise NotFound(f"adapter {name!r} does not exist (stored adapters: {known})", param="name") from None

    def draft_path(self, name: str) -> Path | None:
        """The folder of the current version's draft adapter (PEFT ``adapter_config.json`` and
        ``adapter_model.safetensors`` for the draft model), or None if that version has none.

        Raises:
            NotFound: no adapter is named ``name``.
        """
        rec = self.get(name)
        return None if rec.draft is None else self._version_path(rec) / DRAFT_DIR

    def _version_path(self, rec: AdapterRecord) -> Path:
        """The folder ``rec``'s version is stored in (KeyError if it is not)."""
        return self.store.path(rec.name, rec.version)

    async def upload(
        self,
        name: str,
        files: list[Upload],
        draft_files: list[Upload] | None = None,
        allow_base_mismatch: bool = False,
    ) -> AdapterRecord:
        """Validate, store and serve ``files`` as the next version of adapter ``name``.

        ``files`` is either the two PEFT files or one .tar.gz/.tgz/.zip holding them (which may also
        hold a ``draft/`` folder with the draft adapter). ``draft_files``: the paired draft adapter's
        two files or one archive, or None. The draft is committed in the same rename as the adapter.
        ``allow_base_mismatch``: store an adapter whose tensors cover only part of what its config
        targets in the base (made for another model, ``validate.check_covers_base``).

        Raises:
            DraftInvalid: (400, param ``draft_files``) a bad draft adapter, or one sent to a server
                without a draft model; nothing is stored.
            AdapterInvalid: (400) anything wrong with the name, files or tensors; nothing is stored.
            PayloadTooLarge: (413) files (adapter and draft together) over ``max_upload_bytes``.
        """
        self._check_upload(name, files, draft_files)
        async with self._lock:
            staging = self.store.new_staging_dir()
            try:
                staged = await asyncio.to_thread(stage, staging, files, draft_files, self._rules(), allow_base_mismatch)
                rec = await asyncio.to_thread(self._commit, staging, name, staged)
            except BaseException:
                self.store.discard(staging)
                raise
            try:
                await self._activate(rec)
            except BaseException:
                self.store.remove_version(name, rec.version)
                raise
            await asyncio.to_thread(self.store.prune, name)
            self._event("upload")
            await self.refresh_residency()
            return rec

    def _check_upload(self, name: str, files: list[Upload], draft_files: list[Upload] | None) -> None:
        """The checks of :meth:`upload` that need no files staged; raises what it documents."""
        self.catalog.check_adapter_name(name)
        if draft_files and self.draft_shape is None:
            raise DraftInvalid(NO_DRAFT_MODEL)
        size = sum(len(f.data) for f in files)
        draft_size = sum(len(f.data) for f in draft_files or [])
        if size + draft_size > self.max_upload_bytes:
            parts = f" ({size} adapter + {draft_size} draft adapter)" if draft_files else ""
            raise PayloadTooLarge(
                f"upload is {size + draft_size} bytes{parts}; the limit is {self.max_upload_bytes} bytes",
                param="draft_files" if draft_files and size <= self.max_upload_bytes else "files",
            )

    def _rules(self) -> Rules:
        return Rules(self.base_shape, self.draft_shape, self.max_rank, self.max_upload_bytes)

    def _commit(self, staging: Path, name: str, staged: Staged) -> AdapterRecord:
        return self.store.commit(staging, name, staged.adapter, self.base_name, staged.draft)

    async def _activate(self, rec: AdapterRecord) -> None:
        """Load ``rec`` into the engine under a fresh ``lora_int_id`` and make its name resolve to it."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(
            lora_name=rec.name,
            lora_int_id=self.catalog.next_lora_id(),
            lora_path=str(self._version_path(rec)),
        )
        request.base_model_name = self.base_name
        try:
            await self.engine.add_lora(request)
        except Exception as exc:  # the engine's loader raises many types; we report its message
            self._event("load_failed")
            raise AdapterInvalid(f"the engine could not load adapter {rec.name!r}: {exc}") from None
        self._event("load")
        self._resident.add(request.lora_int_id)
        self.catalog.publish_adapter(rec.name, request)
        self.records[rec.name] = rec
        if self.metrics is not None:
            self.metrics.create_series(self.base_name, rec.name)
            self.metrics.adapters_served.set(len(self.records))

    async def delete(self, name: str) -> AdapterRecord:
        """Stop serving ``name`` (new requests get 404; running ones finish) and delete it from disk.

        Raises:
            NotFound: unknown adapter.
        """
        async with self._lock:
            rec = self.get(name)
            self._withdraw(name)
            await asyncio.to_thread(self.store.delete, name)
            await self.overrides.set(name, None)  # a new adapter of this name starts with the policy's k
            return rec

    def _withdraw(self, name: str) -> None:
        """Stop resolving ``name`` here (requests already running finish on their version)."""
        self.catalog.withdraw_adapter(name)
        self.records.pop(name, None)
        self._event("delete")
        if self.metrics is not None:
            self.metrics.adapters_served.set(len(self.records))

    async def close(self) -> None:
        """Stop background work (none for a local store: the shared registry follows its database)."""

    def link_report(self) -> dict:
        """The ``registry`` entry of ``/ready``: a local store is always in step with itself."""
        return {"backend": "local", "state": "synced"}

    def _event(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_events.labels(event).inc()

    async def refresh_residency(self) -> None:
        """Ask the engine which adapter versions it holds: sets ``adapters_resident``, counts as evictions
        the versions its LRU cache dropped since the last look and as reloads those it loaded again for a
        request (from the stored files). So load + reload - eviction = resident after every look."""
        if self.metrics is None:
            return
        resident = set(await self.engine.list_loras())
        self.metrics.adapter_events.labels("eviction").inc(len(self._resident - resident))
        self.metrics.adapter_events.labels("reload").inc(len(resident - self._resident))
        self._resident = resident
        self.metrics.adapters_resident.set(len(resident))
