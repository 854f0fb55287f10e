"""Building a merge: copy the adapter, merge target and draft, measure fidelity (no engine involved).

:func:`build_merge` fills a staging folder with everything a merged model folder holds
(server/merge/store.py commits it) and returns its manifest. It runs in a worker thread and
blocks for the length of the merge; between steps it raises :class:`MergeCancelled` once its
job is cancelled.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from server.merge.jobs import MergeJob
from server.merge.weights.checkpoint import merge_model, served_weight_bytes
from server.precision import Precision
from server.settings import Settings

# Fidelity bounds per (merge_base, precision): min greedy agreement, max mean KL (nats/token) against the
# adapter served unmerged on the NF4 base. Set from BENCHMARKS.md "Merge fidelity" (16 prompts x 32 tokens:
# default 1.0 / ~1e-7; bf16 base served NF4 0.95-0.97 / 5e-4-1.3e-3) with room for the 8-prompt probe set.
FIDELITY_BOUNDS = {
    (Precision.NF4, Precision.BF16): (1.0, 1e-5),
    (Precision.BF16, Precision.NF4): (0.85, 3e-3),
}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class MergeFailed(Exception):
    """A merge job cannot go on; the message says why and what to do (it becomes the job's ``error``)."""

    @property
    def message(self) -> str:
        return str(self.args[0])


def option_key(merge_base: Precision, precision: Precision) -> str:
    """The fidelity report's key of one merge option, e.g. ``merge_base=nf4,precision=bf16``."""
    return f"merge_base={merge_base.value},precision={precision.value}"


def copy_adapter(adapters, job: MergeJob, dest: Path, with_draft: bool) -> None:
    """Copy the adapter's current version (and its draft adapter) to ``dest``; sets ``job.adapter_version``.

    ``adapters`` is the adapter registry (server/adapters/registry.py). The current version when the
    job starts, not when it was queued: uploads in between replace it.

    Raises:
        MergeFailed: the adapter was deleted, or its version replaced and pruned while being copied.
    """
    record = adapters.records.get(job.adapter)
    if record is None:
        raise MergeFailed(f"adapter {job.adapter!r} was deleted before its merge started; upload it and merge again")
    job.adapter_version = record.version
    try:
        src = adapters.store.path(job.adapter, record.version)
        dest.mkdir()
        for name in ADAPTER_FILES:
            shutil.copyfile(src / name, dest / name)
        if with_draft and (src / "draft" / ADAPTER_FILES[0]).is_file():
            (dest / "draft").mkdir()
            for name in ADAPTER_FILES:
                shutil.copyfile(src / "draft" / name, dest / "draft" / name)
    except (KeyError, FileNotFoundError):
        raise MergeFailed(
            f"adapter {job.adapter!r} version {record.version} was replaced or deleted while the merge copied "
            "it; merge again"
        ) from None


def fidelity_verdict(report: dict, merge_base: Precision, precision: Precision) -> dict:
    """``chosen``, ``bound`` and ``within_bound`` of ``report`` for the option merged (no bound: None)."""
    key = option_key(merge_base, precision)
    chosen = report["target"]["options"][key]
    bound = FIDELITY_BOUNDS.get((merge_base, precision))
    if bound is None:
        return {"chosen": key, "bound": None, "within_bound": None}
    return {
        "chosen": key,
        "bound": {"min_greedy_agreement": bound[0], "max_mean_kl": bound[1]},
        "within_bound": chosen["greedy_agreement"] >= bound[0] and chosen["mean_kl"] <= bound[1],
    }


def build_merge(settings: Settings, adapters, job: MergeJob, staging: Path) -> dict:
    """Copy the adapter, merge target and draft, measure fidelity: the merged folder's files in ``staging``.

    Blocking (call it in a worker thread). Sets the job's stage, progress, ``draft_summary`` and
    ``fidelity``. Returns the manifest.

    Raises:
        MergeCancelled: the job was cancelled (checked between steps).
        MergeFailed: the adapter is gone (:func:`copy_adapter`).
    """
    import torch

    from server.merge.weights.probe import fidelity_report

    torch.set_num_threads(1)  # the engines' compute threads keep the cores
    s = settings
    job.advance("copying adapter", 0.02)
    adapter = staging / "adapter"
    has_draft = s.speculation and s.draft_model is not None
    copy_adapter(adapters, job, adapter, with_draft=has_draft)
    job.raise_if_cancelled()
    check = job.raise_if_cancelled
    job.advance("merging target", 0.05)
    merge_model(s.model, adapter, staging / "target", job.merge_base, job.precision, check=check)
    if not has_draft:
        job.draft_summary = None
    elif (adapter / "draft").is_dir():
        job.advance("merging draft", 0.2)
        merge_model(s.draft_model, adapter / "draft", staging / "draft", job.merge_base, job.precision, check=check)
        job.draft_summary = "merged: the adapter's draft adapter merged into the draft model"
    else:
        job.draft_summary = "plain: the adapter has no draft adapter; the base draft model proposes"
    job.raise_if_cancelled()
    job.advance("fidelity report: target", 0.3)
    report = {"target": fidelity_report(
        s.model, adapter, check=check, progress=lambda f: job.advance("fidelity report: target", 0.3 + 0.4 * f)
    )}  # fmt: skip
    if (staging / "draft").is_dir():
        report["draft"] = fidelity_report(
            s.draft_model, adapter / "draft", check=check,
            progress=lambda f: job.advance("fidelity report: draft", 0.7 + 0.15 * f),
        )  # fmt: skip
    report.update(fidelity_verdict(report, job.merge_base, job.precision))
    job.fidelity = report
    weights = {"target": served_weight_bytes(staging / "target", job.precision)}
    if (staging / "draft").is_dir():
        weights["draft"] = served_weight_bytes(staging / "draft", job.precision)
    return {
        "model": job.model,
        "adapter": job.adapter,
        "adapter_version": job.adapter_version,
        "base_model": s.served_model_name,
        "merge_base": job.merge_base.value,
        "precision": job.precision.value,
        "draft": job.draft_summary,
        "fidelity": report,
        "weight_bytes": weights,
        "job": job.id,
        "created": time.time(),
    }
