"""extract.py: frame sampling, preprocessing, backbone conformance with the reference code, the extraction loop.

- Frames: sample_indices equals the authors' get_uniform_ids_from_k_snippets (numpy) bit for bit; the decoded
  frames of a generated video whose frames are told apart by brightness are those indices (also without a
  container frame count, and for a truncated file); a video shorter than N repeats frames.
- Preprocessing against PIL references with hand-computed sizes.
- Backbones: CLIP (OpenAI's model.py) loaded from a TorchScript archive or a plain state_dict gives
  clip.load's CPU features (fp32, the checkpoint's own values, not rounded to fp16); the registry has
  the released sizes; the ResNet-101 key names and shapes equal torchvision's, and its features equal
  torchvision's resnet.py with fc removed (run when torchvision is importable or DAP_TORCHVISION_WHEEL
  points at a torchvision wheel).
- Weights: download, SHA-256 check and cache; clear errors offline and for wrong files; the SHA-256
  rule (load_matching) and read_meta.
- Decoding ahead: in order, never more than 2 * workers videos ahead of the backbone.
- The loop: a video file -> .npy equals the reference step by step; resume after an interruption; bad files are
  reported and the run goes on; shards and worker processes; I/O errors end in one line naming the file (exit 2)
  and lose nothing; files get a plain open()'s permissions; a run that cannot start leaves no folder; kill -9
  leaves no worker behind.
- The real videos in ../shared (720p with audio, no audio, 176x144, the 55-s trailer in bounded memory), and
  train.py training on what extract.py wrote.
Tests marked slow run extract.py end to end (CLI, subprocesses, real videos); pytest -m "not slow" skips them.
"""
import ast
import errno
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import typing
import warnings
import zipfile
from concurrent.futures import Future
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import extract
from conftest import N_TEST_FRAMES, authors_uniform_ids, load_reference_clip, randomize_, write_video

CLIP_MEAN, CLIP_STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


# ----------------------------------------------------------------------------------------------
# fixtures: a generated video, reference code, tiny random checkpoints in the public layouts


@pytest.fixture(scope="session")
def video(tmp_path_factory):
    """The generated 64x48, 40-frame mp4."""
    return write_video(tmp_path_factory.mktemp("video") / "tiny.mp4")


def tiny_reference_clip(ref, vision_layers, vision_width, patch):
    """A tiny OpenAI CLIP (64-d embedding, 1-layer text tower) with random weights."""
    model = ref.CLIP(64, 224, vision_layers, vision_width, patch, 77, 100, 64, 1, 1)
    return randomize_(model, forward=lambda m, x: m.visual(x))


@pytest.fixture(scope="session")
def clip_ckpts(tmp_path_factory):
    """Tiny CLIP checkpoints: ViT (TorchScript archive, like OpenAI's .pt) and ModifiedResNet (state_dict)."""
    ref = load_reference_clip()
    d = tmp_path_factory.mktemp("clip")
    vit = tiny_reference_clip(ref, 2, 128, 32)  # width 128 -> 2 heads, 7x7 patches
    vit.register_buffer("input_resolution", torch.tensor(224))  # OpenAI's archives carry it too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing a model with Python control flow warns; the weights are what matter
        traced = torch.jit.trace(vit, (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)), check_trace=False)
    traced.half().save(str(d / "vit.pt"))  # fp16, as released
    rn = tiny_reference_clip(ref, (1, 2, 1, 1), 8, None)  # width 8 -> 4 heads in the attention pool
    torch.save(rn.state_dict(), d / "rn.pt")
    return {"ref": ref, "vit": d / "vit.pt", "vit_model": vit, "rn": d / "rn.pt", "rn_model": rn}


def tiny_resnet_state_dict(seed=0, width=64):
    """torchvision-layout ResNet state_dict with 1 bottleneck per stage (fc included, as torchvision saves)."""
    model = randomize_(extract.ResNet(layers=(1, 1, 1, 1), width=width), seed, forward=lambda m, x: m(x[..., :64, :64]))
    sd, dim = model.state_dict(), model.output_dim
    g = torch.Generator().manual_seed(seed + 1)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, dim, generator=g), torch.randn(1000, generator=g)
    return sd


@pytest.fixture(scope="session")
def resnet_ckpt(tmp_path_factory):
    """A tiny torchvision-layout ResNet checkpoint file."""
    path = tmp_path_factory.mktemp("resnet") / "resnet-tiny.pth"
    torch.save(tiny_resnet_state_dict(width=16), path)  # 16-512 channels: 512-d features
    return path


def model_input(backbone, img):
    """What the registered backbone's network receives for one image: (3, H, W) float."""
    spec = extract.BACKBONES[backbone]
    return spec.to_input(torch.tensor(spec.preprocess(img))[None])[0]


def pil_clip_reference(img, new_size, box):
    """OpenAI's transform spelled out with PIL and numpy for known sizes: (3, 224, 224) float."""
    x = np.asarray(img.resize(new_size, Image.BICUBIC).crop(box).convert("RGB"), np.float64) / 255.0
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------
# frame sampling and decoding


@pytest.mark.spec
def test_sample_indices_are_the_authors_segment_centres():
    assert extract.sample_indices(10, 4).tolist() == [1, 3, 6, 8]  # bounds 0, 2, 5, 7, 10
    assert extract.sample_indices(3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2]  # shorter than N: repeats
    assert extract.sample_indices(28, 28).tolist() == list(range(28))
    assert extract.sample_indices(60, 28).tolist()[:6] == [1, 3, 5, 7, 9, 11]  # train.py's 28 of the 60 features
    with pytest.raises(ValueError, match="0 frames"):
        extract.sample_indices(0, 28)


@pytest.mark.spec
def test_sample_indices_equal_the_authors_numpy_rule_bit_for_bit():
    """The plain-Python rule equals numpy's linspace truncation for every T in 1..400, N in 1..64 (T < N too)."""
    for t in range(1, 401):
        for n in range(1, 65):
            assert extract.sample_indices(t, n).tolist() == authors_uniform_ids(t, n), (t, n)


def grey_levels(frames):
    """Index of the test-video frame each decoded frame is, from its brightness away from the square."""
    return [int(round((f[20:, 20:].mean() - 10) / 5)) for f in frames]


@pytest.mark.spec
@pytest.mark.parametrize("n", [8, 40, 50])
def test_decode_keeps_the_sampled_frames(video, n):
    frames = extract.decode_frames(video, n, np.asarray)  # identity preprocessing: (N, 48, 64, 3)
    assert frames.shape == (n, 48, 64, 3) and frames.dtype == np.uint8
    assert grey_levels(frames) == authors_uniform_ids(N_TEST_FRAMES, n)


def test_decode_counts_frames_when_the_container_does_not_say(tmp_path):
    path = write_video(tmp_path / "nocount.mkv")  # Matroska has no frame count: two-pass path
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    assert grey_levels(extract.decode_frames(path, 6, np.asarray)) == [3, 9, 16, 23, 29, 36]


def test_truncated_video_uses_its_decodable_frames(tmp_path):
    """Index at the front (faststart), data cut after 20 of 40 frames: F = 20 decodable frames, not 40."""
    path = write_video(tmp_path / "full.mp4", options={"movflags": "faststart"})
    with av.open(str(path)) as c:
        offsets = [p.pos for p in c.demux(video=0) if p.size]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[:offsets[20]])
    with av.open(str(cut)) as c:
        assert c.streams.video[0].frames == N_TEST_FRAMES  # the container still claims 40
    assert grey_levels(extract.decode_frames(cut, 6, np.asarray)) == [1, 4, 8, 11, 14, 18]  # bounds 0, 3, 6, 10, ...


def test_decode_bad_files_raise_clearly(tmp_path):
    (tmp_path / "text.mp4").write_text("this is not a video\n")
    with pytest.raises(av.error.FFmpegError):
        extract.decode_frames(tmp_path / "text.mp4", 4, np.asarray)
    with av.open(str(tmp_path / "audio.wav"), "w") as c:  # a file with no video stream
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in list(s.encode(frame)) + list(s.encode()):
            c.mux(p)
    with pytest.raises(extract.VideoError, match="no video stream"):
        extract.decode_frames(tmp_path / "audio.wav", 4, np.asarray)


# ----------------------------------------------------------------------------------------------
# preprocessing versus PIL references with hand-computed sizes


@pytest.mark.spec
@pytest.mark.parametrize("size,new_size,box", [
    ((320, 240), (298, 224), (37, 0, 261, 224)),     # 224 * 320 / 240 = 298.67 -> 298; (298 - 224) / 2 = 37
    ((240, 320), (224, 298), (0, 37, 224, 261)),
    ((176, 144), (273, 224), (24, 0, 248, 224)),     # 273.78 -> 273; 24.5 -> round half to even 24
    ((1280, 720), (398, 224), (87, 0, 311, 224)),    # 398.2 -> 398; 87
])
def test_clip_preprocess_matches_pil_reference(size, new_size, box):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    x = model_input("ViT-B/32", img)
    np.testing.assert_allclose(x.numpy(), pil_clip_reference(img, new_size, box), atol=1e-5)


@pytest.mark.spec
def test_imagenet_preprocess_matches_pil_reference():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    ref = np.asarray(img.resize((341, 256), Image.BILINEAR).crop((58, 16, 282, 240)), np.float64) / 255.0  # 341.33
    ref = (ref - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])  # ImageNet mean and std
    np.testing.assert_allclose(model_input("resnet101", img).numpy(), ref.transpose(2, 0, 1), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# backbone conformance with OpenAI's model.py and torchvision's resnet.py


@pytest.mark.spec
@pytest.mark.parametrize("which", ["vit", "rn"])
def test_clip_visual_equals_openai_clip_load_on_cpu(clip_ckpts, which):
    """A TorchScript archive in fp16 (vit) or a plain state_dict (rn) gives clip.load's CPU features."""
    ref = clip_ckpts["ref"]
    sd = extract.load_state_dict(clip_ckpts[which])
    reference = ref.build_model({k: v.clone() for k, v in sd.items()}).float().eval()  # as clip.load on CPU
    ours = extract.build_clip_visual(sd)
    assert type(ours).__name__ == ("VisionTransformer" if which == "vit" else "ModifiedResNet")  # OpenAI's
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference.encode_image(x), ours(x)
    assert got.shape == (3, 64) and (want - want.mean(0)).abs().max() > 1e-2  # depends on its input
    assert (got - want).abs().max() < 1e-4


def test_clip_fp32_weights_are_not_rounded_to_fp16(clip_ckpts):
    """OpenAI's build_model casts to fp16; extraction keeps a fp32 checkpoint's own values."""
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 1e-3 * torch.rand(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in clip_ckpts["rn_model"].state_dict().items()}
    assert any(not torch.equal(v, v.half().float()) for v in sd.values())
    ours = extract.build_clip_visual(dict(sd)).state_dict()
    assert all(torch.equal(ours[k], sd["visual." + k]) for k in ours)


RELEASED_CLIP = {"ViT-B/32": (512, 224), "ViT-B/16": (512, 224), "RN50": (1024, 224), "RN101": (512, 224),
                 "RN50x4": (640, 288)}  # OpenAI's released encoders: embedding size, input pixels


def test_registry_has_the_released_clip_sizes():
    assert {n: (b.dim, b.input_size) for n, b in extract.BACKBONES.items() if n in RELEASED_CLIP} == RELEASED_CLIP


RESNET101_LAYOUT_SHA256 = "e0e4b4ababa6968b1645df803a40d18a45ec23658a671a8a7653a2e13b5b2dc3"


@pytest.mark.spec
def test_resnet101_has_torchvision_key_layout():
    """Key names and shapes equal torchvision 0.28.0's resnet101().state_dict() (626 tensors, hashed)."""
    with torch.device("meta"):
        sd = {k: tuple(v.shape) for k, v in extract.ResNet().state_dict().items()}
    sd.update({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
    text = "\n".join(f"{k}:{shape}" for k, shape in sorted(sd.items()))
    assert len(sd) == 626 and hashlib.sha256(text.encode()).hexdigest() == RESNET101_LAYOUT_SHA256


def load_torchvision_resnet():
    """torchvision's models/resnet.py: from torchvision if importable, else from a wheel ($DAP_TORCHVISION_WHEEL)."""
    try:
        from torchvision.models import resnet
        return resnet.ResNet, resnet.Bottleneck
    except Exception:  # noqa: BLE001 - torchvision missing or not importable next to this torch
        pass
    wheel = os.environ.get("DAP_TORCHVISION_WHEEL")
    if not wheel or not Path(wheel).is_file():
        pytest.skip("torchvision is not importable here; to run this check, `pip download torchvision --no-deps` "
                    "and set DAP_TORCHVISION_WHEEL to the wheel")
    tree = ast.parse(zipfile.ZipFile(wheel).read("torchvision/models/resnet.py").decode())
    wanted = {"conv3x3", "conv1x1", "BasicBlock", "Bottleneck", "ResNet"}
    body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in wanted]
    ns = {"torch": torch, "nn": nn, "Tensor": torch.Tensor, "_log_api_usage_once": lambda *a: None,
          **{k: getattr(typing, k) for k in ("Any", "Callable", "Optional", "Union", "List", "Type")}}
    exec(compile(ast.Module(body=body, type_ignores=[]), "torchvision/models/resnet.py", "exec"), ns)
    return ns["ResNet"], ns["Bottleneck"]


@pytest.mark.spec
def test_resnet_matches_torchvision_without_fc():
    tv_resnet, tv_bottleneck = load_torchvision_resnet()
    with torch.device("meta"):
        full = {k: v.shape for k, v in tv_resnet(tv_bottleneck, [3, 4, 23, 3]).state_dict().items()}
        ours = {k: v.shape for k, v in extract.ResNet().state_dict().items()}
    assert full == ours | {"fc.weight": (1000, 2048), "fc.bias": (1000,)}  # resnet101: same names, same shapes
    reference = tv_resnet(tv_bottleneck, [1, 1, 1, 1]).eval()
    reference.load_state_dict(tiny_resnet_state_dict(seed=3))
    reference.fc = nn.Identity()
    ours = extract.build_imagenet_resnet(reference.state_dict() | {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # any size: global pooling
    with torch.no_grad():
        want, got = reference(x), ours(x)
    assert got.shape == (2, 2048) and (want - want.mean(0)).abs().max() > 1e-2  # depends on its input
    assert (got - want).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------
# weights: download, verify, cache, clear errors


def test_fetch_verifies_and_caches(tmp_path, monkeypatch):
    payload = tmp_path / "srv" / "w.pt"
    payload.parent.mkdir()
    payload.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    monkeypatch.setenv("DAP_CACHE", str(tmp_path / "cache"))
    assert extract.fetch(payload.as_uri(), digest).read_bytes() == b"weights"
    payload.unlink()  # cached: no second download
    assert extract.fetch(payload.as_uri(), digest) == tmp_path / "cache" / "w.pt"
    bad = tmp_path / "srv" / "bad.pt"
    bad.write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="does not match"):
        extract.fetch(bad.as_uri(), digest)
    assert not (tmp_path / "cache" / "bad.pt").exists()  # never kept, never unpickled


def test_fetch_without_network_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("DAP_CACHE", str(tmp_path))
    url = "http://127.0.0.1:9/ViT-B-32.pt"  # nothing listens on the discard port
    with pytest.raises(RuntimeError, match="--weights") as e:
        extract.fetch(url, "00")
    assert url in str(e.value)


def test_weights_for_another_input_size_are_refused(clip_ckpts):
    with pytest.raises(ValueError, match="224-px images, but RN50x4 is preprocessed to 288 px"):
        extract.load_backbone("RN50x4", clip_ckpts["rn"])


@pytest.mark.spec
def test_registry_urls_equal_openai_clip_models():
    """The CLIP URLs are those of openai/CLIP's clip.py _MODELS (read as text: `import clip` needs torchvision)."""
    path = Path(load_reference_clip().__file__).with_name("clip.py")
    tree = ast.parse(path.read_text())
    models = next(ast.literal_eval(n.value) for n in tree.body
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "_MODELS")
    for name in ["ViT-B/32", "ViT-B/16", "RN50", "RN101", "RN50x4"]:
        assert extract.BACKBONES[name].url == models[name]


def test_registry_urls_carry_their_hashes():
    for name, spec in extract.BACKBONES.items():
        assert spec.sha256 in spec.url, name
    assert extract.BACKBONES["resnet101"].url.endswith("resnet101-63fe2227.pth")  # IMAGENET1K_V1


def test_bad_weights_files(tmp_path):
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(ValueError, match="junk.pt"):
        extract.load_state_dict(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        extract.load_backbone("RN50", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown backbone"):
        extract.load_backbone("ViT-H/14", tmp_path / "junk.pt")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "notclip.pt")
    with pytest.raises(ValueError, match="not a CLIP checkpoint"):
        extract.load_backbone("ViT-B/32", tmp_path / "notclip.pt")


def test_load_matching_refuses_other_weights(clip_ckpts, resnet_ckpt):
    """The SHA-256 rule: features are only reproduced by the checkpoint that wrote them."""
    meta = {"backbone": "RN50", "weights_sha256": extract.sha256_file(clip_ckpts["rn"])}
    model, spec = extract.load_matching(meta, clip_ckpts["rn"])
    assert spec is extract.BACKBONES["RN50"] and model.output_dim == 64 and not model.training
    with pytest.raises(ValueError, match=f"weights {clip_ckpts['vit']} have SHA-256 [0-9a-f]{{64}}, but the "
                                         f"features were extracted with RN50 weights of SHA-256 {meta['weights_sha256']}"
                                         "; pass the checkpoint that wrote them with --weights"):
        extract.load_matching(meta, clip_ckpts["vit"])
    with pytest.raises(ValueError, match="unknown backbone 'ViT-H/14'"):
        extract.load_matching({**meta, "backbone": "ViT-H/14"}, clip_ckpts["rn"])
    with pytest.raises(ValueError, match="'resnet101' is not a CLIP backbone"):
        extract.load_matching({**meta, "backbone": "resnet101"}, resnet_ckpt, text=True)


def test_read_meta_names_the_file_and_what_is_wrong(tmp_path):
    (tmp_path / "meta.json").write_text('{"backbone": "RN50"}')
    assert extract.read_meta(tmp_path) == extract.read_meta(tmp_path / "meta.json") == {"backbone": "RN50"}
    (tmp_path / "cut.json").write_text('{"backbone": "RN')
    with pytest.raises(ValueError, match=f"^{tmp_path / 'cut.json'} is not valid JSON .*delete it$"):
        extract.read_meta(tmp_path / "cut.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'list.json'} holds a JSON list, not an object"):
        extract.read_meta(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match="nothere/meta.json"):
        extract.read_meta(tmp_path / "nothere" / "meta.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/meta.json"):
        extract.read_meta(tmp_path / "empty")


def test_decoding_runs_in_order_at_most_2_workers_videos_ahead(monkeypatch, tmp_path):
    """The worker pool, replaced by one that runs each job when it is submitted: the generator yields
    the videos in order, and besides the one it hands over, at most 2 * workers are submitted."""
    submitted, taken = [], []

    class Pool:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, *args):
            submitted.append(args[0])
            assert len(submitted) - len(taken) <= 2 * 3 + 1  # + 1: the one being handed over
            future = Future()
            future.set_result(fn(*args))
            return future

        def shutdown(self, **kwargs):
            pass

    monkeypatch.setattr(extract, "ProcessPoolExecutor", Pool)
    paths = [tmp_path / f"v{i}.mp4" for i in range(20)]  # missing files: each fails at once
    for path, samples, error in extract.decoded_videos(paths, 4, "RN50", workers=3):
        taken.append(path)
        assert samples is None and error == "VideoError: no such file"
        assert len(submitted) - len(taken) == min(2 * 3, len(paths) - len(taken))  # kept busy
    assert taken == paths and submitted == [str(p) for p in paths]
    assert [len(b) for b in extract.batches([(p, np.zeros((3, 1)), None) for p in paths], 8)] == [3] * 6 + [2]


# ----------------------------------------------------------------------------------------------
# the extraction loop


def reference_features(ref_model, video, n):
    """encode_image of the reference model on frames decoded by plain PyAV and preprocessed by PIL."""
    wanted = authors_uniform_ids(N_TEST_FRAMES, n)
    with av.open(str(video)) as c:
        frames = [f.to_image() for k, f in enumerate(c.decode(video=0)) if k in wanted]
    frames = [frames[sorted(set(wanted)).index(k)] for k in wanted]
    x = torch.tensor(np.stack([pil_clip_reference(f, (298, 224), (37, 0, 261, 224)) for f in frames]), dtype=torch.float32)
    with torch.no_grad():
        return ref_model.float().encode_image(x).numpy()


@pytest.mark.slow
def test_extract_end_to_end_equals_reference(clip_ckpts, tmp_path):
    """Video file -> .npy equals OpenAI's encode_image on the same frames; meta.json describes the run."""
    src = tmp_path / "in"
    src.mkdir()
    write_video(src / "v0.mp4", size=(320, 240))
    out = tmp_path / "out"
    summary = extract.extract([src / "v0.mp4"], out, "ViT-B/32", clip_ckpts["vit"], frames=6, workers=0, progress=False)
    assert summary["done"] == 1 and summary["failed"] == []
    got = np.load(out / "v0.npy")
    assert got.dtype == np.float32 and got.shape == (6, 64)
    want = reference_features(clip_ckpts["vit_model"].half().float(), src / "v0.mp4", 6)
    assert np.abs(got - want).max() < 1e-4
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backbone"] == "ViT-B/32" and meta["frames"] == 6 and meta["dtype"] == "fp32"
    assert meta["weights_sha256"] == hashlib.sha256(clip_ckpts["vit"].read_bytes()).hexdigest()
    assert meta["feature_dim"] == 64 and "bicubic" in meta["preprocessing"]


def make_videos(folder, names, video):
    """Copies of the test video under the given names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(video.read_bytes())
    return sorted(folder.iterdir())


@pytest.mark.slow
def test_resume_after_interruption(clip_ckpts, video, tmp_path, monkeypatch):
    videos = make_videos(tmp_path / "in", ["a.mp4", "b.mp4", "c.mp4"], video)
    out = tmp_path / "out"
    real_save, calls = extract.save_features, []

    def save_then_die(path, feats):
        if calls:
            raise KeyboardInterrupt  # killed while writing the second video
        calls.append(path)
        real_save(path, feats)

    monkeypatch.setattr(extract, "save_features", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract.extract(videos, out, "RN50", clip_ckpts["rn"], frames=4, batch_size=4, workers=0, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "meta.json"]  # no half-written files
    first = (out / "a.npy").stat().st_mtime_ns
    monkeypatch.setattr(extract, "save_features", real_save)
    summary = extract.extract(videos, out, "RN50", clip_ckpts["rn"], frames=4, batch_size=4, workers=0, progress=False)
    assert (summary["skipped"], summary["done"]) == (1, 2)
    assert (out / "a.npy").stat().st_mtime_ns == first
    np.testing.assert_array_equal(np.load(out / "a.npy"), np.load(out / "b.npy"))  # same video, same features
    with pytest.raises(ValueError, match="different run"):  # resuming with other settings is refused
        extract.extract(videos, out, "RN50", clip_ckpts["rn"], frames=8, workers=0, progress=False)
    (out / "meta.json").write_text('{"backbone": "RN50", "fra')  # cut short, e.g. by a full disk elsewhere
    with pytest.raises(ValueError, match=f"{out / 'meta.json'} is not valid JSON"):
        extract.extract(videos, out, "RN50", clip_ckpts["rn"], frames=4, workers=0, progress=False)


@pytest.mark.slow
def test_bad_files_are_reported_and_the_run_goes_on(clip_ckpts, video, tmp_path, capsys, monkeypatch):
    """Also: the default N is the authors' 60, and every file written has a plain open()'s permissions."""
    src = tmp_path / "in"
    make_videos(src, ["good.mp4"], video)
    (src / "empty.mp4").write_bytes(b"")
    (src / "notes.mp4").write_text("not a video\n")
    (src / "cut.mp4").write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    listing = tmp_path / "list.txt"
    listing.write_text(f"{src / 'missing.mp4'}\n")
    out = tmp_path / "out"
    umask = os.umask(0o022)
    try:
        rc = extract.main([str(src), "--list", str(listing), "--out", str(out), "--backbone", "RN50",
                           "--weights", str(clip_ckpts["rn"]), "--workers", "0", "--no_progress"])
    finally:
        os.umask(umask)
    assert rc == 1
    assert np.load(out / "good.npy").shape == (60, 64) and json.loads((out / "meta.json").read_text())["frames"] == 60
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()} == {
        name: "0o644" for name in ("good.npy", "meta.json", "failed.txt")}
    failed = dict(line.split("\t")[::2] for line in (out / "failed.txt").read_text().splitlines())
    assert sorted(failed) == ["cut", "empty", "missing", "notes"]
    assert "0 bytes" in failed["empty"] and "no such file" in failed["missing"]
    err = capsys.readouterr().err
    assert all(f"FAILED {v}" in err for v in failed)
    (src / "empty.mp4").write_bytes(video.read_bytes())  # fixed: the next run clears its failed.txt line
    extract.main([str(src), "--out", str(out), "--backbone", "RN50", "--weights", str(clip_ckpts["rn"]),
                  "--workers", "0", "--no_progress"])
    still = sorted(line.split("\t")[0] for line in (out / "failed.txt").read_text().splitlines())
    assert still == ["cut", "missing", "notes"]  # 'missing' was not in that run: its line stays


@pytest.mark.slow
def test_short_video_repeats_frames(clip_ckpts, video, tmp_path):
    out = tmp_path / "out"
    extract.extract([video], out, "RN50", clip_ckpts["rn"], frames=50, workers=0, progress=False)
    feats = np.load(out / "tiny.npy")
    assert feats.shape == (50, 64)
    idx = extract.sample_indices(N_TEST_FRAMES, 50)
    assert idx[:5].tolist() == [0, 0, 1, 2, 3]  # bounds int(0.8 i): 0, 0, 1, 2, 3, 4
    for i, j in [(0, 1), (1, 2), (2, 3)]:  # the same source frame gives the same feature, others differ
        # (to float tolerance: a row's position in a batched convolution may change its last bits)
        assert (idx[i] == idx[j]) == np.allclose(feats[i], feats[j], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_shards_split_and_workers_agree(clip_ckpts, video, tmp_path):
    videos = make_videos(tmp_path / "in", [f"v{i}.mp4" for i in range(3)], video)
    out = tmp_path / "out"
    s0 = extract.extract(videos, out, "RN50", clip_ckpts["rn"], frames=4, workers=0, shard=(0, 2), progress=False)
    assert sorted(p.name for p in out.glob("*.npy")) == ["v0.npy", "v2.npy"] and s0["done"] == 2
    s1 = extract.extract(videos, out, "RN50", clip_ckpts["rn"], frames=4, workers=2, shard=(1, 2), progress=False)
    assert s1["done"] == 1 and sorted(p.name for p in out.glob("*.npy")) == ["v0.npy", "v1.npy", "v2.npy"]
    np.testing.assert_allclose(np.load(out / "v1.npy"), np.load(out / "v0.npy"), atol=1e-6)  # worker processes
    with pytest.raises(ValueError, match="0 <= i < n"):
        extract.parse_shard("2/2")


@pytest.mark.slow
def test_resnet101_backbone_and_bf16(resnet_ckpt, video, tmp_path):
    out = tmp_path / "out"
    extract.extract([video], out, "resnet101", resnet_ckpt, frames=3, workers=0, progress=False)
    feats = np.load(out / "tiny.npy")
    model = extract.build_imagenet_resnet(torch.load(resnet_ckpt, weights_only=True))
    spec = extract.BACKBONES["resnet101"]
    frames = extract.decode_frames(video, 3, spec.preprocess)
    with torch.no_grad():
        want = model(spec.to_input(torch.from_numpy(frames))).numpy()
    assert feats.shape == (3, 512) and np.abs(feats - want).max() < 1e-4
    extract.extract([video], tmp_path / "bf16", "resnet101", resnet_ckpt, frames=3, workers=0, dtype="bf16", progress=False)
    low = np.load(tmp_path / "bf16" / "tiny.npy")
    assert low.dtype == np.float32 and np.abs(low - feats).max() < 0.05 * np.abs(feats).max()


def test_find_videos(tmp_path, video):
    make_videos(tmp_path / "a" / "b", ["x.mp4", "y.MKV"], video)
    (tmp_path / "a" / "readme.txt").write_text("x")
    assert [p.name for p in extract.find_videos([tmp_path / "a"])] == ["x.mp4", "y.MKV"]
    make_videos(tmp_path / "c", ["x.avi"], video)
    with pytest.raises(ValueError, match="share the video_id 'x'"):
        extract.find_videos([tmp_path / "a", tmp_path / "c"])


def test_atomic_write_has_plain_open_permissions_and_leaves_nothing_when_it_fails(tmp_path):
    umask = os.umask(0o022)
    try:
        extract.atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("kept"))
    finally:
        os.umask(umask)
    assert oct(stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)) == "0o644"  # as open(), not mkstemp's 0o600

    def disk_full(tmp):
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as e:
        extract.atomic_write(tmp_path / "a.txt", disk_full)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "a.txt")  # names the file
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "kept"


@pytest.mark.slow
def test_io_errors_end_with_one_line_naming_the_file_and_exit_2(clip_ckpts, video, tmp_path, capsys, monkeypatch):
    """--out is a file; the disk fills up after the first video: exit 2, no traceback, nothing written is lost."""
    videos = make_videos(tmp_path / "in", ["a.mp4", "b.mp4"], video)
    args = [*map(str, videos), "--backbone", "RN50", "--weights", str(clip_ckpts["rn"]), "--frames", "4",
            "--batch_size", "4", "--workers", "0", "--no_progress", "--out"]
    (tmp_path / "file").write_text("not a folder")
    assert extract.main([*args, str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {tmp_path / 'file'}: File exists"
    out, save = tmp_path / "out", np.save

    def disk_full_after_one_video(f, arr):
        if (out / "a.npy").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        save(f, arr)

    monkeypatch.setattr(np, "save", disk_full_after_one_video)
    assert extract.main([*args, str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {out / 'b.npy'}: No space left on device"
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "meta.json"]  # no half-written file, no .tmp
    assert np.load(out / "a.npy").shape == (4, 64)


@pytest.mark.slow
def test_runs_that_cannot_start_leave_no_output_folder(video, tmp_path, capsys):
    (tmp_path / "junk.pt").write_text("not weights")
    assert extract.main([str(video), "--out", str(tmp_path / "out"), "--weights", str(tmp_path / "junk.pt")]) == 2
    assert "junk.pt: neither a TorchScript archive nor a state_dict" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error
        extract.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert "no videos given" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "junk.pt"]


def live_children(pid):
    """PIDs of the live (not zombie) processes whose parent is `pid`, from Linux's /proc."""
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat_file.parent.name))
    return children


def is_alive(pid):
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_kill_9_leaves_no_worker_processes_behind(clip_ckpts, video, tmp_path):
    """kill -9 of extract.py mid-run: its decode workers and multiprocessing's resource tracker end too, instead
    of living on, re-parented to PID 1."""
    if not Path("/proc/self/stat").is_file():
        pytest.skip("lists child processes through Linux's /proc, which this system does not have")
    make_videos(tmp_path / "in", [f"v{i}.mp4" for i in range(40)], video)
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, extract.__file__, str(tmp_path / "in"), "--out", str(out), "--backbone",
                            "RN50", "--weights", str(clip_ckpts["rn"]), "--frames", "4", "--batch_size", "4",
                            "--workers", "2", "--no_progress"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(out.glob("*.npy")) and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # until the workers have decoded and the first features are written
        children = live_children(run.pid)
        assert run.poll() is None and len(children) >= 2, "the run was not caught while its workers ran"
    finally:
        run.kill()
        run.wait()
    deadline = time.time() + 10
    while any(map(is_alive, children)) and time.time() < deadline:
        time.sleep(0.1)
    left = [pid for pid in children if is_alive(pid)]
    for pid in left:  # do not leave them running after a failure either
        os.kill(pid, 9)
    assert not left, f"{len(left)} of the {len(children)} child processes outlived the killed run"


# ----------------------------------------------------------------------------------------------
# the real videos in ../shared


@pytest.mark.slow
def test_shared_videos_decode(shared_dir):
    """720p with audio, no audio, 176x144: the sampled frames equal a plain PyAV decode at those indices."""
    preprocess = extract.BACKBONES["ViT-B/32"].preprocess
    for name, count in [("bigbuckbunny.mp4", 132), ("bikes.mp4", 250), ("carphone.mp4", 120)]:
        path = shared_dir / "data" / "videos" / name
        frames = extract.decode_frames(path, 28, preprocess)
        wanted = authors_uniform_ids(count, 28)
        ref, decoded = {}, 0
        with av.open(str(path)) as c:
            for frame in c.decode(video=0):
                if decoded in wanted:
                    ref[decoded] = preprocess(frame.to_image())
                decoded += 1
        assert decoded == count, name
        assert frames.shape == (28, 224, 224, 3)
        np.testing.assert_array_equal(frames, np.stack([ref[k] for k in wanted]), err_msg=name)


@pytest.mark.slow
def test_long_720p_video_decodes_in_bounded_memory(shared_dir):
    """The 55-s 720p trailer (1,323 frames, 3.6 GB as RGB) decodes with a small peak RSS increase."""
    path = shared_dir / "data" / "videos" / "trailer_bbb.mp4"
    code = ("import resource, sys, extract\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "x = extract.decode_frames(sys.argv[1], 28, extract.BACKBONES['ViT-B/32'].preprocess)\n"
            "print(x.shape[0], before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=Path(extract.__file__).parent)
    assert res.returncode == 0, res.stderr
    n, before_kb, after_kb = map(int, res.stdout.split())
    assert n == 28
    assert (after_kb - before_kb) / 1024 < 200, f"peak RSS grew by {(after_kb - before_kb) / 1024:.0f} MiB"


# ----------------------------------------------------------------------------------------------
# train.py trains on what extract.py wrote


@pytest.mark.slow
def test_train_reads_extracted_features(clip_ckpts, video, tmp_path):
    """A tiny MSR-VTT-format dataset whose image features come from extract.py; one epoch of train.py."""
    train = pytest.importorskip("train")
    ids = [f"video{i}" for i in range(6)]
    splits = ["train", "train", "train", "validate", "test", "test"]
    words = ["a man is cooking food", "a dog runs in a park", "a man is playing a guitar"]
    info = {"info": {}, "videos": [{"video_id": v, "category": i % 2, "split": s, "id": i} for i, (v, s) in enumerate(zip(ids, splits))],
            "sentences": [{"video_id": v, "caption": words[(i + k) % 3], "sen_id": 3 * i + k} for i, v in enumerate(ids) for k in range(3)]}
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "videodatainfo.json").write_text(json.dumps(info))
    videos = make_videos(tmp_path / "videos", [f"{v}.mp4" for v in ids], video)
    assert extract.main([*map(str, videos), "--out", str(tmp_path / "feats"), "--backbone", "ViT-B/32", "--weights",
                         str(clip_ckpts["vit"]), "--frames", "4", "--workers", "0", "--no_progress"]) == 0
    metrics = train.main(["--dataset", "msrvtt", "--data", str(tmp_path / "ann"), "--feats", f"image={tmp_path / 'feats'}",
                          "--epochs", "1", "--d_model", "32", "--n_frames", "4", "--n_attributes", "5", "--batch_size", "4",
                          "--beam_size", "1", "--no_progress", "--out", str(tmp_path / "run")])
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["n_videos"] == 2 and record["dataset"] == "msrvtt"
    assert "CIDEr" in metrics
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["feature_dims"] == {"image": 64}  # the tiny CLIP's 64-d features were read


# ----------------------------------------------------------------------------------------------
# runs beside each other, bad options, interrupts, odd file names

META = {"backbone": "RN50", "frames": 4, "dtype": "fp32", "frame_sampling": extract.FRAME_RULE,
        "preprocessing": "x"}


def test_two_runs_on_one_out_cannot_both_write_meta_json(tmp_path, monkeypatch):
    """W3: two runs with other --weights on one --out (shards started together) both found no
    meta.json, both wrote theirs, and their features mixed under one meta.json. The check and the
    write now hold a lock on the folder: the second run waits, finds the first one's meta.json and
    is refused."""
    real_write, late = extract.write_text, []

    def first_run_writes_slowly(path, text):  # the second run starts between check and write
        if not late:
            late.append(threading.Thread(target=lambda: late.append(second_run())))
            late[0].start()
            late[0].join(0.5)
            assert late[0].is_alive(), "the second run did not wait for the first one's meta.json"
        real_write(path, text)

    def second_run():
        try:
            extract.write_meta(tmp_path, {**META, "weights_sha256": "b"})
        except ValueError as e:
            return e

    monkeypatch.setattr(extract, "write_text", first_run_writes_slowly)
    extract.write_meta(tmp_path, {**META, "weights_sha256": "a"})
    late[0].join(10)
    assert re.match(r".*meta\.json was written by a different run \(\{'weights_sha256': "
                    r"\('a', 'b'\)\}", str(late[1]))
    assert extract.read_meta(tmp_path)["weights_sha256"] == "a"
    assert os.listdir(tmp_path) == ["meta.json"]  # the lock adds no file


@pytest.mark.parametrize("option", [("--batch_size", "0"), ("--batch_size", "-1"),
                                    ("--workers", "-1"), ("--frames", "0"), ("--frames", "100000")])
def test_bad_options_are_one_line_before_anything_is_loaded_or_written(tmp_path, option, capsys):
    """U3: --batch_size 0/-1 and --workers -1 ended in library messages after meta.json was
    written; --frames 100000 on a 40-frame video ran out of memory at 24 GB. Now one line, exit 2,
    no folder, no download (no --weights here); --help states the bound on --frames."""
    out = tmp_path / "out"
    assert extract.main([str(tmp_path / "v.mp4"), "--out", str(out), "--no_progress", *option]) == 2
    err = capsys.readouterr().err.splitlines()
    need = f"need 1 <= --frames <= {extract.MAX_FRAMES}, --batch_size >= 1, --workers >= 0; got"
    assert len(err) == 1 and err[0].startswith(f"error: {need}")
    assert not out.exists()
    with pytest.raises(SystemExit):
        extract.main(["--help"])
    assert f"at most {extract.MAX_FRAMES}" in " ".join(capsys.readouterr().out.split())


def test_atomic_write_names_its_target_and_leaves_nothing_after_an_interrupt(tmp_path, monkeypatch):
    """U2: on a read-only --out the temporary file is never created, and removing it fails too
    (EROFS, not ENOENT): that error, naming the temporary, replaced the real one. U1: SIGTERM (which
    extract.py and train.py turn into SystemExit and KeyboardInterrupt) or Ctrl-C in the middle of
    a write leaves no temporary file."""
    def read_only(tmp):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp))

    def unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with monkeypatch.context() as m:  # root ignores permissions: the read-only folder is simulated
        m.setattr(Path, "unlink", unlink)
        with pytest.raises(OSError) as e:
            extract.atomic_write(tmp_path / "a.npy", read_only)
    assert (e.value.errno, e.value.filename) == (errno.EROFS, str(tmp_path / "a.npy"))
    for interrupt in (SystemExit(143), KeyboardInterrupt()):
        def cut_short(tmp):
            Path(tmp).write_text("half")
            raise interrupt

        with pytest.raises(type(interrupt)):
            extract.atomic_write(tmp_path / "b.txt", cut_short)
        assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_in_the_middle_of_a_write_leaves_no_temporary(clip_ckpts, video, tmp_path):
    """U1: extract.py killed with SIGTERM (here: sent by np.save itself, mid-write) left
    .a.npy.<hex>.tmp behind; its handler now ends it through SystemExit, status 143, and the
    temporary is removed; a rerun resumes."""
    make_videos(tmp_path / "in", ["a.mp4"], video)
    out, args = tmp_path / "out", [str(tmp_path / "in"), "--backbone", "RN50", "--weights",
                                   str(clip_ckpts["rn"]), "--frames", "4", "--workers", "0",
                                   "--no_progress"]
    code = ("import os, runpy, signal, sys, time, numpy as np\nsave = np.save\n"
            "def save_then_sigterm(f, a):\n    save(f, a)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n"
            f"np.save = save_then_sigterm\n"
            f"sys.argv = {[extract.__file__, *args, '--out', str(out)]!r}\n"
            f"runpy.run_path({extract.__file__!r}, run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 143 and "Traceback" not in run.stderr, run.stderr
    assert sorted(os.listdir(out)) == ["meta.json"]
    assert extract.main([*args, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["a.npy", "meta.json"]


def test_a_symlink_loop_named_explicitly_fails_alone(tmp_path, video):
    """U6: Path.resolve raised on a symlink loop named on the command line (or in --list): the
    whole run ended; now that video fails, with its reason."""
    loop = tmp_path / "loop.mp4"
    loop.symlink_to(loop)
    assert extract.find_videos([str(loop), str(video)]) == [loop, video]
    assert extract.decode_job(str(loop), 4, "RN50", 1) == (
        None, "VideoError: a broken or looping symlink")


def test_a_newline_or_tab_in_a_name_stays_on_its_line_of_failed_txt_and_silent_txt(tmp_path,
                                                                                   capsys):
    """U7: a newline in a video's file name split its failed.txt record (and its silent.txt line)
    in two; names are escaped (backslash, tab, newline, CR), and a later run still finds the
    fixed ones."""
    odd = [Path("dir\nx") / "new\nline.mp4", Path("tab\there.mp4"), Path("back\\slash.mp4")]
    for path in odd:
        extract.record_failure(tmp_path, path, "VideoError: zero decodable\nvideo frames")
    why = "VideoError: zero decodable video frames"
    assert [line.split("\t") for line in (tmp_path / "failed.txt").read_text().splitlines()] == [
        [r"new\nline", r"dir\nx/new\nline.mp4", why], [r"tab\there", r"tab\there.mp4", why],
        [r"back\\slash", r"back\\slash.mp4", why]]
    assert len(capsys.readouterr().err.splitlines()) == 3
    np.save(tmp_path / "new\nline.npy", np.zeros((4, 2), np.float32))  # fixed by a later run
    extract.compact_failures(tmp_path)
    failed = (tmp_path / "failed.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in failed] == [r"tab\there", r"back\\slash"]
    (tmp_path / "meta.json").write_text("{}")
    extract.append_line(tmp_path / "silent.txt", "new\nline".translate(extract.ESCAPE))
    extract.list_silent(tmp_path)
    assert extract.read_meta(tmp_path)["silent"] == ["new\nline"]
