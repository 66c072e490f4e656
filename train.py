"""
Train and evaluate a CLIP-DAP video captioner (dap.py) from captions and pre-extracted features.

    python train.py            # SYNTHETIC toy data: Base and DAP side by side, on a CPU, no downloads
    python train.py --dataset msrvtt --data DIR --feats image=feats/image,motion=feats/motion,audio=feats/audio
    python train.py --dataset vatex  --data DIR --feats image=...,motion=...
    python train.py --eval_only --ckpt out/RUN/best.pt [the data options]
    python train.py --caption my_video.mp4 --ckpt out/RUN/best.pt [--weights image=ViT-B-32.pt] [--json]
    python train.py --table | --study   # toy: Base/VAP/TAP/DAP over seeds | notebook 04's study of when DAP helps

Reading order: the recipe (Sec. 4.3) -> data (MSR-VTT, VATEX, the toy, features) -> vocabulary and
attributes (Sec. 4.1) -> training -> evaluation -> command line; then captioning video files, CLIPScore
and the toy tables. Where the paper is silent, the authors' code (yangbang18/CLIP-Captioner) decides: its
file is named next to the line. Importing this file has no side effects; the notebooks use its functions.
"""
import argparse
import atexit
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import string
import subprocess
import sys
import time
import warnings
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import dap
import extract
from dap import BOS, EOS, PAD, UNK

# ----------------------------------------------------------------------------------------------
# The recipe: the paper's defaults (Sec. 4.3) in one place; VATEX and the toy override a few of them

TASKS = {"base": (False, False), "vap": (True, False), "tap": (False, True), "dap": (True, True)}  # (VAP, TAP)


@dataclass
class Recipe:
    d_model: int = 512            # d_h
    n_attributes: int = 500       # K
    n_frames: int = 28            # N frames (snippets) per video
    sparse_sampling: bool = True  # in VAP (Sec. 4.2)
    epochs: int = 50
    batch_size: int = 64          # video-caption pairs, every caption once per epoch
    lr: float = 5e-4              # Adam, "decayed to 0.9 times every epoch before reaching 1e-6"
    lr_decay: float = 0.9
    min_lr: float = 1e-6
    weight_decay: float = 1e-3    # L2, Adam's weight_decay (models/Wrapper.py)
    beam_size: int = 5
    seed: int = 0


DATASET_RECIPES = {"msrvtt": {}, "vatex": {"d_model": 1024},
                   "toy": dict(d_model=128, n_frames=8, epochs=12, lr=3e-3)}  # small and short: a CPU's minutes


def recipe_for(dataset, **overrides):
    """The paper's recipe, the dataset's overrides, then yours (None = not given)."""
    return Recipe(**{**DATASET_RECIPES[dataset], **{k: v for k, v in overrides.items() if v is not None}})


SPLITS = ("train", "val", "test")
MAX_LEN = dap.Config.max_len  # T_max = 30 tokens, BOS and EOS included

# ----------------------------------------------------------------------------------------------
# Data: ids per split, captions per video, a category per video (when the dataset has one)


@dataclass
class Dataset:
    """Annotations of one dataset; features are loaded separately (the toy dataset carries its own)."""
    name: str
    splits: dict                      # "train" | "val" | "test" -> [video_id]
    captions: dict                    # video_id -> [caption], in the annotation files' order
    categories: dict = field(default_factory=dict)      # video_id -> int
    category_names: list = field(default_factory=list)
    feats: dict = None                # toy only: modality -> float tensor (V, N, D), rows in all_ids order
    meta: dict = field(default_factory=dict)             # toy only: the hidden truth behind the features
    synthetic: bool = False

    @property
    def all_ids(self):
        return [v for s in SPLITS for v in self.splits[s]]


def read_json_member(data_dir, names):
    """The first of names found in data_dir, either as a file or inside any .zip there; None if absent."""
    data_dir = Path(data_dir)
    for name in names:
        if (data_dir / name).is_file():
            return (data_dir / name).read_bytes()
    for zpath in sorted(data_dir.glob("*.zip")):
        with zipfile.ZipFile(zpath) as z:
            for member in z.namelist():
                if Path(member).name in names:
                    return z.read(member)
    return None


def load_msrvtt(data_dir):
    """MSR-VTT 2016: train_val_videodatainfo.json + test_videodatainfo.json (or videodatainfo.json), zipped or not."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"MSR-VTT directory {data_dir} does not exist")
    parts = [read_json_member(data_dir, ["train_val_videodatainfo.json"]),
             read_json_member(data_dir, ["test_videodatainfo.json"])]
    if parts[0] is None or parts[1] is None:
        parts = [read_json_member(data_dir, ["videodatainfo.json"])]
        if parts[0] is None:
            raise FileNotFoundError(f"{data_dir}: need train_val_videodatainfo.json and test_videodatainfo.json "
                                    "(or videodatainfo.json), as files or inside the release .zip files")
    videos, sentences = [], []
    for raw in parts:
        info = json.loads(raw)
        videos += info["videos"]
        sentences += info["sentences"]
    split_name = {"train": "train", "validate": "val", "val": "val", "test": "test"}
    order = lambda v: int(re.sub(r"\D", "", v) or 0)  # video0, video1, ... in numeric order
    splits = {s: sorted((v["video_id"] for v in videos if split_name[v["split"]] == s), key=order) for s in SPLITS}
    captions = {}
    for s in sentences:  # in the files' order, as the authors read them: it breaks the vocabulary's ties
        captions.setdefault(s["video_id"], []).append(s["caption"])
    for v in videos:
        captions.setdefault(v["video_id"], [])
    categories = {v["video_id"]: int(v["category"]) for v in videos}
    names = []
    raw = read_json_member(data_dir, ["category.txt"])
    if raw is not None:  # "music\t0" per line
        pairs = [line.split("\t") for line in raw.decode().splitlines() if line.strip()]
        names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    return Dataset("msrvtt", splits, captions, categories, names)


def tokenize_vatex(caption):
    """The authors' VATEX rule (misc/utils_corpora.py, preprocess_VATEX): NLTK's word tokenizer, lowercase,
    "'s" -> "s", punctuation tokens dropped; without NLTK's sentence splitter (punkt, not installed with
    nltk), so a caption is tokenised as one sentence."""
    import nltk
    return [t.lower().replace("'s", "s") for t in nltk.word_tokenize(caption, preserve_line=True)
            if t and t not in string.punctuation]


def load_vatex(data_dir):
    """VATEX: vatex_training_v1.0 / vatex_validation_v1.0 / vatex_public_test_english_v1.1 .json, 10 English captions."""
    files = {"train": "vatex_training_v1.0.json", "val": "vatex_validation_v1.0.json",
             "test": "vatex_public_test_english_v1.1.json"}
    splits, captions = {}, {}
    for split, name in files.items():
        raw = read_json_member(data_dir, [name])
        if raw is None:
            raise FileNotFoundError(f"{Path(data_dir) / name} not found (official VATEX annotation file)")
        items = json.loads(raw)
        splits[split] = [item["videoID"] for item in items]
        for item in items:  # stored tokenised by the VATEX rule; tokenize() leaves them as they are
            captions[item["videoID"]] = [" ".join(tokenize_vatex(c)) for c in item["enCap"]]
    return Dataset("vatex", splits, captions)


def training_captions(dataset):
    """The training split's captions in the annotation files' order (it breaks the vocabulary's ties)."""
    train = set(dataset.splits["train"])
    return [c for v, caps in dataset.captions.items() if v in train for c in caps]


def subset(dataset, ids):
    """A copy of dataset restricted to the video ids in ids (e.g. those that have features)."""
    keep = set(ids)
    ds = copy.copy(dataset)
    ds.splits = {s: [v for v in dataset.splits[s] if v in keep] for s in SPLITS}
    return ds


def drop_uncaptioned(dataset, log=print):
    """A video without any caption cannot be trained on or scored: drop it, with a count and a warning."""
    empty = [v for v in dataset.all_ids if not dataset.captions.get(v)]
    if empty:
        log(f"warning: dropping {len(empty)} videos that have no caption in the annotations: {empty[:5]}")
        dataset = subset(dataset, set(dataset.all_ids) - set(empty))
    return dataset


# ----------------------------------------------------------------------------------------------
# The built-in SYNTHETIC toy dataset: MSR-VTT's caption statistics in miniature (caption_statistics
# measures both). A hidden world of concepts (pseudo-words, so no English is implied) with Zipfian
# popularity and category preferences; a video shows ~12 of them; each of its 20 captions names its main
# subject and action plus a few details, in one of several phrasings and with synonyms, so that one
# caption mentions ~13% of the attributes its video's label (the union over captions) holds. Backbones
# are SIMULATED: "clip" = strong attribute signal, "inp" = weak, under the same caption-irrelevant background.

TOY_CATEGORIES = ["cooking", "sports", "music", "animals", "vehicles", "news", "gaming", "beauty"]
TOY_TYPES = {  # concept type: (modality it is visible in, concepts per video, concepts in the world)
    "subject": ("image", 2, 30), "action": ("motion", 2, 50), "object": ("image", 12, 900),
    "colour": ("image", 2, 40), "scene": ("image", 2, 100), "sound": ("audio", 1, 60)}
TOY_PHRASINGS = {  # template: relative frequency (MSR-VTT: "video" in 7% of captions, "shown" 2%, "clip" 1.5%)
    "{s} is {a}{o}{p}{n}": 40, "a video of {s} {a}{o}{p}{n}": 2.5, "{s} is shown {a}{o}{p}{n}": 1,
    "there is {s} {a}{o}{p}{n}": 1, "{s} is {a} on camera{o}{p}{n}": 0.5, "a clip of {s} {a}{o}{p}{n}": 0.5}
SYNONYM_WEIGHTS = [4, 3, 2, 1.5, 1, 1]  # how often annotators use a concept's 1st, 2nd... word
TOY_BACKBONES = {"clip": 1.0, "inp": 0.3}  # SIMULATED: amplitude of the attribute signal


def toy_words(rng, n):
    """n distinct pseudo-words of two or three syllables ("kovi", "lamesu", ...)."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables, size=int(rng.integers(2, 4)))))
    return list(rng.permutation(sorted(words)))


def pick(rng, weights, variety):
    """An index drawn with probability ~ weights ** (1 / variety); variety 0 always gives the first."""
    if variety <= 0:
        return 0
    p = np.asarray(weights, float) ** (1.0 / variety)
    return int(rng.choice(len(p), p=p / p.sum()))


def make_toy(seed=0, n_train=300, n_val=100, n_test=200, n_captions=20, n_frames=8, backbone="clip",
             mention=0.1, agreement=0.0, phrasing=1.0, zipf=1.0, world=1.0, visible=0.25, dims=None, n_backgrounds=12,
             silent_fraction=0.2, background=3.0, jitter=1.5, noise=1.5):
    """The SYNTHETIC toy dataset, deterministic in seed; backbone "clip" | "inp" is simulated.

    mention: chance that a caption names each detail of its video (beyond the main subject and action);
    agreement: chance that an annotator repeats the video's first caption (1: every caption names the label);
    phrasing: variety of phrasings and synonyms (0: one wording per concept); zipf: exponent of concept
    popularity; world: size of the concept inventory (x TOY_TYPES); visible: share of the frames in which
    a detail is visible (the main subject, action, scene and sound: all). Frame features (V, N, D) per
    modality = background prototype (shared by unrelated videos) + per-video jitter + frame noise + one
    direction per visible concept * signal. Silent videos get all-zero audio and no sound in captions.
    """
    if backbone not in TOY_BACKBONES:
        raise ValueError(f"backbone must be one of {list(TOY_BACKBONES)} (both simulated), got {backbone!r}")
    dims = dims or {"image": 256, "motion": 256, "audio": 64}
    rng = np.random.default_rng(seed)
    # --- the world: concepts per type, 1-6 synonyms each; popularity Zipfian, tilted per category
    sizes = {t: max(n, int(world * size)) for t, (_, n, size) in TOY_TYPES.items()}
    words = iter(toy_words(rng, 4 * sum(sizes.values())))
    n_synonyms = lambda: int(rng.integers(1, len(SYNONYM_WEIGHTS) + 1))
    concepts = [(t, [next(words) + ("ing" if t == "action" else "") for _ in range(n_synonyms())])
                for t, size in sizes.items() for _ in range(size)]
    of_type = {t: [i for i, (u, _) in enumerate(concepts) if u == t] for t in TOY_TYPES}
    affinity = rng.standard_normal((len(TOY_CATEGORIES), len(concepts)))
    n_videos, N = n_train + n_val + n_test, n_frames
    ids = [f"video{i}" for i in range(n_videos)]
    content, spans, captions, cats = [], [], {}, {}
    for v, vid in enumerate(ids):
        # --- what the video shows: concepts drawn by popularity x category preference, and where
        c = int(rng.integers(len(TOY_CATEGORIES)))
        item, silent = [], rng.random() < silent_fraction
        for t, (_, n, _) in TOY_TYPES.items():
            pool = np.array(of_type[t])
            p = np.arange(1, len(pool) + 1) ** -zipf * np.exp(affinity[c, pool])
            item += [] if t == "sound" and silent else list(rng.choice(pool, n, replace=False, p=p / p.sum()))
        first = {}                                    # the main concept of each type: visible throughout
        for i in item:
            first.setdefault(concepts[i][0], i)
        span = []
        for i in item:
            whole = i == first[concepts[i][0]] or concepts[i][0] in ("scene", "sound")
            length = N if whole else 1 + int(rng.binomial(N - 1, visible))
            span.append((int(rng.integers(0, N - length + 1)), length))
        # --- captions: the main subject and action always, each detail with chance `mention`; with chance
        # `agreement` an annotator writes the video's first caption again (1: a caption says all the label does)
        def describe():
            said = {t: [] for t in TOY_TYPES}
            for i in item:
                t, syn = concepts[i]
                if i == first[t] and t in ("subject", "action") or rng.random() < mention:
                    said[t].append(syn[pick(rng, SYNONYM_WEIGHTS[:len(syn)], phrasing)])
            colour = " ".join(said["colour"]) + " " if said["colour"] else ""
            s = " and ".join(f"a {colour if k == 0 else ''}{w}" for k, w in enumerate(said["subject"]))
            o = "".join(f" {'with' if k == 0 else 'and'} a {w}" for k, w in enumerate(said["object"]))
            p = "".join(f" in the {w}" for w in said["scene"])
            n = "".join(f" while {w} is on" for w in said["sound"])
            template = list(TOY_PHRASINGS)[pick(rng, list(TOY_PHRASINGS.values()), phrasing)]
            text = template.format(s=s, a=" and ".join(said["action"]), o=o, p=p, n=n)
            return text.replace(" is ", " are ", 1) if len(said["subject"]) > 1 else text
        caps = [describe()]
        caps += [caps[0] if rng.random() < agreement else describe() for _ in range(n_captions - 1)]
        content.append([{"type": concepts[i][0], "concept": int(i), "words": concepts[i][1]} for i in item])
        spans.append(span)
        captions[vid], cats[vid] = caps, c
    # --- rendering: a fixed random "world" of directions drawn from the seed, scaled per backbone
    signal = TOY_BACKBONES[backbone]
    bg_of_video = rng.integers(n_backgrounds, size=n_videos)
    silent = [not any(x["type"] == "sound" for x in item) for item in content]
    feats = {}
    for m, D in dims.items():
        g = np.random.default_rng([seed, D, len(m)])  # same directions for both backbones

        def unit(*shape):
            x = g.standard_normal((*shape, D)).astype(np.float32)
            return x / np.linalg.norm(x, axis=-1, keepdims=True)
        direction, prototypes, video_jitter = unit(len(concepts)), unit(n_backgrounds), unit(n_videos)
        x = g.standard_normal((n_videos, N, D)).astype(np.float32) * (noise / math.sqrt(D))
        x += (jitter * video_jitter + (background * prototypes[bg_of_video] if m != "audio" else 0))[:, None, :]
        for v, item in enumerate(content):
            for x_i, (start, length) in zip(item, spans[v]):
                if TOY_TYPES[x_i["type"]][0] == m:
                    x[v, start:start + length] += signal * direction[x_i["concept"]]
        if m == "audio":
            x[silent] = 0.0  # padded zeros for videos without a soundtrack (Sec. 3.3)
        feats[m] = torch.from_numpy(x)
    splits = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
    world = [{"type": t, "words": w, "category": int(affinity[:, i].argmax())} for i, (t, w) in enumerate(concepts)]
    meta = {"backbone": f"{backbone} (simulated)", "content": content, "spans": spans, "concepts": world,
            "background": bg_of_video.tolist(), "silent": silent, "seed": seed}
    return Dataset("toy", splits, captions, cats, list(TOY_CATEGORIES), feats=feats, meta=meta, synthetic=True)


def caption_statistics(dataset, vocab, attributes):
    """What a dataset's training captions look like to DAP: {statistic: value}.

    A video's label is the union of the attributes in its captions (Sec. 4.1); the mention share is, per
    caption, the attributes it mentions / its video's label size (mean over captions); document frequency =
    the number of training videos whose label has the attribute.
    """
    train_ids = dataset.splits["train"]
    labels = attribute_labels([dataset.captions[v] for v in train_ids], attributes).numpy()
    index = {w: i for i, w in enumerate(attributes)}
    n_caps, n_words, mentioned, share = [], [], [], []
    for v, vid in enumerate(train_ids):
        n_caps.append(len(dataset.captions[vid]))
        for c in dataset.captions[vid]:
            words = tokenize(c)
            k = len({index[w] for w in words if w in index})
            n_words.append(len(words))
            mentioned.append(k)
            share.append(k / max(labels[v].sum(), 1))
    per_video, df = labels.sum(1), np.sort(labels.sum(0))[::-1]
    return {"videos": len(train_ids), "captions per video": float(np.mean(n_caps)),
            "words per caption": float(np.mean(n_words)), "vocabulary": len(vocab) - len(SPECIALS),
            "K": len(attributes), "attributes per video (mean)": float(per_video.mean()),
            "attributes per video (median)": float(np.median(per_video)),
            "attributes per caption": float(np.mean(mentioned)), "mention share": float(np.mean(share)),
            "videos with the top attribute": int(df[0]), "videos with the median attribute": int(df[len(df) // 2]),
            "videos with the K-th attribute": int(df[-1])}


# ----------------------------------------------------------------------------------------------
# Features: <video_id>.npy arrays (T, D) per modality as extract.py writes them, or the authors'
# HDF5 files (one dataset per video id); N frames taken with extract.py's rule; held as (V, N, D) tensors.

MODALITIES = ("image", "motion", "audio")


def parse_feats(spec):
    """'image=DIR,motion=DIR,audio=DIR' -> {"image": DIR, ...}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise ValueError(f"--feats entry {part!r} is not MODALITY=PATH (e.g. image=feats/image)")
        m, path = (x.strip() for x in part.split("=", 1))
        if m not in MODALITIES:
            raise ValueError(f"--feats: unknown modality {m!r} in {part!r}; the modalities are {', '.join(MODALITIES)}")
        out[m] = path
    if "image" not in out:
        raise ValueError(f"--feats {spec!r} has no image=PATH entry")
    return out


def read_meta(path):
    """extract.py's meta.json, with an error naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); extract.py writes it: rerun it, or remove the file") from None


def feature_provenance(paths):
    """{modality: the meta.json extract.py wrote next to its features (backbone, N, dtype, weights SHA-256), or None}.

    None for features without one (e.g. the authors' HDF5 files). Saved in config.json, for --caption.
    """
    out = {}
    for m, path in paths.items():
        meta = Path(path) / "meta.json"
        out[m] = {k: v for k, v in read_meta(meta).items() if k != "silent"} if meta.is_file() else None
    return out


class FeatureSource:
    """One modality's features: a directory of <video_id>.npy files or an HDF5 file."""

    def __init__(self, path):
        self.path = Path(path)
        self.h5 = None
        if self.path.is_file():
            try:
                import h5py  # only for the authors' released HDF5 features
            except ImportError as e:
                raise ImportError(f"{self.path} looks like an HDF5 file; reading it needs `pip install h5py`") from e
            self.h5 = h5py.File(self.path, "r")
            self.ids = set(self.h5.keys())
        elif self.path.is_dir():
            self.ids = {p.stem for p in self.path.glob("*.npy")}
        else:
            raise FileNotFoundError(f"feature path {self.path} is neither a directory of .npy files nor an HDF5 file")

    def __contains__(self, video_id):
        return video_id in self.ids

    def read(self, video_id):
        """(T, D) float32, with an error naming the file when it cannot be read as such."""
        where = f"{self.path}[{video_id}]" if self.h5 is not None else self.path / f"{video_id}.npy"
        try:
            x = np.asarray(self.h5[video_id][()]) if self.h5 is not None else np.load(where, allow_pickle=False)
            x = x.astype(np.float32)
        except (OSError, ValueError, TypeError, EOFError) as e:
            raise ValueError(f"{where}: cannot be read as a feature array ({e})") from None
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"{where}: expected a (T, D) array with T >= 1, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{where}: contains NaN or inf")
        return x


def load_features(paths, video_ids, n_frames=28, missing="error", log=print):
    """{modality: path} -> ({modality: float tensor (V, N, D)}, kept video ids).

    missing="error": a video without image or motion features is an error naming them;
    missing="drop": such videos are dropped with a count (VATEX). Missing audio is always zeros.
    """
    sources = {m: FeatureSource(p) for m, p in paths.items()}
    required = [m for m in sources if m != "audio"]
    absent = [v for v in video_ids if any(v not in sources[m] for m in required)]
    if absent and missing == "error":
        which = {m: sum(v not in sources[m] for v in video_ids) for m in required}
        raise FileNotFoundError(f"features missing for {len(absent)} of {len(video_ids)} videos "
                                f"(per modality: {which}); first: {absent[:5]}")
    if absent:
        log(f"dropping {len(absent)} of {len(video_ids)} videos without features (e.g. {absent[:3]})")
    kept = [v for v in video_ids if v not in set(absent)]
    feats = {}
    for m, src in sources.items():
        rows = {}  # N frames of each video (audio only may be absent: a video without a soundtrack)
        for v in tqdm([v for v in kept if v in src], desc=f"loading {m} features", leave=False, disable=len(kept) < 1000):
            x = src.read(v)
            rows[v] = x[extract.sample_indices(len(x), n_frames)]                    # (N, D)
        if not rows:
            raise FileNotFoundError(f"no {m} features for any of the {len(kept)} videos in {src.path}")
        dim = Counter(x.shape[1] for x in rows.values()).most_common(1)[0][0]  # the majority's dimension
        odd = [v for v, x in rows.items() if x.shape[1] != dim]
        if odd:
            raise ValueError(f"{m} features in {src.path}: {len(odd)} of {len(rows)} videos are not {dim}-d like the "
                             f"others: " + ", ".join(f"{v} ({rows[v].shape[1]}-d)" for v in odd[:5]))
        zeros = np.zeros((n_frames, dim), np.float32)
        feats[m] = torch.from_numpy(np.stack([rows.get(v, zeros) for v in kept]))   # (V, N, D)
        if len(rows) < len(kept):
            log(f"{m}: {len(kept) - len(rows)} of {len(kept)} videos have no features -> zeros (as the paper "
                "pads silent videos)")
    return feats, kept


# ----------------------------------------------------------------------------------------------
# Vocabulary and attributes (Sec. 4.1), as the authors prepare their corpus (misc/utils_corpora.py)

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids dap.PAD, dap.UNK, dap.BOS, dap.EOS
assert [PAD, UNK, BOS, EOS] == [0, 1, 2, 3]
# Stop words: the authors' data/en.json (570 words, the SMART retrieval system's English list).

STOP_WORDS = frozenset("""
a a's able about above according accordingly across actually after afterwards again against ain't all allow
allows almost alone along already also although always am among amongst an and another any anybody anyhow
anyone anything anyway anyways anywhere apart appear appreciate appropriate are aren't around as aside ask
asking associated at available away awfully b be became because become becomes becoming been before beforehand
behind being believe below beside besides best better between beyond both brief but by c c'mon c's came can
can't cannot cant cause causes certain certainly changes clearly co com come comes concerning consequently
consider considering contain containing contains corresponding could couldn't course currently d definitely
described despite did didn't different do does doesn't doing don't done down downwards during e each edu eg
eight either else elsewhere enough entirely especially et etc even ever every everybody everyone everything
everywhere ex exactly example except f far few fifth first five followed following follows for former formerly
forth four from further furthermore g get gets getting given gives go goes going gone got gotten greetings h
had hadn't happens hardly has hasn't have haven't having he he's hello help hence her here here's hereafter
hereby herein hereupon hers herself hi him himself his hither hopefully how howbeit however i i'd i'll i'm
i've ie if ignored immediate in inasmuch inc indeed indicate indicated indicates inner insofar instead into
inward is isn't it it'd it'll it's its itself j just k keep keeps kept know known knows l last lately later
latter latterly least less lest let let's like liked likely little look looking looks ltd m mainly many may
maybe me mean meanwhile merely might more moreover most mostly much must my myself n name namely nd near
nearly necessary need needs neither never nevertheless new next nine no nobody non none noone nor normally not
nothing novel now nowhere o obviously of off often oh ok okay old on once one ones only onto or other others
otherwise ought our ours ourselves out outside over overall own p particular particularly per perhaps placed
please plus possible presumably probably provides q que quite qv r rather rd re really reasonably regarding
regardless regards relatively respectively right s said same saw say saying says second secondly see seeing
seem seemed seeming seems seen self selves sensible sent serious seriously seven several shall she should
shouldn't since six so some somebody somehow someone something sometime sometimes somewhat somewhere soon
sorry specified specify specifying still sub such sup sure t t's take taken tell tends th than thank thanks
thanx that that's thats the their theirs them themselves then thence there there's thereafter thereby
therefore therein theres thereupon these they they'd they'll they're they've think third this thorough
thoroughly those though three through throughout thru thus to together too took toward towards tried tries
truly try trying twice two u un under unfortunately unless unlikely until unto up upon us use used useful uses
using usually uucp v value various very via viz vs w want wants was wasn't way we we'd we'll we're we've
welcome well went were weren't what what's whatever when whence whenever where where's whereafter whereas
whereby wherein whereupon wherever whether which while whither who who's whoever whole whom whose why will
willing wish with within without won't wonder would wouldn't x y yes yet you you'd you'll you're you've your
yours yourself yourselves z zero
""".split())



def tokenize(caption):
    """The authors' rule (misc/utils_corpora.py, preprocess_MSRVTT): split on whitespace, drop the tokens
    that are punctuation (any substring of string.punctuation, e.g. "," or "-"), lowercase the rest."""
    return [t.lower() for t in caption.split() if t not in string.punctuation]


def build_vocab(train_captions, min_count=3):
    """The specials, then the words seen more than 2 times in the training captions, most frequent first,
    ties in order of first appearance (misc/utils_corpora.py, build_vocab with sort_vocab)."""
    counts = Counter(w for c in train_captions for w in tokenize(c))  # a Counter keeps first-seen order
    return SPECIALS + sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: -counts[w])


def encode_caption(caption, word_to_id, max_len=MAX_LEN):
    """BOS w1..wn EOS, truncated to max_len tokens in all (dataloader.py, _padding), unknown words -> UNK."""
    ids = [word_to_id.get(w, UNK) for w in tokenize(caption)][:max_len - 2]
    return [BOS] + ids + [EOS]


def decode_caption(ids, vocab):
    """Token ids (no BOS) -> text, stopping at EOS or PAD (misc/utils.py, to_sentence)."""
    words = []
    for i in ids:
        if i in (EOS, PAD):
            break
        words.append(vocab[i])
    return " ".join(words)


def pos_filter(words, train_captions):
    """Keep words whose most frequent Penn tag in the training captions is a noun, verb or adjective."""
    import nltk
    try:
        tagged = nltk.pos_tag_sents([tokenize(c) for c in train_captions])
    except LookupError as e:
        raise RuntimeError("--attr_pos needs NLTK's averaged perceptron tagger data: run "
                           "`python -m nltk.downloader averaged_perceptron_tagger_eng`, or point the NLTK_DATA "
                           "environment variable at a folder that has taggers/averaged_perceptron_tagger_eng") from e
    tags = {}
    for sent in tagged:
        for w, t in sent:
            tags.setdefault(w, Counter())[t] += 1
    keep = lambda w: w in tags and tags[w].most_common(1)[0][0][:2] in ("NN", "VB", "JJ")
    return [w for w in words if keep(w)]


def build_attributes(train_captions, vocab, k=500, pos=False, log=print):
    """The K most frequent training words that are not stop words (Sec. 4.1): the first K non-stop words
    of build_vocab's frequency order (misc/utils_corpora.py, build_vocab with attribute_first)."""
    words = [w for w in vocab[len(SPECIALS):] if w not in STOP_WORDS]
    if pos:
        words = pos_filter(words, train_captions)
    if len(words) < k:
        log(f"only {len(words)} attribute candidates (non-stop words in the vocabulary): K = {len(words)} instead of {k}")
    return words[:k]


def attribute_labels(captions_per_video, attributes):
    """Multi-hot (V, K): a_k = 1 if attribute k appears in any caption of the video (Sec. 4.1)."""
    index = {w: i for i, w in enumerate(attributes)}
    labels = torch.zeros(len(captions_per_video), len(attributes))
    for v, caps in enumerate(captions_per_video):
        for c in caps:
            for w in tokenize(c):
                if w in index:
                    labels[v, index[w]] = 1.0
    return labels


# ----------------------------------------------------------------------------------------------
# Tensors of one split: features, references, attribute labels, and every (video, caption) pair


@dataclass
class Split:
    ids: list            # video ids
    feats: dict          # modality -> (V, N, D)
    refs: list           # [[caption]] per video, tokenised and re-joined (the authors' refs.pkl)
    labels: torch.Tensor  # (V, K) multi-hot attributes
    tokens: torch.Tensor  # (P, max_len) every caption as BOS w.. EOS PAD..
    pair_video: torch.Tensor  # (P,) row in ids of each caption

    def to(self, device):
        return dataclasses.replace(self, feats={m: x.to(device) for m, x in self.feats.items()},
                                   labels=self.labels.to(device), tokens=self.tokens.to(device),
                                   pair_video=self.pair_video.to(device))


def make_split(ids, feats, captions, vocab, attributes, max_len=MAX_LEN):
    """Build a Split; feats are already (V, N, D) tensors in the order of ids."""
    word_to_id = {w: i for i, w in enumerate(vocab)}
    refs = [[" ".join(tokenize(c)) for c in captions[v]] for v in ids]  # misc/utils_corpora.py, references
    rows, owner = [], []
    for v, caps in enumerate(refs):
        for c in caps:
            rows.append(encode_caption(c, word_to_id, max_len))
            owner.append(v)
    tokens = torch.full((len(rows), max_len), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
    return Split(list(ids), feats, refs, attribute_labels(refs, attributes), tokens, torch.tensor(owner))


def prepare(dataset, feats, vocab, attributes, max_len=MAX_LEN):
    """{split: Split} from a Dataset and its features {modality: (V, N, D)} in dataset.all_ids order."""
    out, start = {}, 0
    for s in SPLITS:
        ids = dataset.splits[s]
        part = {m: x[start:start + len(ids)] for m, x in feats.items()}
        out[s] = make_split(ids, part, dataset.captions, vocab, attributes, max_len)
        start += len(ids)
    return out


# ----------------------------------------------------------------------------------------------
# Training (Sec. 4.3): Adam, lr x 0.9 every epoch down to 1e-6, L2 weight decay, batches of video-caption
# pairs, beam-search validation after every epoch, the weights of the best validation Meta-Sum kept.


def model_config(task, recipe, feature_dims, vocab, attributes):
    """The dap.Config of task base | vap | tap | dap for this recipe and data."""
    vap, tap = TASKS[task]
    if (vap or tap) and not attributes:
        raise ValueError(f"--task {task} predicts attributes, but there are none (every caption word is a stop "
                         "word?): train --task base, or give captions with content words")
    return dap.Config(feature_dims=dict(feature_dims), vocab_size=len(vocab), n_attributes=len(attributes),
                      d_model=recipe.d_model, vap=vap, tap=tap, sparse_sampling=recipe.sparse_sampling)


def task_of(cfg):
    """The task name of a dap.Config: base | vap | tap | dap."""
    return next(task for task, flags in TASKS.items() if flags == (cfg.vap, cfg.tap))


def save_checkpoint(obj, path):
    """torch.save through a temporary file and a rename: a crash or a full disk never leaves half a file."""
    extract.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(path, obj):
    extract.write_text(path, json.dumps(obj, indent=1))


def read_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True): tensors and plain values only, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} is refused: it holds objects other than tensors and plain values, which could run "
                         f"code when loaded (an unsafe pickle): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, KeyError) as e:
        raise ValueError(f"{path} is corrupt or truncated and cannot be loaded ({e})") from None


def load_checkpoint(path, device="cpu"):
    """A best.pt or last.pt -> (model, vocab, attributes, checkpoint dict)."""
    ckpt = read_checkpoint(path, device)
    if not {"config", "state_dict", "vocab", "attributes"} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint written by train.py (it lacks "
                         f"{sorted({'config', 'state_dict', 'vocab', 'attributes'} - set(ckpt))})")
    model = dap.CaptionModel(dap.Config(**ckpt["config"])).to(device)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["vocab"], ckpt["attributes"], ckpt


def resume_state(out_dir, cfg, log=print):
    """The last.pt of an interrupted run in out_dir, if its model config is cfg's; None if there is none."""
    path = Path(out_dir) / "last.pt"
    if not path.exists():
        log(f"--resume: no checkpoint in {out_dir}, starting from scratch")
        return None
    state = read_checkpoint(path)
    differ = sorted(k for k, v in dataclasses.asdict(cfg).items() if state["config"].get(k) != v)
    if differ:
        raise ValueError(f"{path} was trained with another model configuration ({', '.join(differ)} differ): "
                         "use another --out, or the same options")
    return state


def train_epoch(model, optimizer, split, recipe, epoch, progress=True):
    """One pass over every (video, caption) pair of split in random batches -> the mean of each loss."""
    device = next(model.parameters()).device
    model.train()
    order = torch.randperm(len(split.tokens), generator=torch.Generator().manual_seed(recipe.seed * 1000 + epoch))
    sums, steps = Counter(), 0
    bar = tqdm(order.split(recipe.batch_size), desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False, disable=not progress)
    for pairs in bar:
        videos, caps = split.pair_video[pairs.to(device)], split.tokens[pairs.to(device)]
        caps = caps[:, :int((caps != PAD).sum(1).max())]                         # (B, T) trimmed to the longest
        out = model({m: x[videos] for m, x in split.feats.items()}, caps, split.labels[videos])  # Eq. 12
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        sums.update({k: v.item() for k, v in out.items()})
        steps += 1
        bar.set_postfix(loss=f"{out['loss'].item():.3f}")
    return {k: v / steps for k, v in sums.items()}


def train(model, data, vocab, attributes, recipe, out_dir=None, state=None, progress=True, log=print,
          on_epoch_end=None, validate=True, meteor=True):
    """Train on data["train"], validate on data["val"] after each epoch -> history; keeps the best weights.

    out_dir: writes last.pt (every epoch, for --resume) and best.pt (best validation Meta-Sum).
    state: a last.pt (resume_state) to continue from. on_epoch_end(epoch, history): notebooks, tests.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    train_captions = [c for refs in data["train"].refs for c in refs]
    val_refs = coco_tokenize(dict(enumerate(data["val"].refs))) if validate else None
    history, best_score, best_state, start = [], -math.inf, None, 0
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        history, best_score, best_state, start = state["history"], state["best_score"], state["best_state"], state["epoch"] + 1
        torch.set_rng_state(state["rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([r.cpu() for r in state["cuda_rng"]])
        log(f"resuming from {out_dir}/last.pt after epoch {start} of {recipe.epochs}")
    checkpoint = lambda weights, **more: {"config": dataclasses.asdict(model.cfg), "state_dict": weights,
                                          "vocab": list(vocab), "attributes": list(attributes), **more}
    for epoch in range(start, recipe.epochs):
        t0 = time.time()
        for group in optimizer.param_groups:  # StepLR(gamma=0.9) per epoch (models/Wrapper.py), floored
            group["lr"] = max(recipe.lr * recipe.lr_decay ** epoch, recipe.min_lr)
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                  **train_epoch(model, optimizer, data["train"], recipe, epoch, progress)}
        score = epoch  # without validation the last epoch is kept
        if validate:
            metrics, _ = evaluate(model, data["val"], vocab, attributes, train_captions, recipe.beam_size,
                                  tokenized_refs=val_refs, progress=progress, meteor=meteor)
            record.update({f"val_{k}": v for k, v in metrics.items()})
            score = metrics["Meta-Sum"]
        record["time_s"] = time.time() - t0
        history.append(record)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                     if k in ("epoch", "loss", "cap", "vap", "tap", "val_Meta-Sum", "val_mAP-VAP", "time_s")))
        if score > best_score:
            best_score, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out_dir:
                save_checkpoint(checkpoint(best_state, epoch=epoch + 1, val_meta_sum=score), Path(out_dir) / "best.pt")
        if out_dir:  # everything --resume needs, the random state included
            save_checkpoint(checkpoint(model.state_dict(), optimizer=optimizer.state_dict(), history=history,
                                       best_score=best_score, best_state=best_state, epoch=epoch,
                                       rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all()
                                       if torch.cuda.is_available() else []), Path(out_dir) / "last.pt")
        if on_epoch_end:
            on_epoch_end(epoch, history)
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def train_model(task, data, vocab, attributes, device="cpu", out_dir=None, resume=False, log=print, dataset="toy",
                **kw):
    """Build and train a model for task base | vap | tap | dap on prepared data -> (model, history).

    kw: Recipe fields (the rest from the dataset's recipe) and train()'s options (progress, on_epoch_end, ...).
    """
    names = {f.name for f in dataclasses.fields(Recipe)}
    recipe = recipe_for(dataset, **{k: v for k, v in kw.items() if k in names})
    dims = {m: x.size(-1) for m, x in data["train"].feats.items()}
    cfg = model_config(task, recipe, dims, vocab, attributes)
    state = resume_state(out_dir, cfg, log) if resume else None
    torch.manual_seed(recipe.seed)
    model = dap.CaptionModel(cfg).to(device)
    log(f"{task}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {recipe.epochs} epochs, "
        f"{len(data['train'].tokens)} training pairs")
    data = {s: d.to(device) for s, d in data.items()}
    history = train(model, data, vocab, attributes, recipe, out_dir, state, log=log,
                    **{k: v for k, v in kw.items() if k not in names})
    return model, history


# ----------------------------------------------------------------------------------------------
# Evaluation: caption quality (pycocoevalcap, called directly as the authors' misc/cocoeval.py does; SPICE
# is not run, it downloads a model), diversity (Sec. 3.3), attribute mAP (Sec. 4.3)

METEOR = None  # one METEOR Java process per Python process (it takes ~10 s and 2 GB to start)


def java_available():
    return shutil.which("java") is not None


def get_meteor():
    """The process-wide METEOR scorer, started on first use and closed at exit."""
    global METEOR
    if METEOR is None:
        from pycocoevalcap.meteor.meteor import Meteor
        METEOR = Meteor()
        atexit.register(close_meteor)
    return METEOR


def close_meteor():
    """Stop the METEOR Java process, if one was started."""
    global METEOR
    if METEOR is not None:
        with METEOR.lock:
            METEOR.meteor_p.stdin.close()
            METEOR.meteor_p.kill()
            METEOR.meteor_p.wait()
        METEOR.meteor_p = subprocess.Popen(["true"], stdin=subprocess.PIPE)  # harmless target for its __del__
        METEOR = None


def coco_tokenize(texts):
    """{id: [text]} -> {id: [tokenized text]} with the PTB tokenizer (Java), as the authors score
    (misc/cocoeval.py); without Java, an approximation: lowercase words (inner apostrophes kept), punctuation
    dropped ("don't" where PTB gives "do n't")."""
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        return PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()})
    words = lambda t: re.findall(r"[^\W_]+(?:['_][^\W_]+)*", t.lower())
    return {k: [" ".join(words(t)) for t in v] for k, v in texts.items()}


def caption_scores(references, candidates, tokenized_refs=None, meteor=True):
    """BLEU-4, METEOR, ROUGE-L, CIDEr (x100) and Meta-Sum = their sum (Sec. 3.3).

    references: {id: [caption]}; candidates: {id: caption}. METEOR needs Java; without it METEOR is
    None, a warning is given, and Meta-Sum sums the other three.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    gts = tokenized_refs or coco_tokenize(references)
    res = coco_tokenize({k: [candidates[k]] for k in gts})
    res = {k: [v[0] if v else ""] for k, v in res.items()}
    out = {"BLEU-4": 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3]}
    if meteor and java_available():
        out["METEOR"] = 100 * get_meteor().compute_score(gts, res)[0]
    else:
        if meteor:
            warnings.warn("Java not found: METEOR is skipped (install a Java runtime for it), Meta-Sum = B4 + R + C")
        out["METEOR"] = None
    out["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    out["Meta-Sum"] = sum(v for v in out.values() if v is not None)
    return {k: None if v is None else float(v) for k, v in out.items()}  # plain floats (CIDEr is numpy)


def diversity(captions, train_captions, vocab):
    """Novel, Unique (% of all generated captions) and Vocab (Sec. 3.3), as the authors count them
    (misc/utils.py, analyze_length_novel_unique): Novel = distinct generated captions that are not a
    training caption (whose out-of-vocabulary words read <unk>); Unique = distinct ones; Vocab = words used.
    """
    known = set(vocab)
    seen = {" ".join(w if w in known else vocab[UNK] for w in tokenize(c)) for c in train_captions}
    distinct, n = set(captions), max(len(captions), 1)
    return {"Novel": 100 * len(distinct - seen) / n, "Unique": 100 * len(distinct) / n,
            "Vocab": len({w for c in captions for w in c.split()})}


def mean_average_precision(probs, labels):
    """mAP: per video, AP of its K probabilities against its multi-hot labels; mean over videos with a positive.

    AP = mean over the positive attributes of the precision at their rank (ranks by descending probability).
    The authors (misc/Crit/crit_attribute.py) clamp the probabilities to [0.01, 0.99] first, so that ties
    are ranked in torch.sort's order; here they are not clamped (README, differences).
    """
    probs, labels = probs.float().cpu(), labels.float().cpu()
    order = probs.argsort(dim=1, descending=True, stable=True)
    hits = labels.gather(1, order)                                            # (V, K) labels by rank
    precision = hits.cumsum(1) / torch.arange(1, hits.size(1) + 1)           # precision at each rank
    n_pos = hits.sum(1)
    ap = (precision * hits).sum(1) / n_pos.clamp(min=1)                      # (V,)
    has_pos = n_pos > 0
    return 100 * ap[has_pos].mean().item() if has_pos.any() else float("nan")


def top_attributes(probs, attributes, k=10):
    """(K,) attribute probabilities -> [[word, p]] for the k most probable, p rounded to 4 decimals."""
    p, idx = probs.topk(min(k, probs.numel()))
    return [[attributes[j], round(q, 4)] for q, j in zip(p.tolist(), idx.tolist())]


@torch.no_grad()
def evaluate(model, split, vocab, attributes, train_captions, beam_size=5, batch_size=100, meteor=True,
             tokenized_refs=None, progress=True, n_frames=None, clip_text=None):
    """Generate captions for a split and score them -> (metrics, per-video results).

    n_frames: evaluate with fewer, uniformly resampled frames (the sparse-sampling robustness test, Fig. 7).
    clip_text: CLIP's text tower (load_clipscore_model) -> CLIPScore and RefCLIPScore too (not in the paper).
    """
    model.eval()
    V = len(split.ids)
    feats = split.feats
    if n_frames is not None:
        idx = torch.as_tensor(extract.sample_indices(next(iter(feats.values())).size(1), n_frames))
        feats = {m: x[:, idx.to(x.device)] for m, x in feats.items()}
    texts, vap_probs, tap_probs = [], [], []
    for i in tqdm(range(0, V, batch_size), desc="decoding", leave=False, disable=not progress):
        batch = {m: x[i:i + batch_size] for m, x in feats.items()}
        out = model.generate(batch, beam_size=beam_size)
        texts += [decode_caption(row.tolist(), vocab) for row in out]
        if model.cfg.vap:
            vap_probs.append(model.predict_attributes(batch).cpu())
    metrics = caption_scores({i: r for i, r in enumerate(split.refs)}, dict(enumerate(texts)),
                             tokenized_refs, meteor)
    metrics.update(diversity(texts, train_captions, vocab))
    if clip_text is not None:
        metrics.update(clip_scores(texts, split.refs, split.feats["image"], clip_text))
    if model.cfg.vap:
        vap_probs = torch.cat(vap_probs)
        metrics["mAP-VAP"] = mean_average_precision(vap_probs, split.labels)
    if model.cfg.tap:  # TAP from every ground-truth caption (the authors: the first one), AP over all pairs
        for i in range(0, len(split.tokens), 1000):
            tap_probs.append(model.predict_attributes(captions=split.tokens[i:i + 1000]).cpu())
        metrics["mAP-TAP"] = mean_average_precision(torch.cat(tap_probs), split.labels[split.pair_video].cpu())
    results = []
    for v in range(V):
        item = {"video_id": split.ids[v], "caption": texts[v]}
        if model.cfg.vap:
            item["attributes"] = top_attributes(vap_probs[v], attributes)
        results.append(item)
    return metrics, results


# ----------------------------------------------------------------------------------------------
# Command line

METRIC_COLUMNS = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "Meta-Sum", "Novel", "Unique", "Vocab", "mAP-VAP", "mAP-TAP",
                  "CLIPScore", "RefCLIPScore"]


def format_table(rows, title):
    """rows: {name: {metric: value or (mean, std)}} -> a Markdown table."""
    cols = [c for c in METRIC_COLUMNS if any(c in r for r in rows.values())]
    fmt = lambda v: "-" if v is None else (f"{v[0]:.1f} ± {v[1]:.1f}" if isinstance(v, tuple) else
                                           f"{v:.1f}" if isinstance(v, float) else str(v))
    lines = [title, "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines)


def number(kind, minimum):
    """An argparse type: a number >= minimum (exit 2 with a clear message otherwise)."""
    def parse(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    return parse


def get_args(argv=None):
    count, positive = number(int, 1), number(float, 1e-12)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults: the paper's recipe (Recipe in train.py); VATEX and the toy override "
                                       "a few (DATASET_RECIPES).")
    p.add_argument("--dataset", default="toy", choices=["toy", "msrvtt", "vatex"])
    p.add_argument("--data", help="annotation directory (msrvtt, vatex)")
    p.add_argument("--feats", help="image=PATH[,motion=PATH][,audio=PATH]: dirs of <video_id>.npy or HDF5 files")
    p.add_argument("--task", choices=list(TASKS), help="default dap (toy: base and dap, side by side)")
    p.add_argument("--epochs", type=count)
    p.add_argument("--batch_size", type=count)
    p.add_argument("--lr", type=positive)
    p.add_argument("--weight_decay", type=number(float, 0))
    p.add_argument("--d_model", type=count)
    p.add_argument("--beam_size", type=count)
    p.add_argument("--n_frames", type=count)
    p.add_argument("--n_attributes", type=count)
    p.add_argument("--attr_pos", action="store_true", help="attributes: nouns, verbs, adjectives only (nltk tagger)")
    p.add_argument("--no_sparse_sampling", action="store_true")
    p.add_argument("--seed", type=number(int, 0))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="output directory (default out/<dataset>-<task>-seed<seed>; --eval_only: "
                   "<ckpt dir>/eval; the default run: DIR/base and DIR/dap)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--ckpt", help="checkpoint (best.pt or last.pt) for --eval_only or --caption")
    p.add_argument("--caption", nargs="+", metavar="VIDEO",
                   help="caption these video files with --ckpt: features from the backbones the run was trained on")
    p.add_argument("--json", action="store_true", help="--caption: print a JSON list")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--clipscore", action="store_true",
                   help="also report CLIPScore and RefCLIPScore (Hessel et al. 2021; not in the paper); needs "
                        "image features written by extract.py with a CLIP backbone and that checkpoint")
    p.add_argument("--weights", help="the CLIP checkpoint for --clipscore; for --caption, image=PATH[,motion=PATH]"
                   "[,audio=PATH] or one PATH for image (default: extract.py's cached downloads)")
    p.add_argument("--threads", type=count, help="CPU threads for torch (default: 1 for the toy model on CPU, whose "
                   "small matrices gain little from more and slow down badly when cores are shared; else torch's)")
    toy = p.add_argument_group("toy dataset (SYNTHETIC)")
    toy.add_argument("--backbone", default="clip", choices=list(TOY_BACKBONES), help="simulated backbone")
    toy.add_argument("--toy_train", type=count, help="training videos (default: make_toy's)")
    toy.add_argument("--toy_val", type=count)
    toy.add_argument("--toy_test", type=count)
    toy.add_argument("--toy_seed", type=number(int, 0), help="seed of the toy data (default: --seed)")
    toy.add_argument("--table", action="store_true", help="toy Base/VAP/TAP/DAP over --seeds, mean ± std")
    toy.add_argument("--seeds", type=number(int, 0), nargs="+", default=[0, 1, 2])
    toy.add_argument("--study", action="store_true", help="the toy study of notebook 04 -> --out (default "
                     "notebooks/toy_study.json); resumable")
    args = p.parse_args(argv)
    if args.dataset != "toy" and not (args.data and args.feats):
        p.error(f"--dataset {args.dataset} needs --data DIR (annotations) and --feats image=DIR[,motion=DIR][,audio=DIR]")
    if (args.table or args.study) and args.dataset != "toy":
        p.error("--table and --study run on the synthetic toy dataset only")
    if args.clipscore and args.dataset == "toy":
        p.error("--clipscore needs real CLIP image features: --dataset msrvtt|vatex --feats image=DIR (extract.py)")
    if (args.eval_only or args.caption) and not args.ckpt:
        p.error("--eval_only and --caption need --ckpt out/RUN/best.pt")
    sparse = False if args.no_sparse_sampling else None
    args.recipe = recipe_for(args.dataset, sparse_sampling=sparse,
                             **{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if hasattr(args, f.name)})
    if args.threads is None and args.dataset == "toy" and args.device == "cpu" and not args.caption:
        args.threads = 1
    return args


def load_data(args, vocab=None, attributes=None, log=print):
    """Dataset, features, vocabulary and attributes for args -> (dataset, {split: Split}, vocab, attributes)."""
    recipe = args.recipe
    if args.dataset == "toy":
        sizes = {"n_train": args.toy_train, "n_val": args.toy_val, "n_test": args.toy_test}
        ds = make_toy(seed=recipe.seed if args.toy_seed is None else args.toy_seed, n_frames=recipe.n_frames,
                      backbone=args.backbone, **{k: v for k, v in sizes.items() if v is not None})
        feats = ds.feats
        log(f"toy dataset: SYNTHETIC, backbone {ds.meta['backbone']}, "
            + ", ".join(f"{s} {len(ds.splits[s])}" for s in SPLITS) + " videos")
    else:
        ds = drop_uncaptioned(load_msrvtt(args.data) if args.dataset == "msrvtt" else load_vatex(args.data), log)
        feats, kept = load_features(parse_feats(args.feats), ds.all_ids, recipe.n_frames,
                                    missing="drop" if args.dataset == "vatex" else "error", log=log)
        ds = subset(ds, kept)
    if vocab is None:
        captions = training_captions(ds)
        vocab = build_vocab(captions)
        attributes = build_attributes(captions, vocab, recipe.n_attributes, args.attr_pos, log)
    log(f"vocabulary {len(vocab)} words, {len(attributes)} attributes")
    return ds, prepare(ds, feats, vocab, attributes), vocab, attributes


def run(args, task, log=print):
    """One experiment: data -> train (or load) -> test evaluation -> out/<run>/; returns (metrics, results).

    Everything is checked before anything is written: a refused --resume leaves the run as it was.
    """
    recipe = args.recipe
    torch.manual_seed(recipe.seed)
    if args.eval_only:
        model, vocab, attributes, _ = load_checkpoint(args.ckpt, args.device)
        task = task_of(model.cfg)
    ds, data, vocab, attributes = load_data(args, *((vocab, attributes) if args.eval_only else ()), log=log)
    dims = {m: x.size(-1) for m, x in data["train"].feats.items()}
    clip_text = None  # checked before training, so that a wrong checkpoint fails fast
    if args.clipscore:
        clip_text = load_clipscore_model(parse_feats(args.feats)["image"], args.weights, args.device)
    out_dir = Path(args.out or (Path(args.ckpt).parent / "eval" if args.eval_only
                                else Path("out") / f"{args.dataset}-{task}-seed{recipe.seed}"))
    if args.eval_only:
        if dims != model.cfg.feature_dims:
            raise ValueError(f"{args.ckpt} takes features {model.cfg.feature_dims} (modality: dimension), but the data "
                             f"give {dims}: evaluate it on the features it was trained on")
    else:
        cfg = model_config(task, recipe, dims, vocab, attributes)
        config = {"task": task, "recipe": dataclasses.asdict(recipe), "model": dataclasses.asdict(cfg),
                  "data": {k: getattr(args, k) for k in ("dataset", "data", "feats", "attr_pos", "backbone", "toy_train",
                                                         "toy_val", "toy_test", "toy_seed")},
                  "synthetic": ds.synthetic, "features": None if ds.synthetic else feature_provenance(parse_feats(args.feats))}
        if args.resume and (out_dir / "config.json").is_file():  # the same run, perhaps with more epochs
            before = read_meta(out_dir / "config.json")
            same = lambda c: [c.get("task"), {**c.get("recipe", {}), "epochs": 0}, c.get("model"), c.get("data")]
            differ = [k for k, a, b in zip(("task", "recipe", "model", "data"), same(before), same(config)) if a != b]
            if differ:
                raise ValueError(f"--resume: {out_dir} holds a run with other {' and '.join(differ)} settings "
                                 f"(see its config.json): give the same options, or another --out")
        if args.resume:
            resume_state(out_dir, cfg, log=lambda *a: None)  # its last.pt too, before anything is written
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, obj in [("config.json", config), ("vocab.json", vocab), ("attributes.json", attributes)]:
            write_json(out_dir / name, obj)
        t0 = time.time()
        model, history = train_model(task, data, vocab, attributes, args.device, out_dir, args.resume, log,
                                     progress=not args.no_progress, **dataclasses.asdict(recipe))
        train_time = time.time() - t0
    test = data["test"].to(args.device)
    metrics, results = evaluate(model, test, vocab, attributes, [c for refs in data["train"].refs for c in refs],
                                recipe.beam_size, progress=not args.no_progress, clip_text=clip_text)
    title = f"{args.dataset} test set" + (f" — SYNTHETIC toy data, {ds.meta['backbone']} backbone" if ds.synthetic else "")
    log(format_table({task: metrics}, title))  # printed first: a full disk below loses no result
    record = {"dataset": args.dataset, "synthetic": ds.synthetic, "task": task, "split": "test",
              "n_videos": len(test.ids), **metrics, **({"backbone": ds.meta["backbone"]} if ds.synthetic else {})}
    if not args.eval_only:
        record.update(train_time_s=round(train_time, 1), history=history)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", record)
    write_json(out_dir / "captions.json", results)
    log(f"outputs in {out_dir}/")
    return metrics, results


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.caption:
            return run_caption(args)
        if args.table or args.study:
            return run_study(args) if args.study else run_table(args)
        if args.dataset == "toy" and args.task is None and not args.eval_only:
            return run_toy_comparison(args)
        return run(args, args.task or "dap")[0]
    except (ValueError, OSError, ImportError) as e:  # bad input: one line naming what is wrong, exit 1
        raise SystemExit(f"error: {e}") from None


# ----------------------------------------------------------------------------------------------
# Captioning new video files (--caption): each video goes through the backbones that wrote the training
# features (recorded in config.json from extract.py's meta.json), then beam search and the VAP APNet.


def parse_weights(spec):
    """--weights for --caption: 'image=PATH[,motion=PATH][,audio=PATH]', or one PATH (the image backbone's)."""
    parts = [part.strip() for part in (spec or "").split(",") if part.strip()]
    if parts and all(re.match(r"(image|motion|audio)=", part) for part in parts):
        return dict(part.split("=", 1) for part in parts)
    return {"image": spec} if spec else {}


def load_captioner(ckpt_path, weights=None, device="cpu"):
    """A best.pt and the backbones its features came from -> (model, vocab, attributes, extractors, n_frames).

    extractors: {modality: (backbone, extract.Backbone spec, meta)}. Each backbone's weights (from --weights
    or extract.py's cache) must have the SHA-256 of those that wrote the training features.
    """
    config_path = Path(ckpt_path).parent / "config.json"
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt {ckpt_path}: no such file")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --caption reads the config.json that train.py writes "
                                "next to best.pt (it names the backbones that made the training features)")
    config = read_meta(config_path)
    if config.get("synthetic"):
        raise ValueError(f"{ckpt_path} was trained on the SYNTHETIC toy dataset: its features are simulated, so no "
                         "backbone can compute them from a video. Caption with a model trained on features from "
                         "extract.py (--dataset msrvtt|vatex --feats image=DIR,...)")
    model, vocab, attributes, _ = load_checkpoint(ckpt_path, device)
    provenance = config.get("features") or feature_provenance(parse_feats(config["data"]["feats"]))
    weights = parse_weights(weights)
    if set(weights) - set(model.cfg.feature_dims):
        raise ValueError(f"--weights names {sorted(set(weights) - set(model.cfg.feature_dims))}, but {ckpt_path} "
                         f"takes only {sorted(model.cfg.feature_dims)} features")
    extractors = {}
    for m, dim in model.cfg.feature_dims.items():
        meta = provenance.get(m)
        if meta is None:
            raise ValueError(f"{ckpt_path} was trained on {m} features without extract.py's meta.json (e.g. the "
                             f"authors' HDF5 files): the backbone that made them is unknown, so they cannot be "
                             f"extracted from a new video. Train on {m} features written by extract.py")
        try:
            backbone, spec, sha = extract.load_backbone(meta["backbone"], weights.get(m), device)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            raise RuntimeError(f"{ckpt_path} needs {m} features from the {meta['backbone']} backbone, whose weights "
                               f"could not be loaded: {str(e).rstrip('.')}. With --caption, give them as "
                               f"--weights {m}=PATH (several modalities: --weights image=PATH,motion=PATH,audio=PATH)"
                               ) from None
        if sha != meta["weights_sha256"]:
            raise ValueError(f"the {m} backbone {meta['backbone']}: weights {weights.get(m) or '(cached download)'} "
                             f"have SHA-256 {sha}, but the training features were extracted with weights of SHA-256 "
                             f"{meta['weights_sha256']}; features from other weights do not match the model: pass "
                             f"the checkpoint that wrote them with --weights {m}=PATH")
        if backbone.output_dim != dim:
            raise ValueError(f"the {m} backbone gives {backbone.output_dim}-d features; the model takes {dim}-d")
        extractors[m] = (backbone, spec, meta)
    return model, vocab, attributes, extractors, config["recipe"]["n_frames"]


def video_features(path, extractors, n_frames, device="cpu"):
    """One video file -> {modality: (1, N, D)}: what extract.py and load_features give for a training video."""
    feats = {}
    for m, (backbone, spec, meta) in extractors.items():
        samples = extract.decode_video(path, meta["frames"], spec)  # T = the training run's frames per video
        x = (np.zeros((len(samples), backbone.output_dim), np.float32) if isinstance(samples, extract.Silent)
             else extract.encode_samples(backbone, spec, samples, device, dtype=meta["dtype"]))  # (T, D)
        x = x[extract.sample_indices(len(x), n_frames)]                              # (N, D)
        feats[m] = torch.from_numpy(x).to(device)[None]                             # (1, N, D)
    return feats


@torch.no_grad()
def caption_video(path, model, vocab, attributes, extractors, n_frames, beam_size=5):
    """One video file -> {video, caption, attributes: top-10 [word, p] (None without VAP), seconds}."""
    t0 = time.time()
    feats = video_features(path, extractors, n_frames, next(model.parameters()).device)
    tokens = model.generate(feats, beam_size=beam_size)[0]
    result = {"video": str(path), "caption": decode_caption(tokens.tolist(), vocab), "attributes": None}
    if model.cfg.vap:
        result["attributes"] = top_attributes(model.predict_attributes(feats)[0].cpu(), attributes)
    result["seconds"] = round(time.time() - t0, 3)
    return result


def caption_videos(videos, ckpt_path, weights=None, device="cpu", beam_size=5):
    """Yield caption_video's result for each video file; a bad video yields {video, error} and the rest go on."""
    loaded = load_captioner(ckpt_path, weights, device)
    for path in videos:
        try:
            yield caption_video(path, *loaded, beam_size=beam_size)
        except Exception as e:  # noqa: BLE001 - one bad video fails alone, with its reason
            yield {"video": str(path), "error": extract.failure_reason(e)}


def format_caption(result):
    """One video's result as text: the caption, the top-10 attributes with probabilities, the time taken."""
    attrs = ("unavailable (the model has no VAP APNet)" if result["attributes"] is None
             else ", ".join(f"{w} {p:.2f}" for w, p in result["attributes"]))
    return f"{result['video']} ({result['seconds']:.2f} s)\n  caption: {result['caption']}\n  attributes: {attrs}"


def run_caption(args):
    """--caption: print each video's result (or a JSON list with --json); exit status 1 if any video failed."""
    results = []
    try:
        for r in caption_videos(args.caption, args.ckpt, args.weights, args.device, args.recipe.beam_size):
            results.append(r)
            if "error" in r:
                print(f"error: {r['video']}: {r['error']}", file=sys.stderr)
            elif not args.json:
                print(format_caption(r), flush=True)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        print(json.dumps(results, indent=1))
    failed = [r["video"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(results)} videos failed: {', '.join(failed)}")
    return results


# ----------------------------------------------------------------------------------------------
# CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021), an addition beyond the paper (--clipscore):
# reference-free caption quality from CLIP's text tower (extract.py) and the CLIP image features. A video's
# image embedding is the mean of its frame embeddings. Reported x100, like the other metrics.

CLIPSCORE_W = 2.5  # Hessel et al.'s rescaling of the cosine
CLIPSCORE_PREFIX = "A photo depicts"  # their prompt, put before candidates and references alike


def clip_score(video_emb, caption_emb, w=CLIPSCORE_W):
    """CLIP-S(c, v) = w * max(cos(c, v), 0) per video (Hessel et al. Eq. 1): (V, D), (V, D) -> (V,)."""
    return w * torch.cosine_similarity(caption_emb, video_emb, dim=-1).clamp(min=0)


def ref_clip_score(video_emb, caption_emb, ref_emb, ref_mask, w=CLIPSCORE_W):
    """RefCLIP-S = H-Mean(CLIP-S(c, v), max(max_r cos(c, r), 0)) per video (Eq. 2); the reference side has no w.

    ref_emb: (V, R, D) reference embeddings padded to R; ref_mask: (V, R), True where a reference exists.
    """
    image_side = clip_score(video_emb, caption_emb, w)                                      # (V,)
    cos = torch.cosine_similarity(caption_emb[:, None, :], ref_emb, dim=-1)                 # (V, R)
    text_side = cos.masked_fill(~ref_mask, float("-inf")).amax(dim=1).clamp(min=0)        # (V,)
    total = image_side + text_side
    return torch.where(total > 0, 2 * image_side * text_side / total.clamp(min=1e-12), torch.zeros_like(total))


def clip_scores(candidates, references, image_feats, text_model, batch_size=256):
    """Corpus CLIPScore and RefCLIPScore (x100, mean over videos).

    candidates: [caption] per video; references: [[caption]] per video; image_feats: (V, N, D) CLIP frame
    embeddings from the checkpoint of text_model (see load_clipscore_model).
    """
    V = len(candidates)
    if image_feats.shape[0] != V or len(references) != V:
        raise ValueError(f"CLIPScore: {V} captions, {len(references)} reference lists, {image_feats.shape[0]} videos")
    if any(len(refs) == 0 for refs in references):
        raise ValueError(f"CLIPScore: video #{next(i for i, r in enumerate(references) if not r)} has no reference")
    video = image_feats.float().mean(dim=1).cpu()                                          # (V, D)
    caption = extract.encode_captions(text_model, list(candidates), CLIPSCORE_PREFIX, batch_size)  # (V, D)
    if caption.shape[1] != video.shape[1]:
        raise ValueError(f"CLIPScore: {video.shape[1]}-d image features but {caption.shape[1]}-d CLIP text "
                         "embeddings: the features are not from this CLIP checkpoint")
    counts = [len(refs) for refs in references]
    flat = extract.encode_captions(text_model, [r for refs in references for r in refs], CLIPSCORE_PREFIX, batch_size)
    ref_emb = torch.nn.utils.rnn.pad_sequence(flat.split(counts), batch_first=True)     # (V, R, D)
    ref_mask = torch.arange(ref_emb.shape[1]) < torch.tensor(counts)[:, None]              # (V, R)
    return {"CLIPScore": 100 * clip_score(video, caption).mean().item(),
            "RefCLIPScore": 100 * ref_clip_score(video, caption, ref_emb, ref_mask).mean().item()}


def load_clipscore_model(image_feats_dir, weights=None, device="cpu"):
    """CLIP's text tower from the checkpoint that wrote image_feats_dir; its meta.json's SHA-256 must match."""
    meta_path = Path(image_feats_dir) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"--clipscore: {meta_path} not found; CLIPScore needs image features written by "
                                "extract.py with a CLIP backbone (its meta.json names the checkpoint)")
    meta = read_meta(meta_path)
    backbone, expected = meta.get("backbone"), meta.get("weights_sha256")
    try:
        model, sha = extract.load_clip_text(backbone, weights, device)
    except ValueError as e:
        raise ValueError(f"--clipscore: {meta_path} says backbone {backbone!r}: {e}") from None
    if sha != expected:
        raise ValueError(f"--clipscore: the CLIP weights {weights or '(cache)'} have SHA-256 {sha}, but the image "
                         f"features in {meta_path.parent} were written with {backbone} weights of SHA-256 {expected}; "
                         "pass the checkpoint that wrote them with --weights")
    return model


# ----------------------------------------------------------------------------------------------
# The toy comparisons: Base vs DAP (the default run), Base/VAP/TAP/DAP over seeds (--table), the study (--study)


def run_toy_comparison(args, log=print):
    """python train.py: Base and DAP on the same SYNTHETIC toy data, side by side, and three test videos.

    The two runs are independent (--out DIR: DIR/base and DIR/dap): with two CPU cores they train at once,
    one process and one thread each (the same results as one after the other, in about 60% of the time).
    """
    tasks = ("base", "dap")
    each = [argparse.Namespace(**{**vars(args), "out": args.out and str(Path(args.out) / task)}) for task in tasks]
    if (os.cpu_count() or 1) > 1 and args.threads == 1 and args.device == "cpu":
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        with ProcessPoolExecutor(2, mp_context=spawn) as pool:
            runs = dict(zip(tasks, pool.map(run_in_worker, each, tasks)))
    else:
        runs = {task: run(task_args, task, log) for task_args, task in zip(each, tasks)}
    _, data, _, attributes = load_data(args, log=lambda *a: None)  # the test videos' references and labels
    test = data["test"]
    rows = {"Base": runs["base"][0], "DAP": runs["dap"][0]}
    log("\n" + format_table(rows, f"SYNTHETIC toy data, simulated {args.backbone}-like backbone, "
                                  f"{len(test.ids)} test videos, seed {args.recipe.seed}: Base vs DAP"))
    for v, (base, with_dap) in enumerate(list(zip(runs["base"][1], runs["dap"][1]))[:3]):
        label = {w for w, x in zip(attributes, test.labels[v].tolist()) if x}
        attrs = ", ".join(f"{w} {p:.2f}{'*' if w in label else ''}" for w, p in with_dap["attributes"][:6])
        log(f"{base['video_id']}  one of its captions: {test.refs[v][0]}\n  Base: {base['caption']}\n"
            f"  DAP:  {with_dap['caption']}\n  DAP's top attributes (* = in the video's label): {attrs}")
    gain = rows["DAP"]["Meta-Sum"] - rows["Base"]["Meta-Sum"]
    log(f"\nOn this SYNTHETIC toy, DAP {'gains' if gain > 0 else 'loses'} {abs(gain):.1f} Meta-Sum against Base "
        "with this seed; notebook 04 shows over seeds and settings when DAP helps and when it does not.")
    return rows


def run_in_worker(args, task):
    """run() in a worker process of the default run: one thread, its lines prefixed with its task, no bars."""
    torch.set_num_threads(1)
    log = lambda text: print("\n".join(f"{task:4s} | {line}" for line in str(text).splitlines()), flush=True)
    return run(argparse.Namespace(**{**vars(args), "no_progress": True}), task, log)


def run_table(args, log=print):
    """Toy Base / VAP / TAP / DAP, one run per seed each, mean ± std (population std over seeds)."""
    rows, raw = {}, {}
    for task in TASKS:
        runs = []
        for seed in args.seeds:
            a = copy.copy(args)
            a.recipe, a.out = dataclasses.replace(args.recipe, seed=seed), str(Path(args.out or "out/toy-table") / f"{task}-seed{seed}")
            runs.append(run(a, task, log)[0])
        raw[task] = runs
        rows[task.upper() if task != "base" else "Base"] = {
            k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
            for k in runs[0] if runs[0][k] is not None}
    table = format_table(rows, f"SYNTHETIC toy dataset, simulated {args.backbone}-like backbone, test set, "
                               f"mean ± std over seeds {args.seeds}")
    out = Path(args.out or "out/toy-table")
    extract.write_text(out / "table.md", table + "\n")
    write_json(out / "table.json", raw)
    log(table)
    return rows


# The study of notebook 04: each cell changes one factor of the default toy (make_toy's arguments, the recipe,
# or, for diagnostics, the model) and trains its tasks over three seeds. cell: (make_toy, tasks, variant, recipe)
STUDY_CELLS = {
    "default": ({}, list(TASKS), "paper", {}),                     # MSR-VTT-like: 20 captions, 13% mention share
    "long": ({}, list(TASKS), "paper", {"epochs": 24}),            # twice the schedule
    "share50": ({"agreement": 0.85}, list(TASKS), "paper", {}),    # annotators agree: a caption names ~50%
    "share100": ({"agreement": 1.0}, list(TASKS), "paper", {}),    # a caption names the whole label
    "train100": ({"n_train": 100}, list(TASKS), "paper", {}),
    "inp": ({"backbone": "inp"}, list(TASKS), "paper", {}),        # a weak attribute signal
    "vap_detached": ({}, ["vap", "dap"], "vap_detached", {}),      # VAP's gradient stopped before the encoder
    "lambda_v=0.1": ({}, ["vap", "dap"], "lambda_v=0.1", {}),      # VAP weighted 0.1 in Eq. 12
    "no_ss": ({}, ["vap", "dap"], "no_ss", {}),                    # VAP without sparse sampling
    "train900": ({"n_train": 900}, ["base", "dap"], "paper", {}),
}
STUDY_FRAMES = [4, 2, 1]  # fewer frames at inference (Fig. 7)
STUDY_PATH = Path(__file__).parent / "notebooks" / "toy_study.json"  # --study's output, read by notebooks 04 and 05


def study_run(cell, task, seed, log=lambda *a: None):
    """Train and test one (cell, task, seed) of the study -> a JSON-able record."""
    toy_kw, _, variant, recipe_kw = STUDY_CELLS[cell]
    recipe = recipe_for("toy", seed=seed, sparse_sampling=variant != "no_ss", **recipe_kw)
    t0 = time.time()
    ds = make_toy(seed=seed, n_frames=recipe.n_frames, **toy_kw)
    captions = training_captions(ds)
    vocab = build_vocab(captions)
    attributes = build_attributes(captions, vocab, recipe.n_attributes, log=log)
    data = prepare(ds, ds.feats, vocab, attributes)
    cfg = model_config(task, recipe, {m: x.size(-1) for m, x in ds.feats.items()}, vocab, attributes)
    torch.manual_seed(seed)
    model = dap.CaptionModel(dataclasses.replace(cfg, lambda_v=0.1) if variant == "lambda_v=0.1" else cfg)
    if variant == "vap_detached":  # a diagnostic, not the paper: VAP reads F without training the encoder
        model.video_attribute_p_raw = lambda memory: torch.sigmoid(model.vap_net(memory.detach()))
    history = train(model, data, vocab, attributes, recipe, progress=False, log=log)
    t_train = time.time() - t0
    test = lambda n=None: evaluate(model, data["test"], vocab, attributes, captions, progress=False, n_frames=n)[0]
    return {"cell": cell, "task": task, "seed": seed, "variant": variant, "toy": toy_kw, "recipe": dataclasses.asdict(recipe),
            "test": test(), "test_fewer_frames": {str(n): test(n) for n in STUDY_FRAMES},
            "best_epoch": int(np.argmax([h["val_Meta-Sum"] for h in history])) + 1,
            "val_meta_sum": [round(h["val_Meta-Sum"], 2) for h in history],
            "data_statistics": caption_statistics(ds, vocab, attributes), "train_s": round(t_train, 1),
            "total_s": round(time.time() - t0, 1)}


def study_summary(runs):
    """{cell: {task: {metric: [mean, std, n], "seeds": [...]}, "data_statistics": {...}}} (population std)."""
    groups = {}
    for r in runs.values():
        groups.setdefault(r["cell"], {}).setdefault(r["task"], []).append(r)
    summary = {}
    for cell, tasks in groups.items():
        for task, rs in tasks.items():
            values = {k: [r["test"][k] for r in rs] for k in rs[0]["test"] if rs[0]["test"][k] is not None}
            values.update({f"{k}@{n}f": [r["test_fewer_frames"][str(n)][k] for r in rs] for n in STUDY_FRAMES
                           for k in ("CIDEr", "Meta-Sum", "mAP-VAP") if rs[0]["test"].get(k) is not None})
            row = {k: [round(float(np.mean(v)), 2), round(float(np.std(v)), 2), len(v)] for k, v in values.items()}
            summary.setdefault(cell, {})[task] = {**row, "seeds": sorted(r["seed"] for r in rs),
                                                  "train_s": round(float(np.mean([r["train_s"] for r in rs])), 1)}
        stats = [r["data_statistics"] for r in {r["seed"]: r for rs in tasks.values() for r in rs}.values()]
        summary[cell]["data_statistics"] = {k: round(float(np.mean([x[k] for x in stats])), 3) for k in stats[0]}
    return summary


def run_study(args, log=print):
    """--study: every (cell, task, seed) not yet in the output JSON, then its summary (resumable)."""
    path = Path(args.out or STUDY_PATH)
    study = read_meta(path) if path.is_file() else {"runs": {}}
    for cell, (_, tasks, _, _) in STUDY_CELLS.items():
        for seed in args.seeds:
            for task in tasks:
                key = f"{cell}|{task}|{seed}"
                if key in study["runs"]:
                    continue
                study["runs"][key] = record = study_run(cell, task, seed)
                log(f"{key}: Meta-Sum {record['test']['Meta-Sum']:.1f}, CIDEr {record['test']['CIDEr']:.1f} "
                    f"({record['total_s']:.0f} s)")
                study["summary"] = study_summary(study["runs"])
                write_json(path, study)
    return study


if __name__ == "__main__":
    main()
