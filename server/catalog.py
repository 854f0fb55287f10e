"""The model-id namespace: which ids are served, what each is, and which ids a new adapter or merge may take.

Three kinds of id share one namespace (the ``model`` field of every OpenAI request): the base model,
the stored adapters (``server/adapters/registry.py``) and the merged models
(``server/merge/service.py``). The app (``server/app.py``) builds the registry and the merge service and
sets them on the one :class:`ModelCatalog` (:class:`StoredAdapters`, :class:`MergedModels`: what the
catalog asks of each); routes make one call (:meth:`ModelCatalog.resolve`, :meth:`ModelCatalog.cards`),
and a new name is checked once against all three (:meth:`check_adapter_name`, :meth:`check_merged_id`).

Adapters are served through vLLM's own model registry (``OpenAIServingModels.lora_requests``, which
vLLM's completion and chat handlers resolve per request); the catalog is the only writer of it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from server.errors import BadRequest, Conflict, NotFound, ServiceUnavailable

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODEL_ID_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'"
SERVED_IDS_SHOWN = 20  # a 404 lists this many served ids, then says how many more
ECHO_CHARS = 200  # at most this much of a client's id is echoed in a message


class ModelKind(StrEnum):
    """What a served model id is."""

    BASE = "base"
    ADAPTER = "adapter"
    MERGED = "merged"


@dataclass(frozen=True)
class Resolved:
    """A served model id: its kind and the vLLM serving-handler state that serves it.

    ``handlers`` has vLLM's ``openai_serving_completion``, ``openai_serving_chat``,
    ``openai_serving_models`` and ``serving_tokenization`` (a merged model has its own engine's).
    """

    id: str
    kind: ModelKind
    handlers: Any


class StoredAdapters(Protocol):
    """What the catalog asks of the adapter registry (``server/adapters/registry.py`` ``AdapterRegistry``)."""

    @property
    def records(self) -> Mapping[str, Any]:
        """The stored adapters by name."""
        ...


class MergedModels(Protocol):
    """What the catalog asks of the merge service (``server/merge/service.py`` ``MergeService``)."""

    def id_in_use(self, model_id: str) -> bool: ...

    def served_ids(self) -> list[str]: ...

    def serving_state(self, model_id: str | None) -> Any: ...

    async def cards(self) -> list[dict]: ...


class ModelCatalog:
    """One owner of the model-id namespace of a server.

    ``handlers`` is vLLM's serving state of the base engine (None until the engine is loaded);
    ``adapters`` and ``merges`` are set by the app once they exist (None while loading, with LoRA off,
    with merging off).
    """

    def __init__(self, base_id: str) -> None:
        self.base_id = base_id
        self.handlers: Any = None
        self.adapters: StoredAdapters | None = None
        self.merges: MergedModels | None = None

    @property
    def _serving_models(self):
        return self.handlers.openai_serving_models

    def kind_of(self, model_id: str | None) -> ModelKind | None:
        """The kind of ``model_id`` (a missing or empty id is the base, as in vLLM), or None if unknown.

        A merged id counts while it serves and while its merge or restore job builds it.
        """
        if not model_id or model_id == self.base_id:
            return ModelKind.BASE
        if self._held_by_merge(model_id):
            return ModelKind.MERGED
        if self.handlers is not None and model_id in self._serving_models.lora_requests:
            return ModelKind.ADAPTER
        return None

    def served_ids(self) -> list[str]:
        """Every id a request may name now: the base, the adapters, then the merged models (each sorted)."""
        ids = [self.base_id]
        if self.handlers is not None:
            ids += sorted(self._serving_models.lora_requests)
        if self.merges is not None:
            ids += self.merges.served_ids()
        return ids

    def resolve(self, model_id: str | None) -> Resolved:
        """The model that serves a request naming ``model_id``.

        Raises:
            ServiceUnavailable: the engine is still loading, or ``model_id`` is a merged model that
                is being built, restarted or is down (the message says which and what to do).
            NotFound: ``model_id`` is not served (param ``model``; the served ids are named).
        """
        if self.handlers is None:
            raise ServiceUnavailable("the engine is still loading; retry when GET /ready returns 200")
        # Asked first and for every state: a merged model that is down answers 503 saying why.
        merged = self.merges.serving_state(model_id) if self.merges is not None and model_id else None
        if merged is not None:
            return Resolved(model_id, ModelKind.MERGED, merged)
        kind = self.kind_of(model_id)
        if kind is None:
            raise self.not_found(model_id)
        return Resolved(model_id or self.base_id, kind, self.handlers)

    def not_found(self, model_id: str) -> NotFound:
        """The 404 for an unknown ``model_id``: the first :data:`SERVED_IDS_SHOWN` served ids, then where to list all."""
        ids = self.served_ids()
        shown = ", ".join(ids[:SERVED_IDS_SHOWN])
        more = f" and {len(ids) - SERVED_IDS_SHOWN} more" if len(ids) > SERVED_IDS_SHOWN else ""
        return NotFound(
            f"model {model_id[:ECHO_CHARS]!r} does not exist; served models: {shown}{more} "
            "(all of them: GET /v1/models)",
            param="model",
        )

    async def cards(self) -> list[dict]:
        """``/v1/models`` entries: vLLM's cards of the base and the adapters, then the merged models'.

        Raises:
            ServiceUnavailable: the engine is still loading.
        """
        if self.handlers is None:
            raise ServiceUnavailable("the engine is still loading; retry when GET /ready returns 200")
        cards = (await self._serving_models.show_available_models()).model_dump()["data"]
        return cards + (await self.merges.cards() if self.merges is not None else [])

    async def card(self, model_id: str) -> dict:
        """One entry of :meth:`cards`.

        Raises:
            NotFound: ``model_id`` is not served (the served ids are named).
        """
        for card in await self.cards():
            if card["id"] == model_id:
                return card
        raise self.not_found(model_id)

    # --- new ids ---

    def check_syntax(self, model_id: str, what: str, param: str) -> None:
        """Refuse a ``model_id`` outside :data:`MODEL_ID_RULE`; ``what`` names it in the message.

        Raises:
            BadRequest: naming the allowed alphabet and length (param ``param``).
        """
        if not MODEL_ID_RE.match(model_id or "") or ".." in model_id:
            raise BadRequest(f"{what} {model_id[:ECHO_CHARS]!r} is not allowed: use {MODEL_ID_RULE}", param=param)

    def check_adapter_name(self, name: str) -> None:
        """Refuse ``name`` for an adapter upload unless it is free or already an adapter (a new version).

        Raises:
            BadRequest: bad syntax, the base model's name, or a merged model's id (or one being merged).
        """
        self.check_syntax(name, "adapter name", "name")
        if name == self.base_id:
            raise BadRequest(f"adapter name {name!r} is the base model's name; choose another", param="name")
        if self._held_by_merge(name):
            raise BadRequest(
                f"{name!r} is a merged model's id (or one being merged); choose another name or delete the merged "
                f"model with DELETE /v1/models/{name}",
                param="name",
            )

    def check_merged_id(self, model_id: str) -> None:
        """Refuse ``model_id`` for a new merged model unless no model holds it.

        Raises:
            BadRequest: bad syntax, or the base model's or an adapter's name.
            Conflict: a merged model or a running merge holds it.
        """
        self.check_syntax(model_id, "model id", "model")
        if self.kind_of(model_id) in (ModelKind.BASE, ModelKind.ADAPTER) or self._is_stored_adapter(model_id):
            raise BadRequest(
                f"model id {model_id!r} is already the base model's or an adapter's name; choose another 'model'",
                param="model",
            )
        if self._held_by_merge(model_id):
            raise Conflict(
                f"model id {model_id!r} is already a merged model or being merged; delete it with "
                f"DELETE /v1/models/{model_id} or choose another 'model'",
                param="model",
            )

    def _held_by_merge(self, model_id: str) -> bool:
        """A merged model serves ``model_id`` or a job builds or restores it. A down merged model's id is
        not held: its folder on disk is what guards a new merge of it (``server/merge/refusals.py``)."""
        return self.merges is not None and self.merges.id_in_use(model_id)

    def _is_stored_adapter(self, name: str) -> bool:
        return self.adapters is not None and name in self.adapters.records

    # --- the adapters' side of vLLM's model registry ---

    def next_lora_id(self) -> int:
        """A fresh ``lora_int_id`` from vLLM's counter (ids are never reused, so no engine cache can
        serve an older version's weights under a new one)."""
        return self._serving_models.lora_id_counter.inc(1)

    def publish_adapter(self, name: str, lora_request) -> None:
        """Make ``name`` resolve to ``lora_request`` (a ``vllm.lora.request.LoRARequest``) from now on."""
        self._serving_models.lora_requests[name] = lora_request

    def withdraw_adapter(self, name: str) -> None:
        """Stop resolving ``name``; requests that already resolved it finish on their version."""
        self._serving_models.lora_requests.pop(name, None)
