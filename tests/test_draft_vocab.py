"""The draft's reduced head (FR-Spec): logits over the kept tokens equal the full head's there, -inf elsewhere,
so the draft's q is 0 outside the kept set; a malformed vocabulary file is refused, naming it."""

import json

import pytest
import torch

from server.speculation.hooks.draft_vocab import FILE, ReducedHead, install, read_kept_ids


def test_the_reduced_head_is_the_full_head_on_the_kept_tokens_and_minus_infinity_elsewhere():
    torch.manual_seed(0)
    weight, hidden = torch.randn(128, 16, dtype=torch.bfloat16), torch.randn(3, 16, dtype=torch.bfloat16)
    kept = [0, 2, 17, 99, 100]
    logits = ReducedHead(weight, kept, vocab_size=120)(hidden)  # a padded head: 128 rows, 120 real tokens
    assert logits.shape == (3, 120)
    torch.testing.assert_close(logits[:, kept], hidden @ weight[kept].T)
    outside = torch.ones(120, dtype=torch.bool)
    outside[kept] = False
    assert torch.isneginf(logits[:, outside]).all()
    q = logits.float().softmax(-1)  # the draft's distribution: all its mass on kept tokens
    assert q[:, outside].sum() == 0 and torch.allclose(q.sum(-1), torch.ones(3))


def test_a_kept_id_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="outside the draft's vocabulary of 10"):
        ReducedHead(torch.zeros(16, 4), [3, 12], vocab_size=10)


@pytest.mark.parametrize("body", [{}, {"kept_token_ids": []}, {"kept_token_ids": [1, -2]}, {"kept_token_ids": [1, 1]},
                                  {"kept_token_ids": "1,2"}])  # fmt: skip
def test_a_malformed_vocabulary_file_is_refused_naming_it(tmp_path, body):
    (tmp_path / FILE).write_text(json.dumps(body))
    with pytest.raises(ValueError, match=FILE):
        read_kept_ids(tmp_path)


class _Draft(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"vocab_size": 8})()
        self.lm_head = torch.nn.Linear(4, 8, bias=False)

    def compute_logits(self, hidden_states):
        return self.lm_head(hidden_states)


def test_install_changes_only_a_draft_whose_folder_asks_for_it(tmp_path):
    draft = _Draft()
    assert not install(draft, tmp_path)
    assert isinstance(draft.compute_logits(torch.ones(1, 4)), torch.Tensor)  # unchanged: the full head
    (tmp_path / FILE).write_text(json.dumps({"kept_token_ids": [1, 5]}))
    assert install(draft, tmp_path)
    logits = draft.compute_logits(torch.ones(2, 4))
    assert logits.shape == (2, 8) and torch.isfinite(logits).sum() == 4
