"""Shared test helpers: the repository root on sys.path, the optional ../shared folder, and reference
implementations that several test files (and tests/bench.py) compare against."""
import glob
import importlib.util
import json
import os
import sys
import sysconfig
import warnings
from collections import OrderedDict
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from dap import BOS, EOS, PAD  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(1)  # the tests' small tensors: one thread is faster, and immune to a busy machine

N_TEST_FRAMES = 40  # frames in the generated test video


@pytest.fixture
def shared_dir():
    """The developers' ../shared folder (real MSR-VTT annotations, videos, NLTK data), or skip."""
    if not SHARED.is_dir():
        pytest.skip(f"needs the developers' ../shared folder beside the repository ({SHARED}); "
                    "a clone of the repository does not have it")
    return SHARED


@torch.no_grad()
def reference_beam_search(model, feats, beam_size, max_len=None, length_penalty=1.0, first=BOS, never=(PAD, BOS)):
    """The authors' beam search, one video at a time, recomputing every prefix: a transcription of
    misc/Decoding/Beam.py (Beam.advance, sort_finished) as models/Translator.py drives it, with the two
    documented differences of dap.py (first: the first input, theirs PAD; never: the words that cannot be
    produced, theirs none) as arguments. Returns one list of word ids (no BOS, no EOS) per video.
    """
    V, k, steps = model.cfg.vocab_size, beam_size, (max_len or model.cfg.max_len) - 1
    captions = []
    for b in range(next(iter(feats.values())).size(0)):
        memory = model.encode({m: f[b:b + 1] for m, f in feats.items()})
        rows, scores, finished = [[]], torch.zeros(1), []     # the beam: word lists and summed log p
        for t in range(steps):
            tokens = torch.tensor([[BOS] + words for words in rows] if t else [[first]])
            x = model.embedding(tokens)                       # the whole prefix, every step
            causal = torch.ones(t + 1, t + 1, dtype=torch.bool).tril()
            for layer in model.layers:
                x = layer(x, memory.expand(len(rows), -1, -1), causal)
            log_p = model.head(x[:, -1]).log_softmax(-1)      # the head only where it is needed
            log_p[:, list(never)] = float("-inf")
            ended = torch.tensor([bool(words) and words[-1] == EOS for words in rows])
            candidates = (scores[:, None] + log_p).masked_fill(ended[:, None], float("-inf")).view(-1)
            scores, top = candidates.topk(k)                  # sorted, best first
            rows = [rows[i // V] + [i % V] for i in top.tolist()]
            done = False
            for score, words in zip(scores.tolist(), rows):   # Beam.advance: collect the finished ones
                if words[-1] == EOS and score > float("-inf"):
                    finished.append((score, len(words), words))
                    done = len(finished) >= k
                    if done:
                        break
            if done:
                break
            if t == steps - 1 and not finished:               # max_len reached with nothing finished
                finished = [(s, len(w), w) for s, w in zip(scores.tolist(), rows)]
        finished.sort(key=lambda f: -f[0] / f[1] ** length_penalty)  # stable: earlier wins a tie
        captions.append([w for w in finished[0][2] if w != EOS] if finished else [])
    return captions


def eos_biased(model, scale=8.0, eos_logit=0.0, seed=0):
    """Random weights that decode like a trained model's: the head scaled up (peaked word distributions)
    and a constant added to EOS's logit, so that captions end after a few words (eos_logit ~ their length)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(model.cfg.d_model, generator=g)
    e /= e.norm()
    with torch.no_grad():
        model.head.weight.mul_(scale)
        model.layers[-1].norm3.bias.add_(e)        # every decoder output gets the component e ...
        model.head.weight[EOS].add_(eos_logit * e)  # ... which (almost) only EOS's logit reads
    return model


# ----------------------------------------------------------------------------------------------
# Generated videos and audio, reference code, checkpoints in the public layouts, fixture data


def frame_level(k):
    """Grey level of frame k of the test video: frames are told apart by their brightness."""
    return 10 + 5 * k


def write_video(path, n_frames=N_TEST_FRAMES, size=(64, 48), options=None, audio=None, audio_rate=16000):
    """A libx264 video (PyAV) whose frame k is a flat grey frame_level(k) with a small red square; with `audio`,
    a (C, S) float waveform in [-1, 1], also a 16-bit PCM soundtrack (pcm16(audio))."""
    w, h = size
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.options = w, h, "yuv420p", {"crf": "0"}
        if audio is not None:
            mux_pcm(container, pcm16(audio), audio_rate)
        for k in range(n_frames):
            img = np.full((h, w, 3), frame_level(k), np.uint8)
            img[4:12, 4:12] = (200, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def pcm16(wave):
    """(C, S) float waveform in [-1, 1] -> int16 samples."""
    return np.round(wave * 32767).astype(np.int16)


def mux_pcm(container, pcm, sample_rate):
    """Write int16 samples (C, S) as one pcm_s16le audio stream of an open PyAV output container."""
    layout = "mono" if pcm.shape[0] == 1 else "stereo"
    stream = container.add_stream("pcm_s16le", rate=sample_rate, layout=layout)
    frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1).copy(), format="s16", layout=layout)
    frame.sample_rate = sample_rate
    for packet in list(stream.encode(frame)) + list(stream.encode(None)):
        container.mux(packet)


def authors_uniform_ids(length, k):
    """get_uniform_ids_from_k_snippets of the authors' misc/utils.py (yangbang18/CLIP-Captioner), verbatim."""
    uniform_ids = []
    bound = [int(i) for i in np.linspace(0, length, k + 1)]
    for i in range(k):
        uniform_ids.append((bound[i] + bound[i + 1]) // 2)
    return uniform_ids


def load_reference_clip():
    """OpenAI's clip/model.py from the installed openai-clip package, loaded as a single file."""
    candidates = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "clip", "model.py"))
    if not candidates:
        pytest.skip("needs OpenAI's reference clip/model.py: pip install -r requirements.txt (openai-clip)")
    spec = importlib.util.spec_from_file_location("openai_clip_model", candidates[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize_(model, seed=0, forward=None):
    """Random norm scales and biases on top of the default (random) init; BatchNorm statistics calibrated
    on random images by `forward` (so that deep random nets still depend on their input); everything
    fp16-representable like OpenAI's fp16 checkpoints (the reference build_model rounds weights to fp16)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g) if t.is_floating_point() else None
            if name.endswith("bias"):
                t.copy_(0.1 * noise)
            elif name.endswith(".weight") and t.dim() == 1:  # BatchNorm / LayerNorm scales
                t.copy_(1 + 0.1 * noise)
        if forward is not None:
            bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average over the calibration batch
            model.train()
            forward(model, torch.randn(4, 3, 224, 224, generator=g))
            for bn in bns:
                bn.momentum = 0.1
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model.eval()


def save_public_resnext_checkpoint(model, path):
    """Save `model` as 3D-ResNets-PyTorch's training did: DataParallel keys, no num_batches_tracked."""
    state = OrderedDict(("module." + k, v.clone()) for k, v in model.state_dict().items()
                        if not k.endswith("num_batches_tracked"))
    torch.save({"epoch": 200, "arch": "resnext-101", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]}}, path)
    return path


def write_vatex(root):
    def item(i):
        return {"videoID": f"vid{i}_000001_000011", "enCap": [f"a person does thing {j} number {i}" for j in range(10)],
                "chCap": ["..."] * 10}
    for name, ids in [("vatex_training_v1.0.json", [0, 1, 2]), ("vatex_validation_v1.0.json", [3]),
                      ("vatex_public_test_english_v1.1.json", [4, 5])]:
        (root / name).write_text(json.dumps([item(i) for i in ids]))


@pytest.fixture
def no_java(monkeypatch):
    """PTB tokenisation and METEOR start Java (seconds); the end-to-end tests use the Python fallback."""
    monkeypatch.setattr(train, "java_available", lambda: False)
    warnings.filterwarnings("ignore", "Java not found")
