"""The model-id namespace with fakes for its members: what each id resolves to, which new names are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.catalog import SERVED_IDS_SHOWN, ModelCatalog, ModelKind
from server.errors import BadRequest, Conflict, NotFound, ServiceUnavailable


class FakeMerges:
    """Merged ids by state: ``serving`` have handlers, ``building`` answer 503, ``down`` answer 503 too."""

    def __init__(self, serving=(), building=(), down=()):
        self.serving, self.building, self.down = set(serving), set(building), set(down)

    def id_in_use(self, model_id):
        return model_id in self.serving | self.building

    def served_ids(self):
        return sorted(self.serving)

    def serving_state(self, model_id):
        if model_id in self.serving:
            return f"handlers of {model_id}"
        if model_id in self.building | self.down:
            raise ServiceUnavailable(f"merged model {model_id!r} is not served")
        return None


def catalog(adapters=("austen",), **merges) -> ModelCatalog:
    c = ModelCatalog("demo-target")
    c.handlers = SimpleNamespace(openai_serving_models=SimpleNamespace(lora_requests={a: object() for a in adapters}))
    c.adapters = SimpleNamespace(records={a: None for a in adapters})
    c.merges = FakeMerges(**merges)
    return c


def test_each_kind_resolves_to_its_handlers():
    c = catalog(serving=["austen-merged"])
    for model_id, kind in (("demo-target", ModelKind.BASE), ("", ModelKind.BASE), (None, ModelKind.BASE)):
        assert c.resolve(model_id).kind is kind and c.resolve(model_id).handlers is c.handlers
    assert c.resolve("austen").kind is ModelKind.ADAPTER and c.resolve("austen").handlers is c.handlers
    merged = c.resolve("austen-merged")
    assert merged.kind is ModelKind.MERGED and merged.handlers == "handlers of austen-merged"


@pytest.mark.parametrize("state", ["building", "down"])
def test_a_merged_id_that_does_not_serve_is_503_not_404(state):
    with pytest.raises(ServiceUnavailable, match="not served"):
        catalog(**{state: ["austen-merged"]}).resolve("austen-merged")


def test_an_unknown_id_is_404_naming_the_served_ones_and_loading_is_503():
    with pytest.raises(NotFound) as info:
        catalog(serving=["m"]).resolve("austin")
    assert info.value.param == "model" and "demo-target, austen, m" in info.value.message
    many = catalog(adapters=[f"a{i:02}" for i in range(30)])
    with pytest.raises(NotFound, match=f"and {31 - SERVED_IDS_SHOWN} more"):
        many.resolve("x" * 10_000)
    with pytest.raises(ServiceUnavailable, match="still loading"):
        ModelCatalog("demo-target").resolve("demo-target")


def test_new_adapter_names():
    c = catalog(serving=["m"], down=["gone"])
    c.check_adapter_name("austen")  # a new version of an existing adapter
    c.check_adapter_name("gone")  # a down merged model's id is not held
    with pytest.raises(BadRequest, match="base model's name"):
        c.check_adapter_name("demo-target")
    with pytest.raises(BadRequest, match="merged model's id"):
        c.check_adapter_name("m")
    with pytest.raises(BadRequest, match="not allowed"):
        c.check_adapter_name("../x")


def test_new_merged_ids():
    c = catalog(serving=["m"], building=["b"], down=["gone"])
    c.check_merged_id("fresh")
    c.check_merged_id("gone")  # the merge service's on-disk check answers for a down model
    for taken in ("demo-target", "austen"):
        with pytest.raises(BadRequest, match="base model's or an adapter's name"):
            c.check_merged_id(taken)
    for held in ("m", "b"):
        with pytest.raises(Conflict, match="already a merged model or being merged"):
            c.check_merged_id(held)
