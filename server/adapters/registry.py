"""The adapter registry: validated uploads become stored versions and servable model ids.

Serving reuses vLLM's model registry (``OpenAIServingModels.lora_requests``):
an adapter name maps to a ``LoRARequest`` that vLLM's completion and chat
handlers resolve per request, so requests for different adapters and for
the base share batches. Every stored version gets its own ``lora_int_id``,
so no engine cache (LoRA slots, CPU LRU, prefix cache) can serve a previous
version's weights under the new one; requests already running keep the
``LoRARequest`` they resolved and finish on their version.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from server.adapters import archive
from server.adapters.store import AdapterRecord, AdapterStore
from server.adapters.validate import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterInvalid,
    BaseShape,
    check_files,
    check_name,
    check_weights,
    parse_config,
)
from server.errors import ApiError, NotFound
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class PayloadTooLarge(ApiError):
    """413: an uploaded file or archive is over the configured limit."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its client-side file name and its bytes."""

    filename: str
    data: bytes


class AdapterRegistry:
    """Adapters of one server: the store on disk plus their registration in the engine."""

    def __init__(
        self,
        store: AdapterStore,
        serving_models,
        engine,
        base_shape: BaseShape,
        base_name: str,
        max_rank: int,
        max_upload_bytes: int,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.store = store
        self.models = serving_models  # vllm OpenAIServingModels
        self.engine = engine  # vllm EngineClient
        self.base_shape = base_shape
        self.base_name = base_name
        self.max_rank = max_rank
        self.max_upload_bytes = max_upload_bytes
        self.records: dict[str, AdapterRecord] = {}
        self.metrics = metrics
        self._resident: set[int] = set()  # lora_int_ids in the engine at the last look (plus loads since)
        self._lock = asyncio.Lock()  # one writer at a time: versions and engine ids stay ordered

    async def restore(self) -> None:
        """Serve every adapter already in the store (after a restart), newest intact version each."""
        for rec in self.store.load_all():
            try:
                await self._activate(rec)
            except AdapterInvalid as exc:
                log.error("stored adapter %s v%d not served: %s", rec.name, rec.version, exc.message)

    async def seed(self, folder: Path) -> None:
        """Store and serve each adapter folder under ``folder`` whose name is not stored yet.

        An adapter that does not fit this base is logged and skipped, not fatal.
        """
        if not folder.is_dir():
            return
        for d in sorted(p for p in folder.iterdir() if (p / CONFIG_FILE).is_file()):
            if d.name in self.records:
                continue
            uploads = [Upload(f.name, f.read_bytes()) for f in d.iterdir() if f.name in (CONFIG_FILE, WEIGHTS_FILE)]
            try:
                rec = await self.upload(d.name, uploads)
            except AdapterInvalid as exc:  # e.g. the shipped adapters beside another base model
                log.error("shipped adapter %s not served on %s: %s", d.name, self.base_name, exc.message)
                continue
            log.info("seeded adapter %s v%d from %s", rec.name, rec.version, d)

    def list(self) -> list[AdapterRecord]:
        return [self.records[n] for n in sorted(self.records)]

    def get(self, name: str) -> AdapterRecord:
        """Raises NotFound naming the known adapters."""
        try:
            return self.records[name]
        except KeyError:
            known = ", ".join(sorted(self.records)) or "none"
            raise NotFound(f"adapter {name!r} does not exist (stored adapters: {known})", param="name") from None

    async def upload(self, name: str, files: list[Upload]) -> AdapterRecord:
        """Validate, store and serve ``files`` as the next version of adapter ``name``.

        ``files`` is either the two PEFT files or one .tar.gz/.tgz/.zip holding them.

        Raises:
            AdapterInvalid: (400) anything wrong with the name, files or tensors; nothing is stored.
            PayloadTooLarge: (413) files or archive expansion over ``max_upload_bytes``.
        """
        check_name(name, self.base_name)
        total = sum(len(f.data) for f in files)
        if total > self.max_upload_bytes:
            raise PayloadTooLarge(f"upload is {total} bytes; the limit is {self.max_upload_bytes} bytes", param="files")
        async with self._lock:
            staging = self.store.new_staging_dir()
            try:
                info = await asyncio.to_thread(self._stage, staging, files)
                rec = await asyncio.to_thread(self.store.commit, staging, name, info, self.base_name)
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

    def _stage(self, staging: Path, files: list[Upload]) -> object:
        """Write ``files`` into ``staging`` (unpacking an archive) and validate them."""
        kinds = [archive.archive_kind(f.filename) for f in files]
        if len(files) == 1 and kinds[0] is not None:
            names = archive.extract(files[0].data, kinds[0], staging, self.max_upload_bytes)
            check_files(names)
        else:
            if any(kinds):
                raise AdapterInvalid("send either one archive or the adapter files, not both", param="files")
            names = []
            for f in files:
                base = Path(f.filename.replace("\\", "/")).name
                if not base or base in names:
                    raise AdapterInvalid(f"file name {f.filename!r} is empty or repeated", param="files")
                names.append(base)
            check_files(names)  # before writing anything: refuses pickles by name
            for f, base in zip(files, names, strict=True):
                if base in (CONFIG_FILE, WEIGHTS_FILE):
                    (staging / base).write_bytes(f.data)
        for extra in set(names) - {CONFIG_FILE, WEIGHTS_FILE}:
            (staging / extra).unlink(missing_ok=True)  # README etc. are not kept
        cfg = parse_config((staging / CONFIG_FILE).read_bytes(), self.max_rank)
        return check_weights(staging / WEIGHTS_FILE, cfg, self.base_shape)

    async def _activate(self, rec: AdapterRecord) -> None:
        """Load ``rec`` into the engine under a fresh ``lora_int_id`` and make its name resolve to it."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(
            lora_name=rec.name,
            lora_int_id=self.models.lora_id_counter.inc(1),
            lora_path=str(self.store.path(rec.name, rec.version)),
        )
        request.base_model_name = self.base_name
        try:
            await self.engine.add_lora(request)
        except Exception as exc:  # the engine's loader raises many types; we report its message
            self._event("load_failed")
            raise AdapterInvalid(f"the engine could not load adapter {rec.name!r}: {exc}") from None
        self._event("load")
        self._resident.add(request.lora_int_id)
        self.models.lora_requests[rec.name] = request
        self.records[rec.name] = rec
        if self.metrics is not None:
            spec = self.engine.vllm_config.speculative_config
            self.metrics.touch(self.base_name, rec.name, spec.num_speculative_tokens if spec else 0)
            self.metrics.adapters_served.set(len(self.records))

    async def delete(self, name: str) -> AdapterRecord:
        """Stop serving ``name`` (new requests get 404; running ones finish) and delete it from disk.

        Raises:
            NotFound: unknown adapter.
        """
        async with self._lock:
            rec = self.get(name)
            self.models.lora_requests.pop(name, None)
            del self.records[name]
            await asyncio.to_thread(self.store.delete, name)
            self._event("delete")
            if self.metrics is not None:
                self.metrics.adapters_served.set(len(self.records))
            return rec

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
