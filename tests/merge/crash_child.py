"""Child process for tests/merge/test_merge_crash.py: build and commit one merge, as a merge job does.

Usage: python -m tests.merge.crash_child ROOT READY_FILE. Writes READY_FILE once imports are done
(the parent then waits a chosen delay and SIGKILLs it), prints ``committed`` when the merge is in place.
The fidelity report is faked; the adapter copy, both merges and the commit are the real code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from server.merge.build import build_merge
from server.merge.jobs import MergeJob
from server.merge.store import MergedStore
from server.merge.weights import probe
from server.precision import Precision
from server.settings import Settings
from testing.process import REPO_ROOT
from tests.merge.service_fakes import FakeRegistry, fake_report

if __name__ == "__main__":
    root, ready = Path(sys.argv[1]), Path(sys.argv[2])
    probe.fidelity_report = fake_report
    settings = Settings(merged_models_dir=root, adapter_store_dir=root.parent / "unused-store")
    store = MergedStore(root)
    adapters = FakeRegistry({"austen": REPO_ROOT / "adapters/demo/austen"})
    job = MergeJob("austen", 1, "m", Precision.NF4, Precision.BF16)
    ready.write_text("ready")
    staging = store.new_staging_dir(job.id)
    manifest = build_merge(settings, adapters, job, staging)
    store.commit(staging, "m", manifest)
    print("committed", flush=True)
