"""Beam search (generate.beam_search) against transformers' generate(num_beams=3) on a tiny random Phi-3: the
same best beam and the same score, with and without length normalisation, batched and left-padded."""
import pytest
import torch

import generate
import phi3
from test_phi3 import make_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("beam")
    hf = make_hf(d, seed=3, vocab_size=96)  # a small vocabulary: beams meet stop tokens within a few steps
    return hf, phi3.Phi3.from_pretrained(d)


PROMPTS = [[1, 17, 33, 50, 9, 81, 4, 20, 77, 5, 6], [1, 30, 42, 8], [1, 5, 9]]


def reference(hf, prompts, n, length_penalty, eos):
    idx, mask = generate.left_pad(prompts, 0)
    out = hf.generate(input_ids=idx, attention_mask=mask, max_new_tokens=n, num_beams=3, do_sample=False,
                      length_penalty=length_penalty, eos_token_id=eos, pad_token_id=0, output_scores=True,
                      return_dict_in_generate=True)
    return out.sequences[:, idx.shape[1]:], out.sequences_scores


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("eos", [[2], [2, 7, 11]])
def test_beam_search_equals_transformers(pair, length_penalty, eos):
    hf, ours = pair
    n = 12
    ref, ref_scores = reference(hf, PROMPTS, n, length_penalty, eos)
    idx, mask = generate.left_pad(PROMPTS, 0)
    got, scores = generate.beam_search(ours, ours.model.embed_tokens(idx), mask, n, num_beams=3,
                                       length_penalty=length_penalty, stop_ids=eos, pad_id=eos[0])
    assert got.tolist() == ref.tolist()  # transformers fills a finished beam with the first stop id (pad 0)
    assert torch.allclose(scores, ref_scores, atol=1e-5)
    assert any(set(row) & set(eos) for row in got.tolist()), "the case should end some beams on a stop token"


def test_beam_search_rows_equal_one_by_one(pair):
    _, ours = pair
    idx, mask = generate.left_pad(PROMPTS, 0)
    batched, scores = generate.beam_search(ours, ours.model.embed_tokens(idx), mask, 10, stop_ids=[2], pad_id=0)
    for i, p in enumerate(PROMPTS):
        one, score = generate.beam_search(ours, ours.model.embed_tokens(torch.tensor([p])), torch.ones(1, len(p)),
                                          10, stop_ids=[2], pad_id=0)
        assert one[0].tolist() == batched[i, :one.shape[1]].tolist() and torch.allclose(score, scores[i:i + 1])


def test_one_beam_is_greedy(pair):
    _, ours = pair
    idx, mask = generate.left_pad(PROMPTS, 0)
    beam, _ = generate.beam_search(ours, ours.model.embed_tokens(idx), mask, 10, num_beams=1, stop_ids=[2], pad_id=0)
    assert beam.tolist() == ours.generate(PROMPTS, 10, stop_ids=[2], pad_id=0).tolist()
