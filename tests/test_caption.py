"""train.py --caption: video files -> caption, top-10 attributes and time, through the backbones a run was trained on.

A tiny run is trained in the test, end to end through the command lines: generated videos -> extract.py (random
CLIP ViT and 3D ResNeXt weights in the public formats) -> train.py -> best.pt; then --caption on the test
videos must give what train.py's evaluation gave for them (captions.json). Plumbing, not caption quality."""
import json

import pytest
import torch

import dap
import extract
import train
from conftest import save_public_resnext_checkpoint, write_video

pytestmark = pytest.mark.slow  # trains a run through the command lines

CAPTIONS = ["a man is cooking food in a kitchen", "a man is playing a guitar on a stage",
            "a woman is singing a song on a stage", "a dog is running in a park"]  # 13 attribute words
SPLITS = ["train"] * 4 + ["validate"] + ["test"] * 2


def make_video(path, n_frames):
    """A 64x48 libx264 video of n_frames (frame k: flat grey 10 + 5k with a red square), no soundtrack."""
    write_video(path, n_frames=n_frames, size=(64, 48))
    return path


def tiny_clip_checkpoint(path, seed):
    """A random CLIP (1-layer ViT, 32-d embedding, 224 px) saved as a state_dict in OpenAI's key layout."""
    torch.manual_seed(seed)
    clip = extract.package_module("clip", "model").CLIP(32, 224, 1, 64, 32, 77, 100, 64, 1, 1)
    torch.save(clip.state_dict(), path)
    return path


@pytest.fixture(scope="module", autouse=True)
def restore_torch_threads():
    """--threads 1 (fast on a shared CPU) sets torch's thread count for the whole process: put it back after."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An image+motion DAP run trained by train.py's CLI on features extract.py wrote from 7 generated videos."""
    d = tmp_path_factory.mktemp("caption")
    (d / "videos").mkdir()
    videos = [make_video(d / "videos" / f"video{i}.mp4", 8 + 3 * i) for i in range(len(SPLITS))]  # != frames
    weights = {"image": tiny_clip_checkpoint(d / "clip.pt", 0),
               "motion": save_public_resnext_checkpoint(extract.ResNeXt3D((1, 1, 1, 1), cardinality=1), d / "r.pth")}
    for m, backbone, frames in [("image", "ViT-B/32", "4"), ("motion", "resnext101-kinetics", "2")]:
        assert extract.main([str(d / "videos"), "--out", str(d / "feats" / m), "--backbone", backbone, "--weights",
                             str(weights[m]), "--frames", frames, "--workers", "0", "--no_progress"]) == 0
    (d / "msrvtt").mkdir()
    (d / "msrvtt" / "videodatainfo.json").write_text(json.dumps({
        "videos": [{"video_id": f"video{i}", "category": i, "split": s} for i, s in enumerate(SPLITS)],
        "sentences": [{"video_id": f"video{i}", "caption": CAPTIONS[(i + j) % 4], "sen_id": 3 * i + j}
                      for i in range(len(SPLITS)) for j in range(3)]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "java_available", lambda: False)  # no PTB tokenizer or METEOR start-up: seconds, not 30
        with pytest.warns(UserWarning, match="METEOR is skipped"):
            train.main(["--dataset", "msrvtt", "--data", str(d / "msrvtt"), "--feats",
                        f"image={d / 'feats' / 'image'},motion={d / 'feats' / 'motion'}", "--epochs", "8", "--lr",
                        "5e-3", "--d_model", "32", "--n_frames", "4", "--n_attributes", "12", "--batch_size", "4",
                        "--beam_size", "2", "--no_progress", "--out", str(d / "run"), "--threads", "1"])
    return {"dir": d, "videos": videos, "weights": weights, "ckpt": d / "run" / "best.pt",
            "flag": f"image={weights['image']},motion={weights['motion']}"}


def caption(run, videos, *extra):
    """train.main(["--caption", ...]) on the run's checkpoint."""
    return train.main(["--caption", *map(str, videos), "--ckpt", str(run["ckpt"]), "--weights", run["flag"],
                       "--beam_size", "2", "--device", "cpu", "--threads", "1", *extra])


def test_config_records_the_backbones_of_the_features(run):
    config = json.loads((run["dir"] / "run" / "config.json").read_text())
    for m in ("image", "motion"):
        meta = json.loads((run["dir"] / "feats" / m / "meta.json").read_text())
        assert config["features"][m] == meta  # backbone, frames, dtype, weights SHA-256, ...
    assert config["features"]["motion"]["backbone"] == "resnext101-kinetics"
    assert config["features"]["image"]["weights_sha256"] == extract.sha256_file(run["weights"]["image"])


def test_features_of_a_video_file_equal_its_training_features(run):
    """File -> decode -> backbone -> N frames = extract.py's .npy read by load_features (motion: T = 2 -> N = 4)."""
    _, _, _, extractors, n_frames = train.load_captioner(run["ckpt"], run["flag"])
    assert n_frames == 4 and {m: e[2]["frames"] for m, e in extractors.items()} == {"image": 4, "motion": 2}
    ids = [p.stem for p in run["videos"]]
    want, _ = train.load_features({m: run["dir"] / "feats" / m for m in extractors}, ids, n_frames)
    for i in (0, 5):
        got = train.video_features(run["videos"][i], extractors, n_frames)
        for m in extractors:
            assert got[m].shape == (1, 4, want[m].shape[-1])
            torch.testing.assert_close(got[m][0], want[m][i], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(want["image"][0], want["image"][5], atol=1e-3)  # the videos differ


def test_caption_equals_the_evaluation_of_the_same_videos(run, capsys):
    """The test videos captioned from their files = train.py's test-set evaluation on extract.py's features."""
    evaluated = {r["video_id"]: r for r in json.loads((run["dir"] / "run" / "captions.json").read_text())}
    test_videos = [v for v, s in zip(run["videos"], SPLITS) if s == "test"]
    results = caption(run, test_videos)
    out = capsys.readouterr().out
    assert len(results) == 2
    for r, path in zip(results, test_videos):
        want = evaluated[path.stem]
        assert r["video"] == str(path) and r["caption"] == want["caption"] and r["caption"]
        assert [w for w, _ in r["attributes"]] == [w for w, _ in want["attributes"]]
        assert [p for _, p in r["attributes"]] == pytest.approx([p for _, p in want["attributes"]], abs=2e-4)
        assert len(r["attributes"]) == 10 and 0 < r["seconds"] < 60  # top 10 of K = 12
        assert f"{path} ({r['seconds']:.2f} s)\n  caption: {r['caption']}\n  attributes: " in out
        assert ", ".join(f"{w} {p:.2f}" for w, p in r["attributes"]) in out


def test_json_output(run, capsys):
    results = caption(run, run["videos"][:1], "--json")
    printed = json.loads(capsys.readouterr().out)
    assert printed == results and set(printed[0]) == {"video", "caption", "attributes", "seconds"}


def test_bad_videos_fail_alone_and_the_exit_status_says_so(run, tmp_path, capsys):
    (tmp_path / "notes.mp4").write_text("not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    bad = [tmp_path / "notes.mp4", tmp_path / "missing.mp4", tmp_path / "empty.mp4"]
    with pytest.raises(SystemExit) as e:
        caption(run, [bad[0], run["videos"][5], *bad[1:]], "--json")
    assert e.value.code == f"3 of 4 videos failed: {', '.join(map(str, bad))}"  # a message: exit status 1
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert [r.get("error") is None for r in printed] == [False, True, False, False]  # the good one still captioned
    assert f"error: {bad[0]}: not a readable video" in captured.err
    assert f"error: {bad[1]}: VideoError: no such file" in captured.err
    assert f"error: {bad[2]}: VideoError: empty file (0 bytes)" in captured.err


def test_missing_backbone_weights_name_the_modality(run, tmp_path, monkeypatch):
    monkeypatch.setenv("DAP_CACHE", str(tmp_path))  # nothing cached; the ResNeXt has no direct download
    with pytest.raises(SystemExit, match=r"needs motion features from the resnext101-kinetics backbone.*"
                                         r"--weights motion=PATH"):
        train.main(["--caption", str(run["videos"][0]), "--ckpt", str(run["ckpt"]),
                    "--weights", f"image={run['weights']['image']}"])
    with pytest.raises(SystemExit, match=r"nope.pth: no such file\. With --caption.*--weights motion=PATH"):
        train.main(["--caption", str(run["videos"][0]), "--ckpt", str(run["ckpt"]),
                    "--weights", f"image={run['weights']['image']},motion={tmp_path / 'nope.pth'}"])


def test_other_backbone_weights_are_refused(run, tmp_path):
    other = tiny_clip_checkpoint(tmp_path / "other.pt", 1)  # same shapes, other values
    with pytest.raises(SystemExit, match=rf"image features from the ViT-B/32 backbone: weights {other} have "
                                         rf"SHA-256 {extract.sha256_file(other)}, but the features were "
                                         r"extracted with ViT-B/32 weights"):
        train.main(["--caption", str(run["videos"][0]), "--ckpt", str(run["ckpt"]),
                    "--weights", f"image={other},motion={run['weights']['motion']}"])


def test_toy_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "java_available", lambda: False)
    with pytest.warns(UserWarning, match="METEOR"):
        train.main(["--task", "dap", "--epochs", "1", "--toy_train", "8", "--toy_val", "2", "--toy_test", "2",
                    "--d_model", "16", "--beam_size", "1", "--no_progress", "--out", str(tmp_path / "toy")])
    video = make_video(tmp_path / "v.mp4", 8)
    with pytest.raises(SystemExit, match="SYNTHETIC toy dataset.*no backbone"):
        train.main(["--caption", str(video), "--ckpt", str(tmp_path / "toy" / "best.pt")])


def test_model_without_vap_says_attributes_are_unavailable(run):
    """A Base model (no APNet) captions, and its attributes are None / 'unavailable' in the text."""
    _, vocab, attributes, extractors, n_frames = train.load_captioner(run["ckpt"], run["flag"])
    torch.manual_seed(0)
    base = dap.CaptionModel(train.model_config("base", train.Recipe(d_model=32), {"image": 32, "motion": 2048}, vocab,
                                               attributes)).eval()
    r = train.caption_video(run["videos"][0], base, vocab, attributes, extractors, n_frames, beam_size=2)
    assert r["attributes"] is None and isinstance(r["caption"], str)
    assert train.format_caption(r).endswith("attributes: unavailable (the model has no VAP APNet)")


def test_parse_weights():
    assert train.parse_modalities("clip.pt", "--weights") == {"image": "clip.pt"}
    assert train.parse_modalities("image=a.pt, motion=b=c.pth", "--weights") == {"image": "a.pt", "motion": "b=c.pth"}
    assert train.parse_modalities(None, "--weights") == {}
    with pytest.raises(ValueError, match="unknown modality 'imgae'"):
        train.parse_modalities("imgae=a.pt", "--weights")


def copy_run(run, tmp_path, edit):
    """A copy of the run whose config.json is changed by edit(config)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(run["ckpt"].read_bytes())
    config = json.loads((run["dir"] / "run" / "config.json").read_text())
    edit(config)
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    return tmp_path / "run" / "best.pt"


def test_runs_without_a_features_record_read_the_meta_json_of_their_feature_folders(run, tmp_path):
    ckpt = copy_run(run, tmp_path, lambda c: c.pop("features"))  # a config.json from before --caption existed
    _, _, _, extractors, _ = train.load_captioner(ckpt, run["flag"])
    backbones = {m: meta["backbone"] for m, (_, _, meta) in extractors.items()}
    assert backbones == {"image": "ViT-B/32", "motion": "resnext101-kinetics"}


def test_features_of_unknown_origin_are_refused(run, tmp_path):
    ckpt = copy_run(run, tmp_path, lambda c: c["features"].update(motion=None))  # e.g. the authors' HDF5 file
    with pytest.raises(ValueError, match="trained on motion features without extract.py's meta.json"):
        train.load_captioner(ckpt, run["flag"])
