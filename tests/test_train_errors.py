"""train.py on bad input: every case ends in one clear line naming the file, video or option and what
is wrong (exit 1 for data, exit 2 for options), and nothing already computed is lost or rewritten."""
import errno
import json
import pathlib
import pickle

import numpy as np
import pytest

import train

TINY = ["--toy_train", "12", "--toy_val", "3", "--toy_test", "3", "--d_model", "32", "--n_frames", "4",
        "--batch_size", "16", "--beam_size", "1", "--no_progress", "--epochs", "1"]


pytestmark = pytest.mark.usefixtures("no_java")  # the Python fallbacks: no Java start-up


def tiny_msrvtt(root, captions=None, dims=None, empty=()):
    """An MSR-VTT-format folder (6 videos: 3 train, 1 val, 2 test, 2 captions each; no captions for `empty`)
    and .npy features (T=5) per modality -> the --data and --feats arguments."""
    captions = captions or ["a man is cooking food in a kitchen", "a dog is running in a park"]
    splits = ["train"] * 3 + ["validate"] + ["test"] * 2
    (root / "ann").mkdir()
    (root / "ann" / "videodatainfo.json").write_text(json.dumps({
        "videos": [{"video_id": f"video{i}", "category": 0, "split": s} for i, s in enumerate(splits)],
        "sentences": [{"video_id": f"video{i}", "caption": c, "sen_id": 2 * i + j} for i in range(6)
                      for j, c in enumerate(captions) if f"video{i}" not in empty]}))
    rng = np.random.default_rng(0)
    for m, d in (dims or {"image": 8, "motion": 6}).items():
        (root / m).mkdir()
        for i in range(6):
            np.save(root / m / f"video{i}.npy", rng.standard_normal((5, d)).astype(np.float32))
    feats = ",".join(f"{m}={root / m}" for m in (dims or {"image": 8, "motion": 6}))
    return ["--dataset", "msrvtt", "--data", str(root / "ann"), "--feats", feats, "--d_model", "32", "--n_frames", "4",
            "--epochs", "1", "--batch_size", "4", "--beam_size", "1", "--no_progress", "--threads", "1"]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- data safety -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("changed", [["--d_model", "16"], ["--n_frames", "5"], ["--task", "base"]])
def test_a_refused_resume_rewrites_nothing(tmp_path, changed):
    """D1: --resume with other options is refused before config.json, vocab.json, ... are written."""
    out = tmp_path / "run"
    train.main(TINY + ["--task", "dap", "--out", str(out)])
    before = snapshot(out)
    with pytest.raises(SystemExit, match="--resume: .* other .* settings"):
        train.main(TINY + ["--task", "dap"] + changed + ["--out", str(out), "--resume"])
    assert snapshot(out) == before
    train.main(TINY + ["--task", "dap", "--out", str(out), "--resume", "--epochs", "2"])  # more epochs: fine
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 2


@pytest.mark.slow
def test_a_full_disk_loses_no_printed_result_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    """D14: the table is printed before metrics.json is written; a failed write leaves no file behind."""
    out = tmp_path / "run"
    real = pathlib.Path.write_text

    def full_disk(self, *a, **k):
        if "metrics" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(SystemExit, match="error: .*No space left on device.*metrics.json"):
        train.main(TINY + ["--task", "base", "--out", str(out)])
    assert "| base |" in capsys.readouterr().out
    assert not (out / "metrics.json").exists() and not [p for p in out.iterdir() if "tmp" in p.name]


def test_videos_without_captions_are_dropped_with_a_warning(tmp_path):
    """D9: a val/test video with no caption would be left out of the scores but counted: dropped at load time."""
    args = train.get_args(tiny_msrvtt(tmp_path, empty=("video5",)))
    messages = []
    _, data, _, _ = train.load_data(args, log=messages.append)
    assert data["test"].ids == ["video4"] and any("dropping 1 videos" in m and "video5" in m for m in messages)


# --- clear errors ----------------------------------------------------------------------------------

def test_the_odd_dimension_is_named_even_in_the_first_video(tmp_path):
    """D6: the expected dimension is the majority's; the first video is not taken as the reference."""
    for i, d in enumerate([9, 4, 4, 4]):
        (tmp_path / "image").mkdir(exist_ok=True)
        np.save(tmp_path / "image" / f"v{i}.npy", np.ones((3, d), np.float32))
    with pytest.raises(ValueError, match=r"1 of 4 videos are not 4-d like the others: v0 \(9-d\)"):
        train.load_features({"image": tmp_path / "image"}, [f"v{i}" for i in range(4)], n_frames=2)


@pytest.mark.parametrize("kind", ["truncated", "object array", "text", "empty"])
def test_unreadable_feature_files_are_named(tmp_path, kind):
    """D7: numpy's own message alone does not say which of 10,000 files is bad."""
    (tmp_path / "image").mkdir()
    np.save(tmp_path / "image" / "good.npy", np.ones((3, 4), np.float32))
    bad = tmp_path / "image" / "bad.npy"
    if kind == "truncated":
        np.save(bad, np.ones((30, 4), np.float32))
        bad.write_bytes(bad.read_bytes()[:150])
    elif kind == "object array":
        np.save(bad, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    elif kind == "text":
        bad.write_text("not an array")
    else:
        bad.write_bytes(b"")
    with pytest.raises(ValueError, match=r"image.bad\.npy: cannot be read as a feature array"):
        train.load_features({"image": tmp_path / "image"}, ["good", "bad"], n_frames=2)


class Evil:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [("empty", "corrupt or truncated"), ("truncated", "corrupt or truncated"),
                                           ("pickle", "refused: .* unsafe pickle")])
def test_corrupt_or_unsafe_checkpoints_are_named(tmp_path, kind, message, capsys):
    """D13: a truncated, empty or malicious best.pt names the file; the malicious one never runs."""
    out = tmp_path / "run"
    train.main(TINY + ["--task", "base", "--out", str(out)])
    ckpt = out / "best.pt"
    if kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    else:
        ckpt.write_bytes(pickle.dumps({"config": Evil()}))
    with pytest.raises(SystemExit, match=f"error: {ckpt}.* {message}"):
        train.main(TINY + ["--eval_only", "--ckpt", str(ckpt)])
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.slow
def test_eval_only_accepts_last_pt_and_labels_results_with_the_checkpoints_task(tmp_path):
    """D12, D15: last.pt is a complete checkpoint too; results carry the checkpoint's task, not --task's."""
    out = tmp_path / "run"
    train.main(TINY + ["--task", "dap", "--out", str(out)])
    train.main(TINY + ["--eval_only", "--ckpt", str(out / "last.pt"), "--task", "base", "--out", str(tmp_path / "e")])
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["task"] == "dap"


@pytest.mark.slow
def test_eval_only_on_other_features_says_so(tmp_path):
    """D16: the checkpoint's feature dimensions are compared with the data before anything runs."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train.main(tiny_msrvtt(tmp_path / "a") + ["--task", "base", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match=r"takes features \{'image': 8, 'motion': 6\}.* give \{'image': 5"):
        train.main(tiny_msrvtt(tmp_path / "b", dims={"image": 5, "motion": 6}) +
                   ["--eval_only", "--ckpt", str(tmp_path / "run" / "best.pt")])


@pytest.mark.slow
def test_no_attributes_is_refused_for_attribute_tasks(tmp_path):
    """D8: with every caption word a stop word there are no attributes: DAP is refused, Base trains."""
    args = tiny_msrvtt(tmp_path, captions=["it is a one", "this is the one"])
    with pytest.raises(SystemExit, match="--task dap predicts attributes, but there are none"):
        train.main(args + ["--task", "dap", "--out", str(tmp_path / "dap")])
    assert not (tmp_path / "dap").exists()                                  # and no empty folder is left
    assert train.main(args + ["--task", "base", "--out", str(tmp_path / "base")])["Meta-Sum"] >= 0


# --- options -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--epochs", "--batch_size", "--beam_size", "--n_frames", "--d_model",
                                    "--n_attributes", "--lr", "--toy_train"])
def test_numeric_options_are_checked_up_front(option, capsys):
    """D10, D11: 0 is neither replaced by the default nor found out after an epoch: exit 2 at once."""
    with pytest.raises(SystemExit) as e:
        train.get_args([option, "0"])
    assert e.value.code == 2 and f"{option}: must be at least" in capsys.readouterr().err


def test_an_explicit_zero_is_kept():
    """D10: --weight_decay 0 means no weight decay, not the default 1e-3."""
    assert train.get_args(["--weight_decay", "0"]).recipe.weight_decay == 0.0
    assert train.get_args(["--seed", "0"]).recipe.seed == 0


def test_a_misspelt_modality_and_a_corrupt_meta_json_are_named(tmp_path):
    args = tiny_msrvtt(tmp_path)
    with pytest.raises(SystemExit, match="unknown modality 'audoi'"):
        train.main(args[:5] + [args[5] + f",audoi={tmp_path / 'image'}"] + args[6:])
    (tmp_path / "image" / "meta.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"error: .*image.meta\.json is not valid JSON"):
        train.main(args + ["--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_missing_data_is_one_line_with_exit_1_and_no_folder(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "msrvtt", "--data", str(tmp_path / "nowhere"), "--feats", "image=x",
                    "--out", str(tmp_path / "run")])
    assert str(e.value).startswith("error: ") and "nowhere" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
