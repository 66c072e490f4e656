"""CLIP's text side: extract.py runs OpenAI's tokenizer and text tower (the installed openai-clip); train.py's
CLIPScore equals Hessel et al.'s computation.

- Tokenizer: extract.tokenize equals OpenAI's clip.tokenize(truncate=True) on awkward strings: accents, emoji,
  CJK, Arabic, HTML entities, mojibake, odd whitespace, truncation (keeping the EOT); without openai-clip,
  one line says what to install.
- Text tower: loaded from random fp16 weights saved as a TorchScript archive like the released ones, it equals
  OpenAI's build_model + encode_text in fp32 (clip.load on a CPU), to 1e-4; captions are prefixed and batched.
- CLIPScore / RefCLIPScore by hand, and train.py's equal to jmhessel/clipscore's computation (slow: trains).
"""
import importlib.util
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import extract
import train
from conftest import load_reference_clip, randomize_, write_vatex, write_video

TRICKY = [
    "a man is playing a guitar on stage.",
    "Hello, World!!! What's up?? I'm fine; you'll see -- they've gone (maybe)...",
    "  lots   of\t\twhitespace \n\n and\u00a0non-breaking   spaces  ",
    "Café naïve résumé Ångström façade jalapeño",
    "emoji 🎸🎉👍🏽 and flags 🇫🇷 and zwj 👨‍👩‍👧",
    "中文字幕 日本語のテキスト 한국어 문장",
    "Русский текст, العربية, עברית, ελληνικά",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &amp;amp;",
    "mojibake: cafÃ© and â€œsmart quotesâ€\x9d",
    "numbers 1234567 3.14159 1,000,000 2nd 10x",
    "URLs http://example.com/a_b?c=d&e=f #hashtag @user",
    "UPPER lower MiXeD CaSe DON'T SHOULDN'T",
    "<|startoftext|> inside <|endoftext|> text",
    "symbols ©®™ ±×÷ ≤≥≠ ∞ → ← ‰ § ¶ • … — – ¿¡",
    "",
    " ".join(f"word{i} supercalifragilisticexpialidocious" for i in range(60)),  # far beyond 77 tokens
]


@pytest.fixture(scope="module")
def reference_tokenizer():
    """OpenAI's clip/simple_tokenizer.py, loaded as a single file (clip/__init__ needs torchvision)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs OpenAI's reference simple_tokenizer.py: pip install -r requirements.txt (openai-clip)")
    path = Path(spec.submodule_search_locations[0]) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def reference_tokenize(tok, texts, context_length=77):
    """OpenAI's clip.tokenize(texts, truncate=True), spelled out on their SimpleTokenizer."""
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [sot] + tok.encode(text) + [eot]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        result[i, :len(ids)] = torch.tensor(ids)
    return result


# ---- tokenizer ------------------------------------------------------------------------------------


def test_without_openai_clip_one_line_says_what_to_install(monkeypatch, tmp_path, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "clip" else find_spec(name, *a))
    extract.package_module.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"clip/model.py.*pip install -r requirements.txt"):
            extract.build_clip({k: None for k in extract.CLIP_KEYS})
        write_video(tmp_path / "v.mp4", n_frames=2)
        torch.save({k: torch.zeros(1) for k in extract.CLIP_KEYS}, tmp_path / "w.pt")
        assert extract.main([str(tmp_path / "v.mp4"), "--out", str(tmp_path / "out"), "--weights",
                             str(tmp_path / "w.pt")]) == 2
    finally:
        extract.package_module.cache_clear()
    assert capsys.readouterr().err.splitlines() == [
        "error: extract.py needs clip/model.py, not installed: pip install -r requirements.txt"]


@pytest.mark.spec
def test_tokenize_equals_openai_including_truncation(reference_tokenizer):
    ours = extract.tokenize(TRICKY)
    assert ours.dtype == torch.long and ours.shape == (len(TRICKY), 77)
    assert torch.equal(ours, reference_tokenize(reference_tokenizer, TRICKY))
    longest = ours[-1]
    assert longest[0] == 49406 and longest[-1] == 49407 and (longest != 0).all()  # truncated, EOT kept


@pytest.mark.spec
def test_tokenize_known_ids():
    tokens = extract.tokenize("a dog.")[0]
    assert tokens[:5].tolist() == [49406, 320, 1929, 269, 49407] and tokens[5:].eq(0).all()


def test_tokenize_bad_inputs():
    with pytest.raises(ValueError, match="context_length 77"):
        extract.tokenize(TRICKY[-1], truncate=False)
    with pytest.raises(TypeError, match="expects strings.*None"):
        extract.tokenize(["ok", None])


# ---- text tower -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A tiny CLIP with the full 49,408-token vocabulary and a 2-layer, 2-head text tower, random fp16
    weights, saved as a TorchScript archive carrying OpenAI's extra int buffers (like the released .pt)."""
    ref = load_reference_clip()
    torch.manual_seed(0)
    model = ref.CLIP(32, 224, 1, 64, 32, 77, 49408, 128, 2, 2)  # ViT visual, text width 128 -> 2 heads
    model = randomize_(model, seed=3)
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, name):
            delattr(model, name)  # a plain int attribute on the Python class, a tensor in OpenAI's archives
        model.register_buffer(name, torch.tensor(value))
    path = tmp_path_factory.mktemp("clip_text") / "tiny-text.pt"
    example = (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing is how OpenAI's archives were made; its warnings are noise here
        torch.jit.trace(model, example, check_trace=False).half().save(str(path))
    reference = ref.build_model({k: v.clone() for k, v in model.state_dict().items()}).float().eval()
    return {"path": path, "reference": reference}


@pytest.mark.spec
def test_encode_text_equals_openai_model(text_ckpt):
    ours, sha = extract.load_clip_text("ViT-B/32", weights=text_ckpt["path"])  # any CLIP name: sizes come from the file
    assert sha == extract.sha256_file(text_ckpt["path"])
    assert all(p.dtype == torch.float32 for p in ours.parameters()) and not ours.training
    tokens = extract.tokenize(TRICKY)
    with torch.no_grad():
        expected = text_ckpt["reference"].encode_text(tokens)
        got = ours.encode_text(tokens)
    assert got.shape == (len(TRICKY), 32) and expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_load_matching_text_tower(text_ckpt):
    meta = {"backbone": "RN50", "weights_sha256": extract.sha256_file(text_ckpt["path"])}
    model, spec = extract.load_matching(meta, text_ckpt["path"], text=True)
    assert spec is extract.BACKBONES["RN50"] and model.encode_text(extract.tokenize("a dog")).shape == (1, 32)
    with pytest.raises(ValueError, match="have SHA-256 .* but the features were extracted with RN50 weights of SHA-256 00"):
        extract.load_matching({**meta, "weights_sha256": "00"}, text_ckpt["path"], text=True)


def test_encode_captions_prefix_and_batches(text_ckpt):
    ours, _ = extract.load_clip_text("ViT-B/32", weights=text_ckpt["path"])
    captions = ["a man sings", "two dogs run on grass", "a cartoon"]
    with torch.no_grad():
        direct = ours.encode_text(extract.tokenize(["A photo depicts " + c for c in captions]))
        bare = ours.encode_text(extract.tokenize(captions))
    torch.testing.assert_close(extract.encode_captions(ours, captions, "A photo depicts", batch_size=2), direct,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(extract.encode_captions(ours, captions), bare, atol=1e-5, rtol=0)
    assert extract.encode_captions(ours, []).shape == (0, 32)


def test_text_tower_bad_inputs(tmp_path):
    sd = {k: torch.zeros(1) for k in extract.CLIP_KEYS if k != "text_projection"}
    with pytest.raises(ValueError, match="not a CLIP checkpoint in OpenAI's layout: no 'text_projection' tensor"):
        extract.build_clip(sd)
    with pytest.raises(ValueError, match="'resnet101' is not a CLIP backbone"):
        extract.load_clip_text("resnet101")
    with pytest.raises(FileNotFoundError, match="missing.pt: no such file"):
        extract.load_clip_text("ViT-B/32", weights=tmp_path / "missing.pt")


# ---- CLIPScore / RefCLIPScore in train.py evaluation (an addition beyond the paper) ---------------


def test_clip_score_and_ref_clip_score_by_hand():
    frames = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])  # one video, mean frame (2, 1)
    video = frames.mean(dim=1)
    caption = torch.tensor([[1.0, 1.0]])
    cos = 3 / (math.sqrt(5) * math.sqrt(2))
    assert train.clip_score(video, caption).item() == pytest.approx(2.5 * cos, abs=1e-6)
    assert train.clip_score(video, -caption).item() == 0.0  # a negative cosine is clipped to 0
    video = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    caption = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    refs = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [9.0, 9.0]],  # the third is padding
                         [[-1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    s0 = 2.5 / math.sqrt(2)  # video 0: CLIP-S = 2.5 cos 45deg, best reference cos 1 (not x w)
    expected = torch.tensor([2 * s0 * 1.0 / (s0 + 1.0), 0.0])  # video 1: best reference cos -1 -> 0 -> H-Mean 0
    torch.testing.assert_close(train.ref_clip_score(video, caption, refs, mask), expected, atol=1e-6, rtol=0)
    mask[1, 2] = True  # video 1 now has a reference equal to its caption: H-Mean(2.5, 1)
    assert train.ref_clip_score(video, caption, refs, mask)[1].item() == pytest.approx(5 / 3.5, abs=1e-6)


@pytest.fixture
def vatex_with_clip_features(tmp_path, text_ckpt):
    """The VATEX fixture of test_train.py with CLIP image features that extract.py wrote from 6 tiny videos."""
    write_vatex(tmp_path)
    clip_video = write_video(tmp_path / "tiny.mp4", n_frames=12)
    videos = []
    for vid in train.load_vatex(tmp_path).all_ids:
        videos.append(tmp_path / "videos" / f"{vid}.mp4")
        videos[-1].parent.mkdir(exist_ok=True)
        shutil.copy(clip_video, videos[-1])
    feats = tmp_path / "feats" / "image"
    summary = extract.extract(videos, feats, "ViT-B/32", weights=text_ckpt["path"], frames=4, device="cpu",
                              workers=0, progress=False)
    assert summary["done"] == 6
    return tmp_path, feats


def text_like_features(feats, ds, text_ckpt):
    """Overwrite each video's frame features with its first reference's CLIP text embedding plus noise, so that
    the cosines of the random tiny model are positive and the scores are not clipped to 0."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref_text = text_ckpt["reference"].encode_text(extract.tokenize(
            ["A photo depicts " + ds.captions[v][0] for v in ds.all_ids]))  # (V, D)
    for v, e in zip(ds.all_ids, ref_text):
        np.save(feats / f"{v}.npy", (e + 0.3 * e.norm() * torch.randn(4, e.numel(), generator=g)).numpy())


def hessel_reference(tok, reference_model, candidates, references, image_embeddings):
    """CLIPScore / RefCLIPScore as jmhessel/clipscore computes them (numpy, per instance), with OpenAI's model."""
    def encode(texts):
        with torch.no_grad():
            return reference_model.encode_text(reference_tokenize(tok, ["A photo depicts " + t for t in texts])).numpy()
    unit = lambda x: x / np.sqrt(np.sum(x ** 2, axis=1, keepdims=True))
    images, cands = unit(np.stack(image_embeddings)), unit(encode(candidates))
    per_clip = 2.5 * np.clip(np.sum(images * cands, axis=1), 0, None)
    per_text = np.array([max(np.max(c @ unit(encode(refs)).T), 0) for c, refs in zip(cands, references)])
    per_ref = 2 * per_clip * per_text / (per_clip + per_text)
    return 100 * per_clip.mean(), 100 * per_ref.mean()


@pytest.mark.slow
def test_train_reports_clipscore_equal_to_hessel_reference(vatex_with_clip_features, text_ckpt, reference_tokenizer,
                                                           no_java):
    root, feats = vatex_with_clip_features
    ds = train.load_vatex(root)
    text_like_features(feats, ds, text_ckpt)  # meta.json stays extract.py's
    out = root / "run"
    metrics = train.main(["--dataset", "vatex", "--data", str(root), "--feats", f"image={feats}", "--n_frames", "4",
                          "--epochs", "1", "--d_model", "32", "--batch_size", "8", "--beam_size", "2",
                          "--no_progress", "--out", str(out), "--clipscore", "--weights", str(text_ckpt["path"])])
    saved = json.loads((out / "metrics.json").read_text())
    captions = json.loads((out / "captions.json").read_text())
    ids = [c["video_id"] for c in captions]
    assert ids == ds.splits["test"]
    clip_s, ref_clip_s = hessel_reference(reference_tokenizer, text_ckpt["reference"], [c["caption"] for c in captions],
                                          [ds.captions[v] for v in ids],
                                          [np.load(feats / f"{v}.npy").mean(axis=0) for v in ids])
    assert saved["CLIPScore"] == pytest.approx(clip_s, abs=1e-3) == metrics["CLIPScore"]
    assert saved["RefCLIPScore"] == pytest.approx(ref_clip_s, abs=1e-3)
    assert 0 < saved["CLIPScore"] <= 250 and 0 < saved["RefCLIPScore"] <= 100 * 2 * 2.5 / 3.5


@pytest.mark.slow
def test_clipscore_needs_the_checkpoint_that_wrote_the_features(vatex_with_clip_features, text_ckpt, tmp_path):
    root, feats = vatex_with_clip_features
    other = tmp_path / "other.pt"
    sd = {k: v.clone() for k, v in text_ckpt["reference"].state_dict().items()}
    sd["text_projection"] += 1
    torch.save(sd, other)
    with pytest.raises(ValueError, match="other.pt have SHA-256 [0-9a-f]{64}, but the features were extracted with "
                                         "ViT-B/32 weights of SHA-256"):  # extract.load_matching's rule
        train.load_clipscore_model(feats, weights=other)
    (root / "nometa").mkdir()
    with pytest.raises(FileNotFoundError, match="nometa/meta.json not found"):
        train.load_clipscore_model(root / "nometa", weights=other)
    meta = json.loads((feats / "meta.json").read_text())
    (root / "inp").mkdir()
    (root / "inp" / "meta.json").write_text(json.dumps({**meta, "backbone": "resnet101"}))
    with pytest.raises(ValueError, match="'resnet101' is not a CLIP backbone"):
        train.load_clipscore_model(root / "inp", weights=other)
    with pytest.raises(SystemExit):  # the toy data has no CLIP features
        train.get_args(["--clipscore"])


def test_clip_scores_bad_inputs():
    with pytest.raises(ValueError, match="video #1 has no reference"):
        train.clip_scores(["a", "b"], [["x"], []], torch.zeros(2, 3, 4), text_model=None)
    with pytest.raises(ValueError, match="2 captions, 2 reference lists, 3 videos"):
        train.clip_scores(["a", "b"], [["x"], ["y"]], torch.zeros(3, 3, 4), text_model=None)
