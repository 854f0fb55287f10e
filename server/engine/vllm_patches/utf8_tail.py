"""The last bytes of an output that stops inside a multi-byte character are emitted, as U+FFFD.

Fault (vLLM 0.32.0, fast tokenizers): ``FastIncrementalDetokenizer`` decodes each new token
with ``tokenizers.decoders.DecodeStream.step``, which returns None while the bytes seen so far
end inside a UTF-8 character (a byte-level BPE token can hold part of one). When generation
then stops (``length``, or an end/stop token), those held bytes are never decoded: the text,
streamed and not, ends one or more replacement characters short of what its tokens decode to
(``tokenizer.decode(token_ids)``).

Fix: the detokenizer remembers the tokens whose bytes are still held (those ``step`` answered
None for since its last text) and, when the request finishes without a stop string, appends
their lossy decoding (U+FFFD for each incomplete character, as ``tokenizer.decode`` gives) to
the output text before the last text is handed out, so the final stream delta and the full
text both carry it. A stop string ends the text where it matched, before any held bytes, so
nothing is appended then. The slow (Python) detokenizer is untouched.
"""

from __future__ import annotations

import functools


def patch() -> None:
    """Wrap ``FastIncrementalDetokenizer``'s ``decode_next``, ``update`` and ``get_next_output_text`` (idempotent)."""
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer as Detok

    if getattr(Detok.decode_next, "_qserve_patched", False):
        return
    decode_next, update, next_text = Detok.decode_next, Detok.update, Detok.get_next_output_text

    @functools.wraps(decode_next)
    def tracked_decode_next(self, next_token_id: int) -> str:
        text = decode_next(self, next_token_id)
        held = self.__dict__.setdefault("_qserve_held", [])
        if text:
            held.clear()
        else:
            held.append(next_token_id)
        return text

    @functools.wraps(update)
    def tracked_update(self, new_token_ids, stop_terminated):
        stop_string = update(self, new_token_ids, stop_terminated)
        if stop_string:
            self.__dict__.get("_qserve_held", []).clear()
        return stop_string

    @functools.wraps(next_text)
    def flushed_next_text(self, finished: bool, delta: bool) -> str:
        held = self.__dict__.get("_qserve_held")
        if finished and held:
            self.output_text += self.tokenizer.decode(held, skip_special_tokens=self.skip_special_tokens)
            held.clear()
        return next_text(self, finished, delta)

    for fn in (tracked_decode_next, tracked_update, flushed_next_text):
        fn._qserve_patched = True
    Detok.decode_next, Detok.update, Detok.get_next_output_text = tracked_decode_next, tracked_update, flushed_next_text
