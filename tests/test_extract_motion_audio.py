"""extract.py's motion (3D ResNeXt-101, Kinetics) and audio (VGGish, AudioSet) backbones: public checkpoint
formats, conformance with the reference implementations, front ends, and the extraction loop.

No pretrained weights exist on the test machines, so every check runs on random weights saved in the public
checkpoint formats.
- VGGish and its log-mel front end are torchvggish's (PyPI torchvggish 0.2); what is ours is checked against it:
  vggish-pca equals its Postprocessor; the log-mel examples centred on given times equal its waveform_to_examples
  on a synthetic two-tone signal at 16 kHz (1e-5), and are centred, clamped and zero-padded as documented.
- Audio decoding: the channel mean of 16-bit PCM is exact; 44.1 kHz is resampled to 16 kHz exactly as the
  reference does (resampy); on the real AAC (5.1, 48 kHz) and MP3 (stereo, 44.1 kHz) soundtracks in ../shared,
  extract.py's features equal torchvggish's whole pipeline (atol 1e-5; they were equal to the bit). The silent
  real videos have no soundtrack.
- 3D ResNeXt-101: its state_dict has exactly the 522 keys and shapes of the public checkpoint (written out from
  the reference code's rules, with the `module.` prefix and no num_batches_tracked); a checkpoint saved in that
  format ({'epoch', 'arch', 'state_dict', 'optimizer'}) loads strictly; a reduced network with the same block
  structure equals an independent functional forward written directly on the checkpoint's tensors; the full
  ResNeXt-101 gives a 2048-d feature for one 16 x 112 x 112 clip. The reference 3D ResNeXt code is not a package,
  so it is not run itself.
- End to end: extract.py on generated videos equals a step-by-step reference (plain PyAV decoding, PIL transforms,
  the model) for motion and audio; a silent video gives zeros and the "silent" list (names with spaces too)
  survives resumed and sharded runs; image, motion and audio features extracted from generated videos train
  train.py's model for the three settings of the paper's modality table (the loss falls).
Tests marked slow run extract.py end to end or the full-size networks; pytest -m "not slow" skips them.
"""
import hashlib
import json
import math
from collections import OrderedDict

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import extract
from conftest import (authors_uniform_ids, load_reference_clip, mux_pcm, pcm16, save_public_resnext_checkpoint,
                      write_video)


# -----------------------------------------------------------------------------
# helpers


def torchvggish_modules():
    """The reference implementation: PyPI's torchvggish 0.2 (model, input pipeline, mel features)."""
    pytest.importorskip("torchvggish", reason="needs the reference torchvggish: pip install -r requirements.txt")
    import torchvggish.mel_features as mel_features
    import torchvggish.torchvggish as model
    import torchvggish.vggish_input as vggish_input

    return model, vggish_input, mel_features


def write_audio(path, wave, sample_rate):
    """Write a (C, S) float waveform in [-1, 1] as 16-bit PCM WAV with PyAV; returns the int16 samples."""
    with av.open(str(path), "w") as container:
        mux_pcm(container, pcm16(wave), sample_rate)
    return pcm16(wave)


def randomise_batchnorm(model, seed=0):
    """Non-trivial BatchNorm statistics and affine weights, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def reference_checkpoint_keys(layers=(3, 4, 23, 3), cardinality=32):
    """Key -> shape of a 3D-ResNets-PyTorch ResNeXt checkpoint, from the reference's rules (models/resnext.py, 2018).

    mid = cardinality * (planes / 32), out = 2 * planes for planes 128, 256, 512, 1024; conv2 is grouped;
    shortcut type B adds downsample.0 (conv) and downsample.1 (BN) to each stage's first block;
    fc in_features = cardinality * 32 * 2. BatchNorm keys: weight, bias, running_mean, running_var
    (2018 files have no num_batches_tracked). Every key is prefixed with `module.` (nn.DataParallel).
    """
    keys = OrderedDict()

    def bn(name, n):
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"module.{name}.{s}"] = (n,)

    keys["module.conv1.weight"] = (64, 3, 7, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (depth, planes) in enumerate(zip(layers, (128, 256, 512, 1024)), start=1):
        mid, out = cardinality * (planes // 32), planes * 2
        for b in range(depth):
            p = f"layer{stage}.{b}"
            keys[f"module.{p}.conv1.weight"] = (mid, inplanes, 1, 1, 1)
            bn(f"{p}.bn1", mid)
            keys[f"module.{p}.conv2.weight"] = (mid, mid // cardinality, 3, 3, 3)
            bn(f"{p}.bn2", mid)
            keys[f"module.{p}.conv3.weight"] = (out, mid, 1, 1, 1)
            bn(f"{p}.bn3", out)
            if b == 0:
                keys[f"module.{p}.downsample.0.weight"] = (out, inplanes, 1, 1, 1)
                bn(f"{p}.downsample.1", out)
            inplanes = out
    keys["module.fc.weight"] = (400, cardinality * 32 * 2)
    keys["module.fc.bias"] = (400,)
    return keys


def functional_resnext(state, x, layers, cardinality=32):
    """Reference forward written from the public description, directly on a checkpoint's state_dict."""
    s = {k.removeprefix("module."): v for k, v in state.items()}

    def bn(name, y):
        return F.batch_norm(y, s[f"{name}.running_mean"], s[f"{name}.running_var"],
                            s[f"{name}.weight"], s[f"{name}.bias"], training=False, eps=1e-5)

    y = F.relu(bn("bn1", F.conv3d(x, s["conv1.weight"], stride=(1, 2, 2), padding=3)))
    y = F.max_pool3d(y, kernel_size=3, stride=2, padding=1)
    for stage, depth in enumerate(layers, start=1):
        for b in range(depth):
            p = f"layer{stage}.{b}"
            stride = 2 if (stage > 1 and b == 0) else 1
            z = F.relu(bn(f"{p}.bn1", F.conv3d(y, s[f"{p}.conv1.weight"])))
            z = F.conv3d(z, s[f"{p}.conv2.weight"], stride=stride, padding=1, groups=cardinality)
            z = F.relu(bn(f"{p}.bn2", z))
            z = bn(f"{p}.bn3", F.conv3d(z, s[f"{p}.conv3.weight"]))
            if f"{p}.downsample.0.weight" in s:
                y = bn(f"{p}.downsample.1", F.conv3d(y, s[f"{p}.downsample.0.weight"], stride=stride))
            y = F.relu(z + y)
    t, h, w = y.shape[2:]
    return F.avg_pool3d(y, (t, h, w), stride=1).flatten(1)  # AvgPool3d over the whole final map


# -----------------------------------------------------------------------------
# 3D ResNeXt-101


@pytest.mark.spec
def test_resnext101_state_dict_has_the_public_checkpoint_keys_and_shapes():
    expected = reference_checkpoint_keys()
    ours = OrderedDict(("module." + k, tuple(v.shape)) for k, v in extract.ResNeXt3D().state_dict().items()
                       if not k.endswith("num_batches_tracked"))
    assert len(expected) == 522
    assert ours == expected  # same names, same shapes, same order
    # spot checks written out by hand from the reference code
    assert expected["module.layer1.0.conv2.weight"] == (128, 4, 3, 3, 3)  # 128 channels in 32 groups of 4
    assert expected["module.layer3.22.conv3.weight"] == (1024, 512, 1, 1, 1)
    assert expected["module.layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1, 1)
    assert expected["module.fc.weight"] == (400, 2048)


@pytest.mark.spec
def test_reduced_resnext_matches_functional_reference_after_loading_public_format(tmp_path):
    layers = (2, 1, 1, 2)  # ResNeXt-101's blocks, fewer of them: blocks with and without a shortcut conv
    torch.manual_seed(0)
    source = randomise_batchnorm(extract.ResNeXt3D(layers)).eval()
    path = save_public_resnext_checkpoint(source, tmp_path / "resnext.pth")
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint["state_dict"]) == list(reference_checkpoint_keys(layers))

    model = extract.build_resnext3d(extract.load_state_dict(path))  # extract's loader takes checkpoint["state_dict"]
    assert [len(model.get_submodule(f"layer{i}")) for i in (1, 2, 3, 4)] == list(layers)
    assert model.layer1[0].conv2.groups == 32 and model.fc.out_features == 400 and model.output_dim == 2048
    x = torch.randn(2, 3, 16, 32, 32)
    with torch.no_grad():
        ours = model(x)
        ref = functional_resnext(checkpoint["state_dict"], x, layers)
    assert ours.shape == (2, 2048)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert ours.std() > 0  # a real, non-constant feature


@pytest.mark.slow
def test_full_resnext101_loads_the_public_format_and_gives_2048_d(tmp_path):
    torch.manual_seed(1)
    source = randomise_batchnorm(extract.ResNeXt3D(), seed=1).eval()
    path = save_public_resnext_checkpoint(source, tmp_path / "resnext-101-kinetics.pth")
    model, spec, _ = extract.load_backbone("resnext101-kinetics", path)
    assert spec.kind == "clips" and spec.dim == model.output_dim == 2048
    loaded, original = model.state_dict(), source.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in loaded if not k.endswith("num_batches_tracked"))
    with torch.no_grad():  # one 16 x 112 x 112 clip through all 101 layers (about 3 s on 2 CPU cores)
        feature = model(torch.randn(1, 3, 16, 112, 112))
    assert feature.shape == (1, 2048) and torch.isfinite(feature).all() and feature.std() > 0


def test_resnext_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a 3D-ResNets-PyTorch ResNeXt"):
        extract.build_resnext3d({"layer1.0.conv2.weight": torch.zeros(64, 64, 3, 3)})  # a 2D torchvision ResNet
    state = OrderedDict(("module." + k, v) for k, v in extract.ResNeXt3D((1, 1, 1, 1)).state_dict().items())
    del state["module.layer2.0.bn3.running_var"]
    with pytest.raises(RuntimeError, match="layer2.0.bn3.running_var"):
        extract.build_resnext3d(state)
    (tmp_path / "junk.pth").write_text("hello")
    with pytest.raises(ValueError, match="junk.pth"):
        extract.load_backbone("resnext101-kinetics", tmp_path / "junk.pth")


@pytest.mark.spec
def test_clip_indices_centre_shift_and_loop():
    idx = extract.clip_indices(np.array([0, 50, 99]), 100, 16)
    assert idx.tolist() == [list(range(0, 16)), list(range(42, 58)), list(range(84, 100))]
    assert extract.clip_indices(np.array([2]), 5, 16).tolist() == [[i % 5 for i in range(16)]]  # LoopPadding


@pytest.mark.spec
def test_kinetics_preprocess_and_input():
    spec, rng = extract.BACKBONES["resnext101-kinetics"], np.random.default_rng(0)
    # already 112 on the shorter side: no resize, a centre crop x0 = round((150 - 112) / 2) = 19
    frame = rng.integers(0, 256, (112, 150, 3), dtype=np.uint8)
    np.testing.assert_array_equal(spec.preprocess(Image.fromarray(frame)), frame[:, 19:131])
    # a uniform frame stays uniform through the bilinear resize
    uniform = np.zeros((240, 320, 3), np.uint8) + np.array([200, 100, 50], np.uint8)
    assert np.all(spec.preprocess(Image.fromarray(uniform)) == [200, 100, 50])
    # portrait: width to 112, height int(112 * 300 / 200) = 168, rows 28..140 of the resized image
    tall = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    np.testing.assert_array_equal(spec.preprocess(tall), np.asarray(tall.resize((112, 168), Image.BILINEAR))[28:140])
    clips = torch.from_numpy(rng.integers(0, 256, (2, 16, 112, 112, 3), dtype=np.uint8))
    x = spec.to_input(clips)
    assert x.shape == (2, 3, 16, 112, 112) and x.dtype == torch.float32
    assert x[1, 2, 5, 7, 9].item() == pytest.approx(clips[1, 5, 7, 9, 2].item() - 99.4750, abs=1e-4)  # std 1


# -----------------------------------------------------------------------------
# VGGish


@pytest.mark.spec
def test_log_mel_examples_equal_reference_waveform_to_examples_on_a_tone():
    """The reference cuts consecutive 0.96 s examples; ours centred on 0.48, 1.44, 2.40 s are the same ones."""
    _, vggish_input, _ = torchvggish_modules()
    t = np.arange(int(3.5 * 16000)) / 16000
    wave = 0.5 * np.sin(2 * np.pi * 1000 * t) + 0.1 * np.sin(2 * np.pi * 3100 * t)  # 3.5 s, two tones
    ref = vggish_input.waveform_to_examples(wave, 16000, return_tensor=False)  # (3, 96, 64)
    ours = extract.segment_log_mel(wave, [0.48, 1.44, 2.40])
    assert ours.shape == (3, 1, 96, 64)
    np.testing.assert_allclose(ours[:, 0], ref, rtol=0, atol=1e-5)


def reference_log_mel(wave):
    """torchvggish's log mel of a whole 16 kHz track, frames 10 ms apart: (F, 64) float32."""
    _, vggish_input, mel_features = torchvggish_modules()
    p = vggish_input.vggish_params
    return mel_features.log_mel_spectrogram(
        wave, audio_sample_rate=16000, log_offset=p.LOG_OFFSET, window_length_secs=p.STFT_WINDOW_LENGTH_SECONDS,
        hop_length_secs=p.STFT_HOP_LENGTH_SECONDS, num_mel_bins=p.NUM_MEL_BINS, lower_edge_hertz=p.MEL_MIN_HZ,
        upper_edge_hertz=p.MEL_MAX_HZ).astype(np.float32)


def test_segment_log_mel_windows_are_centred_clamped_and_padded():
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(5 * 16000) * 0.1  # 5 s -> 491 frames
    full = reference_log_mel(wave)
    seg = extract.segment_log_mel(wave, [2.5, 0.1, 4.95])
    assert seg.shape == (3, 1, 96, 64) and seg.dtype == np.float32
    np.testing.assert_array_equal(seg[0, 0], full[250 - 48:250 + 48])  # centred on frame 250
    np.testing.assert_array_equal(seg[1, 0], full[:96])  # shifted inside at the start
    np.testing.assert_array_equal(seg[2, 0], full[-96:])  # ... and at the end
    short = rng.standard_normal(8000) * 0.1  # 0.5 s: zero-padded to 15600 samples = 96 frames
    padded = reference_log_mel(np.concatenate([short, np.zeros(15600 - 8000)]))
    np.testing.assert_array_equal(extract.segment_log_mel(short, [0.25, 0.25])[:, 0], np.stack([padded, padded]))


@pytest.fixture(scope="module")
def release_vggish(tmp_path_factory):
    """The reference torchvggish VGG with random weights, and its state_dict saved as the release file."""
    reference, _, _ = torchvggish_modules()
    torch.manual_seed(0)
    model = reference.VGG(reference.make_layers(), postprocess=False).eval()
    for p in model.parameters():  # small weights so the ReLU stack neither dies nor explodes
        p.data.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("vggish") / "vggish-10086976.pth"
    torch.save(model.state_dict(), path)  # keys features.*, embeddings.*
    return model, path


@pytest.mark.spec
def test_vggish_pca_postprocessing_equals_reference(release_vggish, tmp_path, monkeypatch):
    reference, _, _ = torchvggish_modules()
    rng = np.random.default_rng(0)
    params = {"pca_eigen_vectors": rng.standard_normal((128, 128)) * 0.5, "pca_means": rng.standard_normal(128) * 0.01}
    pca_file = tmp_path / "vggish_pca_params-970ea276.pth"  # in the cache under the release's name
    torch.save(params, pca_file)  # the release stores numpy arrays
    monkeypatch.setenv("DAP_CACHE", str(tmp_path))
    monkeypatch.setattr(extract, "VGGISH_PCA_SHA256",  # our random file's hash, not the release's
                        hashlib.sha256(pca_file.read_bytes()).hexdigest()[:8])
    ours, spec, _ = extract.load_backbone("vggish-pca", release_vggish[1])
    assert spec.kind == "audio" and ours.output_dim == spec.dim == 128
    pproc = object.__new__(reference.Postprocessor)  # its __init__ downloads; set its two tensors by hand
    pproc._pca_matrix = torch.as_tensor(params["pca_eigen_vectors"]).float()
    pproc._pca_means = torch.as_tensor(params["pca_means"].reshape(-1, 1)).float()
    embeddings = torch.rand(5, 128) * 3
    torch.testing.assert_close(ours[1](embeddings), pproc.postprocess(embeddings))
    with torch.no_grad():
        out = ours(torch.randn(2, 1, 96, 64))
    assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())


def test_vggish_bad_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a torchvggish VGGish"):
        extract.build_vggish({"conv1.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="embeddings.4.weight"):
        extract.build_vggish({"embeddings.4.weight": torch.zeros(64, 4096)})
    torch.save({"pca_means": np.zeros(128)}, tmp_path / "pca.pth")
    with pytest.raises(ValueError, match="pca.pth.*pca_eigen_vectors"):
        extract.load_vggish_pca(tmp_path / "pca.pth")
    torch.save({"pca_eigen_vectors": np.zeros((128, 64)), "pca_means": np.zeros(128)}, tmp_path / "pca.pth")
    with pytest.raises(ValueError, match=r"pca.pth.*\(128, 64\)"):
        extract.load_vggish_pca(tmp_path / "pca.pth")


# -----------------------------------------------------------------------------
# audio decoding


@pytest.mark.spec
def test_decode_audio_averages_channels_at_16khz(tmp_path):
    """A 16 kHz WAV as torchvggish's wavfile_to_examples reads it: int16 / 32768, np.mean over channels."""
    t = np.arange(16000) / 16000
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.2 * np.cos(2 * np.pi * 97 * t)])
    pcm = write_audio(tmp_path / "a.wav", stereo, 16000)
    wave, start = extract.decode_audio(tmp_path / "a.wav")
    assert start == 0.0
    np.testing.assert_array_equal(wave, np.mean(pcm.T / 32768.0, axis=1))


@pytest.mark.spec
def test_decode_audio_resamples_44k1_stereo_to_16k_as_the_reference(tmp_path):
    import resampy

    t = np.arange(2 * 44100) / 44100  # 2 s
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 440 * t)])
    pcm = write_audio(tmp_path / "a.wav", stereo, 44100)
    wave, _ = extract.decode_audio(tmp_path / "a.wav")
    assert wave.shape == (32000,) and wave.dtype == np.float64
    np.testing.assert_array_equal(wave, resampy.resample(np.mean(pcm.T / 32768.0, axis=1), 44100, 16000))
    ideal = 0.4 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)  # the channel mean, at 16 kHz
    assert np.abs(wave - ideal)[1000:-1000].max() < 1e-4  # away from the filter's edges


def test_decode_audio_of_a_video_without_soundtrack_is_none(tmp_path):
    write_video(tmp_path / "silent.mp4")
    assert extract.decode_audio(tmp_path / "silent.mp4") is None


def test_weights_without_direct_download_and_release_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("DAP_CACHE", str(tmp_path))
    spec = extract.BACKBONES["resnext101-kinetics"]
    with pytest.raises(RuntimeError, match="no direct download.*resnext-101-kinetics.pth.*--weights") as e:
        extract.fetch(spec.url, spec.sha256, spec.file)  # never tries to "download" the Google Drive folder page
    assert spec.url in str(e.value)
    (tmp_path / "resnext-101-kinetics.pth").write_bytes(b"put there by hand")
    assert extract.fetch(spec.url, spec.sha256, spec.file) == tmp_path / "resnext-101-kinetics.pth"
    for name in ("vggish", "vggish-pca"):  # torchvggish's release names carry SHA-256 prefixes
        assert extract.BACKBONES[name].url.endswith(f"vggish-{extract.BACKBONES[name].sha256}.pth")
    assert extract.VGGISH_PCA_URL.endswith(f"vggish_pca_params-{extract.VGGISH_PCA_SHA256}.pth")


# -----------------------------------------------------------------------------
# the extraction loop: video files -> .npy, against a reference computed step by step


@pytest.mark.slow
def test_motion_extraction_equals_step_by_step_reference(tmp_path):
    """Video -> 16-frame clips at the segment centres -> 3D-ResNets transform -> ResNeXt -> .npy."""
    write_video(tmp_path / "v.mkv", size=(320, 240))
    torch.manual_seed(0)
    source = randomise_batchnorm(extract.ResNeXt3D((1, 1, 1, 1), cardinality=1)).eval()  # same layout, thin
    ckpt = save_public_resnext_checkpoint(source, tmp_path / "tiny-resnext.pth")
    out = tmp_path / "motion"
    summary = extract.extract([tmp_path / "v.mkv"], out, "resnext101-kinetics", ckpt, frames=3, batch_size=2,
                              workers=0, progress=False)
    assert summary["done"] == 1 and summary["failed"] == []
    got = np.load(out / "v.npy")
    assert got.shape == (3, 2048) and got.dtype == np.float32

    with av.open(str(tmp_path / "v.mkv")) as c:  # reference: every frame with plain PyAV and PIL
        frames = [f.to_image() for f in c.decode(video=0)]
    assert len(frames) == 40
    idx = extract.clip_indices(np.array([6, 19, 33]), 40, 16)  # bounds 0, 13, 26, 40: centres 6, 19, 33
    assert idx[0, 0] == 0 and idx[1, 0] == 11 and idx[2, -1] == 39  # centred, shifted inside at both ends

    def reference_transform(img):  # Scale(112): 320x240 -> int(112 * 320 / 240) = 149 x 112; CenterCrop(112)
        img = img.resize((149, 112), Image.BILINEAR).crop((18, 0, 130, 112))  # x0 = round(37 / 2) = 18
        return np.asarray(img, np.float32) - np.array(extract.KINETICS_MEAN, np.float32)

    clips = np.stack([[reference_transform(frames[k]) for k in row] for row in idx])  # (3, 16, 112, 112, 3)
    with torch.no_grad():
        want = source(torch.from_numpy(clips).permute(0, 4, 1, 2, 3)).numpy()
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    assert not np.allclose(got[0], got[2])  # different clips, different features
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backbone"] == "resnext101-kinetics" and meta["feature_dim"] == 2048
    assert "16 consecutive frames" in meta["preprocessing"]


@pytest.mark.slow
def test_audio_extraction_equals_step_by_step_reference_and_silent_videos_get_zeros(release_vggish, tmp_path):
    reference_model, weights = release_vggish
    t = np.arange(int(1.6 * 16000)) / 16000  # as long as the 40 frames at 25 fps
    tone = 0.5 * np.sin(2 * np.pi * 660 * t) * (1 + np.sin(2 * np.pi * 1.5 * t)) / 2  # a pulsing tone
    (tmp_path / "in").mkdir()
    write_video(tmp_path / "in" / "sound.mkv", audio=tone[None])
    write_video(tmp_path / "in" / "quiet clip.mkv")  # no soundtrack; a space in its name
    out = tmp_path / "audio"
    summary = extract.extract(sorted((tmp_path / "in").iterdir()), out, "vggish", weights, frames=3, workers=0,
                              progress=False)
    assert summary["done"] == 2 and summary["failed"] == [] and summary["silent"] == ["quiet clip"]

    wave = pcm16(tone[None])[0] / 32768.0  # what the decoder must recover exactly (16 kHz, mono)
    times = np.array([6, 19, 33]) / 25.0  # the segment-centre frames' times
    examples = torch.from_numpy(extract.segment_log_mel(wave, times))
    _, vggish_input, _ = torchvggish_modules()
    ref_examples = vggish_input.waveform_to_examples(wave, 16000, return_tensor=False)  # 0.96 s hops from 0 s
    np.testing.assert_allclose(extract.segment_log_mel(wave, [0.48])[0, 0], ref_examples[0], atol=1e-5)  # 0..95
    with torch.no_grad():
        want = reference_model(examples).numpy()
    got = np.load(out / "sound.npy")
    assert got.shape == (3, 128) and np.abs(got - want).max() < 1e-5
    np.testing.assert_array_equal(np.load(out / "quiet clip.npy"), np.zeros((3, 128), np.float32))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["silent"] == ["quiet clip"] and meta["feature_dim"] == 128 and "log(mel + 0.01)" in meta["preprocessing"]

    # resumed and sharded runs keep one sorted, de-duplicated silent list
    write_video(tmp_path / "in" / "mute.mkv")
    videos = sorted((tmp_path / "in").iterdir())  # mute, quiet clip, sound
    extract.extract(videos, out, "vggish", weights, frames=3, workers=0, shard=(0, 2), progress=False)
    extract.extract(videos, out, "vggish", weights, frames=3, workers=0, shard=(1, 2), progress=False)
    assert json.loads((out / "meta.json").read_text())["silent"] == ["mute", "quiet clip"]


@pytest.mark.slow
def test_shared_videos_soundtracks(shared_dir):
    """The real test videos: the two silent ones have no soundtrack; bigbuckbunny's segments sit on its frames."""
    videos = shared_dir / "data" / "videos"
    for name in ("bikes", "carphone"):
        assert extract.decode_audio(videos / f"{name}.mp4") is None
        assert isinstance(extract.decode_log_mel(videos / f"{name}.mp4", 28), extract.Silent)
    times = extract.segment_times(videos / "bigbuckbunny.mp4", 28)  # 132 frames at 25 fps
    np.testing.assert_allclose(times, extract.sample_indices(132, 28) / 25.0)
    examples = extract.decode_log_mel(videos / "bigbuckbunny.mp4", 28)
    assert examples.shape == (28, 1, 96, 64) and np.isfinite(examples).all()


@pytest.mark.slow
@pytest.mark.parametrize("name,seconds", [("bigbuckbunny", 5.3), ("trailer_bbb", 52.2)])
def test_audio_features_equal_torchvggish_on_the_real_soundtracks(shared_dir, release_vggish, tmp_path, name, seconds):
    """AAC 5.1 at 48 kHz; MP3 stereo at 44.1 kHz, shorter than its video. extract.py end to end equals torchvggish
    on the same random weights, fed as the authors fed it: the soundtrack as `ffmpeg -i VIDEO -f wav` writes it
    (16-bit PCM at its own rate and channels), then waveform_to_examples (channel mean, resampy to 16 kHz, log mel,
    consecutive 0.96 s examples) and the VGG. extract.py centres one example on each segment-centre frame's time,
    so they are compared where the examples coincide: the reference's log-mel frames cut at extract.py's starts."""
    _, vggish_input, _ = torchvggish_modules()
    reference_model, weights = release_vggish
    path = shared_dir / "data" / "videos" / f"{name}.mp4"
    with av.open(str(path)) as c:
        rate, frames, fps = c.streams.audio[0].rate, c.streams.video[0].frames, float(c.streams.video[0].average_rate)
        pcm = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)  # (C, S) float32
    assert abs(pcm.shape[1] / rate - seconds) < 0.1
    pcm = np.clip(np.round(pcm * 32768), -32768, 32767).astype(np.int16)  # FFmpeg's float -> 16-bit conversion
    log_mel = vggish_input.waveform_to_examples(pcm.T / 32768.0, rate)[:, 0].detach().reshape(-1, 64)  # (96 E, 64)

    extract.extract([path], tmp_path, "vggish", weights, workers=0, progress=False)  # N = 60 segments
    got = np.load(tmp_path / f"{name}.npy")
    times = np.array(authors_uniform_ids(frames, 60)) / fps  # the segment-centre frames' times
    starts = np.maximum(np.round(times * 100).astype(int) - 48, 0)  # log-mel frames are 10 ms apart
    inside = starts + 96 <= len(log_mel)  # examples the reference's consecutive ones cover
    with torch.no_grad():
        want = reference_model(torch.stack([log_mel[s:s + 96] for s in starts[inside]])[:, None]).numpy()
    assert got.shape == (60, 128) and inside.sum() >= 45 and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got[inside], want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_extract_image_motion_audio_then_train(release_vggish, tmp_path):
    """extract.py -> feats/{image,motion,audio} -> train.py's loader and training loop, for the three settings
    of the paper's modality table (random weights, tiny generated videos: plumbing, not quality)."""
    import dap
    import train

    videos = tmp_path / "videos"
    videos.mkdir()
    t = np.arange(16000) / 16000
    for i in range(4):  # video0..video3; video1 and video3 have no soundtrack
        audio = None if i % 2 else (0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t))[None]
        write_video(videos / f"video{i}.mkv", n_frames=12, audio=audio)
    torch.manual_seed(0)  # the random backbones, and so the features, are the same whatever ran before
    clip = load_reference_clip().CLIP(32, 224, 1, 64, 32, 77, 100, 64, 1, 1)  # tiny ViT, 224 px input
    torch.save(clip.state_dict(), tmp_path / "clip.pt")  # OpenAI's key layout
    motion = save_public_resnext_checkpoint(extract.ResNeXt3D((1, 1, 1, 1), cardinality=1), tmp_path / "r.pth")
    feats = tmp_path / "feats"
    for modality, backbone, weights in [("image", "ViT-B/32", tmp_path / "clip.pt"),
                                        ("motion", "resnext101-kinetics", motion),
                                        ("audio", "vggish", release_vggish[1])]:
        rc = extract.main([str(videos), "--out", str(feats / modality), "--backbone", backbone, "--weights",
                           str(weights), "--frames", "4", "--workers", "0", "--no_progress"])
        assert rc == 0
    assert json.loads((feats / "audio" / "meta.json").read_text())["silent"] == ["video1", "video3"]

    captions = ["a man is cooking food in a kitchen", "a man is playing a guitar on a stage",
                "a woman is singing a song on a stage", "a dog is running in a park"]
    splits = ["train", "train", "validate", "test"]
    (tmp_path / "msrvtt").mkdir()
    (tmp_path / "msrvtt" / "videodatainfo.json").write_text(json.dumps({
        "videos": [{"video_id": f"video{i}", "category": i, "split": s} for i, s in enumerate(splits)],
        "sentences": [{"video_id": f"video{i}", "caption": captions[(i + j) % 4], "sen_id": 3 * i + j}
                      for i in range(4) for j in range(3)]}))
    settings = {"image": {"image": 32}, "image+motion": {"image": 32, "motion": 2048},
                "image+motion+audio": {"image": 32, "motion": 2048, "audio": 128}}
    for name, dims in settings.items():
        spec = ",".join(f"{m}={feats / m}" for m in dims)
        args = train.get_args(["--dataset", "msrvtt", "--data", str(tmp_path / "msrvtt"), "--feats", spec,
                               "--n_frames", "4", "--d_model", "32", "--n_attributes", "8", "--epochs", "3",
                               "--batch_size", "3", "--lr", "5e-3"])
        _, data, vocab, attributes = train.load_data(args, log=lambda *a: None)
        assert {m: x.shape[1:] for m, x in data["train"].feats.items()} == {m: (4, d) for m, d in dims.items()}
        torch.manual_seed(0)
        model = dap.CaptionModel(train.model_config("dap", args.recipe, dims, vocab, attributes))
        history = train.train(model, data, vocab, attributes, args.recipe, validate=False, progress=False,
                              log=lambda *a: None)
        losses = [h["loss"] for h in history]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], (name, losses)
    audio_feats = data["train"].feats["audio"]  # train split = video0 (sound), video1 (silent)
    assert audio_feats[0].abs().sum() > 0 and audio_feats[1].abs().sum() == 0
