"""The HF engine's decoding loop (thinkforge.engines.sampler) against transformers' own.

- greedy: token for token what `model.generate` produces on a real tiny Llama with left padding, with
  rows ending at different steps (so the batch and its KV cache shrink mid-run) and n > 1;
- sampling: the nucleus it draws from is transformers' TopPLogitsWarper's, token set and probabilities,
  also for flat rows whose nucleus needs more tokens than the candidates it looks at first.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from thinkforge.engines import sampler  # noqa: E402
from thinkforge.engines.sampler import nucleus_sample, sample  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def _batch():
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [0, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]])
    return ids, (ids != 0).long()


def _hf_greedy(model, ids, mask, eos, max_new):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             eos_token_id=sorted(eos), pad_token_id=0)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def test_greedy_matches_generate_while_rows_end_and_the_batch_shrinks(tiny, monkeypatch):
    ids, mask = _batch()
    free = _hf_greedy(tiny, ids, mask, {1}, 24)
    # End tokens that each row meets at a different step: rows leave the batch one after another.
    eos = {free[0][3], free[1][9]}
    monkeypatch.setattr(sampler, "COMPACT_FRACTION", 0.0)  # shrink at every row that ends
    want = _hf_greedy(tiny, ids, mask, eos, 24)
    got = sample(tiny, ids, mask, n=1, temperature=0.0, top_p=1.0, max_new_tokens=24, eos_ids=eos,
                 generator=torch.Generator().manual_seed(0))
    assert got == want
    assert len({len(r) for r in got}) > 1, "the rows must end at different steps for this test to mean anything"
    assert any(r[-1] in eos for r in got) and any(r[-1] not in eos for r in got)


def test_greedy_with_n_copies_of_each_prompt(tiny):
    ids, mask = _batch()
    want = _hf_greedy(tiny, ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0), {1}, 12)
    got = sample(tiny, ids, mask, n=2, temperature=0.0, top_p=1.0, max_new_tokens=12, eos_ids={1},
                 generator=torch.Generator().manual_seed(0))
    assert got == want and len(got) == 6


def _hf_nucleus(logits, temperature, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("flat", [False, True], ids=["peaked", "flat-falls-back-to-a-full-sort"])
def test_nucleus_draws_from_transformers_top_p_distribution(flat):
    g = torch.Generator().manual_seed(1)
    vocab = 400
    logits = torch.randn(2, vocab, generator=g) * (0.05 if flat else 3.0)
    want = _hf_nucleus(logits, 0.7, 0.9)
    kept = (want > 0).sum(dim=-1)
    if flat:
        assert int(kept.min()) > sampler.CANDIDATES  # the nucleus does not fit in the candidates
    else:
        assert int(kept.max()) <= sampler.CANDIDATES
    draws = 20000
    counts = torch.zeros(2, vocab)
    gen = torch.Generator().manual_seed(2)
    for _ in range(draws // 1000):
        batch = logits.repeat_interleave(1000, dim=0)
        tok = nucleus_sample(batch, 0.7, 0.9, gen).view(2, 1000)
        for row in range(2):
            counts[row] += torch.bincount(tok[row], minlength=vocab).float()
    freq = counts / draws
    assert bool(((freq > 0) <= (want > 0)).all()), "a token outside transformers' nucleus was drawn"
    tv = 0.5 * (freq - want).abs().sum(dim=-1)
    # total variation of 20,000 draws from the right distribution: ~0.01 (peaked) to ~0.05 (flat, ~350 tokens)
    assert float(tv.max()) < (0.08 if flat else 0.04), tv


def test_seeded_sampling_repeats_and_the_seed_matters(tiny):
    ids, mask = _batch()

    def run(seed):
        return sample(tiny, ids, mask, n=3, temperature=1.0, top_p=0.95, max_new_tokens=10, eos_ids={1},
                      generator=torch.Generator().manual_seed(seed))

    assert run(3) == run(3)
    assert run(3) != run(4)
