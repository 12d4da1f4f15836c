"""kNN-LM against a float64 NumPy reference: a datastore built through our engine, then at
every step of greedy decoding log p_mix = log(λ p_kNN + (1 - λ) p_LM) from transformers'
hidden states and logits, brute-force neighbours over the stored keys, within 1e-5; λ = 0 is
the base model; the datastore refuses other weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.datastore import adapter_fingerprint, model_fingerprint, open_datastore, tokenizer_fingerprint
from retrieval.knn_build import build_datastore, windows
from retrieval.store import StoreError
from server.engine.sequence import SamplingParams
from server.methods.knn_lm import KNNLM, KNNLMOptions
from server.models.llama import LAST_FFN_INPUT_TAP
from tests.conftest import make_engine
from tests.methods.conftest import run_requests

CORPUS = ["The river Velmor flows through Tarsk and Quill. Tarsk is known for blue glass and Quill for "
          "stone bridges. The mayor of Tarsk is Oren Vale, who founded the glass guild in 1871.",
          "Quill holds a bridge market every spring. Traders from Tarsk bring blue glass down the Velmor."]
PROMPT = "The mayor of Tarsk is"


def engine_query(engine, ids) -> np.ndarray:
    """Our engine's query vector (the last layer's FFN input) at the last position of `ids`,
    through the plain tap path, not the kNN-LM method."""
    engine.add_request("q", ids, SamplingParams(temperature=0.0, max_tokens=1), tap_layers=(LAST_FFN_INPUT_TAP,))
    query = None
    while engine.has_unfinished:
        for d in engine.step():
            if d.extra and "taps" in d.extra:
                query = d.extra["taps"][LAST_FFN_INPUT_TAP]
    return query.double().numpy()


def reference_step(hf, engine, ids, keys, values, k, lam, tau):
    """float64: log p_mix over the vocabulary at the last position of `ids`: p_LM from
    transformers, the query from our engine's tap (distances amplify any difference in it:
    HF computes RoPE frequencies in float32 arithmetic, we round float64 ones, an ulp apart)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1].double().numpy()
    query = engine_query(engine, ids)
    d = ((keys - query) ** 2).sum(-1)
    near = np.argsort(d, kind="stable")[:k]
    w = np.exp(-(d[near] - d[near].min()) / tau)
    p_knn = np.zeros(logits.shape[0])
    np.add.at(p_knn, values[near], w / w.sum())
    p_lm = np.exp(logits - logits.max())
    p_lm /= p_lm.sum()
    with np.errstate(divide="ignore"):
        return np.log(lam * p_knn + (1 - lam) * p_lm)


@pytest.fixture(scope="module")
def engine64(model_dir):
    return make_engine(model_dir, dtype="float64", max_num_batched_tokens=24)


@pytest.fixture(scope="module")
def store(engine64, tmp_path_factory):
    return build_datastore(engine64, tmp_path_factory.mktemp("knn"), "velmor", CORPUS, context_window=20)


def test_datastore_pairs_every_position_with_its_next_token(engine64, store):
    ids = [engine64.tokenizer.encode(t) for t in CORPUS]
    want = [v for t in ids for w, nxt in windows(t, 20) for v in w[1:] + ([nxt] if nxt is not None else [])]
    assert store.values.tolist() == want and store.keys.shape == (len(want), engine64.model_config.hidden_size)
    assert store.keys.dtype == np.float16 and store.meta["index_type"] == "flat"
    assert open_datastore(store.path).values.tolist() == want


@pytest.mark.parametrize("k, lam, tau", [(8, 0.25, 1.0), pytest.param(32, 0.5, 10.0, marks=pytest.mark.slow)])
def test_log_p_mix_matches_float64_reference(engine64, hf_model, store, k, lam, tau):
    ids = engine64.tokenizer.encode(PROMPT)
    options = KNNLMOptions(datastore="velmor", k=k, **{"lambda": lam}, temperature=tau)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5)
    out = run_requests(engine64, {"knn": (ids, params, {"method": KNNLM(options, store)})})["knn"]
    tokens, logprobs = out["tokens"][0], out["logprobs"][0]
    keys, values = store.keys.astype(np.float64), store.values
    prefix, knn_changed = list(ids), 0
    for token, lp in zip(tokens, logprobs):
        ref = reference_step(hf_model, engine64, prefix, keys, values, k, lam, tau)
        for t, v in lp.top + [(token, lp.logprob)]:
            assert abs(v - ref[t]) <= 1e-5, (t, v, ref[t])
        assert token == int(np.argmax(ref))
        knn_changed += token != int(np.argmax(reference_step(hf_model, engine64, prefix, keys, values, k, 0.0, tau)))
        prefix.append(token)
    assert out["alignment"]["knn_lm"]["tokens"] == len(tokens)
    assert knn_changed > 0  # the datastore changed some greedy choice, or this test could not fail


def test_lambda_zero_is_the_base_model(model_dir, tmp_path):
    engine = make_engine(model_dir)
    store = build_datastore(engine, tmp_path, "s", CORPUS, context_window=32)
    ids = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=3)
    options = KNNLMOptions(datastore="s", k=16, **{"lambda": 0.0})
    out = run_requests(engine, {"base": (ids, params, {}), "knn": (ids, params, {"method": KNNLM(options, store)})})
    assert out["knn"]["tokens"] == out["base"]["tokens"]
    for a, b in zip(out["knn"]["logprobs"][0], out["base"]["logprobs"][0]):
        # log_softmax of an already normalised row moves it by rounding only.
        assert [t for t, _ in a.top] == [t for t, _ in b.top] and abs(a.logprob - b.logprob) <= 1e-5


def test_a_datastore_refuses_other_weights(model_dir, tmp_path):
    from adapters.peft_format import load_peft_adapter
    from tests.adapters.real_lora import ATTENTION, make_real_adapter

    engine = make_engine(model_dir)
    for name, seed in (("a", 1), ("b", 2)):
        path = make_real_adapter(model_dir, tmp_path / name, ATTENTION, rank=4, seed=seed, std=0.05)
        engine.add_adapter(name, load_peft_adapter(path, engine.model_config, 64, name))
    store = build_datastore(engine, tmp_path / "root", "under-a", CORPUS[:1], adapter_name="a", context_window=32)
    model_fp, tok_fp = model_fingerprint(engine.runner.model), tokenizer_fingerprint(engine.tokenizer)
    fp = {n: adapter_fingerprint(engine.adapters.get(n).weights) for n in ("a", "b")}
    store.check_compatible(model_fp, fp["a"], tok_fp, "a")
    for adapter_fp, name in ((None, None), (fp["b"], "b")):
        with pytest.raises(StoreError) as err:
            store.check_compatible(model_fp, adapter_fp, tok_fp, name)
        assert err.value.status == 409 and "adapter `a`" in str(err.value)


def test_prompt_logprobs_match_references(engine64, hf_model, store):
    """Prompt logprobs, plain and under kNN-LM, at every prompt position."""
    ids = engine64.tokenizer.encode(CORPUS[1])[:12]
    options = KNNLMOptions(datastore="velmor", k=8, **{"lambda": 0.25})
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)
    got = {}
    for rid, kwargs in (("plain", {}), ("knn", {"method": KNNLM(options, store)})):
        engine64.add_request(rid, ids, params, **kwargs)
        while engine64.has_unfinished:
            for d in engine64.step():
                if d.extra and "prompt_logprobs" in d.extra:
                    got[rid] = d.extra["prompt_logprobs"]
    with torch.no_grad():
        plain_ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    keys, values = store.keys.astype(np.float64), store.values
    assert got["plain"][0] is None and got["knn"][0] is None and len(got["plain"]) == len(ids)
    for i in range(1, len(ids)):
        plain, knn = got["plain"][i], got["knn"][i]
        assert plain.token_id == knn.token_id == ids[i]
        # float64 engine vs float64 transformers: only RoPE's float32 frequencies differ.
        assert abs(plain.logprob - plain_ref[i - 1, ids[i]]) <= 1e-5
        assert plain.rank == 1 + int((plain_ref[i - 1] > plain_ref[i - 1, ids[i]] + 1e-9).sum())
        ref = reference_step(hf_model, engine64, ids[:i], keys, values, 8, 0.25, 1.0)
        for t, v in knn.top + [(knn.token_id, knn.logprob)]:
            assert abs(v - ref[t]) <= 1e-5, (i, t, v, ref[t])
