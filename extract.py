"""
Frozen backbone features from raw videos: video files -> DIR/<video_id>.npy, float32 (N, D), one row per segment.

    python extract.py videos/ --out feats/image  --backbone ViT-B/32                    # image  (N, 512)
    python extract.py videos/ --out feats/motion --backbone resnext101-kinetics --weights resnext-101-kinetics.pth
    python extract.py videos/ --out feats/audio  --backbone vggish                      # audio  (N, 128)

Segments. A video of F decodable frames is cut into N segments (--frames, default 60: the authors' fixed 60
features per video; train.py then takes 28 of the 60 by the same rule) by the authors' rule
(get_uniform_ids_from_k_snippets): bounds b_i = int(i * F / N) for i < N and b_N = F, segment i's centre frame
(b_i + b_i+1) // 2; a video shorter than N frames repeats frames. F is counted by decoding (a container's frame
count is trusted only when the decode confirms it), so a truncated file gives features of the frames it has.
Decoding uses PyAV (FFmpeg ships in its wheels); only the sampled frames are held in memory.

Backbones (--backbone), plain PyTorch below, built from the public checkpoints (sizes read off the tensor shapes):
  ViT-B/32 (default, the paper's), ViT-B/16   CLIP visual encoder (ViT), D = 512
  RN50, RN101, RN50x4                         CLIP visual encoder (ModifiedResNet), D = 1024, 512, 640
  resnet101                                   ImageNet ResNet-101 (the INP baseline of Sec. 3), torchvision's
                                              IMAGENET1K_V1 without fc: layer4 globally average-pooled, D = 2048
  resnext101-kinetics                         3D ResNeXt-101 on Kinetics-400 (Hara et al., CVPR 2018), D = 2048
  vggish, vggish-pca                          VGGish on AudioSet (Hershey et al., ICASSP 2017), D = 128
- CLIP: encode_image's projected embedding, not L2-normalised. OpenAI's transform: shorter side to 224 (RN50x4:
  288, its input size) with PIL bicubic, centre crop, RGB, /255, mean (0.48145466, 0.4578275, 0.40821073), std
  (0.26862954, 0.26130258, 0.27577711). ImageNet: shorter side 256 (PIL bilinear), centre crop 224, /255, mean
  (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
- Motion: per segment the 16 consecutive frames centred on its centre frame (shifted to stay inside the video,
  looped when it is shorter than 16 frames); 3D-ResNets-PyTorch's test transform: shorter side 112 (PIL bilinear),
  centre crop 112, RGB in [0, 255] minus (114.7748, 107.7354, 99.4750), no std. --batch_size counts clips.
- Audio: the first soundtrack as 16-bit PCM (what the authors' `ffmpeg -i VIDEO -f wav` gives), / 32768, the
  channel mean, resampled to 16 kHz with resampy, as torchvggish's waveform_to_examples; log mel: 25 ms
  periodic-Hann windows every 10 ms, |FFT 512|, 64 HTK mel bands 125-7500 Hz, log(mel + 0.01). Per segment one
  0.96 s example (96 x 64) centred on its centre frame's time (start + k / fps, k by the rule above on the
  container's frame count), shifted to stay inside the soundtrack (zero-padded when it is shorter than 0.96 s).
  The mono track is held in memory at its own rate (23 MB per minute at 48 kHz). vggish gives the raw embeddings
  (the paper's); vggish-pca adds the AudioSet release's PCA, whitening and 8-bit quantisation. As in torchvggish,
  a ReLU follows the last layer (TF's release has none: torchvggish issue #24). A video without a soundtrack gets
  zeros and is listed in meta.json's "silent" (and silent.txt, so that shards sharing a folder all count).
- Precision: fp32 (the authors note that fp16 features change the captions; fp32 also turns TF32 off on a GPU);
  --dtype fp16|bf16 runs the backbone under autocast: faster on a GPU, the features differ slightly.

Weights (--weights PATH): OpenAI's released .pt files (TorchScript) or a state_dict file (read weights_only).
Without --weights the file is downloaded from its public URL, checked against the SHA-256 (or its prefix) that the
URL carries and cached in $DAP_CACHE (default ~/.cache/dap); offline, the error names the URL to fetch by hand.
resnext-101-kinetics.pth sits in 3D-ResNets-PyTorch's Google Drive folder (no direct download, no published
hash): download it by hand and pass --weights (or put it in the cache); its `module.` keys load as they are.

Output in --out DIR: <video_id>.npy, each written atomically (existing ones are skipped: a killed run resumes);
meta.json (backbone, D, N, dtype, weights SHA-256, frame rule, preprocessing; resuming with other settings is
refused); failed.txt (video_id TAB path TAB reason; retried, and dropped when fixed, by the next run). Exit status
0; 1 when some videos failed (each on stderr; the others go on); 2 for a usage or I/O error (one line naming the
file). --shard i/n takes every n-th video from the i-th, so that several GPUs or machines share one --out.

The code, in reading order: 1. sampling and decoding; 2. preprocessing; 3. the backbones, and CLIP's text side
(BPE tokenizer, text tower) for CLIPScore in train.py; 4. the registry; 5. weights; 6. the extraction loop; 7. CLI.
"""
import argparse
import gzip
import hashlib
import html
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
import urllib.request
import uuid
import warnings
import zipfile
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import av
import ftfy
import numpy as np
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg",
                    ".3gp", ".ts", ".ogv"}
FRAMES = 60  # N per video: the authors' fixed 60 (config/Constants.py n_total_frames); train.py takes 28 of them
BATCH_SIZE = 256  # samples per backbone batch


class VideoError(Exception):
    """A video that cannot be used (unreadable, no video stream, zero decodable frames)."""


# ----------------------------------------------------------------------------------------------
# 1. Frame sampling and decoding


def sample_indices(num_frames: int, n: int) -> np.ndarray:
    """(N,) centre frames of n segments of num_frames frames, by the authors' rule (misc/utils.py of
    yangbang18/CLIP-Captioner, get_uniform_ids_from_k_snippets): bounds int(x) of np.linspace(0, F, N + 1), whose
    i-th value is i * (F / N) and last F; centre i = (bound_i + bound_i+1) // 2."""
    if num_frames <= 0:
        raise ValueError(f"cannot sample from {num_frames} frames")
    bounds = [int(i * (num_frames / n)) for i in range(n)] + [num_frames]
    return np.array([(bounds[i] + bounds[i + 1]) // 2 for i in range(n)], dtype=np.int64)


def grab_frames(path, wanted, preprocess: Callable, threads: int):
    """Decode `path` once; keep preprocess(frame) for the frame indices wanted(F_claimed) -> (kept, F, F_claimed).

    F_claimed is the container's frame count (0 if unknown); F is the number of frames actually decoded.
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
                        kept[count] = preprocess(frame.to_image())  # RGB PIL image -> (H, W, 3) uint8
                    count += 1
        except av.error.FFmpegError:
            pass  # a truncated file: the frames decoded so far are the decodable ones
    return kept, count, claimed


def clip_indices(centres: np.ndarray, num_frames: int, clip_len: int) -> np.ndarray:
    """(N, clip_len) frame indices: clip_len consecutive frames around each centre, shifted to stay inside
    the video; a video shorter than clip_len repeats its frames cyclically (3D-ResNets' LoopPadding)."""
    start = np.clip(centres - clip_len // 2, 0, max(num_frames - clip_len, 0))  # (N,)
    return (start[:, None] + np.arange(clip_len)) % num_frames  # (N, clip_len)


def decode_frames(path, n: int, preprocess: Callable, threads: int = 0, clip_len: int = 0) -> np.ndarray:
    """N preprocessed frames at the segment centres of a video's decodable frames: (N, H, W, 3) uint8;
    with clip_len > 0, a clip of clip_len frames around each centre: (N, clip_len, H, W, 3) uint8.

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
    """(mono float64 waveform at 16 kHz, its start time in s) of the first audio track; None without one.

    As the reference: the samples as 16-bit PCM / 32768 (the authors' ffmpeg -f wav, then torchvggish's
    wavfile_to_examples), the mean over channels, resampy.resample to 16 kHz (waveform_to_examples).
    """
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        to_pcm, rate, chunks = None, AUDIO_RATE, []
        try:
            for frame in container.decode(stream):
                if to_pcm is None:  # int16 planar, the decoder's channels and rate
                    rate = frame.sample_rate
                    to_pcm = av.AudioResampler(format="s16p", layout=frame.layout, rate=rate)
                chunks += [(pcm.to_ndarray() / 32768.0).mean(axis=0) for pcm in to_pcm.resample(frame)]  # (S_k,)
            if to_pcm is not None:
                chunks += [(pcm.to_ndarray() / 32768.0).mean(axis=0) for pcm in to_pcm.resample(None)]
        except av.error.FFmpegError:
            pass  # a corrupt or truncated tail: keep what decoded
    wave = np.concatenate(chunks) if chunks else np.zeros(0)  # (S,) float64
    if rate != AUDIO_RATE and wave.size:
        import resampy  # here: it loads numba, seconds that image and motion extraction need not pay
        wave = resampy.resample(wave, rate, AUDIO_RATE)
    return wave, start


def segment_times(path, n: int, threads: int = 0) -> np.ndarray:
    """(N,) times in s of the N segment-centre frames, on the container's clock.

    The frame rule of decode_frames on the container's frame count (frames are decoded and counted only
    when the container does not say), frame k shown at start + k / fps; without a frame rate, the
    centres of N equal parts of the duration.
    """
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        count, rate = int(stream.frames or 0), stream.average_rate or stream.guessed_rate
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        duration = (float(stream.duration * stream.time_base) if stream.duration
                    else (container.duration or 0) / av.time_base)
    if rate and count <= 0:
        _, count, _ = grab_frames(path, lambda f: np.empty(0, np.int64), None, threads)
    if rate and count > 0:
        return start + sample_indices(count, n) / float(rate)
    if duration > 0:
        return start + (np.arange(n) + 0.5) * duration / n
    raise VideoError("neither the frame rate nor the duration is known: cannot place the audio segments")


class Silent:
    """A decoder's answer for a video without a soundtrack: N zero vectors, no backbone (the paper's padding)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n


def decode_log_mel(path, n: int, threads: int = 0):
    """(N, 1, 96, 64) float32 log-mel examples centred on the N segment-centre frames, or Silent(N)."""
    times = segment_times(path, n, threads)
    audio = decode_audio(path)
    if audio is None or audio[0].size == 0:
        return Silent(n)
    wave, audio_start = audio
    return segment_log_mel(wave, times - audio_start)


# ----------------------------------------------------------------------------------------------
# 2. Preprocessing: PIL image -> uint8 (H, W, 3) in the decode workers; float normalisation on device

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The test transform of kenshohara/3D-ResNets-PyTorch (2018 release: opts.py, mean.py, main.py), whose
# Kinetics checkpoints the motion backbone loads: --sample_duration 16, --sample_size 112; Scale(112)
# (shorter side, PIL bilinear, the other int(112 * long / short)); CenterCrop(112) with round();
# ToTensor(norm_value=1), so pixels stay in [0, 255]; Normalize(get_mean(1, 'activitynet'), [1, 1, 1]).
KINETICS_CLIP_LEN, KINETICS_SIZE = 16, 112
KINETICS_MEAN = (114.7748, 107.7354, 99.4750)  # RGB; no std


def resize_shorter(img: Image.Image, size: int, resample) -> Image.Image:
    """Resize so the shorter side is `size`, the longer one int(size * long / short), like torchvision."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central size x size crop, with torchvision's rounding."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, resize: int, size: int, resample) -> np.ndarray:
    """Shorter side to `resize` (PIL filter `resample`), centre crop `size`, RGB -> (size, size, 3) uint8.

    CLIP: resize = size = 224 (RN50x4: 288), bicubic; ImageNet: 256, 224, bilinear; Kinetics: 112, 112, bilinear.
    """
    return np.asarray(center_crop(resize_shorter(img, resize, resample), size).convert("RGB"), dtype=np.uint8)


def normalize(x: torch.Tensor, mean, std=(1.0, 1.0, 1.0), scale: float = 255.0) -> torch.Tensor:
    """(B, [T,] H, W, 3) uint8 -> (B, 3, [T,] H, W) float32: x / scale, minus mean, over std, per channel.

    CLIP and ImageNet: scale 255 and their mean / std; Kinetics: scale 1 (pixels in [0, 255]), its mean, std 1.
    """
    x = x.movedim(-1, 1).float() / scale
    shape = (1, 3) + (1,) * (x.dim() - 2)  # broadcast over the channel axis
    mean, std = torch.tensor(mean, device=x.device).view(shape), torch.tensor(std, device=x.device).view(shape)
    return ((x - mean) / std).contiguous()


# VGGish's front end (vggish_params.py and mel_features.py of tensorflow/models, kept by torchvggish):
# 25 ms periodic-Hann windows every 10 ms, |FFT| on 512 points, 64 HTK mel bands over 125-7500 Hz,
# log(mel + 0.01); examples of 96 frames (0.96 s).
STFT_WINDOW, STFT_HOP, N_FFT = 400, 160, 512  # samples at 16 kHz
N_MELS, MEL_LOW_HZ, MEL_HIGH_HZ, LOG_OFFSET = 64, 125.0, 7500.0, 0.01
EXAMPLE_FRAMES = 96


def hz_to_mel(hz):
    """HTK mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def mel_filterbank(n_freqs=N_FFT // 2 + 1, n_mels=N_MELS, rate=AUDIO_RATE, low=MEL_LOW_HZ, high=MEL_HIGH_HZ):
    """(n_freqs, n_mels) triangular filters, linear in mel (float64); the DC bin, below 125 Hz, gets 0."""
    bin_mel = hz_to_mel(np.linspace(0.0, rate / 2.0, n_freqs))[:, None]  # (n_freqs, 1)
    edges = np.linspace(hz_to_mel(low), hz_to_mel(high), n_mels + 2)  # band i: edges i, i + 1, i + 2
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (n_mels,) each
    rising, falling = (bin_mel - lower) / (centre - lower), (upper - bin_mel) / (upper - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(rising, falling)))


def log_mel_spectrogram(wave) -> torch.Tensor:
    """(..., S) 16 kHz waveforms -> (..., F, 64) float64 log mel, F = 1 + (S - 400) // 160 (no padding)."""
    wave = torch.as_tensor(wave, dtype=torch.float64)
    frames = wave.unfold(-1, STFT_WINDOW, STFT_HOP)  # (..., F, 400)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(STFT_WINDOW, dtype=torch.float64) / STFT_WINDOW)
    magnitude = torch.fft.rfft(frames * window, n=N_FFT).abs()  # (..., F, 257)
    return torch.log(magnitude @ mel_filterbank() + LOG_OFFSET)  # (..., F, 64)


def segment_log_mel(wave, times) -> np.ndarray:
    """(S,) waveform, (N,) times in s -> (N, 1, 96, 64) float32: the 0.96 s example centred on each time,
    shifted to stay inside the track; a track shorter than 0.96 s is zero-padded (silence).

    Frame k of the track's log mel starts at sample 160 k, so only the N examples' samples are transformed.
    """
    wave = torch.as_tensor(wave, dtype=torch.float64)
    span = STFT_WINDOW + (EXAMPLE_FRAMES - 1) * STFT_HOP  # 15600 samples = exactly 96 frames
    wave = F.pad(wave, (0, max(span - wave.numel(), 0)))
    n_frames = 1 + (wave.numel() - STFT_WINDOW) // STFT_HOP  # frames of the whole track
    centres = torch.round(torch.as_tensor(times, dtype=torch.float64) * AUDIO_RATE / STFT_HOP).long()  # (N,)
    start = (centres - EXAMPLE_FRAMES // 2).clamp(0, n_frames - EXAMPLE_FRAMES)  # (N,) first frame of each
    samples = wave[start[:, None] * STFT_HOP + torch.arange(span)]  # (N, 15600)
    return log_mel_spectrogram(samples).unsqueeze(1).float().numpy()  # (N, 1, 96, 64)


# ----------------------------------------------------------------------------------------------
# 3a. CLIP's building blocks (shared by the visual and the text tower; OpenAI key names)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as in CLIP."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head, batch_first=True)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x, attn_mask=None):  # (B, L, D)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ResidualAttentionBlocks; attn_mask (L, L) additive, e.g. causal for CLIP's text tower."""

    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor = None):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.register_buffer("attn_mask", attn_mask, persistent=False)

    def forward(self, x):  # (B, L, D)
        L = x.shape[1]  # a causal mask cut to (L, L) gives the same outputs for the first L tokens
        mask = None if self.attn_mask is None else self.attn_mask[:L, :L].to(x.dtype)
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTransformer(nn.Module):
    """CLIP ViT: patches + [CLS] + positions -> Transformer -> ln_post([CLS]) @ proj."""

    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):  # (B, 3, H, W)
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid**2, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, grid**2 + 1, width)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0, :]) @ self.proj  # (B, output_dim)


# 3b. ResNet stages and bottlenecks (torchvision's and CLIP's); CLIP's ModifiedResNet


def add_stages(module, block, inplanes, base_planes, layers, expansion):
    """Add layer1..layerN: stage i has layers[i] blocks of base_planes * 2**i planes, stride 2 after stage 1.

    Returns the output channels. Shared by CLIP's ModifiedResNet, torchvision's ResNet and the 3D ResNeXt.
    """
    for i, blocks in enumerate(layers):
        planes = base_planes * 2 ** i
        stage = [block(inplanes, planes, 1 if i == 0 else 2)]
        stage += [block(planes * expansion, planes, 1) for _ in range(blocks - 1)]
        module.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        inplanes = planes * expansion
    return inplanes


class Bottleneck(nn.Module):
    """ResNet bottleneck 1x1 -> 3x3 -> 1x1 (4x planes) plus a shortcut. torchvision's (v1.5) strides on the 3x3 conv;
    CLIP's anti-aliased one average-pools after it instead, and before the shortcut's conv."""

    def __init__(self, inplanes, planes, stride=1, anti_alias=False):
        super().__init__()
        conv_stride = 1 if anti_alias else stride
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=conv_stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if anti_alias and stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            pool = [("-1", nn.AvgPool2d(stride))] if anti_alias else []
            self.downsample = nn.Sequential(OrderedDict(pool + [
                ("0", nn.Conv2d(inplanes, planes * 4, 1, stride=conv_stride, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention pooling: the mean token (plus positions) attends over the spatial grid."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x):  # (B, C, H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, HW + 1, C)

        def heads(t):  # (B, L, C) -> (B, heads, L, C / heads)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q, k, v = heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x))  # the mean token asks
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))[:, 0]  # (B, output_dim)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem with avgpool, anti-aliased bottlenecks, attention pooling."""

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        add_stages(self, partial(Bottleneck, anti_alias=True), width, width, layers, expansion=4)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward(self, x):  # (B, 3, H, W)
        x = x.to(self.conv1.weight.dtype)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))  # (B, width, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 width, H/32, W/32)
        return self.attnpool(x)  # (B, output_dim)


def sub_state_dict(state_dict: dict, prefix: str) -> dict:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def num_blocks(state_dict: dict, prefix: str) -> int:
    """How many numbered children `prefix.<i>.` the state_dict has."""
    return len({k[len(prefix):].split(".")[1] for k in state_dict if k.startswith(prefix + ".")})


def clip_visual_config(state_dict: dict) -> dict:
    """CLIP visual hyper-parameters read off a CLIP state_dict's tensor shapes (as openai/CLIP's build_model)."""
    sd = sub_state_dict(state_dict, "visual.")
    if not sd:
        raise ValueError("not a CLIP checkpoint: no 'visual.*' tensors")
    if "proj" in sd:  # ViT: patch embedding conv, [CLS] + grid**2 positions, 64-d heads
        width, patch = sd["conv1.weight"].shape[0], sd["conv1.weight"].shape[-1]
        grid = round((sd["positional_embedding"].shape[0] - 1) ** 0.5)
        return dict(arch="vit", input_resolution=patch * grid, patch_size=patch, width=width,
                    layers=len([k for k in sd if k.endswith(".attn.in_proj_weight")]), heads=width // 64,
                    output_dim=sd["proj"].shape[1])
    width = sd["layer1.0.conv1.weight"].shape[0]  # ModifiedResNet: the attention pool sees a 1/32 grid
    grid = round((sd["attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return dict(arch="resnet", layers=[num_blocks(sd, f"layer{b}") for b in (1, 2, 3, 4)],
                output_dim=sd["attnpool.c_proj.weight"].shape[0], heads=width * 32 // 64,
                input_resolution=grid * 32, width=width)


def build_clip_visual(state_dict: dict) -> nn.Module:
    """CLIP's image encoder (encode_image) from a CLIP state_dict, in fp32."""
    cfg = clip_visual_config(state_dict)
    model = (VisionTransformer if cfg.pop("arch") == "vit" else ModifiedResNet)(**cfg)
    sd = sub_state_dict(state_dict, "visual.")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval()


# 3c. torchvision's ImageNet ResNet (the INP baseline), key layout of torchvision.models.resnet


class ResNet(nn.Module):
    """ImageNet ResNet trunk (no fc): 7x7 stem, maxpool, 4 stages, global average pool -> (B, 2048)."""

    def __init__(self, layers=(3, 4, 23, 3), width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.output_dim = add_stages(self, Bottleneck, width, width, layers, expansion=4)

    def forward(self, x):  # (B, 3, 224, 224)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, 64, 56, 56)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, 7, 7)
        return x.mean(dim=(2, 3))  # (B, 2048): the globally average-pooled feature


def build_imagenet_resnet(state_dict: dict) -> nn.Module:
    """torchvision resnet50/101/152 from its state_dict (fc.* ignored), depth read off the keys."""
    if "layer1.0.conv3.weight" not in state_dict:
        raise ValueError("not a torchvision bottleneck-ResNet state_dict (no 'layer1.0.conv3.weight')")
    layers = [num_blocks(state_dict, f"layer{b}") for b in (1, 2, 3, 4)]
    model = ResNet(layers, width=state_dict["conv1.weight"].shape[0])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state_dict.items() if not k.startswith("fc.")})
    return model.eval()


# 3d. CLIP's text side: byte-level BPE tokenizer (openai/CLIP simple_tokenizer.py) and text tower

BPE_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_PACKAGES = ("clip", "open_clip")  # openai-clip and clip-anytorch install `clip`, open-clip-torch `open_clip`
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # the merges CLIP uses: 2 * 256 byte symbols + 48,894 merges + SOT, EOT = 49,408 ids
# a word is a special token, a contraction, a run of letters, ONE digit, or a run of other non-space symbols
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def find_bpe_vocab() -> Path:
    """CLIP's merges file inside an installed package (MIT licence); it is not copied into this repository."""
    for package in BPE_PACKAGES:
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        for root in (spec.submodule_search_locations or []) if spec else []:
            if (Path(root) / BPE_VOCAB_NAME).is_file():
                return Path(root) / BPE_VOCAB_NAME
    raise FileNotFoundError(
        f"CLIP's BPE vocabulary {BPE_VOCAB_NAME} was not found in an installed `clip` or `open_clip` package; "
        "install it with `pip install -r requirements.txt` (openai-clip; only that file is used)")


@lru_cache()
def bytes_to_unicode() -> dict:
    """Each of the 256 bytes -> a printable character, so BPE never sees spaces or control codes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    # printable bytes stand for themselves, the others borrow code points 256, 257, ...; this order
    # (printable first) is the order of the first 256 token ids
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(unprintable)}


def clean_text(text: str) -> str:
    """CLIP's normalisation: repair mojibake (ftfy), unescape HTML twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class BPETokenizer:
    """CLIP's tokenizer: clean the text, split it into words, merge each word's bytes by the BPE ranks."""

    def __init__(self, vocab_path=None):
        vocab_path = Path(vocab_path) if vocab_path else find_bpe_vocab()
        if not vocab_path.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary {vocab_path} does not exist")
        lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is a version header
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{vocab_path}: expected {N_MERGES} merges of two symbols each")
        self.byte_encoder = bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}  # 49,408 ids
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}  # lower rank = merged earlier
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.cache = {SOT: [SOT], EOT: [EOT]}

    def bpe(self, word: str) -> list:
        """One byte-encoded word -> its BPE symbols, the last one marked with '</w>'."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            # merge every occurrence of the adjacent pair with the lowest rank, left to right
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.merge_rank.get(pair, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list:
        """Token ids of a text, without SOT/EOT."""
        ids = []
        for word in WORD_PATTERN.findall(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids += [self.encoder[symbol] for symbol in self.bpe(word)]
        return ids


@lru_cache()
def default_tokenizer() -> BPETokenizer:
    """The tokenizer on the installed vocabulary file, built once."""
    return BPETokenizer()


def tokenize(texts, context_length: int = 77, truncate: bool = True, tokenizer=None) -> torch.Tensor:
    """Texts -> (B, context_length) int64: SOT, BPE ids, EOT, zero padding (as OpenAI's clip.tokenize)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"tokenize expects strings, got {type(t).__name__}: {t!r}")
    tokenizer = tokenizer or default_tokenizer()
    tokens = torch.zeros(len(texts), context_length, dtype=torch.long)  # (B, L)
    for row, text in enumerate(texts):
        ids = [tokenizer.sot_id] + tokenizer.encode(text) + [tokenizer.eot_id]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text of {len(ids)} tokens > context_length {context_length}: {text[:80]!r}")
            ids = ids[:context_length - 1] + [tokenizer.eot_id]  # keep the EOT: the features are read there
        tokens[row, :len(ids)] = torch.tensor(ids)
    return tokens


class TextTransformer(nn.Module):
    """CLIP's text tower (encode_text): causal Transformer over BPE ids, read at EOT, projected."""

    def __init__(self, output_dim, context_length, vocab_size, width, layers, heads):
        super().__init__()
        self.context_length, self.output_dim = context_length, output_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width).normal_(std=0.01))
        causal = torch.full((context_length, context_length), float("-inf")).triu(1)  # token t sees 0..t
        self.transformer = Transformer(width, layers, heads, attn_mask=causal)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim).normal_(std=width ** -0.5))

    def forward(self, tokens):  # (B, L) int64
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"expected token ids of shape (B, {self.context_length}), got {tuple(tokens.shape)}")
        eot = tokens.argmax(dim=-1)  # (B,) EOT has the largest id in every row
        L = int(eot.max()) + 1  # causal: tokens after the last EOT cannot change it, so they are skipped
        x = self.token_embedding(tokens[:, :L]) + self.positional_embedding[:L]  # (B, L, width)
        x = self.ln_final(self.transformer(x))  # (B, L, width)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (B, output_dim)


TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def clip_text_config(state_dict: dict) -> dict:
    """CLIP text hyper-parameters read off a CLIP state_dict's tensor shapes (as openai/CLIP's build_model)."""
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"):
        if key not in state_dict:
            raise ValueError(f"not a CLIP checkpoint with a text tower: no {key!r} tensor")
    width = state_dict["ln_final.weight"].shape[0]
    return dict(output_dim=state_dict["text_projection"].shape[1],
                context_length=state_dict["positional_embedding"].shape[0],
                vocab_size=state_dict["token_embedding.weight"].shape[0], width=width,
                layers=num_blocks(state_dict, "transformer.resblocks"), heads=width // 64)


def build_clip_text(state_dict: dict) -> nn.Module:
    """CLIP's text encoder (encode_text) from a CLIP state_dict, in fp32."""
    model = TextTransformer(**clip_text_config(state_dict))
    model.load_state_dict({k: v.float() for k, v in state_dict.items() if k.startswith(TEXT_PREFIXES)})
    return model.eval()


# 3e. 3D ResNeXt (motion; Hara et al., CVPR 2018), key layout of 3D-ResNets-PyTorch's models/resnext.py


class ResNeXtBlock(Bottleneck):
    """3D bottleneck 1x1x1 -> grouped 3x3x3 (carries the stride) -> 1x1x1, plus a conv shortcut (type B).

    The same residual forward as the 2D Bottleneck; only the convolutions differ.
    """
    expansion = 2

    def __init__(self, inplanes, planes, cardinality, stride=1):
        nn.Module.__init__(self)
        self.avgpool = nn.Identity()
        mid, out = cardinality * (planes // 32), planes * self.expansion  # cardinality 32: mid = planes
        self.conv1 = nn.Conv3d(inplanes, mid, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.conv2 = nn.Conv3d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm3d(mid)
        self.conv3 = nn.Conv3d(mid, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv3d(inplanes, out, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm3d(out))


class ResNeXt3D(nn.Module):
    """3D ResNeXt trunk: a (B, 3, 16, 112, 112) clip -> (B, 2048), the globally average-pooled feature."""

    def __init__(self, layers=(3, 4, 23, 3), cardinality=32, num_classes=400):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, kernel_size=7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        block = lambda inplanes, planes, stride: ResNeXtBlock(inplanes, planes, cardinality, stride)  # noqa: E731
        self.output_dim = add_stages(self, block, 64, 128, layers, expansion=ResNeXtBlock.expansion)
        self.fc = nn.Linear(self.output_dim, num_classes)  # the Kinetics classifier: loaded (strict), not used

    def forward(self, x):  # (B, 3, 16, 112, 112)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, 64, 8, 28, 28)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, 1, 4, 4)
        # the reference's AvgPool3d((ceil(16 / 16), ceil(112 / 32), ceil(112 / 32))) covers this whole map
        return x.mean(dim=(2, 3, 4))  # (B, 2048)


def build_resnext3d(state_dict: dict) -> nn.Module:
    """3D ResNeXt from a 3D-ResNets-PyTorch checkpoint (`module.` keys of nn.DataParallel, or bare ones);
    depth, cardinality and classes read off the shapes. The 2018 files predate num_batches_tracked:
    a plain dict lets BatchNorm fill it in; every other key must match exactly."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if "layer1.0.conv2.weight" not in sd or sd["layer1.0.conv2.weight"].dim() != 5 or "fc.weight" not in sd:
        raise ValueError("not a 3D-ResNets-PyTorch ResNeXt checkpoint (no 5-d 'layer1.0.conv2.weight' or no 'fc')")
    conv2 = sd["layer1.0.conv2.weight"]  # (mid, mid / cardinality, 3, 3, 3)
    layers = [num_blocks(sd, f"layer{b}") for b in (1, 2, 3, 4)]
    model = ResNeXt3D(layers, cardinality=conv2.shape[0] // conv2.shape[1], num_classes=sd["fc.weight"].shape[0])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval()


# 3f. VGGish (audio; Hershey et al., ICASSP 2017), key layout of harritaylor/torchvggish


class VGGishPCA(nn.Module):
    """The AudioSet release's post-processing: PCA with whitening, clip to [-2, 2], 8-bit quantisation."""

    def __init__(self, matrix: torch.Tensor, means: torch.Tensor):
        super().__init__()
        self.register_buffer("pca_matrix", matrix.float())  # (128, 128), rows = output dimensions
        self.register_buffer("pca_means", means.float().reshape(-1, 1))  # (128, 1)

    def forward(self, x):  # (B, 128) -> (B, 128), integers 0..255 as floats
        projected = (x - self.pca_means.T) @ self.pca_matrix.T
        return torch.round((projected.clamp(-2.0, 2.0) + 2.0) * (255.0 / 4.0))


class VGGish(nn.Module):
    """VGGish: a (B, 1, 96, 64) log-mel example (96 frames x 64 bands) -> a (B, 128) embedding."""

    def __init__(self, pca: VGGishPCA = None):
        super().__init__()
        layers, channels = [], 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):  # list positions = features.<i> keys
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096), nn.ReLU(True), nn.Linear(4096, 4096), nn.ReLU(True),
            # torchvggish ends in a ReLU (TF's release has none there, torchvggish issue #24); kept, so that
            # the port's checkpoint gives the port's numbers
            nn.Linear(4096, 128), nn.ReLU(True))
        self.pproc = pca
        self.output_dim = 128

    def forward(self, x):  # (B, 1, 96, 64)
        x = self.features(x)  # (B, 512, 6, 4): 6 time steps x 4 frequency bands
        x = x.permute(0, 2, 3, 1).flatten(1)  # (B, 12288) in TF's (time, frequency, channel) order
        x = self.embeddings(x)  # (B, 128)
        return x if self.pproc is None else self.pproc(x)


def build_vggish(state_dict: dict, pca: VGGishPCA = None) -> nn.Module:
    """VGGish from torchvggish's `vggish-10086976.pth` (features.*, embeddings.*; a pproc.* is ignored)."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith("pproc.")}
    if "embeddings.4.weight" not in sd:
        raise ValueError("not a torchvggish VGGish state_dict (no 'embeddings.4.weight')")
    model = VGGish()
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    model.pproc = pca
    return model.eval()


def load_vggish_pca(path) -> VGGishPCA:
    """The PCA parameters in torchvggish's `vggish_pca_params-970ea276.pth`: numpy arrays in a dict."""
    numpy_types = [np.ndarray, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType,
                   np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(numpy_types):  # weights_only, with numpy arrays allowed
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


# ----------------------------------------------------------------------------------------------
# 4. The backbone registry


@dataclass
class Backbone:
    """What extract() needs to know about a backbone; adding one = adding an entry to BACKBONES."""
    name: str
    kind: str              # one sample per segment centre: "frames" (an image), "clips" or "audio" (decode_video)
    build: Callable        # state_dict -> nn.Module with .output_dim: to_input(batch) -> (B, output_dim)
    preprocess: Callable   # in the decode workers: PIL image -> uint8 (H, W, 3)
    to_input: Callable     # on the device: the decoded batch -> the model's float input
    dim: int
    url: str
    sha256: str            # the full SHA-256 (OpenAI) or its prefix (torchvision's file names)
    input_size: int = 224  # pixels of the square model input
    preprocessing: str = ""  # human-readable, for meta.json
    clip_len: int = 0      # "clips": frames per clip
    file: str = ""         # the cache file name when the URL is not a direct download


def clip_backbone(name, dim, sha, file, size=224):
    """A CLIP visual encoder entry; OpenAI's URLs carry the file's SHA-256."""
    return Backbone(
        name=name, kind="frames", build=build_clip_visual,
        preprocess=partial(preprocess, resize=size, size=size, resample=Image.BICUBIC),
        to_input=partial(normalize, mean=CLIP_MEAN, std=CLIP_STD), dim=dim,
        url=f"https://openaipublic.azureedge.net/clip/models/{sha}/{file}", sha256=sha, input_size=size,
        preprocessing=f"CLIP: shorter side {size} (PIL bicubic), centre crop {size}, RGB, /255, "
                      f"mean {CLIP_MEAN}, std {CLIP_STD}")


BACKBONES = {  # OpenAI's file SHA-256s as in openai/CLIP's clip.py _MODELS
    "ViT-B/32": clip_backbone("ViT-B/32", 512, "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
                              "ViT-B-32.pt"),
    "ViT-B/16": clip_backbone("ViT-B/16", 512, "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
                              "ViT-B-16.pt"),
    "RN50": clip_backbone("RN50", 1024, "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
                          "RN50.pt"),
    "RN101": clip_backbone("RN101", 512, "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
                           "RN101.pt"),
    "RN50x4": clip_backbone("RN50x4", 640, "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
                            "RN50x4.pt", size=288),
    "resnet101": Backbone(  # INP: torchvision IMAGENET1K_V1, the classic ImageNet weights
        name="resnet101", kind="frames", build=build_imagenet_resnet,
        preprocess=partial(preprocess, resize=256, size=224, resample=Image.BILINEAR),
        to_input=partial(normalize, mean=IMAGENET_MEAN, std=IMAGENET_STD), dim=2048,
        url="https://download.pytorch.org/models/resnet101-63fe2227.pth", sha256="63fe2227",
        preprocessing=f"ImageNet: shorter side 256 (PIL bilinear), centre crop 224, RGB, /255, "
                      f"mean {IMAGENET_MEAN}, std {IMAGENET_STD}"),
    # Motion: Hara et al.'s Kinetics-400 ResNeXt-101 (16-frame `resnext-101-kinetics.pth`, 2018 release).
    # It sits in a Google Drive folder: no direct-download URL and no published SHA-256, so it is
    # downloaded by hand and passed with --weights (or put in the cache folder under `file`).
    "resnext101-kinetics": Backbone(
        name="resnext101-kinetics", kind="clips", build=build_resnext3d,
        preprocess=partial(preprocess, resize=KINETICS_SIZE, size=KINETICS_SIZE, resample=Image.BILINEAR),
        to_input=partial(normalize, mean=KINETICS_MEAN, scale=1.0), dim=2048, sha256="", input_size=KINETICS_SIZE,
        clip_len=KINETICS_CLIP_LEN, file="resnext-101-kinetics.pth",
        url="https://drive.google.com/drive/folders/14KRBqT8ySfPtFSuLsFS2U4I-ihTDs0Y9",
        preprocessing=f"3D-ResNets: {KINETICS_CLIP_LEN} consecutive frames centred on each segment centre (shifted "
                      f"inside the video, looped if it is shorter), shorter side 112 (PIL bilinear), centre crop "
                      f"112, RGB in [0, 255] minus mean {KINETICS_MEAN}, std 1"),
}

VGGISH_TEXT = ("VGGish (torchvggish): soundtrack -> 16-bit PCM / 32768, channel mean, 16 kHz (resampy), 25 ms "
               "periodic-Hann windows every 10 ms, |FFT 512|, 64 HTK mel bands 125-7500 Hz, log(mel + 0.01); the "
               "0.96 s example (96 x 64) centred on each segment-centre frame's time; no soundtrack -> zeros, "
               "listed in 'silent'")
TORCHVGGISH_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/"  # names carry SHA-256 prefixes
VGGISH_PCA = Backbone(  # vggish-pca's second file, fetched and verified like a backbone's weights
    name="vggish PCA parameters", kind="", build=None, preprocess=None, to_input=None, dim=128,
    url=TORCHVGGISH_URL + "vggish_pca_params-970ea276.pth", sha256="970ea276")
BACKBONES["vggish"] = Backbone(  # the paper's audio features: raw embeddings
    name="vggish", kind="audio", build=build_vggish, preprocess=None, to_input=lambda x: x, dim=128,
    url=TORCHVGGISH_URL + "vggish-10086976.pth", sha256="10086976", preprocessing=VGGISH_TEXT + "; raw embeddings")
BACKBONES["vggish-pca"] = Backbone(  # AudioSet's released embedding format (optional)
    name="vggish-pca", kind="audio", build=lambda sd: build_vggish(sd, load_vggish_pca(fetch_weights(VGGISH_PCA))),
    preprocess=None, to_input=lambda x: x, dim=128, url=TORCHVGGISH_URL + "vggish-10086976.pth", sha256="10086976",
    preprocessing=VGGISH_TEXT + "; then the release's PCA + whitening and 8-bit quantisation")


# ----------------------------------------------------------------------------------------------
# 5. Weights: download, verify, cache, load


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


def fetch_weights(spec: Backbone) -> Path:
    """The verified cached checkpoint for `spec`, downloaded from its public URL if needed."""
    target = cache_dir() / (spec.file or spec.url.rsplit("/", 1)[-1])
    if not spec.sha256:  # no direct download and no published hash: a file put there by hand
        if target.is_file():
            return target
        raise RuntimeError(f"the {spec.name} weights have no direct download: get {target.name} from {spec.url} "
                           f"by hand and pass it with --weights PATH (or put it in {cache_dir()}, set by $DAP_CACHE)")
    if target.is_file() and sha256_file(target).startswith(spec.sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def download(tmp):
        print(f"downloading {spec.url} -> {target}", file=sys.stderr)
        try:
            with urllib.request.urlopen(spec.url, timeout=60) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as e:  # urllib.error.URLError included
            raise RuntimeError(f"cannot download the {spec.name} weights from {spec.url} ({e}). Download that "
                               f"file on a machine with internet access and pass it with --weights PATH "
                               f"(or put it in {cache_dir()}, set by $DAP_CACHE).") from None
        digest = sha256_file(tmp)
        if not digest.startswith(spec.sha256):
            raise RuntimeError(f"{spec.url}: SHA-256 {digest} does not match the expected {spec.sha256}; "
                               f"file discarded")

    atomic_write(target, download)  # a failed or tampered download leaves nothing in the cache
    return target


def is_torchscript(path) -> bool:
    """True for a TorchScript archive (a zip with a constants.pkl), like OpenAI's released .pt files."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("constants.pkl") for name in z.namelist())
    except zipfile.BadZipFile:
        return False


def load_state_dict(path) -> dict:
    """Tensors of a checkpoint: a TorchScript archive (OpenAI's .pt) or a plain state_dict (weights_only)."""
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # jit.load is how OpenAI's files load
                state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
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
    """The checkpoint to load: --weights PATH if given (must exist), else the verified cached download."""
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file")
    return Path(weights) if weights is not None else fetch_weights(spec)


def load_backbone(name: str, weights=None, device="cpu"):
    """(model on device in eval mode, spec, weights SHA-256) for a registered backbone."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    path = weights_path(spec, weights)
    model = spec.build(load_state_dict(path)).to(device).eval().requires_grad_(False)
    if getattr(model, "input_resolution", spec.input_size) != spec.input_size:
        raise ValueError(f"{path}: the model takes {model.input_resolution}-px images, but {name} is "
                         f"preprocessed to {spec.input_size} px; pick the --backbone these weights belong to")
    if model.output_dim != spec.dim:
        print(f"warning: {path} gives {model.output_dim}-d features; {name} gives {spec.dim}-d ones",
              file=sys.stderr)
    return model, spec, sha256_file(path)


def load_clip_text(name: str, weights=None, device="cpu"):
    """(CLIP text tower on device in eval mode, weights SHA-256) from the checkpoint of CLIP backbone `name`."""
    if name not in BACKBONES or BACKBONES[name].build is not build_clip_visual:
        clip_names = [k for k, b in BACKBONES.items() if b.build is build_clip_visual]
        raise ValueError(f"{name!r} is not a CLIP backbone (no text tower); choose from {', '.join(clip_names)}")
    path = weights_path(BACKBONES[name], weights)
    model = build_clip_text(load_state_dict(path)).to(device).eval().requires_grad_(False)
    return model, sha256_file(path)


@torch.inference_mode()
def encode_captions(text_model: nn.Module, captions, prefix: str = "", batch_size: int = 256) -> torch.Tensor:
    """Captions -> (B, D) float32 CLIP text embeddings (not normalised), each as `prefix + " " + caption`."""
    prefix = prefix.rstrip() + " " if prefix else ""
    device = text_model.text_projection.device
    out = [text_model(tokenize([prefix + c for c in captions[s:s + batch_size]], text_model.context_length)
                      .to(device)).float().cpu() for s in range(0, len(captions), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, text_model.output_dim)


# ----------------------------------------------------------------------------------------------
# 6. The extraction loop


def find_videos(inputs, list_file=None) -> list:
    """Video paths from files, directories (recursive, by extension) and a list file, sorted, deduplicated."""
    paths = []
    for item in list(inputs) + ([line.strip() for line in Path(list_file).read_text().splitlines()
                                 if line.strip()] if list_file else []):
        p = Path(item)
        if p.is_dir():
            paths += [q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in VIDEO_EXTENSIONS]
        else:
            paths.append(p)  # named explicitly: taken whatever its extension (a missing one fails later)
    paths = sorted({p.resolve(): p for p in paths}.values(), key=lambda p: (p.stem, str(p)))
    stems = {}
    for p in paths:
        if p.stem in stems:
            raise ValueError(f"two videos share the video_id {p.stem!r}: {stems[p.stem]} and {p}")
        stems[p.stem] = p
    return paths


def decode_video(path, n: int, spec: Backbone, threads: int = 0):
    """The N samples of one video for backbone `spec`, or Silent(N); raises on a bad file. Samples are
    frames (N, H, W, 3) or clips (N, clip_len, H, W, 3), uint8, or log-mel examples (N, 1, 96, 64) float32."""
    if not Path(path).is_file():
        raise VideoError("no such file")
    if Path(path).stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    if spec.kind == "audio":
        return decode_log_mel(path, n, threads)
    return decode_frames(path, n, spec.preprocess, threads, spec.clip_len)


def failure_reason(e: Exception) -> str:
    """One line saying why a video failed: FFmpeg's reason for an unreadable file, else the exception."""
    if isinstance(e, av.error.FFmpegError):
        return f"not a readable video: {e.strerror or e} (FFmpeg {type(e).__name__})"
    return f"{type(e).__name__}: {str(e).strip()}"


def exit_with_parent(parent_pid: int):
    """Decode-worker initializer: a daemon thread ends this process once its parent is gone (e.g. killed with
    kill -9), instead of leaving it waiting for work forever, re-parented to PID 1."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def decode_job(path, n, backbone, threads):
    """Worker: (video_id, frames or None, error or None); never raises, so one bad video fails alone."""
    try:
        return Path(path).stem, decode_video(path, n, BACKBONES[backbone], threads), None
    except Exception as e:  # noqa: BLE001 - every failure is reported per video
        return Path(path).stem, None, failure_reason(e)


def atomic_write(path, write: Callable):
    """Write `path` through write(tmp_path) into a temporary file beside it, then rename: readers never see half a
    file. The file gets a plain open()'s permissions (0666 minus the umask); a failed write leaves no temporary
    file behind, and an OSError names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
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


def read_meta(out: Path) -> dict:
    """DIR/meta.json as a dict, or an error naming that file."""
    path = out / "meta.json"
    try:
        return dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:  # not JSON, or not a JSON object
        raise ValueError(f"{path} is not the meta.json extract.py writes ({e}): delete it, or use another --out"
                         ) from None


def write_meta(out: Path, meta: dict):
    """Write meta.json, or check that an existing one (a run being resumed) agrees with this run."""
    if not (out / "meta.json").is_file():
        write_text(out / "meta.json", json.dumps(meta, indent=1) + "\n")
        return
    old = read_meta(out)
    keys = ("backbone", "weights_sha256", "frames", "dtype", "frame_sampling", "preprocessing")
    diff = {k: (old.get(k), meta[k]) for k in keys if old.get(k) != meta[k]}
    if diff:
        raise ValueError(f"{out / 'meta.json'} was written by a different run ({diff}, old vs new); "
                         f"use another --out or delete that folder")


def append_line(path: Path, line: str):
    """Append one line with a single write: safe when several shards share the folder."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def record_failure(out: Path, video_id: str, path, reason: str):
    """One line on stderr and one appended to DIR/failed.txt: video_id<TAB>path<TAB>reason."""
    print(f"FAILED {video_id} ({path}): {reason}", file=sys.stderr)
    append_line(out / "failed.txt", f"{video_id}\t{path}\t{' '.join(reason.split())}")


def list_silent(out: Path):
    """meta.json's "silent": the sorted video_ids of silent.txt that have features; shards update it in turn."""
    if not (out / "silent.txt").is_file() or not (out / "meta.json").is_file():
        return
    try:
        import fcntl  # POSIX: one shard at a time reads, merges and rewrites meta.json
    except ImportError:
        fcntl = None
    with open(out / ".meta.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        lines = (out / "silent.txt").read_text().splitlines()  # one video_id a line: names may hold spaces
        silent = sorted({v for v in lines if v and (out / f"{v}.npy").exists()})
        meta = read_meta(out)
        if meta.get("silent") != silent:
            write_text(out / "meta.json", json.dumps({**meta, "silent": silent}, indent=1) + "\n")


def compact_failures(out: Path):
    """Drop failed.txt lines of videos that now have features (fixed on a later run), and duplicates."""
    path = out / "failed.txt"
    if not path.is_file():
        return
    lines = OrderedDict()
    for line in path.read_text().splitlines():
        vid = line.split("\t", 1)[0]
        if line and not (out / f"{vid}.npy").exists():
            lines[vid] = line  # the latest reason wins
    if lines:
        write_text(path, "\n".join(lines.values()) + "\n")
    else:
        path.unlink()


def parse_shard(text: str):
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(s) for s in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@torch.inference_mode()
def encode_samples(model: nn.Module, spec: Backbone, samples: np.ndarray, device, batch_size: int = BATCH_SIZE,
                   dtype: str = "fp32") -> np.ndarray:
    """(B, ...) decoded samples -> (B, D) float32 features, in chunks of batch_size on the device."""
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


def extract(videos, out, backbone="ViT-B/32", weights=None, frames=FRAMES, device=None, batch_size=BATCH_SIZE,
            workers=None, dtype="fp32", shard=(0, 1), progress=True) -> dict:
    """Features for every video (missing ones only) -> out/<video_id>.npy; returns a summary dict.

    videos: list of paths (see find_videos). Decoding runs in `workers` processes (0: in this one), which end
    when this process does; frames of several videos are batched together for the backbone on `device`
    (default: cuda if present). An output that cannot be written raises OSError naming the file.
    """
    if dtype not in AMP_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(AMP_DTYPES)}")
    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if workers is None:
        workers = min(os.cpu_count() or 1, 16)
    out = Path(out)
    i, n = shard
    videos = [Path(v) for v in videos][i::n]
    todo = [v for v in videos if not (out / f"{v.stem}.npy").exists()]

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = dtype != "fp32"  # fp32 means fp32: no TF32 convs either
        torch.backends.cuda.matmul.allow_tf32 = dtype != "fp32"
    model, spec, weights_sha = load_backbone(backbone, weights, device)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot start leaves no empty folder
    write_meta(out, {
        "backbone": backbone, "kind": spec.kind, "feature_dim": model.output_dim, "frames": frames, "dtype": dtype,
        "weights": Path(weights).name if weights else spec.url, "weights_sha256": weights_sha,
        "frame_sampling": "F decodable frames, bounds b_i = int(i * F / N), b_N = F; frame i = (b_i + b_i+1) // 2 "
                          "(the authors' get_uniform_ids_from_k_snippets)",
        "preprocessing": spec.preprocessing, "format": "<video_id>.npy: float32 (N, feature_dim)",
    })
    encode = partial(encode_samples, model, spec, device=device, batch_size=batch_size, dtype=dtype)

    summary = {"done": 0, "skipped": len(videos) - len(todo), "failed": [], "frames": 0, "silent": []}
    bar = tqdm(total=len(todo), unit="video", file=sys.stderr, dynamic_ncols=True, disable=not progress)
    t0 = time.time()
    pending = []  # (video_id, (N, ...) array) waiting for a full batch

    def done(videos, frames):
        summary["frames"] += frames
        bar.update(videos)
        bar.set_postfix(frames_per_s=f"{summary['frames'] / max(time.time() - t0, 1e-9):.0f}")

    def flush():
        """Encode all pending videos as one batch stream and write their features."""
        if not pending:
            return
        feats = encode(np.concatenate([f for _, f in pending]))  # (sum N, D)
        for (vid, f), y in zip(pending, np.split(feats, np.cumsum([len(f) for _, f in pending])[:-1])):
            save_features(out / f"{vid}.npy", y)
            summary["done"] += 1
        done(len(pending), len(feats))
        pending.clear()

    def consume(result, path):
        vid, arr, error = result
        if error is not None:
            summary["failed"].append((vid, str(path), error))
            record_failure(out, vid, path, error)
            done(1, 0)
        elif isinstance(arr, Silent):  # no soundtrack: zeros (Sec. 4 of the paper), no backbone
            save_features(out / f"{vid}.npy", np.zeros((len(arr), model.output_dim), np.float32))
            append_line(out / "silent.txt", vid)
            summary["silent"].append(vid)
            summary["done"] += 1
            done(1, 0)
        else:
            pending.append((vid, arr))
            if sum(len(a) for _, a in pending) >= batch_size:
                flush()

    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    try:
        if workers == 0:
            for path in todo:
                consume(decode_job(str(path), frames, backbone, threads), path)
        else:
            ctx = multiprocessing.get_context("spawn")  # safe next to CUDA and torch's threads
            with ProcessPoolExecutor(workers, ctx, initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
                queue, in_flight = iter(todo), {}
                while True:
                    while len(in_flight) < 2 * workers:  # bounded read-ahead: memory stays bounded
                        path = next(queue, None)
                        if path is None:
                            break
                        in_flight[pool.submit(decode_job, str(path), frames, backbone, threads)] = path
                    if not in_flight:
                        break
                    finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        consume(fut.result(), in_flight.pop(fut))
        flush()
    finally:
        bar.close()
        compact_failures(out)
        list_silent(out)
    return summary


# ----------------------------------------------------------------------------------------------
# 7. Command line


def main(argv=None) -> int:
    """The CLI; returns the exit status: 0, 1 if some videos failed, 2 for a usage or I/O error."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="*", help="video files and/or folders (searched recursively)")
    p.add_argument("--list", help="a text file with one video path per line")
    p.add_argument("--out", required=True, help="output folder, e.g. feats/image")
    p.add_argument("--backbone", default="ViT-B/32", choices=list(BACKBONES))
    p.add_argument("--weights", help="checkpoint file (else downloaded from the public URL and cached)")
    p.add_argument("--frames", type=int, default=FRAMES,
                   help=f"N segments per video (default {FRAMES}, the authors'; train.py takes 28 of them)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE,
                   help="samples per backbone batch: frames, 16-frame clips (lower it for resnext101-kinetics "
                        "on a small GPU) or 0.96 s audio examples")
    p.add_argument("--workers", type=int, help="decoding processes (default: CPU count, at most 16; 0 = none)")
    p.add_argument("--dtype", default="fp32", choices=list(AMP_DTYPES),
                   help="fp32 (default, as the paper) or fp16/bf16 autocast: faster on GPU, features differ")
    p.add_argument("--shard", default="0/1", help="i/n: process every n-th video starting at the i-th")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        videos = find_videos(args.videos, args.list)
        if not videos:
            p.error("no videos given (pass files, folders or --list FILE)")
        summary = extract(videos, args.out, args.backbone, args.weights, args.frames, args.device, args.batch_size,
                          args.workers, args.dtype, parse_shard(args.shard), not args.no_progress)
    except (ValueError, RuntimeError, OSError) as e:  # usage and I/O errors: one line, no traceback
        io_error = isinstance(e, OSError) and e.errno is not None  # named after its file, else the output folder
        print(f"error: {e.filename or args.out}: {e.strerror}" if io_error else f"error: {e}", file=sys.stderr)
        return 2
    if summary["silent"]:
        print(f"{len(summary['silent'])} without a soundtrack: zero features (listed in meta.json)", file=sys.stderr)
    print(f"{summary['done']} written, {summary['skipped']} already there, {len(summary['failed'])} failed "
          f"(see {Path(args.out) / 'failed.txt'})" if summary["failed"] else
          f"{summary['done']} written, {summary['skipped']} already there", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
