"""The start-up patches refuse to run on a vLLM they were not written for, and say what they applied."""

from __future__ import annotations

import pytest

from server.engine import vllm_patches


def test_another_vllm_version_refuses_to_start_naming_the_patches_and_both_versions(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError) as info:
        vllm_patches.apply()
    message = str(info.value)
    assert "vLLM 0.33.0 is installed" in message and f"written for vLLM {vllm_patches.WRITTEN_FOR}" in message
    assert all(name in message for name in vllm_patches.wanted())


def test_row_invariant_gemm_is_applied_only_with_batch_invariant(monkeypatch):
    monkeypatch.delenv("QSERVE_VLLM_PATCHES", raising=False)
    monkeypatch.setenv("QSERVE_BATCH_INVARIANT", "0")
    assert vllm_patches.wanted() == [p for p in vllm_patches.PATCHES if p != "row_invariant_gemm"]
    monkeypatch.setenv("QSERVE_BATCH_INVARIANT", "1")
    assert vllm_patches.wanted() == list(vllm_patches.PATCHES)


def test_no_patch_wanted_runs_any_version(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    monkeypatch.setenv("QSERVE_VLLM_PATCHES", "")
    vllm_patches.apply()  # nothing wanted: nothing to refuse
    assert vllm_patches.wanted() == []


def test_a_patch_that_cannot_install_itself_is_named(monkeypatch):
    def broken() -> None:
        raise AttributeError("type object 'RequestState' has no attribute '_new_completion_output'")

    monkeypatch.setenv("QSERVE_VLLM_PATCHES", "end_token_output")
    monkeypatch.setitem(vllm_patches.APPLY, "end_token_output", broken)
    monkeypatch.setattr(vllm_patches, "_applied", [])
    with pytest.raises(RuntimeError, match="start-up patch 'end_token_output' could not be applied to vLLM 0.32.0: "
                       "AttributeError: type object 'RequestState' has no attribute"):  # fmt: skip
        vllm_patches.apply()


def test_unknown_patch_names_are_refused_with_the_allowed_list(monkeypatch):
    monkeypatch.setenv("QSERVE_VLLM_PATCHES", "cpu_kernels,no_such_patch")
    with pytest.raises(ValueError, match=r"unknown patches \['no_such_patch'\]; allowed: abort_metrics"):
        vllm_patches.wanted()


def test_report_names_the_version_and_what_this_process_applied(monkeypatch):
    monkeypatch.setattr(vllm_patches, "_applied", ["utf8_tail", "cpu_kernels"])
    assert vllm_patches.report() == {"vllm_version": vllm_patches.WRITTEN_FOR, "applied": ["cpu_kernels", "utf8_tail"]}
