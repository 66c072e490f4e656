"""
The toy study of notebook 04: when does DAP help? (SYNTHETIC data; not the paper's pipeline.)

    python notebooks/toy_study.py                       # every cell x seeds 0-2 (hours on a CPU)
    python notebooks/toy_study.py --cells train900      # some cells; several processes may share
    python notebooks/toy_study.py --table               # the table of what is there

Each cell changes one factor of the default toy (train.make_toy's arguments, the recipe, or, for
the diagnostics, the model) and trains Base and DAP (the default cell: VAP and TAP too) on the same
data and seeds with train.py's functions, each to its best validation epoch. The output,
notebooks/toy_study.json, holds every run's record, written as it finishes (an interrupted study
resumes where it stopped), and a summary: mean ± std over seeds, and DAP - Base per seed.
"""
import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py, dap.py, extract.py
import dap  # noqa: E402
import extract  # noqa: E402
import train  # noqa: E402

# cell: (what it changes, make_toy's arguments, tasks, variant, recipe overrides). Every run trains
# until its validation Meta-Sum has not improved for the toy recipe's patience (at most 50 epochs)
# and is tested at its best epoch. The diagnostic cells train DAP only: its Base is the default's.
STUDY_CELLS = {
    "train100": ("100 training videos", {"n_train": 100}, ["base", "dap"], "paper", {}),
    "default": ("300 training videos (default)", {}, list(train.TASKS), "paper", {}),
    "train900": ("900 training videos", {"n_train": 900}, ["base", "dap"], "paper", {}),
    "train2700": ("2,700 training videos", {"n_train": 2700}, ["base", "dap"], "paper", {}),
    "share50": ("a caption names ~50% of its label", {"agreement": 0.85}, ["base", "dap"], "paper",
                {}),
    "inp": ("INP-like features (every modality weaker)", {"backbone": "inp"}, ["base", "dap"],
            "paper", {}),
    "no_ss": ("VAP without sparse sampling", {}, ["dap"], "no_ss", {}),
    "vap_detached": ("VAP's gradient stopped at F", {}, ["dap"], "vap_detached", {}),
}
STUDY_FRAMES = [4, 2, 1]  # fewer frames at inference (Fig. 7)
STUDY_PATH = train.STUDY_FILE  # read by train.py's default run and notebooks 04 and 05


def caption_statistics(dataset, vocab, attributes):
    """What a dataset's training captions look like to DAP: {statistic: value}.

    A video's label is the union of the attributes in its captions (Sec. 4.1); the mention share is,
    per caption, the attributes it mentions / its video's label size (mean over captions); document
    frequency = the number of training videos whose label has the attribute.
    """
    train_ids = dataset.splits["train"]
    labels = train.attribute_labels([dataset.captions[v] for v in train_ids], attributes).numpy()
    index = {w: i for i, w in enumerate(attributes)}
    n_words, mentioned, share = [], [], []
    for v, vid in enumerate(train_ids):
        for c in dataset.captions[vid]:
            words = train.tokenize(c)
            k = len({index[w] for w in words if w in index})
            n_words.append(len(words))
            mentioned.append(k)
            share.append(k / max(labels[v].sum(), 1))
    per_video, df = labels.sum(1), np.sort(labels.sum(0))[::-1]
    return {"videos": len(train_ids),
            "captions per video": float(np.mean([len(dataset.captions[v]) for v in train_ids])),
            "words per caption": float(np.mean(n_words)),
            "vocabulary": len(vocab) - len(train.SPECIALS), "K": len(attributes),
            "attributes per video (mean)": float(per_video.mean()),
            "attributes per video (median)": float(np.median(per_video)),
            "attributes per caption": float(np.mean(mentioned)),
            "mention share": float(np.mean(share)),
            "videos with the top attribute": int(df[0]),
            "videos with the median attribute": int(df[len(df) // 2]),
            "videos with the K-th attribute": int(df[-1])}


def machine():
    """The CPU and torch of a run: a seed fixes the data and every random draw but not the rounding,
    which differs between CPUs, and training amplifies it (README, What the toy shows)."""
    info = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                if line.startswith("model name")), "") if info.is_file() else ""
    return (f"{cpu or platform.processor() or platform.machine()}, "
            f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")


def study_run(cell, task, seed, log=lambda *a: None):
    """Train and test one (cell, task, seed) of the study -> a JSON-able record."""
    _, toy_kw, _, variant, recipe_kw = STUDY_CELLS[cell]
    recipe = train.recipe_for("toy", seed=seed, sparse_sampling=variant != "no_ss", **recipe_kw)
    t0 = time.time()
    ds = train.make_toy(seed=seed, n_frames=recipe.n_frames, **toy_kw)
    captions = train.training_captions(ds)
    vocab = train.build_vocab(captions)
    attributes = train.build_attributes(captions, vocab, recipe.n_attributes, log=log)
    data = train.prepare(ds, ds.feats, vocab, attributes)
    cfg = train.model_config(task, recipe, {m: x.size(-1) for m, x in ds.feats.items()}, vocab,
                             attributes)
    torch.manual_seed(seed)
    model = dap.CaptionModel(cfg)
    if variant == "vap_detached":  # a diagnostic, not the paper: VAP reads F without training it
        model.video_attribute_p_raw = lambda memory: torch.sigmoid(model.vap_net(memory.detach()))
    history = train.train(model, data, vocab, attributes, recipe, progress=False, log=log)
    t_train = time.time() - t0

    def test(n=None):
        metrics, results = train.evaluate(model, data["test"], vocab, attributes,
                                          data["train"].refs, progress=False, n_frames=n)
        return {**metrics, **train.toy_details(ds, data["test"].ids,
                                               [r["caption"] for r in results])}
    return {"cell": cell, "task": task, "seed": seed, "variant": variant, "toy": toy_kw,
            "recipe": dataclasses.asdict(recipe), "test": test(),
            "test_fewer_frames": {str(n): test(n) for n in STUDY_FRAMES},
            "best_epoch": train.best_epoch(history),
            "epochs_run": len(history),
            "val_meta_sum": [round(h["val_Meta-Sum"], 2) for h in history],
            "data_statistics": caption_statistics(ds, vocab, attributes),
            "machine": machine(),
            "train_s": round(t_train, 1), "total_s": round(time.time() - t0, 1)}


def paired_differences(runs, metric="Meta-Sum"):
    """{cell: {"what", "diff": [mean, std, n], "ahead": seeds where DAP > Base}}: DAP - Base per
    seed on the same data (a diagnostic cell's Base is the default cell's), population std."""
    value = {(r["cell"], r["task"], r["seed"]): r["test"][metric] for r in runs.values()}
    out = {}
    for cell, (what, _, tasks, _, _) in STUDY_CELLS.items():
        base_cell = cell if "base" in tasks else "default"
        d = np.array([v - value[base_cell, "base", s] for (c, t, s), v in value.items()
                      if c == cell and t == "dap" and (base_cell, "base", s) in value])
        if len(d):
            out[cell] = {"what": what, "diff": [round(float(d.mean()), 2), round(float(d.std()), 2),
                                                len(d)], "ahead": int((d > 0).sum())}
    return out


def study_summary(runs):
    """{cell: {task: {metric: [mean, std, n], "seeds": [...]}, "data_statistics": {...}}}
    (population std over seeds)."""
    groups = {}
    for r in runs.values():
        groups.setdefault(r["cell"], {}).setdefault(r["task"], []).append(r)
    summary = {}
    for cell, tasks in groups.items():
        for task, rs in tasks.items():
            values = {k: [r["test"][k] for r in rs] for k in rs[0]["test"]
                      if rs[0]["test"][k] is not None}
            values.update({f"{k}@{n}f": [r["test_fewer_frames"][str(n)][k] for r in rs]
                           for n in STUDY_FRAMES for k in ("CIDEr", "Meta-Sum", "mAP-VAP")
                           if rs[0]["test"].get(k) is not None})
            row = {k: [round(float(np.mean(v)), 2), round(float(np.std(v)), 2), len(v)]
                   for k, v in values.items()}
            summary.setdefault(cell, {})[task] = {
                **row, "seeds": sorted(r["seed"] for r in rs),
                "train_s": round(float(np.mean([r["train_s"] for r in rs])), 1)}
        stats = [r["data_statistics"] for r in {r["seed"]: r for rs in tasks.values()
                                                 for r in rs}.values()]
        summary[cell]["data_statistics"] = {k: round(float(np.mean([x[k] for x in stats])), 3)
                                            for k in stats[0]}
    return summary


def read_study(path):
    """The study file, or a new one; an error naming the file when it is not a study."""
    study = extract.read_meta(path) if Path(path).is_file() else {"runs": {}}
    if not isinstance(study.get("runs"), dict):
        raise ValueError(f"{path} is not a study file (no \"runs\" object): use another --out")
    return study


def run_study(path=STUDY_PATH, cells=tuple(STUDY_CELLS), seeds=(0, 1, 2), tasks=None, log=print):
    """Every (cell, task, seed) not yet in the study file, each saved as it finishes (resumable).
    Several processes may share the file (e.g. one per core, other cells): each record is merged
    into it under a lock."""
    for cell in cells:
        for seed in seeds:
            for task in [t for t in STUDY_CELLS[cell][2] if t in (tasks or train.TASKS)]:
                key = f"{cell}|{task}|{seed}"
                if key in read_study(path)["runs"]:
                    continue
                record = study_run(cell, task, seed)
                with extract.meta_lock(Path(path).parent):
                    study = read_study(path)
                    study["runs"][key] = record
                    study["summary"] = {**study_summary(study["runs"]),
                                        "paired": paired_differences(study["runs"])}
                    train.write_json(path, study)
                log(f"{key}: Meta-Sum {record['test']['Meta-Sum']:.1f}, epoch "
                    f"{record['best_epoch']} of {record['epochs_run']} ({record['total_s']:.0f} s)")
    return read_study(path)


def summary_table(study, cells=None):
    """The test Meta-Sum of every cell and task, mean ± std over seeds, as a Markdown table."""
    summary = study_summary(study["runs"])
    rows = {f"{cell} ({task})": {k: tuple(v[:2]) for k, v in result.items()
                                 if k in train.METRIC_COLUMNS}
            for cell, tasks in summary.items() if cells is None or cell in cells
            for task, result in tasks.items() if task != "data_statistics"}
    return train.format_table(rows, "The toy study (SYNTHETIC), test set, mean ± std over seeds")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--cells", nargs="+", choices=list(STUDY_CELLS), default=list(STUDY_CELLS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", choices=list(train.TASKS), help="only these (default all)")
    p.add_argument("--out", default=str(STUDY_PATH), help="the study file (resumed if it exists)")
    p.add_argument("--table", action="store_true", help="only print the table of what is there")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the toy's small matrices: one thread is as fast, and shares well
    try:
        study = (read_study(args.out) if args.table
                 else run_study(args.out, args.cells, args.seeds, args.tasks))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(summary_table(study, None if args.table else args.cells))
    print(train.study_verdict(args.out))
    return study


if __name__ == "__main__":
    main()
