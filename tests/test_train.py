"""train.py: the datasets (MSR-VTT on the real annotations when ../shared exists, VATEX on a fixture in the
official format, the SYNTHETIC toy), features (.npy and HDF5, extract.py's frame rule), vocabulary and
attributes, the metrics against hand computations, the toy study's bookkeeping (notebooks/toy_study.py),
and end-to-end toy runs (train, reload, --eval_only, --resume, the default Base-vs-DAP run, one study cell)."""
import json
import sys
import zipfile

import numpy as np
import pytest
import torch

import extract
import train
from conftest import ROOT

sys.path.insert(0, str(ROOT / "notebooks"))
import toy_study  # noqa: E402
from conftest import write_vatex
from dap import BOS, EOS, PAD, UNK

# ----------------------------------------------------------------------------------------------
# MSR-VTT on the real annotations in ../shared


@pytest.fixture(scope="module")
def msrvtt():
    from conftest import SHARED
    path = SHARED / "data" / "msrvtt"
    if not path.is_dir():
        pytest.skip(f"needs the MSR-VTT annotations at {path} (developers' machines only)")
    ds = train.load_msrvtt(path)
    captions = train.training_captions(ds)
    vocab = train.build_vocab(captions)
    return ds, captions, vocab


def test_msrvtt_splits_captions_categories(msrvtt):
    ds, _, _ = msrvtt
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 6513, "val": 497, "test": 2990}
    assert ds.splits["train"][:2] == ["video0", "video1"] and ds.splits["test"][0] == "video7010"
    assert all(len(ds.captions[v]) == 20 for v in ds.all_ids)
    assert len(ds.category_names) == 20 and ds.category_names[0] == "music" and ds.category_names[19] == "advertisement"
    assert set(ds.categories.values()) == set(range(20)) and ds.categories["video0"] == 9


@pytest.mark.spec
def test_msrvtt_vocabulary_and_attributes(msrvtt):
    ds, captions, vocab = msrvtt
    assert vocab[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert len(vocab) == 10541 + 4                  # words seen > 2 times (the authors' 10,541) + 4 specials
    assert train.build_vocab(captions) == vocab     # deterministic
    attrs = train.build_attributes(captions, vocab, 500)
    assert len(attrs) == 500 and len(set(attrs)) == 500
    assert not set(attrs) & train.STOP_WORDS
    assert attrs[:3] == ["man", "woman", "talking"]
    assert train.build_attributes(captions, vocab, 500) == attrs


def test_msrvtt_single_2016_file(tmp_path):
    info = {"videos": [{"video_id": "video1", "split": "validate", "category": 3},
                       {"video_id": "video0", "split": "train", "category": 1},
                       {"video_id": "video2", "split": "test", "category": 0}],
            "sentences": [{"video_id": "video0", "caption": "second", "sen_id": 5},
                          {"video_id": "video0", "caption": "first", "sen_id": 2},
                          {"video_id": "video1", "caption": "x", "sen_id": 0},
                          {"video_id": "video2", "caption": "y", "sen_id": 1}]}
    with zipfile.ZipFile(tmp_path / "release.zip", "w") as z:   # a zipped release is read without extracting
        z.writestr("annotation/videodatainfo.json", json.dumps(info))
    (tmp_path / "category.txt").write_text("music\t0\r\npeople\t1\r\n")
    ds = train.load_msrvtt(tmp_path)
    assert ds.splits == {"train": ["video0"], "val": ["video1"], "test": ["video2"]}
    assert ds.captions["video0"] == ["second", "first"] and ds.category_names == ["music", "people"]  # file order
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="videodatainfo"):
        train.load_msrvtt(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# VATEX on a fixture in the official format


def test_vatex_loader_and_missing_videos_dropped(tmp_path):
    write_vatex(tmp_path)
    ds = train.load_vatex(tmp_path)
    assert [len(ds.splits[s]) for s in train.SPLITS] == [3, 1, 2]
    assert all(len(ds.captions[v]) == 10 for v in ds.all_ids)
    feats_dir = tmp_path / "image"
    feats_dir.mkdir()
    for v in ds.all_ids:
        if v != "vid1_000001_000011":   # gone from the web
            np.save(feats_dir / f"{v}.npy", np.ones((5, 4), np.float32))
    messages = []
    feats, kept = train.load_features({"image": feats_dir}, ds.all_ids, n_frames=3, missing="drop", log=messages.append)
    assert "vid1_000001_000011" not in kept and len(kept) == 5 and feats["image"].shape == (5, 3, 4)
    assert any("dropping 1 of 6" in m for m in messages)
    assert train.subset(ds, kept).splits["train"] == ["vid0_000001_000011", "vid2_000001_000011"]
    with pytest.raises(FileNotFoundError, match="vatex_training_v1.0.json"):
        train.load_vatex(feats_dir)


@pytest.mark.spec
def test_tokenize_vatex_splits_sentences_as_nltk_word_tokenize_with_punkt():
    assert train.tokenize_vatex("A group of people are performing on stage. While a man's dog sings.") == [
        "a", "group", "of", "people", "are", "performing", "on", "stage", "while", "a", "man", "s", "dog", "sings"]
    # punkt's English abbreviations keep their full stop, and it needs a space after one
    assert train.tokenize_vatex("Mr. Smith turns right.then stops") == ["mr.", "smith", "turns", "right.then", "stops"]


@pytest.mark.spec
def test_vatex_vocabulary_and_attributes_ignore_missing_features(tmp_path):
    write_vatex(tmp_path)   # 3 training videos; without vid0's captions, 8 of 15 words fall under 3 counts
    ids = train.load_vatex(tmp_path).all_ids
    dirs, _ = make_feature_dirs(tmp_path, ids, dims={"image": 4})
    args = train.get_args(["--dataset", "vatex", "--data", str(tmp_path), "--feats", f"image={dirs['image']}"])
    _, _, vocab, attributes = train.load_data(args, log=lambda m: None)
    (dirs["image"] / f"{ids[0]}.npy").unlink()
    messages = []
    ds, _, vocab_without, attributes_without = train.load_data(args, log=messages.append)
    assert (vocab_without, attributes_without) == (vocab, attributes) and ids[0] not in ds.all_ids
    assert any("dropping 1 of 6" in m for m in messages)


# ----------------------------------------------------------------------------------------------
# Features


def make_feature_dirs(root, ids, dims={"image": 4, "motion": 3, "audio": 2}, T=7):
    rng = np.random.default_rng(0)
    arrays = {}
    for m, d in dims.items():
        (root / m).mkdir()
        for v in ids:
            arrays[m, v] = rng.standard_normal((T, d)).astype(np.float32)
            np.save(root / m / f"{v}.npy", arrays[m, v])
    return {m: root / m for m in dims}, arrays


@pytest.mark.spec
def test_load_features_takes_extracts_frames(tmp_path):
    ids = ["a", "b"]
    paths, arrays = make_feature_dirs(tmp_path, ids)
    np.save(tmp_path / "motion" / "b.npy", arrays["motion", "b"][:2])      # a shorter video: T = 2
    feats, kept = train.load_features(paths, ids, n_frames=4)
    assert kept == ids and feats["image"].shape == (2, 4, 4) and feats["audio"].shape == (2, 4, 2)
    idx = [0, 2, 4, 6]                                                      # k-snippet midpoints of 7 frames
    assert list(extract.sample_indices(7, 4)) == idx
    assert torch.equal(feats["image"][0], torch.from_numpy(arrays["image", "a"][idx]))
    assert torch.equal(feats["audio"][1], torch.from_numpy(arrays["audio", "b"][idx]))
    assert torch.equal(feats["motion"][1], torch.from_numpy(arrays["motion", "b"][[0, 0, 1, 1]]))


def test_missing_audio_is_zeros_missing_image_is_an_error(tmp_path):
    ids = ["a", "b", "c"]
    paths, _ = make_feature_dirs(tmp_path, ids)
    (tmp_path / "audio" / "b.npy").unlink()
    feats, _ = train.load_features(paths, ids, n_frames=3, log=lambda *a: None)
    assert torch.equal(feats["audio"][1], torch.zeros(3, 2)) and feats["audio"][0].abs().sum() > 0
    (tmp_path / "image" / "c.npy").unlink()
    (tmp_path / "image" / "a.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing for 2 of 3 videos.*\['a', 'c'\]"):
        train.load_features(paths, ids, n_frames=3)


@pytest.mark.parametrize("bad, message", [(np.ones((5,), np.float32), "expected a \\(T, D\\) array"),
                                          (np.zeros((0, 4), np.float32), "expected a \\(T, D\\) array"),
                                          (np.array([[0, np.nan, 0, 0]], np.float32), "NaN or inf"),
                                          (np.array([[0, np.inf, 0, 0]], np.float32), "NaN or inf")])
def test_bad_feature_files_name_the_file(tmp_path, bad, message):
    paths, _ = make_feature_dirs(tmp_path, ["a", "b"])
    np.save(tmp_path / "image" / "b.npy", bad)
    with pytest.raises(ValueError, match=f"image.b\\.npy: .*{message}"):
        train.load_features(paths, ["a", "b"], n_frames=3)


def test_hdf5_features(tmp_path):
    h5py = pytest.importorskip("h5py")
    x = np.arange(60 * 3, dtype=np.float32).reshape(60, 3)
    with h5py.File(tmp_path / "feats.hdf5", "w") as f:
        f["video0"] = x
        f["video1"] = x + 1
    feats, _ = train.load_features({"image": tmp_path / "feats.hdf5"}, ["video1", "video0"], n_frames=28)
    assert torch.equal(feats["image"][1], torch.from_numpy(x[extract.sample_indices(60, 28)]))
    assert torch.equal(feats["image"][0], feats["image"][1] + 1)


def test_parse_feats():
    assert train.parse_modalities("image=a/b, motion=c") == {"image": "a/b", "motion": "c"}
    with pytest.raises(ValueError, match="MODALITY=PATH"):
        train.parse_modalities("image")
    with pytest.raises(ValueError, match="no image"):
        train.parse_modalities("motion=x")


# ----------------------------------------------------------------------------------------------
# Vocabulary and attributes


@pytest.mark.spec
def test_tokenize_and_vocabulary_edge_cases():
    # the authors' rule: whitespace split, tokens that are (substrings of) string.punctuation dropped, lowercase
    assert train.tokenize("A man , a PLAN... don't stop -- t-shirt café !") == [
        "a", "man", "a", "plan...", "don't", "stop", "--", "t-shirt", "café"]
    assert train.tokenize("") == [] and train.tokenize("? ! ()") == []
    caps = ["a cat sits", "the dog runs", "a cat runs", "the dog", "the cat", "a dog"]  # cat 3, dog 3, a 3, the 3
    vocab = train.build_vocab(caps)  # by count, ties first seen first: a cat the dog; non-stop first
    assert vocab == ["<pad>", "<unk>", "<bos>", "<eos>", "cat", "dog", "a", "the"]
    w2i = {w: i for i, w in enumerate(vocab)}
    assert train.encode_caption("", w2i) == [BOS, EOS]
    assert train.encode_caption("A cat , naïvely !", w2i) == [BOS, 6, 4, UNK, EOS]
    long = train.encode_caption(" ".join(["cat"] * 50), w2i, max_len=30)
    assert len(long) == 30 and long[0] == BOS and long[-1] == EOS
    assert train.decode_caption([6, 4, EOS, 4], vocab) == "a cat" and train.decode_caption([4, PAD], vocab) == "cat"


@pytest.mark.spec
def test_attributes_skip_stop_words_shrink_and_label():
    caps = ["the dog runs in the park"] * 3 + ["a dog eats"] * 3 + ["a cat eats"] * 4
    vocab = train.build_vocab(caps)
    messages = []
    attrs = train.build_attributes(caps, vocab, k=10, log=messages.append)
    assert attrs == ["eats", "dog", "cat", "runs", "park"]              # by count, ties: first seen first
    assert messages and "K = 5" in messages[0]
    labels = train.attribute_labels([["a dog eats", "the park"], ["nothing here"]], attrs)
    assert labels.tolist() == [[1, 1, 0, 0, 1], [0, 0, 0, 0, 0]]


def test_attr_pos_keeps_nouns_verbs_adjectives(monkeypatch, shared_dir):
    import nltk
    caps = ["a man is quickly running on the green grass"] * 3
    vocab = train.build_vocab(caps)
    monkeypatch.setattr(nltk.data, "path", [str(shared_dir / "nltk_data")])
    nltk.tag._get_tagger.cache_clear()
    assert set(train.build_attributes(caps, vocab, pos=True)) == {"man", "running", "green", "grass"}
    nltk.tag._get_tagger.cache_clear()


def test_attr_pos_without_tagger_data_says_how_to_get_it(monkeypatch, tmp_path):
    import nltk
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    nltk.tag._get_tagger.cache_clear()
    with pytest.raises(RuntimeError, match="nltk.downloader averaged_perceptron_tagger_eng"):
        train.build_attributes(["a man runs"] * 3, train.build_vocab(["a man runs"] * 3), pos=True)
    nltk.tag._get_tagger.cache_clear()


# ----------------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.slow  # starts Java (PTB tokenizer, METEOR)
def test_caption_scores_with_pycocoevalcap():
    if not train.java_available():
        pytest.skip("no Java: METEOR and the PTB tokenizer need it")
    refs = {0: ["a man is playing a guitar on the stage", "a man plays guitar"],
            1: ["a woman is cooking pasta in a kitchen", "someone cooks food"],
            2: ["a dog runs across the green park", "a puppy is running"]}
    tokenized = train.coco_tokenize(refs)                                   # PTB tokenizer (Java), once
    exact = train.caption_scores(refs, {k: v[0] for k, v in refs.items()}, tokenized)
    assert exact["BLEU-4"] > 99 and exact["ROUGE-L"] > 99 and exact["METEOR"] > 90 and exact["CIDEr"] > 100
    assert exact["Meta-Sum"] == pytest.approx(sum(exact[k] for k in ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]))
    worse = train.caption_scores(refs, {0: "a dog runs", 1: "", 2: "a man is playing"}, tokenized)  # one empty
    assert all(0 <= worse[k] < exact[k] for k in ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"])
    train.close_meteor()


def test_caption_scores_without_java(monkeypatch):
    monkeypatch.setattr(train, "java_available", lambda: False)
    refs = {0: ["A man plays the guitar"], 1: ["A woman cooks pasta !"]}
    with pytest.warns(UserWarning, match="METEOR is skipped"):
        s = train.caption_scores(refs, {0: "a man plays the guitar", 1: "a woman cooks pasta"})
    assert s["METEOR"] is None and s["ROUGE-L"] == pytest.approx(100)
    assert s["Meta-Sum"] == pytest.approx(s["BLEU-4"] + s["ROUGE-L"] + s["CIDEr"])
    assert train.coco_tokenize({0: ["Don't STOP, now."]}) == {0: ["don't stop now"]}


@pytest.mark.spec
def test_diversity_hand_computed():
    """Novel counts distinct novel captions over all captions; training words outside the vocabulary read <unk>."""
    vocab = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "man", "runs", "dog", "barks", "cat"]
    generated = ["a man runs", "a man runs", "a dog barks", "a dog barks", "a cat <unk>", "a dog runs"]
    d = train.diversity(generated, ["A man runs", "a cat sits"], vocab)
    # distinct: 4; not seen in training ("a man runs", "a cat <unk>" are): "a dog barks", "a dog runs"
    assert d["Novel"] == pytest.approx(100 * 2 / 6) and d["Unique"] == pytest.approx(100 * 4 / 6) and d["Vocab"] == 7


@pytest.mark.spec
def test_mean_average_precision_hand_computed():
    probs = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.7, 0.5], [0.3, 0.2, 0.1]])
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0]])           # the last video has no positive: skipped
    # video 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; video 1: rank 1 -> 1
    assert train.mean_average_precision(probs, labels) == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)
    from sklearn.metrics import average_precision_score
    g = torch.Generator().manual_seed(0)
    p, y = torch.rand(20, 15, generator=g), (torch.rand(20, 15, generator=g) < 0.3).float()
    y[:, 0] = 1
    ref = np.mean([average_precision_score(y[i], p[i]) for i in range(20)])
    assert train.mean_average_precision(p, y) == pytest.approx(100 * ref)


# ----------------------------------------------------------------------------------------------
# The synthetic toy dataset


def test_toy_dataset_has_the_papers_conditions():
    a = train.make_toy(seed=3, n_train=40, n_val=5, n_test=5, n_captions=6, n_frames=12)
    b = train.make_toy(seed=3, n_train=40, n_val=5, n_test=5, n_captions=6, n_frames=12)
    inp = train.make_toy(seed=3, n_train=40, n_val=5, n_test=5, n_captions=6, n_frames=12, backbone="inp")
    assert a.synthetic and "simulated" in a.meta["backbone"]
    assert a.captions == b.captions and all(torch.equal(a.feats[m], b.feats[m]) for m in a.feats)   # deterministic
    assert a.captions == inp.captions and not torch.equal(a.feats["image"], inp.feats["image"])
    assert [len(a.splits[s]) for s in train.SPLITS] == [40, 5, 5] and len(a.captions["video0"]) == 6
    assert {m: x.shape[:2] for m, x in a.feats.items()} == {m: (50, 12) for m in a.feats}
    for v, vid in enumerate(a.all_ids):
        words = {w for c in a.captions[vid] for w in train.tokenize(c)}
        shown = a.meta["content"][v]
        main = [next(x for x in shown if x["type"] == t) for t in ("subject", "action")]
        assert all(set(x["words"]) & words for x in main)             # the main subject and action: always named
        if a.meta["silent"][v]:
            assert a.feats["audio"][v].abs().sum() == 0 and not any(x["type"] == "sound" for x in shown)
        details = [length for x, (_, length) in zip(shown, a.meta["spans"][v]) if x["type"] == "object"][1:]
        assert sum(details) < 0.8 * 12 * len(details)                # details: visible in some frames only
    assert 0 < sum(a.meta["silent"]) < 50
    # the background is shared by the backbones; only the attribute signal differs (weaker for inp)
    diff = (a.feats["image"] - inp.feats["image"]).norm(dim=-1)
    assert diff.mean() < 0.5 * a.feats["image"].norm(dim=-1).mean()


def test_toy_statistics_mirror_msrvtt_and_follow_their_parameters():
    """One caption names a small share of its video's label (MSR-VTT: 13%); annotators who all agree: 100%."""
    stats = {}
    for agreement in (0.0, 1.0):
        ds = train.make_toy(seed=0, n_train=100, n_val=2, n_test=2, agreement=agreement)
        captions = train.training_captions(ds)
        vocab = train.build_vocab(captions)
        stats[agreement] = toy_study.caption_statistics(ds, vocab, train.build_attributes(captions, vocab, 500))
    assert stats[0.0]["captions per video"] == 20 and 0.05 < stats[0.0]["mention share"] < 0.25
    assert 7 < stats[0.0]["words per caption"] < 13 and stats[0.0]["vocabulary"] > stats[0.0]["K"] / 2
    assert stats[1.0]["mention share"] == 1.0


def test_caption_statistics_hand_computed():
    ds = train.Dataset("x", {"train": ["a", "b"], "val": [], "test": []},
                       {"a": ["a red car drives", "a car"], "b": ["a dog runs", "a dog barks loudly"]})
    attributes = ["car", "dog", "red", "runs", "barks"]
    s = toy_study.caption_statistics(ds, train.SPECIALS + ["a", "car", "dog"], attributes)
    # labels: a = {car, red}, b = {dog, runs, barks}; per caption: 2/2, 1/2, 2/3, 2/3
    assert s["attributes per video (mean)"] == 2.5 and s["attributes per caption"] == pytest.approx(7 / 4)
    assert s["mention share"] == pytest.approx((1 + 0.5 + 2 / 3 + 2 / 3) / 4)
    assert s["words per caption"] == pytest.approx(13 / 4) and s["videos with the top attribute"] == 1


# ----------------------------------------------------------------------------------------------
# End to end on a tiny toy dataset

TINY = ["--toy_train", "16", "--toy_val", "4", "--toy_test", "4", "--d_model", "32", "--n_frames", "6",
        "--batch_size", "16", "--beam_size", "2", "--no_progress"]


@pytest.mark.slow
def test_end_to_end_toy_run_and_reload(tmp_path, no_java):
    out = tmp_path / "run"
    metrics = train.main(TINY + ["--epochs", "2", "--out", str(out), "--task", "dap"])
    for name in ["config.json", "vocab.json", "attributes.json", "best.pt", "last.pt", "metrics.json", "captions.json"]:
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["synthetic"] is True and saved["CIDEr"] == pytest.approx(metrics["CIDEr"]) and len(saved["history"]) == 2
    assert {"Novel", "Unique", "Vocab", "mAP-VAP", "mAP-TAP", "Meta-Sum"} <= set(saved)
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions) == 4 and len(captions[0]["attributes"]) == 10
    ckpt = torch.load(out / "best.pt", weights_only=True)                 # a plain state_dict + config
    assert set(ckpt) >= {"config", "state_dict", "vocab", "attributes"}
    # reloaded: identical captions, through --eval_only as well
    model, vocab, attrs, _ = train.load_checkpoint(out / "best.pt")
    args = train.get_args(TINY)
    _, data, _, _ = train.load_data(args, vocab, attrs, log=lambda *a: None)
    _, again = train.evaluate(model, data["test"], vocab, attrs, [], beam_size=2, meteor=False, progress=False)
    assert [r["caption"] for r in again] == [r["caption"] for r in captions]
    train.main(TINY + ["--eval_only", "--ckpt", str(out / "best.pt"), "--out", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "best.captions.json").read_text()) == captions


@pytest.mark.slow
def test_resume_continues_an_interrupted_run(tmp_path, no_java):
    args = train.get_args(TINY)
    _, data, vocab, attrs = train.load_data(args, log=lambda *a: None)
    recipe = train.recipe_for("toy", d_model=32, batch_size=16, beam_size=1, epochs=3)
    kw = dict(progress=False, log=lambda *a: None)
    full, full_history = train.train_model("dap", data, vocab, attrs, recipe, **kw)

    def interrupt(epoch, history):
        if epoch == 0:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.train_model("dap", data, vocab, attrs, recipe, out_dir=tmp_path, on_epoch_end=interrupt, **kw)
    logs = []
    kw["log"] = logs.append
    state = train.read_checkpoint(tmp_path / "last.pt")
    resumed, history = train.train_model("dap", data, vocab, attrs, recipe, out_dir=tmp_path, state=state, **kw)
    assert any("resuming" in m and "after epoch 1" in m for m in logs)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in full_history])
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name                        # continued, not restarted


def test_cli_errors():
    with pytest.raises(SystemExit):
        train.get_args(["--dataset", "msrvtt"])
    with pytest.raises(SystemExit):
        train.get_args(["--eval_only"])
    assert train.get_args([]).recipe.d_model == train.DATASET_RECIPES["toy"]["d_model"]
    assert train.get_args(["--dataset", "msrvtt", "--data", "x", "--feats", "image=y"]).recipe == train.Recipe()
    assert train.get_args(["--dataset", "vatex", "--data", "x", "--feats", "image=y"]).recipe.d_model == 1024


@pytest.mark.slow
def test_the_default_run_compares_base_and_dap(tmp_path, no_java, monkeypatch, capsys):
    """python train.py: Base and DAP side by side, three test videos with DAP's attributes, one line of meaning."""
    monkeypatch.chdir(tmp_path)
    rows = train.main(TINY + ["--epochs", "1"])
    assert list(rows) == ["Base", "DAP"] and "mAP-VAP" in rows["DAP"] and "mAP-VAP" not in rows["Base"]
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and out.count("  DAP:  ") == 3 and "DAP's top attributes" in out
    assert "Meta-Sum against Base" in out.splitlines()[-1]
    assert (tmp_path / "out" / "toy-base-seed0" / "best.pt").exists() and (tmp_path / "out" / "toy-dap-seed0").is_dir()


@pytest.mark.slow
def test_the_default_run_gives_each_task_its_own_out_folder(tmp_path, no_java):
    """--out DIR with the default run: Base in DIR/base, DAP in DIR/dap (they used to overwrite each other)."""
    train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "cmp")])
    for task in ("base", "dap"):
        assert extract.read_meta(tmp_path / "cmp" / task / "config.json")["task"] == task
        assert (tmp_path / "cmp" / task / "best.pt").exists()


def test_study_resumes_and_summarises_over_seeds(tmp_path, monkeypatch):
    """The study runs each (cell, task, seed) once, saves after each, and summarises mean, std, count."""
    calls = []

    def fake_run(cell, task, seed):
        calls.append((cell, task, seed))
        test = {"Meta-Sum": 100.0 + seed, "CIDEr": 50.0, "mAP-VAP": None}
        return {"cell": cell, "task": task, "seed": seed, "test": test, "total_s": 1.0, "train_s": 1.0,
                "test_fewer_frames": {str(n): test for n in toy_study.STUDY_FRAMES}, "data_statistics": {"K": 10},
                "best_epoch": 2, "epochs_run": 7}
    monkeypatch.setattr(toy_study, "study_run", fake_run)
    monkeypatch.setattr(toy_study, "STUDY_CELLS", {"default": ("300 videos", {}, ["base", "dap"], "paper", {})})
    args = ["--cells", "default", "--seeds", "0", "1", "--out", str(tmp_path / "s.json")]
    toy_study.main(args)
    assert len(calls) == 4
    summary = json.loads((tmp_path / "s.json").read_text())["summary"]
    assert summary["default"]["dap"]["Meta-Sum"] == [100.5, 0.5, 2] and "mAP-VAP" not in summary["default"]["dap"]
    toy_study.main(args)                                   # everything is there: nothing runs again
    assert len(calls) == 4
    study = json.loads((tmp_path / "s.json").read_text())
    assert "| default (dap) | 100.5 ± 0.5 |" in toy_study.summary_table(study).replace("50.0 ± 0.0 | ", "")
    # DAP - Base per seed: 0 and 0, neither seed ahead; the default run's closing sentence says so
    assert study["summary"]["paired"]["default"] == {"what": "300 videos", "diff": [0.0, 0.0, 2], "ahead": 0}
    verdict = train.study_verdict(tmp_path / "s.json")
    assert "300 videos +0.0 ± 0.0 (0/2 seeds ahead)" in verdict and "behind beyond it: none" in verdict
    assert "no paired runs" in train.study_verdict(tmp_path / "nothing.json")


def test_a_file_that_is_not_a_study_is_refused(tmp_path):
    (tmp_path / "metrics.json").write_text('{"CIDEr": 1.0}')
    with pytest.raises(SystemExit, match="metrics.json is not a study file"):
        toy_study.main(["--table", "--out", str(tmp_path / "metrics.json")])


@pytest.mark.slow
def test_one_study_cell_runs_every_task(tmp_path, no_java, monkeypatch):
    """python notebooks/toy_study.py --cells default: Base, VAP, TAP and DAP on a tiny toy."""
    tiny = dict(n_train=16, n_val=4, n_test=4)
    make_toy = train.make_toy
    monkeypatch.setattr(train, "make_toy", lambda **kw: make_toy(**{**kw, **tiny}))
    monkeypatch.setitem(train.DATASET_RECIPES, "toy", dict(d_model=32, n_frames=6, epochs=1, beam_size=2))
    study = toy_study.main(["--cells", "default", "--seeds", "0", "--out", str(tmp_path / "s.json")])
    assert sorted(r["task"] for r in study["runs"].values()) == ["base", "dap", "tap", "vap"]
    dap_run = study["runs"]["default|dap|0"]
    assert {"mAP-VAP", "mAP-TAP"} <= set(dap_run["test"]) and dap_run["best_epoch"] == 1
