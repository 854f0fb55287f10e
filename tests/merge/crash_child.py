"""Child process for tests/merge/test_merge_crash.py: build and commit one merge, as a merge job does.

Usage: python -m tests.merge.crash_child ROOT READY_FILE. Writes READY_FILE once imports are done
(the parent then waits a chosen delay and SIGKILLs it), prints ``committed`` when the merge is in place.
The fidelity report is faked; the adapter copy, both merges and the commit are the real code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from server.merge import probe
from server.merge.jobs import MergeJob, Precision
from server.merge.nf4 import MergeBase
from server.merge.service import MergeService
from server.merge.store import MergedStore
from server.metrics import ServerMetrics
from server.process import REPO_ROOT
from server.settings import Settings
from tests.merge.service_fakes import FakeRegistry, fake_report

if __name__ == "__main__":
    root, ready = Path(sys.argv[1]), Path(sys.argv[2])
    probe.fidelity_report = fake_report
    settings = Settings(merged_models_dir=root, adapter_store_dir=root.parent / "unused-store")
    store = MergedStore(root)
    service = MergeService(settings, store, FakeRegistry({"austen": REPO_ROOT / "adapters/austen"}), ServerMetrics())
    job = MergeJob("austen", 1, "m", MergeBase.NF4, Precision.BF16)
    ready.write_text("ready")
    staging = store.new_staging_dir(job.id)
    manifest = service._build(job, staging)
    store.commit(staging, "m", manifest)
    print("committed", flush=True)
