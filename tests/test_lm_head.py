"""The CPU LM head that replaces TRL's fused (GPU-tiled) head: same outputs and gradients as TRL's, on a
real tiny model through TRL's own patch; and it is what the training stages run on a CPU."""

import copy

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from thinkforge.models import load_model, resolve
from thinkforge.stages.lm_head import use_plain_lm_head

OUTPUTS = ("log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")


class _Trainer:
    def __init__(self, model, temperature=None, ref_model=None):
        self.model, self.ref_model = model, ref_model
        if temperature is not None:
            self.temperature = temperature


@pytest.mark.parametrize("temperature", [None, 0.7])
def test_plain_head_matches_trls_fused_head(temperature):
    base = load_model(str(resolve("random:llama-tiny")))
    trl_model, ours, ref = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    for m in (trl_model, ours, ref):
        add_fused_lm_head(m, temperature=temperature or 1.0, outputs=OUTPUTS)
    assert use_plain_lm_head(_Trainer(ours, temperature, ref_model=ref)) == [ours, ref]
    assert use_plain_lm_head(_Trainer(ours, temperature)) == []  # already replaced: not wrapped twice

    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (3, 24))
    labels = ids.clone()
    labels[:, :9] = -100  # prompt positions
    labels[2, 17:] = -100  # padding
    a = trl_model(input_ids=ids, labels=labels, fused_lm_head=True)
    b = ours(input_ids=ids, labels=labels, fused_lm_head=True)
    for key in OUTPUTS:
        assert b[key].dtype == a[key].dtype and b[key].shape == a[key].shape, key  # DPO ANDs is_top1 with a mask
        torch.testing.assert_close(b[key].float(), a[key].float(), atol=1e-4, rtol=1e-4, msg=key)
    assert torch.equal(a.label_mask, b.label_mask)
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    for (name, pa), pb in zip(trl_model.named_parameters(), ours.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=name)
    # without the flag it is the model's own forward (generation, the model's loss)
    torch.testing.assert_close(ours(input_ids=ids, labels=ids).loss, base(input_ids=ids, labels=ids).loss)


def test_models_whose_head_trl_transforms_keep_trls_head():
    model = load_model(str(resolve("random:llama-tiny")))
    model.config.logit_scale = 0.5
    add_fused_lm_head(model)
    assert use_plain_lm_head(_Trainer(model)) == []
