"""
Frozen backbone features: video files -> DIR/<video_id>.npy, float32 (N, D), one row per segment.

    python extract.py videos/ --out feats/image  --backbone ViT-B/32          # image  (N, 512)
    python extract.py videos/ --out feats/motion --backbone resnext101-kinetics \\
        --weights resnext-101-kinetics.pth                                     # motion (N, 2048)
    python extract.py videos/ --out feats/audio  --backbone vggish            # audio  (N, 128)

Segments. A video of F decodable frames is cut into N segments (--frames, default 60: the authors'
60 features per video; train.py takes 28 of them by the same rule, FRAME_RULE), each one sample at
its centre frame; a video shorter than N frames repeats frames. F is counted by decoding, so a
truncated file gives features of the frames it has. Decoding uses PyAV (FFmpeg ships in its
wheels); only the sampled frames are held in memory. A video without a soundtrack gets zeros.

Backbones (--backbone), built from the public checkpoints, sizes read off the tensor shapes:
  ViT-B/32 (default, the paper's), ViT-B/16  CLIP image encoder (ViT), D = 512
  RN50, RN101, RN50x4                        CLIP image encoder (ModifiedResNet), D = 1024, 512, 640
  resnet101                                  ImageNet ResNet-101 (INP, the paper's Sec. 3), D = 2048
  resnext101-kinetics                        3D ResNeXt-101 on Kinetics-400 (Hara et al.), D = 2048
  vggish, vggish-pca                         VGGish on AudioSet (Hershey et al.), D = 128
CLIP and VGGish run OpenAI's and torchvggish's code (installed packages); CLIP's features are
encode_image's projected embedding, not L2-normalised. Each preprocessing is stated once, in the
backbone's BACKBONES entry; --help lists them, meta.json records the one used.

Precision: fp32 (the authors note that fp16 features change the captions; on a GPU, no TF32
either); --dtype fp16|bf16 runs the backbone under autocast: faster on a GPU, features differ a bit.

Weights (--weights PATH): OpenAI's released .pt files (TorchScript) or a state_dict file (read
weights_only). Without --weights the file is downloaded from its public URL, checked against the
SHA-256 (or its prefix) that the URL carries and cached in $DAP_CACHE (default ~/.cache/dap);
offline, the error names the URL. resnext-101-kinetics.pth has no direct download: fetch it by hand
from 3D-ResNets-PyTorch's Google Drive folder and pass --weights (or put it in the cache).

Output in --out DIR: <video_id>.npy, each written atomically (existing ones are skipped: a killed
run resumes); meta.json (backbone, D, N, dtype, weights SHA-256, frame rule, preprocessing, the
videos without a soundtrack; a run with other settings, resumed or beside, is refused); failed.txt
(video_id TAB path TAB reason, a tab, newline or backslash in a name escaped; retried, and dropped
when fixed, by the next run). Exit status 0; 1 when some videos failed (each on stderr; the others
go on); 2 for a usage or I/O error (one line naming the file; a bad option: before any output).
--shard i/n takes every n-th video from the i-th, so that several GPUs or machines share one --out.

The code, in reading order: 1. sampling and decoding; 2. preprocessing; 3. the backbones, and CLIP's
text side for CLIPScore in train.py; 4. the registry; 5. weights; 6. the extraction loop; 7. CLI.
"""
import argparse
import hashlib
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import islice
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".wmv", ".mpg",
                    ".mpeg", ".3gp", ".ts", ".ogv"}
FRAMES = 60  # N per video: the authors' fixed 60 (config/Constants.py n_total_frames)
MAX_FRAMES = 1000  # at most: a video's N samples are decoded into memory (N = 100,000: 24 GB)
BATCH_SIZE = 256  # samples per backbone batch
ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})  # in failed.txt


class VideoError(Exception):
    """A video that cannot be used (unreadable, no video stream, zero decodable frames)."""


@lru_cache()
def package_module(package: str, module: str):
    """<package>/<module>.py of an installed package (openai-clip's clip, torchvggish), run as one
    file: their __init__ imports more (clip: torchvision, which does not import beside every torch
    build; torchvggish: soundfile)."""
    found = importlib.util.find_spec(package)  # finds the package without importing it
    folders = (found.submodule_search_locations or []) if found else []
    path = Path(folders[0]) / f"{module}.py" if folders else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(f"extract.py needs {package}/{module}.py, not installed: "
                                  "pip install -r requirements.txt")
    spec = importlib.util.spec_from_file_location(f"{package}_{module}", path)
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    return code


# ----------------------------------------------------------------------------------------------
# 1. Frame sampling and decoding

FRAME_RULE = ("F decodable frames, bounds b_i = int(i * F / N), b_N = F; "  # meta.json's too
              "frame i = (b_i + b_i+1) // 2 (the authors' get_uniform_ids_from_k_snippets)")


def sample_indices(num_frames: int, n: int) -> np.ndarray:
    """(N,) centre frames of n segments of num_frames frames by FRAME_RULE (the authors'
    misc/utils.py: int() of np.linspace(0, F, N + 1), whose i-th value is i * (F / N))."""
    if num_frames <= 0:
        raise ValueError(f"cannot sample from {num_frames} frames")
    bounds = [int(i * (num_frames / n)) for i in range(n)] + [num_frames]
    return np.array([(bounds[i] + bounds[i + 1]) // 2 for i in range(n)], dtype=np.int64)


def grab_frames(path, wanted, preprocess: Callable, threads: int):
    """Decode `path` once, keeping preprocess(frame) for the frame indices wanted(F_claimed).

    Returns (kept, F, F_claimed): F_claimed is the container's frame count (0 if unknown), F the
    number of frames actually decoded.
    """
    kept = {}  # frame index -> preprocessed uint8 array; never more than N entries
    count = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        claimed = int(stream.frames or 0)
        wanted_set = set(wanted(claimed).tolist())
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    continue  # a corrupt packet: its frame is not decodable, the next ones may be
                for frame in frames:
                    if count in wanted_set:
                        kept[count] = preprocess(frame.to_image())  # RGB PIL image -> (H, W, 3)
                    count += 1
        except av.error.FFmpegError:
            pass  # a truncated file: the frames decoded so far are the decodable ones
    return kept, count, claimed


def clip_indices(centres: np.ndarray, num_frames: int, clip_len: int) -> np.ndarray:
    """(N, clip_len) frame indices: clip_len consecutive frames around each centre, shifted to stay
    inside the video; a video shorter than clip_len repeats its frames (3D-ResNets' LoopPadding)."""
    start = np.clip(centres - clip_len // 2, 0, max(num_frames - clip_len, 0))  # (N,)
    return (start[:, None] + np.arange(clip_len)) % num_frames  # (N, clip_len)


def decode_frames(path, n: int, preprocess: Callable, threads=0, clip_len=0) -> np.ndarray:
    """N preprocessed frames at the segment centres of a video's decodable frames: (N, H, W, 3)
    uint8; with clip_len > 0, a clip of clip_len frames around each: (N, clip_len, H, W, 3) uint8.

    One pass when the container's frame count is right (the common case); otherwise (count unknown
    or wrong, e.g. a truncated file) a second pass keeps the frames sampled from the decoded count.
    Only the N (or N x clip_len) sampled frames are ever held in memory.
    """
    def wanted(f):  # (N,) or (N, clip_len) frame indices for a video of f frames
        centres = sample_indices(f, n)
        return clip_indices(centres, f, clip_len) if clip_len else centres

    kept, count, claimed = grab_frames(
        path, lambda f: wanted(f).ravel() if f > 0 else np.empty(0, np.int64), preprocess, threads)
    if count == 0:
        raise VideoError("zero decodable video frames")
    indices = wanted(count)
    if count != claimed:
        kept, count2, _ = grab_frames(path, lambda f: indices.ravel(), preprocess, threads)
        if count2 != count:
            raise VideoError(f"decoding is not repeatable ({count} then {count2} frames)")
    frames = np.stack([kept[i] for i in indices.ravel().tolist()])  # (N [* clip_len], H, W, 3)
    return frames.reshape(indices.shape + frames.shape[1:])


AUDIO_RATE = 16000  # VGGish's sample rate


def decode_audio(path):
    """(mono float64 waveform at 16 kHz, its start time in s) of the first audio track, or None.

    As the reference: the samples as 16-bit PCM / 32768 (the authors' ffmpeg -f wav, then
    torchvggish's wavfile_to_examples), the mean over channels, resampy.resample to 16 kHz
    (waveform_to_examples). The mono track is held at its own rate (23 MB a minute at 48 kHz).
    """
    def mono(pcm):  # int16 (C, S_k) -> (S_k,) float64
        return (pcm.to_ndarray() / 32768.0).mean(axis=0)

    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        to_pcm, rate, chunks = None, AUDIO_RATE, []
        try:
            for frame in container.decode(stream):
                if to_pcm is None:  # int16 planar, the decoder's channels and rate
                    rate = frame.sample_rate
                    to_pcm = av.AudioResampler(format="s16p", layout=frame.layout, rate=rate)
                chunks += [mono(pcm) for pcm in to_pcm.resample(frame)]
            if to_pcm is not None:
                chunks += [mono(pcm) for pcm in to_pcm.resample(None)]
        except av.error.FFmpegError:
            pass  # a corrupt or truncated tail: keep what decoded
    wave = np.concatenate(chunks) if chunks else np.zeros(0)  # (S,)
    if rate != AUDIO_RATE and wave.size:
        import resampy  # here: it loads numba, seconds that image and motion need not pay
        wave = resampy.resample(wave, rate, AUDIO_RATE)
    return wave, start


def segment_times(path, n: int, threads: int = 0) -> np.ndarray:
    """(N,) times in s of the N segment-centre frames, on the container's clock.

    The frame rule of decode_frames on the container's frame count (frames are decoded and counted
    only when the container does not say), frame k shown at start + k / fps; without a frame rate,
    the centres of N equal parts of the duration.
    """
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        count, rate = int(stream.frames or 0), stream.average_rate or stream.guessed_rate
        start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        duration = (float(stream.duration * stream.time_base) if stream.duration
                    else (container.duration or 0) / av.time_base)
    if rate and count <= 0:
        _, count, _ = grab_frames(path, lambda f: np.empty(0, np.int64), None, threads)
    if rate and count > 0:
        return start + sample_indices(count, n) / float(rate)
    if duration > 0:
        return start + (np.arange(n) + 0.5) * duration / n
    raise VideoError("neither the frame rate nor the duration is known: cannot place the audio")


@dataclass
class Silent:
    """The decoded audio of a video without a soundtrack: N zero vectors, no backbone."""
    n: int

    def __len__(self):
        return self.n


def decode_log_mel(path, n: int, threads: int = 0):
    """(N, 1, 96, 64) float32 log-mel examples centred on the N segment centres, or Silent(N)."""
    times = segment_times(path, n, threads)
    audio = decode_audio(path)
    if audio is None or audio[0].size == 0:
        return Silent(n)
    wave, audio_start = audio
    return segment_log_mel(wave, times - audio_start)


# ----------------------------------------------------------------------------------------------
# 2. Preprocessing: PIL image -> uint8 (H, W, 3) in the decode workers, then floats on the device.
# Which parameters each backbone uses, and the one description of them: its BACKBONES entry.

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The test transform of kenshohara/3D-ResNets-PyTorch (2018: opts.py, mean.py, main.py), whose
# Kinetics checkpoints the motion backbone loads: --sample_duration 16, --sample_size 112,
# ToTensor(norm_value=1), Normalize(get_mean(1, 'activitynet'), [1, 1, 1]).
KINETICS_CLIP_LEN, KINETICS_SIZE = 16, 112
KINETICS_MEAN = (114.7748, 107.7354, 99.4750)  # RGB; no std


def resize_shorter(img: Image.Image, size: int, resample) -> Image.Image:
    """Resize so the shorter side is `size`, the longer int(size * long / short), as torchvision."""
    w, h = img.size
    return img.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central size x size crop, with torchvision's rounding."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, resize: int, size: int, resample) -> np.ndarray:
    """Shorter side to `resize` (PIL filter `resample`), centre crop, RGB: (size, size, 3) uint8."""
    img = center_crop(resize_shorter(img, resize, resample), size).convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def normalize(x: torch.Tensor, mean, std=(1.0, 1.0, 1.0), scale: float = 255.0) -> torch.Tensor:
    """(B, [T,] H, W, 3) uint8 -> (B, 3, [T,] H, W) float32: x / scale, minus mean, over std."""
    x = x.movedim(-1, 1).float() / scale
    shape = (1, 3) + (1,) * (x.dim() - 2)  # broadcast over the channel axis
    mean = torch.tensor(mean, device=x.device).view(shape)
    std = torch.tensor(std, device=x.device).view(shape)
    return ((x - mean) / std).contiguous()


# VGGish's front end is torchvggish's (mel_features.py and vggish_params.py, TF's release ported);
# where the examples sit is ours: one 0.96 s example (96 log-mel frames, 10 ms apart) per segment.
STFT_WINDOW, STFT_HOP, EXAMPLE_FRAMES = 400, 160, 96  # at 16 kHz: 25 ms windows every 10 ms


def segment_log_mel(wave, times) -> np.ndarray:
    """(S,) 16 kHz waveform, (N,) times in s -> (N, 1, 96, 64) float32: the example centred on each
    time, shifted to stay inside the track; a track shorter than 0.96 s is zero-padded (silence).

    Log-mel frame k starts at sample 160 k, so only the N examples' samples are transformed, with
    the parameters of torchvggish's waveform_to_examples.
    """
    p = package_module("torchvggish", "vggish_params")
    log_mel = partial(package_module("torchvggish", "mel_features").log_mel_spectrogram,
                      audio_sample_rate=p.SAMPLE_RATE, log_offset=p.LOG_OFFSET,
                      window_length_secs=p.STFT_WINDOW_LENGTH_SECONDS,
                      hop_length_secs=p.STFT_HOP_LENGTH_SECONDS, num_mel_bins=p.NUM_MEL_BINS,
                      lower_edge_hertz=p.MEL_MIN_HZ, upper_edge_hertz=p.MEL_MAX_HZ)
    span = STFT_WINDOW + (EXAMPLE_FRAMES - 1) * STFT_HOP  # 15600 samples = exactly 96 frames
    wave = np.pad(np.asarray(wave, np.float64), (0, max(span - len(wave), 0)))
    n_frames = 1 + (len(wave) - STFT_WINDOW) // STFT_HOP  # log-mel frames of the whole track
    centres = np.round(np.asarray(times, np.float64) * AUDIO_RATE / STFT_HOP).astype(int)  # (N,)
    first = np.clip(centres - EXAMPLE_FRAMES // 2, 0, n_frames - EXAMPLE_FRAMES)  # (N,) frames
    examples = [log_mel(wave[k * STFT_HOP:k * STFT_HOP + span]) for k in first]  # (96, 64) each
    return np.stack(examples)[:, None].astype(np.float32)  # (N, 1, 96, 64)


# ----------------------------------------------------------------------------------------------
# 3. The backbones. 3a. CLIP: OpenAI's code (image and text towers, tokenizer), in fp32

CLIP_KEYS = ("visual.conv1.weight", "token_embedding.weight", "positional_embedding",
             "ln_final.weight", "text_projection")  # what build_model reads the sizes off


def build_clip(state_dict: dict) -> nn.Module:
    """OpenAI's CLIP from a CLIP state_dict: their build_model (sizes read off the shapes), fp32."""
    missing = [k for k in CLIP_KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"not a CLIP checkpoint in OpenAI's layout: no {missing[0]!r} tensor")
    state_dict = dict(state_dict)  # build_model deletes the int buffers of OpenAI's archives
    model = package_module("clip", "model").build_model(state_dict)  # in fp16, for GPUs; so ...
    model.float().load_state_dict(state_dict)  # ... the checkpoint's own values again, in fp32
    return model.eval()


def build_clip_visual(state_dict: dict) -> nn.Module:
    """CLIP's image encoder, fp32: (B, 3, H, W) -> (B, D), encode_image's projected embedding."""
    return build_clip(state_dict).visual


@lru_cache()
def clip_tokenizer():
    """OpenAI's byte-level BPE tokenizer, on the vocabulary file that openai-clip installs."""
    return package_module("clip", "simple_tokenizer").SimpleTokenizer()


def tokenize(texts, context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """Texts -> (B, context_length) int64: SOT, BPE ids, EOT, zero padding. OpenAI's clip.tokenize
    (clip.py imports torchvision), truncating by default, keeping the EOT (the features' token)."""
    tokenizer = clip_tokenizer()
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    texts = [texts] if isinstance(texts, str) else list(texts)
    tokens = torch.zeros(len(texts), context_length, dtype=torch.long)  # (B, L)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects strings, got {type(text).__name__}: {text!r}")
        ids = [sot] + tokenizer.encode(text) + [eot]
        if len(ids) > context_length and not truncate:
            raise ValueError(f"text of {len(ids)} tokens > context_length {context_length}: "
                             f"{text[:80]!r}")
        ids = ids if len(ids) <= context_length else ids[:context_length - 1] + [eot]
        tokens[row, :len(ids)] = torch.tensor(ids)
    return tokens


@torch.inference_mode()
def encode_captions(clip_model: nn.Module, captions, prefix: str = "", batch_size: int = 256):
    """Captions -> (B, D) float32 CLIP text embeddings (encode_text, not normalised) of
    `prefix + " " + caption`; clip_model as load_clip_text returns it."""
    prefix = prefix.rstrip() + " " if prefix else ""
    device, length = clip_model.text_projection.device, clip_model.context_length
    out = [clip_model.encode_text(tokenize([prefix + c for c in captions[s:s + batch_size]], length)
                                  .to(device)).float().cpu()
           for s in range(0, len(captions), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, clip_model.text_projection.shape[1])


# 3b. ImageNet ResNet and 3D ResNeXt in plain PyTorch, in the key layouts of their public
# checkpoints: no importable package has them (torchvision does not import beside this torch build;
# 3D-ResNets-PyTorch is not a package). VGGish is torchvggish's.


def add_stages(module, block, inplanes, base_planes, layers, expansion):
    """Add layer1..layerN: stage i has layers[i] blocks of base_planes * 2**i planes, stride 2 after
    stage 1. Returns the output channels. Shared by torchvision's ResNet and the 3D ResNeXt."""
    for i, blocks in enumerate(layers):
        planes = base_planes * 2 ** i
        stage = [block(inplanes, planes, 1 if i == 0 else 2)]
        stage += [block(planes * expansion, planes, 1) for _ in range(blocks - 1)]
        module.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        inplanes = planes * expansion
    return inplanes


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (v1.5): 1x1 -> 3x3 (carries the stride) -> 1x1 (4x planes),
    plus a shortcut (a strided 1x1 conv where the shape changes)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet without fc: 7x7 stem, maxpool, 4 stages, global average."""

    def __init__(self, layers=(3, 4, 23, 3), width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.output_dim = add_stages(self, Bottleneck, width, width, layers, expansion=4)

    def forward(self, x):  # (B, 3, 224, 224)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, 64, 56, 56)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, 7, 7)
        return x.mean(dim=(2, 3))  # (B, 2048): layer4 globally average-pooled


def num_blocks(state_dict: dict, prefix: str) -> int:
    """How many numbered children `prefix.<i>.` the state_dict has."""
    return len({k[len(prefix):].split(".")[1] for k in state_dict if k.startswith(prefix + ".")})


def fp32(state_dict: dict) -> dict:
    """The state_dict with its floating-point tensors in fp32, as extraction runs."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def build_imagenet_resnet(state_dict: dict) -> nn.Module:
    """torchvision resnet50/101/152 from its state_dict (fc.* ignored), depth read off the keys."""
    if "layer1.0.conv3.weight" not in state_dict:
        raise ValueError("not a torchvision bottleneck-ResNet (no 'layer1.0.conv3.weight' tensor)")
    layers = [num_blocks(state_dict, f"layer{b}") for b in (1, 2, 3, 4)]
    model = ResNet(layers, width=state_dict["conv1.weight"].shape[0])
    model.load_state_dict(fp32({k: v for k, v in state_dict.items() if not k.startswith("fc.")}))
    return model.eval()


class ResNeXtBlock(Bottleneck):
    """3D bottleneck 1x1x1 -> grouped 3x3x3 (carries the stride) -> 1x1x1, plus a conv shortcut
    (type B): the residual forward of the 2D Bottleneck, other convolutions."""
    expansion = 2

    def __init__(self, inplanes, planes, stride=1, cardinality=32):
        nn.Module.__init__(self)
        mid, out = cardinality * (planes // 32), planes * self.expansion  # cardinality 32: planes
        self.conv1 = nn.Conv3d(inplanes, mid, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.conv2 = nn.Conv3d(mid, mid, 3, stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm3d(mid)
        self.conv3 = nn.Conv3d(mid, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv3d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(out))


class ResNeXt3D(nn.Module):
    """3D ResNeXt (Hara et al., CVPR 2018), 3D-ResNets-PyTorch's models/resnext.py: a (B, 3, 16,
    112, 112) clip -> (B, 2048), the globally average-pooled feature."""

    def __init__(self, layers=(3, 4, 23, 3), cardinality=32, num_classes=400):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, kernel_size=7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        block = partial(ResNeXtBlock, cardinality=cardinality)
        self.output_dim = add_stages(self, block, 64, 128, layers, ResNeXtBlock.expansion)
        self.fc = nn.Linear(self.output_dim, num_classes)  # the Kinetics classifier: loaded, unused

    def forward(self, x):  # (B, 3, 16, 112, 112)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, 64, 8, 28, 28)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, 1, 4, 4)
        # the reference's AvgPool3d((ceil(16 / 16), ceil(112 / 32), ceil(112 / 32))) covers the map
        return x.mean(dim=(2, 3, 4))  # (B, 2048)


def build_resnext3d(state_dict: dict) -> nn.Module:
    """3D ResNeXt from a 3D-ResNets-PyTorch checkpoint (`module.` keys of nn.DataParallel, or bare
    ones); depth, cardinality and classes read off the shapes. The 2018 files predate
    num_batches_tracked: a plain dict lets BatchNorm fill it in; all other keys must match."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    conv2 = sd.get("layer1.0.conv2.weight")  # (mid, mid / cardinality, 3, 3, 3)
    if conv2 is None or conv2.dim() != 5 or "fc.weight" not in sd:
        raise ValueError("not a 3D-ResNets-PyTorch ResNeXt checkpoint (no 5-d "
                         "'layer1.0.conv2.weight' or no 'fc')")
    layers = [num_blocks(sd, f"layer{b}") for b in (1, 2, 3, 4)]
    model = ResNeXt3D(layers, conv2.shape[0] // conv2.shape[1], sd["fc.weight"].shape[0])
    model.load_state_dict(fp32(sd))
    return model.eval()


class VGGishPCA(nn.Module):
    """The AudioSet release's post-processing: PCA and whitening, clip to [-2, 2], 8-bit levels."""

    def __init__(self, matrix: torch.Tensor, means: torch.Tensor):
        super().__init__()
        self.register_buffer("pca_matrix", matrix.float())  # (128, 128), rows = output dimensions
        self.register_buffer("pca_means", means.float().reshape(-1, 1))  # (128, 1)

    def forward(self, x):  # (B, 128) -> (B, 128), integers 0..255 as floats
        projected = (x - self.pca_means.T) @ self.pca_matrix.T
        return torch.round((projected.clamp(-2.0, 2.0) + 2.0) * (255.0 / 4.0))


def build_vggish(state_dict: dict, pca: VGGishPCA = None) -> nn.Module:
    """torchvggish's VGGish from its vggish-10086976.pth (features.*, embeddings.*; no pproc.*),
    then the release's PCA if given: a (B, 1, 96, 64) log-mel example -> a (B, 128) embedding. It
    ends in a ReLU, as the port (TF's release has none: torchvggish issue #24)."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith("pproc.")}
    if "embeddings.4.weight" not in sd:
        raise ValueError("not a torchvggish VGGish state_dict (no 'embeddings.4.weight')")
    vggish = package_module("torchvggish", "torchvggish")
    model = vggish.VGG(vggish.make_layers(), postprocess=False)  # its own PCA would download
    model.load_state_dict(fp32(sd))
    model = model if pca is None else nn.Sequential(model, pca)
    model.output_dim = 128
    return model.eval()


def load_vggish_pca(path) -> VGGishPCA:
    """The PCA parameters in torchvggish's vggish_pca_params-970ea276.pth: numpy arrays, a dict."""
    core = np._core if hasattr(np, "_core") else np.core
    numpy_types = [np.ndarray, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType,
                   core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(numpy_types):  # weights_only, numpy arrays allowed
            params = torch.load(path, map_location="cpu", weights_only=True)
        matrix = torch.as_tensor(np.asarray(params["pca_eigen_vectors"]), dtype=torch.float32)
        means = torch.as_tensor(np.asarray(params["pca_means"]), dtype=torch.float32).reshape(-1, 1)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not torchvggish's PCA file, a dict with 'pca_eigen_vectors' and "
                         f"'pca_means' ({type(e).__name__}: {e})") from None
    if matrix.shape != (128, 128) or means.shape != (128, 1):
        raise ValueError(f"{path}: PCA shapes {tuple(matrix.shape)} and {tuple(means.shape)[:1]}, "
                         f"expected (128, 128) and (128,)")
    return VGGishPCA(matrix, means)


TORCHVGGISH_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/"
VGGISH_PCA_URL = TORCHVGGISH_URL + "vggish_pca_params-970ea276.pth"  # names carry SHA-256 prefixes
VGGISH_PCA_SHA256 = "970ea276"


def build_vggish_pca(state_dict: dict) -> nn.Module:
    """VGGish and the release's PCA, whose parameters file is downloaded (and verified) here."""
    return build_vggish(state_dict, load_vggish_pca(fetch(VGGISH_PCA_URL, VGGISH_PCA_SHA256)))


# ----------------------------------------------------------------------------------------------
# 4. The backbone registry


@dataclass(frozen=True)
class Backbone:
    """What extract() needs to know about a backbone; adding one = adding an entry to BACKBONES."""
    name: str
    kind: str  # one sample per segment: "frames" (an image), "clips" or "audio" (decode_video)
    build: Callable  # state_dict -> nn.Module with .output_dim: to_input(batch) -> (B, output_dim)
    dim: int
    url: str
    sha256: str  # the full SHA-256 (OpenAI) or its prefix (torchvision's, torchvggish's file names)
    preprocessing: str  # THE description of the preprocessing: in --help and meta.json
    preprocess: Callable = None  # in the decode workers: PIL image -> uint8 (H, W, 3)
    to_input: Callable = None  # on the device: the decoded batch -> the model's float input
    input_size: int = 224  # pixels of the square model input
    clip_len: int = 0  # "clips": frames per clip
    file: str = ""  # the cache file name when the URL is not a direct download


def clip_backbone(name, dim, file, sha, size=224):
    """A CLIP image encoder entry; OpenAI's URLs carry the file's SHA-256."""
    return Backbone(
        name=name, kind="frames", build=build_clip_visual, dim=dim, sha256=sha,
        url=f"https://openaipublic.azureedge.net/clip/models/{sha}/{file}",
        preprocessing=f"CLIP: shorter side {size} (PIL bicubic), centre crop {size}, RGB, /255, "
                      f"mean {CLIP_MEAN}, std {CLIP_STD}",
        preprocess=partial(preprocess, resize=size, size=size, resample=Image.BICUBIC),
        to_input=partial(normalize, mean=CLIP_MEAN, std=CLIP_STD), input_size=size)


def vggish_backbone(name, build, output):
    """A VGGish entry: torchvggish's release file (the name carries its SHA-256 prefix)."""
    return Backbone(
        name=name, kind="audio", build=build, dim=128, sha256="10086976",
        url=TORCHVGGISH_URL + "vggish-10086976.pth", to_input=lambda x: x,
        preprocessing="VGGish (torchvggish): soundtrack -> 16-bit PCM / 32768, channel mean, 16 "
                      "kHz (resampy), 25 ms periodic-Hann windows every 10 ms, |FFT 512|, 64 HTK "
                      "mel bands 125-7500 Hz, log(mel + 0.01); the 0.96 s example (96 x 64) "
                      "centred on each segment-centre frame's time; no soundtrack -> zeros, listed "
                      "in 'silent'; " + output)


BACKBONES = {b.name: b for b in [  # OpenAI's SHA-256s as in openai/CLIP's clip.py _MODELS
    clip_backbone("ViT-B/32", 512, "ViT-B-32.pt",
                  "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    clip_backbone("ViT-B/16", 512, "ViT-B-16.pt",
                  "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    clip_backbone("RN50", 1024, "RN50.pt",
                  "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"),
    clip_backbone("RN101", 512, "RN101.pt",
                  "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599"),
    clip_backbone("RN50x4", 640, "RN50x4.pt",
                  "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", size=288),
    Backbone(  # INP: torchvision's IMAGENET1K_V1, the classic ImageNet weights
        name="resnet101", kind="frames", build=build_imagenet_resnet, dim=2048, sha256="63fe2227",
        url="https://download.pytorch.org/models/resnet101-63fe2227.pth",
        preprocessing=f"ImageNet: shorter side 256 (PIL bilinear), centre crop 224, RGB, /255, "
                      f"mean {IMAGENET_MEAN}, std {IMAGENET_STD}",
        preprocess=partial(preprocess, resize=256, size=224, resample=Image.BILINEAR),
        to_input=partial(normalize, mean=IMAGENET_MEAN, std=IMAGENET_STD)),
    Backbone(  # Hara et al.'s 16-frame `resnext-101-kinetics.pth` (2018), in a Google Drive folder:
        # no direct download, no published SHA-256 (passed with --weights, or put in the cache)
        name="resnext101-kinetics", kind="clips", build=build_resnext3d, dim=2048, sha256="",
        url="https://drive.google.com/drive/folders/14KRBqT8ySfPtFSuLsFS2U4I-ihTDs0Y9",
        file="resnext-101-kinetics.pth", clip_len=KINETICS_CLIP_LEN, input_size=KINETICS_SIZE,
        preprocessing=f"3D-ResNets: {KINETICS_CLIP_LEN} consecutive frames centred on each segment "
                      "centre (shifted inside the video, looped if it is shorter), shorter side "
                      f"112 (PIL bilinear), centre crop 112, RGB in [0, 255] minus mean "
                      f"{KINETICS_MEAN}, std 1",
        preprocess=partial(preprocess, resize=KINETICS_SIZE, size=KINETICS_SIZE,
                           resample=Image.BILINEAR),
        to_input=partial(normalize, mean=KINETICS_MEAN, scale=1.0)),
    vggish_backbone("vggish", build_vggish, "raw embeddings"),  # the paper's
    vggish_backbone("vggish-pca", build_vggish_pca,  # AudioSet's released format
                    "then the release's PCA + whitening and 8-bit quantisation"),
]}


# ----------------------------------------------------------------------------------------------
# 5. Weights: download, verify, cache, load; the SHA-256 rule


def cache_dir() -> Path:
    """Where downloaded weights live: $DAP_CACHE, else ~/.cache/dap."""
    return Path(os.environ.get("DAP_CACHE", "~/.cache/dap")).expanduser()


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, sha256: str, file: str = "") -> Path:
    """The cached copy of a public file, downloaded if needed; its SHA-256 must start with `sha256`.

    Without a sha256 (no direct download, no published hash) the file must have been put in the
    cache by hand, as `file`. A failed or tampered download leaves nothing in the cache.
    """
    target = cache_dir() / (file or url.rsplit("/", 1)[-1])
    by_hand = f"pass it with --weights PATH (or put it in {cache_dir()}, set by $DAP_CACHE)"
    if not sha256:
        if target.is_file():
            return target
        raise RuntimeError(f"no direct download of {target.name}: get it from {url} by hand and "
                           f"{by_hand}")
    if target.is_file() and sha256_file(target).startswith(sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def download(tmp):
        print(f"downloading {url} -> {target}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=60) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as e:  # urllib.error.URLError included
            raise RuntimeError(f"cannot download {url} ({e}). Download that file on a machine with "
                               f"internet access and {by_hand}.") from None
        digest = sha256_file(tmp)
        if not digest.startswith(sha256):
            raise RuntimeError(f"{url}: SHA-256 {digest} does not match the expected {sha256}; "
                               f"file discarded")

    atomic_write(target, download)
    return target


def load_state_dict(path) -> dict:
    """Tensors of a checkpoint: TorchScript (OpenAI's .pt files) or a state_dict (weights_only)."""
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # how OpenAI's files load
                state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError:  # not TorchScript
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: neither a TorchScript archive nor a state_dict file "
                         f"({type(e).__name__}: {e})") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(state_dict).__name__}")
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def weights_path(spec: Backbone, weights=None) -> Path:
    """The checkpoint to load: --weights PATH if given (must exist), else the cached download."""
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file")
    return Path(weights) if weights is not None else fetch(spec.url, spec.sha256, spec.file)


def load_backbone(name: str, weights=None, device="cpu"):
    """(model on device in eval mode, spec, weights SHA-256) for a registered backbone."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    path = weights_path(spec, weights)
    model = spec.build(load_state_dict(path)).to(device).eval().requires_grad_(False)
    if getattr(model, "input_resolution", spec.input_size) != spec.input_size:
        raise ValueError(f"{path} takes {model.input_resolution}-px images, but {name} is "
                         f"preprocessed to {spec.input_size} px; pick their --backbone")
    if model.output_dim != spec.dim:
        print(f"warning: {path} gives {model.output_dim}-d features; {name}, {spec.dim}-d ones",
              file=sys.stderr)
    return model, spec, sha256_file(path)


def load_clip_text(name: str, weights=None, device="cpu"):
    """(OpenAI's CLIP model on device in eval mode, weights SHA-256) from the checkpoint of CLIP
    backbone `name`, for its text tower: encode_captions(model, captions)."""
    clip_names = [k for k, b in BACKBONES.items() if b.build is build_clip_visual]
    if name not in clip_names:
        raise ValueError(f"{name!r} is not a CLIP backbone (no text tower); choose from "
                         f"{', '.join(clip_names)}")
    path = weights_path(BACKBONES[name], weights)
    model = build_clip(load_state_dict(path)).to(device).eval().requires_grad_(False)
    return model, sha256_file(path)


def load_matching(meta: dict, weights=None, device="cpu", text=False):
    """The backbone that wrote some features, from the weights that wrote them: (model, spec).

    meta: the features' meta.json (read_meta): "backbone" names the extractor, "weights_sha256" the
    SHA-256 of the checkpoint it ran. weights: the checkpoint to load (a path), or None for the
    cached download (downloaded if missing). text=False: the extractor, as load_backbone returns it
    (on `device`, eval mode); text=True: OpenAI's CLIP model of that CLIP checkpoint, as
    load_clip_text returns it, for its text tower (encode_captions). spec: BACKBONES[backbone].
    Raises ValueError when the checkpoint's SHA-256 is not meta["weights_sha256"]: features of other
    weights do not match. Loading raises as load_backbone and load_clip_text do: ValueError (unknown
    backbone; with text=True, not a CLIP one; a file that is not its checkpoint), FileNotFoundError
    (no such weights file), RuntimeError (no direct download; a download that failed or did not
    verify), ModuleNotFoundError (openai-clip is not installed).
    """
    name = meta.get("backbone")
    if text:
        model, sha = load_clip_text(name, weights, device)
    else:
        model, _, sha = load_backbone(name, weights, device)
    if sha != meta.get("weights_sha256"):
        raise ValueError(f"weights {weights or '(cached download)'} have SHA-256 {sha}, but the "
                         f"features were extracted with {name} weights of SHA-256 "
                         f"{meta.get('weights_sha256')}; pass the checkpoint that wrote them with "
                         f"--weights")
    return model, BACKBONES[name]


# ----------------------------------------------------------------------------------------------
# 6. The extraction loop


def find_videos(inputs, list_file=None) -> list:
    """Video paths from files, folders (recursive, by extension) and a list file, sorted, unique."""
    listed = Path(list_file).read_text().splitlines() if list_file else []
    paths = []
    for item in [*inputs, *filter(None, map(str.strip, listed))]:
        p = Path(item)
        if p.is_dir():
            paths += [q for q in p.rglob("*")
                      if q.suffix.lower() in VIDEO_EXTENSIONS and q.is_file()]
        else:
            paths.append(p)  # named explicitly: taken whatever its extension (a missing one fails)
    paths = sorted({os.path.realpath(p): p for p in paths}.values(), key=lambda p: (p.stem, str(p)))
    for a, b in zip(paths, paths[1:]):  # sorted by video_id: a shared one is in neighbours
        if a.stem == b.stem:
            raise ValueError(f"two videos share the video_id {a.stem!r}: {a} and {b}")
    return paths


def decode_video(path, n: int, spec: Backbone, threads: int = 0):
    """The N samples of one video for backbone `spec`, or Silent(N); raises on a bad file. Samples
    are frames (N, H, W, 3) or clips (N, clip_len, H, W, 3), uint8, or log-mel examples
    (N, 1, 96, 64) float32."""
    if not Path(path).is_file():
        raise VideoError("a broken or looping symlink" if os.path.islink(path) else "no such file")
    if Path(path).stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    if spec.kind == "audio":
        return decode_log_mel(path, n, threads)
    return decode_frames(path, n, spec.preprocess, threads, spec.clip_len)


def failure_reason(e: Exception) -> str:
    """One line saying why a video failed: FFmpeg's reason for an unreadable file, or the error."""
    if isinstance(e, av.error.FFmpegError):
        return f"not a readable video: {e.strerror or e} (FFmpeg {type(e).__name__})"
    return f"{type(e).__name__}: {str(e).strip()}"


def decode_job(path, n, backbone, threads):
    """(samples, None) or (None, why it failed): never raises, so that a bad video fails alone."""
    try:
        return decode_video(path, n, BACKBONES[backbone], threads), None
    except Exception as e:  # noqa: BLE001 - every failure is reported per video
        return None, failure_reason(e)


def exit_with_parent(parent_pid: int):
    """Decode-worker initializer: a daemon thread ends this process once its parent is gone (e.g.
    killed with kill -9), instead of leaving it waiting for work forever, re-parented to PID 1."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def decoded_videos(paths, n, backbone, workers):
    """Yield (path, samples, None) or (path, None, why it failed) for each path, in order.

    Decoding runs in this process (workers=0) or in `workers` processes, at most 2 * workers videos
    ahead, so that memory stays bounded; they end with this process, or when the generator closes.
    """
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))  # decoder threads per video
    if workers == 0:
        yield from ((p, *decode_job(str(p), n, backbone, threads)) for p in paths)
        return
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),  # safe beside CUDA
                               initializer=exit_with_parent, initargs=(os.getpid(),))
    try:
        jobs = ((p, pool.submit(decode_job, str(p), n, backbone, threads)) for p in paths)  # lazy
        ahead = deque(islice(jobs, 2 * workers))
        while ahead:
            path, job = ahead.popleft()
            ahead.extend(islice(jobs, 1))  # one submitted for each one taken
            yield (path, *job.result())
    finally:
        pool.shutdown(cancel_futures=True)  # an early exit decodes no more videos


def batches(videos, batch_size):
    """Group decoded videos into lists of at least batch_size samples for the backbone (the last
    list may hold fewer); failed and silent videos ride along in the list they arrive in."""
    batch, size = [], 0
    for path, samples, error in videos:
        batch.append((path, samples, error))
        size += len(samples) if samples is not None and not isinstance(samples, Silent) else 0
        if size >= batch_size:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def atomic_write(path, write: Callable):
    """Write `path` through write(tmp_path) into a temporary file beside it, then rename: readers
    never see half a file. The file gets a plain open()'s permissions (0666 minus the umask); a
    failed write leaves no temporary file behind, and an OSError names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # an error, Ctrl-C, SIGTERM (extract.py and train.py make it one)
        with suppress(OSError):  # a read-only folder: the error to report is write's, not unlink's
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # e.g. a full disk: say which file could not be written
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def write_text(path, text: str):
    """A text file, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_features(path: Path, feats: np.ndarray):
    """DIR/<video_id>.npy, float32 (N, D), written atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, feats.astype(np.float32))

    atomic_write(path, write)


def read_meta(path) -> dict:
    """The JSON object in a file, or in a folder's meta.json (the one extract.py writes).

    Raises FileNotFoundError naming a missing file, and ValueError, one line naming the file, for a
    file that is not valid JSON or whose JSON value is not an object.
    """
    path = Path(path) / "meta.json" if Path(path).is_dir() else Path(path)
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e}): rewrite it, or delete it") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, not an object: rewrite it, "
                         f"or delete it")
    return meta


@contextmanager
def meta_lock(out: Path):
    """One run at a time on the folder `out` (shards): an exclusive flock on the folder itself."""
    with ExitStack() as held:
        if os.name == "posix":
            import fcntl  # POSIX only
            held.callback(os.close, fd := os.open(out, os.O_RDONLY))
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits for the other run
        yield


def write_meta(out: Path, meta: dict):
    """Write meta.json, or check that an existing one (a run resumed, or a run beside this one on
    the same --out) agrees with this run: both under meta_lock, so that only one run writes it."""
    with meta_lock(out):
        if not (out / "meta.json").is_file():
            write_text(out / "meta.json", json.dumps(meta, indent=1) + "\n")
            return
        old = read_meta(out)
    keys = ("backbone", "weights_sha256", "frames", "dtype", "frame_sampling", "preprocessing")
    diff = {k: (old.get(k), meta[k]) for k in keys if old.get(k) != meta[k]}
    if diff:
        raise ValueError(f"{out / 'meta.json'} was written by a different run ({diff}, old vs "
                         f"new); use another --out or delete that folder")


def append_line(path: Path, line: str):
    """Append one line with a single write (O_APPEND): safe when several shards share the folder."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{line}\n")


def record_failure(out: Path, path: Path, reason: str):
    """One line on stderr and one appended to DIR/failed.txt: video_id<TAB>path<TAB>reason, with
    a backslash, tab or newline in a name escaped (ESCAPE)."""
    vid, where, reason = path.stem.translate(ESCAPE), str(path).translate(ESCAPE), reason.split()
    print(f"FAILED {vid} ({where}): {' '.join(reason)}", file=sys.stderr)
    append_line(out / "failed.txt", f"{vid}\t{where}\t{' '.join(reason)}")


def list_silent(out: Path):
    """meta.json's "silent": silent.txt's video_ids with features, sorted; shards take turns."""
    if not (out / "silent.txt").is_file() or not (out / "meta.json").is_file():
        return
    with meta_lock(out):
        done = {p.stem.translate(ESCAPE): p.stem for p in out.glob("*.npy")}  # as silent.txt has
        listed = (out / "silent.txt").read_text().splitlines()
        silent, meta = sorted({done[v] for v in listed if v in done}), read_meta(out)
        if meta.get("silent") != silent:
            write_text(out / "meta.json", json.dumps({**meta, "silent": silent}, indent=1) + "\n")


def compact_failures(out: Path):
    """Drop failed.txt lines of videos that now have features (fixed by a later run), repeats."""
    path = out / "failed.txt"
    if path.is_file():
        done = {p.stem.translate(ESCAPE) for p in out.glob("*.npy")}  # as failed.txt holds them
        lines = {line.split("\t", 1)[0]: line for line in path.read_text().splitlines() if line}
        kept = [line for vid, line in lines.items() if vid not in done]  # the latest reason wins
        if kept:
            write_text(path, "\n".join(kept) + "\n")
        else:
            path.unlink()


def parse_shard(text: str):
    """'i/n' -> (i, n) with 0 <= i < n."""
    i, n = map(int, m.groups()) if (m := re.fullmatch(r"(\d+)/(\d+)", text.strip())) else (0, 0)
    if not i < n:
        raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@torch.inference_mode()
def encode_samples(model: nn.Module, spec: Backbone, samples: np.ndarray, device,
                   batch_size: int = BATCH_SIZE, dtype: str = "fp32") -> np.ndarray:
    """(B, ...) decoded samples -> (B, D) float32 features, batch_size at a time on the device."""
    device, amp = torch.device(device), AMP_DTYPES[dtype]
    outs = []
    for s in range(0, len(samples), batch_size):
        x = torch.from_numpy(samples[s:s + batch_size])
        if device.type == "cuda":
            x = x.pin_memory()
        x = spec.to_input(x.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            outs.append(model(x).float())
    return torch.cat(outs).cpu().numpy()


def extract(videos, out, backbone="ViT-B/32", weights=None, frames=FRAMES, device=None,
            batch_size=BATCH_SIZE, workers=None, dtype="fp32", shard=(0, 1), progress=True) -> dict:
    """Features for every video (missing ones only) -> out/<video_id>.npy. Returns a summary: done,
    skipped, failed [(video_id, path, reason)], frames (samples encoded), silent [video_id].

    videos: paths (see find_videos). Decoding runs in `workers` processes (0: in this one); the
    samples of several videos are batched for the backbone on `device` (default: cuda if present).
    An output that cannot be written raises OSError naming the file.
    """
    if dtype not in AMP_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(AMP_DTYPES)}")
    if not (1 <= frames <= MAX_FRAMES and batch_size >= 1 and (workers or 0) >= 0):  # first
        raise ValueError(f"need 1 <= --frames <= {MAX_FRAMES}, --batch_size >= 1, --workers >= 0; "
                         f"got {frames}, {batch_size}, {workers}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = min(os.cpu_count() or 1, 16) if workers is None else workers
    out = Path(out)
    videos = [Path(v) for v in videos][shard[0]::shard[1]]
    todo = [v for v in videos if not (out / f"{v.stem}.npy").exists()]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = dtype != "fp32"  # fp32 means fp32: no TF32 convs either
        torch.backends.cuda.matmul.allow_tf32 = dtype != "fp32"
    model, spec, weights_sha = load_backbone(backbone, weights, device)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot start leaves no folder
    write_meta(out, {
        "backbone": backbone, "kind": spec.kind, "feature_dim": model.output_dim, "frames": frames,
        "dtype": dtype, "weights": Path(weights).name if weights else spec.url,
        "weights_sha256": weights_sha, "frame_sampling": FRAME_RULE,
        "preprocessing": spec.preprocessing, "format": "<video_id>.npy: float32 (N, feature_dim)"})

    summary = dict(done=0, skipped=len(videos) - len(todo), failed=[], frames=0, silent=[])
    start = time.time()
    try:
        with (closing(decoded_videos(todo, frames, backbone, workers)) as decoded,
              tqdm(total=len(todo), unit="video", file=sys.stderr, dynamic_ncols=True,
                   disable=not progress) as bar):
            for batch in batches(decoded, batch_size):
                encodable = [s for _, s, err in batch if err is None and not isinstance(s, Silent)]
                feats = (encode_samples(model, spec, np.concatenate(encodable), device, batch_size,
                                        dtype) if encodable else np.zeros((0, model.output_dim)))
                rows = iter(np.split(feats, np.cumsum([len(s) for s in encodable])[:-1]))  # (N, D)s
                for path, samples, error in batch:
                    if error is not None:
                        record_failure(out, path, error)
                        summary["failed"].append((path.stem, str(path), error))
                    elif isinstance(samples, Silent):  # no soundtrack: zeros (the paper's padding)
                        zeros = np.zeros((len(samples), model.output_dim), np.float32)
                        save_features(out / f"{path.stem}.npy", zeros)
                        append_line(out / "silent.txt", path.stem.translate(ESCAPE))
                        summary["silent"].append(path.stem)
                    else:
                        save_features(out / f"{path.stem}.npy", next(rows))
                    summary["done"] += error is None
                summary["frames"] += len(feats)
                bar.update(len(batch))
                speed = summary["frames"] / max(time.time() - start, 1e-9)
                bar.set_postfix(frames_per_s=f"{speed:.0f}")
    finally:
        compact_failures(out)
        list_silent(out)
    return summary


# ----------------------------------------------------------------------------------------------
# 7. Command line


def main(argv=None) -> int:
    """The CLI; returns the exit status: 0, 1 if some videos failed, 2 for a usage or I/O error."""
    epilog = "Preprocessing (also in each run's meta.json):\n" + "\n".join(
        textwrap.fill(f"{b.name}: {b.preprocessing}", 100, subsequent_indent="    ")
        for b in BACKBONES.values())
    p = argparse.ArgumentParser(description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="*", help="video files and/or folders (searched recursively)")
    p.add_argument("--list", help="a text file with one video path per line")
    p.add_argument("--out", required=True, help="output folder, e.g. feats/image")
    p.add_argument("--backbone", default="ViT-B/32", choices=list(BACKBONES))
    p.add_argument("--weights", help="checkpoint file (else the public one, downloaded and cached)")
    p.add_argument("--frames", type=int, default=FRAMES, help=f"N segments per video (default "
                   f"{FRAMES}, the authors'; at most {MAX_FRAMES}: a video's are held in memory)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE,
                   help="samples per backbone batch: frames, 16-frame clips (lower it for "
                        "resnext101-kinetics on a small GPU) or 0.96 s audio examples")
    p.add_argument("--workers", type=int,
                   help="decoding processes (default: CPU count, at most 16; 0 = none)")
    p.add_argument("--dtype", default="fp32", choices=list(AMP_DTYPES), help="fp32 (default, as "
                   "the paper) or fp16/bf16 autocast: faster on GPU, features differ")
    p.add_argument("--shard", default="0/1", help="i/n: process every n-th video from the i-th")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        videos = find_videos(args.videos, args.list)
        if not videos:
            p.error("no videos given (pass files, folders or --list FILE)")
        summary = extract(videos, args.out, args.backbone, args.weights, args.frames, args.device,
                          args.batch_size, args.workers, args.dtype, parse_shard(args.shard),
                          not args.no_progress)
    except (ValueError, RuntimeError, OSError, ImportError) as e:  # usage and I/O errors: one line
        io_error = isinstance(e, OSError) and e.errno is not None  # names its file, else --out
        print(f"error: {e.filename or args.out}: {e.strerror}" if io_error else f"error: {e}",
              file=sys.stderr)
        return 2
    if summary["silent"]:
        print(f"{len(summary['silent'])} without a soundtrack: zero features (listed in meta.json)",
              file=sys.stderr)
    failed = f", {len(summary['failed'])} failed (see {Path(args.out) / 'failed.txt'})"
    print(f"{summary['done']} written, {summary['skipped']} already there"
          f"{failed if summary['failed'] else ''}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleaned up: no temporary file left
    sys.exit(main())
