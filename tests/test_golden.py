"""Equality with the authors' own code (github.com/yangbang18/CLIP-Captioner), in the style of minGPT's
test against Hugging Face: tests/make_golden.py ran their model, criterion, translator and corpus
preparation and saved weights, inputs and outputs in tests/golden/ (how: the files' readme entries).
Here their weights are loaded into dap.CaptionModel through a name map, and every output must agree:
float32 to 1e-5, tokens exactly. No network and no authors' code is needed."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dap
import train
from conftest import reference_beam_search
from make_golden import their_names_to_ours
from dap import PAD

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden():
    g = torch.load(GOLDEN / "authors_model.pt", weights_only=True)
    opt = g["opt"]
    cfg = dap.Config(feature_dims={"image": opt["dim_i"], "motion": opt["dim_m"], "audio": opt["dim_a"]},
                     vocab_size=opt["vocab_size"], d_model=opt["dim_hidden"], n_heads=opt["num_attention_heads"],
                     n_layers=opt["num_hidden_layers_decoder"], max_len=opt["max_len"],
                     n_attributes=opt["attribute_prediction_k"])
    assert cfg.ffn_mult * cfg.d_model == opt["intermediate_size"]
    model = dap.CaptionModel(cfg)
    model.load_state_dict(their_names_to_ours(g["state_dict"]))  # strict: every name maps, none is left over
    return model.eval(), g


def feats_of(tensors):
    return dict(zip(["image", "motion", "audio"], tensors))  # their modality order 'ima'


def close(ours, theirs):
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-5, rtol=1e-5)


@pytest.mark.spec
def test_forward_equals_the_authors(golden):
    """Encoder output, teacher-forced logits, caption loss, VAP and TAP noisy-OR and losses, Eq. 12's total."""
    model, g = golden
    with torch.no_grad():
        memory = model.encode(feats_of(g["feats"]))
        close(memory, g["encoder_hidden_states"])
        embeddings = model.embedding(g["input_ids"])                     # their decoder inputs BOS w.. EOS PAD..
        close(embeddings, g["input_embs"])
        logits = model.decode(embeddings, memory)
        real = g["labels"] != PAD                                        # PAD targets are never scored
        close(logits[real], g["logits"][real])
        close(dap.caption_loss(logits, g["labels"]), g["lang_loss"])
        packed = model.decode(model.embedding(g["input_ids"], real=real), memory, real=real)  # training's path
        close(packed, g["logits"][real])
        vap = model.video_attribute_p_raw(memory)
        close(dap.noisy_or(vap), g["preds_attr"])
        close(dap.attribute_loss(vap, g["labels_attr"]), g["vap_loss"])
        kept = ~g["vap_mask"]                                            # their mask: True = left out
        close(dap.noisy_or(vap, kept), g["vap_masked_probs"])
        close(dap.attribute_loss(vap, g["labels_attr"], kept), g["vap_masked_loss"])
        tap = model.text_attribute_p_raw(embeddings)
        close(dap.noisy_or(tap, ~g["tap_mask"]), g["tap_probs"])
        close(dap.attribute_loss(tap, g["labels_attr"], ~g["tap_mask"]), g["tap_loss"])
        captions = torch.cat([g["input_ids"][:, :1], g["labels"]], dim=1)  # BOS w.. EOS PAD..
        out = model(feats_of(g["feats"]), captions, g["labels_attr"])
    close(out["loss"], g["total_loss"])
    for ours, theirs in [("cap", "lang_loss"), ("vap", "vap_loss"), ("tap", "tap_loss")]:
        close(out[ours], g[theirs])


@pytest.mark.spec
@pytest.mark.parametrize("beam_size", [1, 5])
def test_greedy_and_beam_search_equal_the_authors(golden, beam_size):
    """Their Translator and Beam with the two documented changes (BOS first; PAD and BOS never produced)."""
    model, g = golden
    expected = g["generation"][f"beam{beam_size}_patched"]["tokens"]
    found = model.generate(feats_of(g["gen_feats"]), beam_size=beam_size)
    assert [[w for w in row if w != PAD] for row in found.tolist()] == expected
    assert len({len(c) for c in expected}) > 2                           # realistic, varied lengths


@pytest.mark.spec
@pytest.mark.parametrize("variant", ["as_is", "bos_first", "patched"])
def test_the_per_video_transcription_reproduces_their_translator(golden, variant):
    """conftest.reference_beam_search, the specification the batched search is tested against, is their
    Beam: with their first input (PAD) and nothing forbidden it gives what their unchanged code gave."""
    model, g = golden
    first, never = {"as_is": (PAD, ()), "bos_first": (dap.BOS, ()), "patched": (dap.BOS, (PAD, dap.BOS))}[variant]
    for beam_size in (1, 5):
        found = reference_beam_search(model, feats_of(g["gen_feats"]), beam_size, first=first, never=never)
        assert found == [[w for w in c if w != dap.EOS] for c in g["generation"][f"beam{beam_size}_{variant}"]["tokens"]]


# ----------------------------------------------------------------------------------------------
# Data: their corpus preparation (misc/utils_corpora.py) on MSR-VTT; the novelty metric (misc/utils.py)


@pytest.fixture(scope="module")
def theirs():
    return json.loads((GOLDEN / "authors_msrvtt.json").read_text())


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.spec
def test_tokenisation_equals_theirs_on_tricky_captions(theirs):
    for example in theirs["examples"]:
        assert train.tokenize(example["raw"]) == example["tokens"], example["kind"]


@pytest.mark.spec
def test_novel_unique_vocab_equal_theirs(theirs):
    case = theirs["novelty_metric"]
    itow = {int(i): w for i, w in case["vocab"].items()}
    vocab = [itow[i] for i in range(len(itow))]
    train_captions = [" ".join(itow[i] for i in cap[1:-1]) for v in case["splits"]["train"]
                      for cap in case["captions"][f"video{v}"]]
    generated = [p[0]["caption"] for p in case["predictions"].values()]
    d = train.diversity(generated, train_captions, vocab)
    out = case["outputs"]
    assert d["Novel"] == pytest.approx(100 * out["novel"]) and d["Unique"] == pytest.approx(100 * out["unique"])
    assert d["Vocab"] == out["vocabulary_usage"]


@pytest.fixture(scope="module")
def msrvtt(shared_dir_module):
    ds = train.load_msrvtt(shared_dir_module / "data" / "msrvtt")
    captions = train.training_captions(ds)
    vocab = train.build_vocab(captions)
    return ds, captions, vocab, train.build_attributes(captions, vocab, 500)


@pytest.fixture(scope="module")
def shared_dir_module():
    from conftest import SHARED
    if not (SHARED / "data" / "msrvtt").is_dir():
        pytest.skip(f"needs the MSR-VTT annotations at {SHARED / 'data' / 'msrvtt'} (developers' machines only)")
    return SHARED


@pytest.mark.spec
def test_vocabulary_and_attributes_equal_theirs(msrvtt, theirs):
    ds, captions, vocab, attributes = msrvtt
    words = vocab[len(train.SPECIALS):]
    assert len(words) == theirs["vocab_size"] == 10541
    assert sha256("\n".join(sorted(words))) == theirs["vocab_set_sha256"]
    assert sha256("\n".join(words)) == theirs["vocab_ordered_sha256"]  # their word ids, in order
    assert attributes == theirs["attributes_k500"]                      # the same 500, in the same order


@pytest.mark.spec
def test_attribute_labels_and_references_equal_theirs(msrvtt, theirs):
    ds, _, _, attributes = msrvtt
    labels = train.attribute_labels([ds.captions[v] for v in ds.splits["train"]], attributes)  # numeric id order
    text = "".join(f"{v}:" + "".join("1" if x else "0" for x in row.tolist()) + "\n"
                   for v, row in zip(ds.splits["train"], labels.bool()))
    assert sha256(text) == theirs["train_labels_k500_sha256"]
    order = lambda v: int(v[5:])
    refs = "".join(f"{v}\t{i}\t{' '.join(train.tokenize(c))}\n" for v in sorted(ds.captions, key=order)
                   for i, c in enumerate(ds.captions[v]))
    assert sha256(refs) == theirs["references_sha256"]


@pytest.mark.spec
def test_vatex_prepared_as_theirs_though_some_videos_have_no_features(tmp_path):
    """Their preprocess_VATEX on a VATEX-format sample (tests/make_golden.py, vatex_sample): the same
    tokens (punkt's sentence splitting included), the vocabulary from every training caption (of the
    videos without features too) in their word order, the same attribute labels."""
    g = json.loads((GOLDEN / "authors_vatex.json").read_text())
    for name, items in g["annotations"].items():
        (tmp_path / name).write_text(json.dumps(items))
    (tmp_path / "image").mkdir()
    for v in g["available"]:
        np.save(tmp_path / "image" / f"{v}.npy", np.zeros((2, 3), np.float32))
    args = train.get_args(["--dataset", "vatex", "--data", str(tmp_path), "--feats", f"image={tmp_path / 'image'}"])
    messages = []
    ds, data, vocab, attributes = train.load_data(args, log=messages.append)
    assert ds.captions == g["references"]                                  # stored tokenised
    assert vocab[len(train.SPECIALS):] == g["vocab"] and attributes == g["vocab"][:len(attributes)]
    assert ds.all_ids == g["available"] and any("dropping 8 of 38" in m for m in messages)
    labels = {v: "".join("1" if x else "0" for x in row.tolist())
              for v, row in zip(data["train"].ids, data["train"].labels.bool())}
    assert labels == {v: g["train_labels"][v][:len(attributes)] for v in data["train"].ids}
