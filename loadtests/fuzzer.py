"""The fuzzer's client: steers schemathesis cases past validation, sends them, counts outcomes per route.

Used by ``loadtests/fuzz.py`` (which generates the cases). Valid cases are steered so that they reach
the work behind validation: completions name the served model (or a shipped adapter) with a prompt and
at most ``MAX_TOKENS`` tokens, so generation is cheap; every second adapter upload sends the pair's
shipped adapter's real files under a fresh valid name. What steered cases say depends on the pair:
the demo pair fixed words of its books (``DEMO_WORDS``), an instruct pair (smollm2) the first prompt of
the model's set (base: prompts/chat.txt; austen and its uploads: prompts/style.txt), and a fresh adapter
is sent a chat request.
"""

from __future__ import annotations

import zlib
from collections import Counter

import httpx
import requests
from schemathesis.core.errors import SerializationError
from schemathesis.core.transport import Response

from prompts import CHAT_PAIRS, adapter_prompts
from server.pairs import PAIRS

MAX_TOKENS = 16  # tokens a steered completion may generate
GENERATION = ("/v1/completions", "/v1/chat/completions")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Fields a steered generation case keeps: sampling parameters, so the engine sees their generated values.
SAMPLING = {
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "seed", "n", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "logprobs", "top_logprobs", "echo", "stream", "stream_options", "ignore_eos", "min_tokens", "suffix",
}  # fmt: skip
# The demo pair's words: a steered chat message, a completion's missing prompt, a fresh adapter's prompt.
DEMO_WORDS = ("Tell me of the sea.", "The sea", "It was a truth")


class Fuzzer:
    """Sends schemathesis cases to ``base_url`` and counts the outcomes per route.

    ``counts[route]`` is a Counter of ``requests``, ``2xx``, ``3xx``, ``4xx``, ``4xx_not_envelope``,
    ``5xx``, ``transport_error`` and ``unsendable`` (data schemathesis cannot encode); ``failures``
    holds the first 20 5xx, transport errors and non-envelope 4xx as text (the request as a curl
    command, and the response). ``pair``: the model pair served (its adapters uploaded, its prompts sent).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout_s: float, pair: str = "demo") -> None:
        self.base_url, self.model, self.timeout_s = base_url, model, timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.counts: dict[str, Counter] = {}
        self.failures: list[str] = []
        self._real_uploads: set[str] = set()  # names steered into real uploads
        self.stateful_stopped: str | None = None
        self._adapter = [(f, (PAIRS[pair].seed_adapters / "austen" / f).read_bytes()) for f in ADAPTER_FILES]
        self.chat = pair in CHAT_PAIRS  # a fresh adapter is sent a chat request, not a completion
        self._words = {model: DEMO_WORDS, "austen": DEMO_WORDS}  # by model, as DEMO_WORDS
        if self.chat:
            base, style = adapter_prompts(None, 1)[0], adapter_prompts("austen", 1)[0]
            self._words = {model: (base, base, style), "austen": (style, style, style)}

    def steer(self, case) -> None:
        """Make a valid case reach past validation: the served model (or a shipped adapter), a prompt, few
        tokens; every second generation case keeps only its sampling fields (``SAMPLING``), so that the
        engine is reached; every second upload becomes a real upload of a shipped adapter."""
        body = case.body
        if not isinstance(body, dict):
            return
        # A function of the generated case, not a counter: hypothesis replays a stateful scenario's
        # prefix and must get the same requests, hence the same responses, to draw consistently.
        n = zlib.crc32(repr(body).encode())
        if case.path in GENERATION:
            body["model"] = "austen" if n % 3 == 0 else self.model
            message, prompt, _ = self._words[body["model"]]
            if n % 2 == 0:
                for key in set(body) - SAMPLING:
                    del body[key]
                if case.path == "/v1/chat/completions":
                    body["messages"] = [{"role": "user", "content": message}]
            for key in ("max_tokens", "max_completion_tokens"):
                if not isinstance(body.get(key), int) or not 0 < body[key] <= MAX_TOKENS:
                    body[key] = 1 + n % MAX_TOKENS
            if case.path == "/v1/completions":
                body.pop("prompt_embeds", None)
                body.pop("max_completion_tokens")
                if not body.get("prompt"):
                    body["prompt"] = prompt
        elif case.path == "/v1/adapters" and case.method.upper() == "POST" and n % 2 == 0:
            body["name"] = f"fuzz-{n}"
            self._real_uploads.add(body["name"])

    def _call(self, case):
        name = case.body.get("name") if isinstance(case.body, dict) else None
        if case.method.upper() == "POST" and isinstance(name, str) and name in self._real_uploads:
            # Sent here: schemathesis would send the adapter's bytes as form fields, not as files.
            files = [("files", (f, content)) for f, content in self._adapter]
            r = httpx.post(
                self.base_url + case.path,
                data={"name": name},
                files=files,
                headers=self.headers,
                timeout=self.timeout_s,
            )
            r.request.read()  # schemathesis' Response keeps the request body
            return Response.from_httpx(r, verify=False)
        return case.call(base_url=self.base_url, headers=self.headers, timeout=self.timeout_s)

    def send(self, case) -> Response | None:
        """Send ``case``, count its outcome under its route; None when no response came (transport error)
        or the generated data cannot be sent at all (counted as ``unsendable``, not as a request)."""
        c = self.counts.setdefault(f"{case.method.upper()} {case.path}", Counter())
        try:
            response = self._call(case)
        except SerializationError:
            c["unsendable"] += 1
            return None
        except (requests.RequestException, httpx.HTTPError) as exc:
            c["requests"] += 1
            c["transport_error"] += 1
            self._fail("transport error", case, f"{type(exc).__name__}: {exc}")
            return None
        c["requests"] += 1
        status = response.status_code
        c[f"{status // 100}xx"] += 1
        if status >= 500:
            self._fail("5xx", case, f"{status}: {response.text[:500]}")
        elif status >= 400 and not _is_envelope(response):
            c["4xx_not_envelope"] += 1
            self._fail("4xx not in the envelope", case, f"{status}: {response.text[:300]}")
        return response

    def _fail(self, kind: str, case, what: str) -> None:
        if len(self.failures) < 20:
            curl = case.as_curl_command(headers=self.headers)
            self.failures.append(f"{kind}: {curl[:1500]}\n  -> {what}")

    def use_adapter(self, name: str) -> None:
        """One short completion (an instruct pair: chat request) with the adapter ``name`` just uploaded (counted
        under its route)."""
        route = "POST /v1/chat/completions" if self.chat else "POST /v1/completions"
        c = self.counts.setdefault(route, Counter())
        c["requests"] += 1
        text = self._words["austen"][2]
        body = {"model": name, "max_tokens": 4}
        body |= {"messages": [{"role": "user", "content": text}]} if self.chat else {"prompt": text}
        try:
            r = httpx.post(self.base_url + route.split()[1], json=body, headers=self.headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            c["transport_error"] += 1
            self.failures.append(f"transport error: completion with adapter {name}: {exc}"[:2000])
            return
        c[f"{r.status_code // 100}xx"] += 1
        if r.status_code >= 500:
            self.failures.append(f"5xx: completion with adapter {name} -> {r.status_code}: {r.text[:500]}")


def _is_envelope(response) -> bool:
    try:
        err = response.json()["error"]
        return bool(err["message"]) and err["code"] == response.status_code and {"type", "param"} <= set(err)
    except (ValueError, KeyError, TypeError):
        return False
