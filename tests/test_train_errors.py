"""train.py on bad input: every case ends in one clear line naming the file, video or option and what
is wrong (exit 1 for data, exit 2 for options), and nothing already computed is lost or rewritten."""
import dataclasses
import errno
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import types
import zipfile

import numpy as np
import pytest
import torch

import dap
import extract
import train
from conftest import ROOT

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
    why = r"\(not a \.npy file\)" if kind == "text" else ""  # U5: not numpy's "pickled data"
    with pytest.raises(ValueError, match=r"image.bad\.npy: cannot be read as a feature array " + why):
        train.load_features({"image": tmp_path / "image"}, ["good", "bad"], n_frames=2)


class Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def tiny_checkpoint():
    """What train() saves in best.pt, for a small model (no training needed)."""
    cfg = dap.Config(feature_dims={"image": 8}, vocab_size=6, n_attributes=2, d_model=32)
    return {"config": dataclasses.asdict(cfg), "state_dict": dap.CaptionModel(cfg).state_dict(),
            "vocab": train.SPECIALS + ["dog", "runs"], "attributes": ["dog", "runs"]}


def flip_tensor_bytes(ckpt):
    """8 bytes inside the largest tensor of a torch.save zip archive inverted, as a bad disk or copy does."""
    with zipfile.ZipFile(ckpt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(ckpt.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start:start + 8] = bytes(b ^ 0xFF for b in raw[start:start + 8])
    ckpt.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind, message", [
    ("empty", "corrupt or truncated, or not a checkpoint"), ("truncated", "corrupt or truncated, or not a checkpoint"),
    ("random bytes", "corrupt or truncated, or not a checkpoint"),                          # U5: not "unsafe pickle"
    ("plain pickle", "corrupt or truncated, or not a checkpoint"),                          # never unpickled
    ("pickled code", r"refused: it holds print, which could run code .*unsafe pickle"),
    ("8 bytes overwritten", r"corrupt or truncated, or not a checkpoint \(\S+/data/\d+ does not match its CRC-32\)"),
    ("another zip", r"is not a checkpoint of train.py: it lacks the fields \['config', ")])
def test_corrupt_or_unsafe_checkpoints_are_named(tmp_path, kind, message, capsys):
    """D13, W4, U5: a damaged, foreign or malicious best.pt is refused in one line naming the file; code in it never
    runs; the CRC-32 that torch.save's zip archive holds for each tensor is checked, so 8 overwritten bytes, which
    torch.load loads silently (the model then scored 0), are refused."""
    ckpt = tmp_path / "best.pt"
    train.save_checkpoint(tiny_checkpoint(), ckpt)
    if kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif kind == "random bytes":
        ckpt.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "plain pickle":
        ckpt.write_bytes(pickle.dumps({"config": Evil()}))
    elif kind == "pickled code":
        torch.save({"config": Evil()}, ckpt)
    elif kind == "8 bytes overwritten":
        flip_tensor_bytes(ckpt)
        assert torch.load(ckpt, weights_only=True)  # what torch alone does: loads it
    else:
        torch.save([torch.ones(2)], ckpt)
    with pytest.raises(SystemExit, match=f"^error: {re.escape(str(ckpt))}.* {message}[^\n]*$"):
        train.main(TINY + ["--eval_only", "--ckpt", str(ckpt)])
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.parametrize("change, field", [
    (lambda c: c["config"].update(colour=1), "config"), (lambda c: c.update(config=None), "config"),
    (lambda c: c["state_dict"].popitem(), "state_dict"),
    (lambda c: c["state_dict"].update({"head.weight": torch.zeros(1)}), "state_dict"),
    (lambda c: c["vocab"].pop(), "vocab"), (lambda c: c["attributes"].append(None), "attributes")])
def test_a_malformed_checkpoint_names_the_file_and_the_field(tmp_path, change, field):
    """T4: an extra config key, config None, a missing weight, a shape mismatch, a short vocabulary: one error at
    load naming the file and the field, not a TypeError, RuntimeError or IndexError later."""
    ckpt = tiny_checkpoint()
    change(ckpt)
    train.save_checkpoint(ckpt, tmp_path / "best.pt")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'best.pt'))}: the field {field} is invalid"):
        train.load_checkpoint(tmp_path / "best.pt")
    del ckpt["attributes"]
    train.save_checkpoint(ckpt, tmp_path / "best.pt")
    with pytest.raises(ValueError, match=r"best\.pt is not a checkpoint of train.py: it lacks the fields \['attr"):
        train.load_checkpoint(tmp_path / "best.pt")


@pytest.mark.slow
def test_eval_only_accepts_last_pt_and_labels_results_with_the_checkpoints_task(tmp_path):
    """D12, D15, W6: last.pt is a complete checkpoint too; results carry the checkpoint's task, not --task's, and
    are named after the checkpoint (best.metrics.json, last.metrics.json), which they name with its SHA-256."""
    out = tmp_path / "run"
    train.main(TINY + ["--task", "dap", "--out", str(out)])
    for name in ("last", "best"):
        train.main(TINY + ["--eval_only", "--ckpt", str(out / f"{name}.pt"), "--task", "base"])
    for name in ("last", "best"):
        record = json.loads((out / "eval" / f"{name}.metrics.json").read_text())
        assert record["task"] == "dap" and (out / "eval" / f"{name}.captions.json").is_file()
        ckpt = out / f"{name}.pt"
        assert record["checkpoint"] == {"path": str(ckpt), "sha256": extract.sha256_file(ckpt)}


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

@pytest.mark.parametrize("option, value", [(o, "0") for o in ["--epochs", "--batch_size", "--beam_size", "--n_frames",
                                                                  "--d_model", "--n_attributes", "--lr", "--toy_train"]]
                         + [("--lr", "inf"), ("--lr", "nan"), ("--weight_decay", "inf"), ("--weight_decay", "nan")])
def test_numeric_options_are_checked_up_front(option, value, capsys):
    """D10, D11, W5: 0 is neither replaced by the default nor found out after an epoch, and --lr inf does not train
    to NaN (nor --lr nan reach config.json): exit 2 at once."""
    with pytest.raises(SystemExit) as e:
        train.get_args([option, value])
    assert e.value.code == 2 and f"{option}: must be a finite number >= " in capsys.readouterr().err


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
    (tmp_path / "image" / "meta.json").write_text('["a list"]')  # T3: valid JSON, but not an object
    with pytest.raises(SystemExit, match=r"error: .*image.meta\.json holds a JSON list, not an object"):
        train.main(args + ["--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_missing_data_is_one_line_with_exit_1_and_no_folder(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "msrvtt", "--data", str(tmp_path / "nowhere"), "--feats", "image=x",
                    "--out", str(tmp_path / "run")])
    assert str(e.value).startswith("error: ") and "nowhere" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_paths_of_the_wrong_kind_are_refused_up_front(tmp_path, capsys):
    """U5: --data the .json file (not "directory does not exist"), --ckpt or --caption a folder (not "no such file")."""
    args = tiny_msrvtt(tmp_path)
    calls = {"the folder that holds it": args[:3] + [str(tmp_path / "ann" / "videodatainfo.json")] + args[4:],
             "--ckpt takes a file": ["--eval_only", "--ckpt", str(tmp_path)],
             "--caption takes a file": ["--caption", str(tmp_path), "--ckpt", str(tmp_path / "x.pt")]}
    for message, argv in calls.items():
        with pytest.raises(SystemExit) as e:
            train.get_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_a_device_this_torch_lacks_is_refused_up_front(tmp_path, capsys):
    """T6: --device cuda on a CPU-only torch: exit 2 before anything is written (was an AssertionError later)."""
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--device", "cuda", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "--device cuda: this torch" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- empty splits, METEOR, interruptions -------------------------------------------------------------

def blank_captions(root, videos):
    """Captions that tokenize to nothing for these videos of a tiny_msrvtt folder."""
    path = root / "ann" / "videodatainfo.json"
    info = json.loads(path.read_text())
    for s in info["sentences"]:
        s["caption"] = " . " if s["video_id"] in videos else s["caption"]
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("split, empty, blank", [
    ("train", ("video0", "video1", "video2"), ()), ("val", ("video3",), ()), ("test", ("video4", "video5"), ()),
    ("test", (), ("video4", "video5"))])
def test_an_empty_split_is_refused_before_training(tmp_path, split, empty, blank):
    """H1, U5: a split left without any captioned video (none in the annotations, no captions, or captions that
    tokenize to nothing) is one line naming the split and the folder, before anything is trained or written; METEOR
    on it failed while holding a lock that the exit then waited on forever."""
    args = tiny_msrvtt(tmp_path, empty=empty)
    blank_captions(tmp_path, blank)
    with pytest.raises(SystemExit, match=f"^error: no {split} video has both a caption and features "
                                         f"\\({re.escape(str(tmp_path / 'ann'))}\\)$"):
        train.main(args + ["--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_eval_only_without_test_videos_is_refused(tmp_path):
    """H1: the issue's reproduction, --eval_only on annotations without test videos, hung after its error."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train.main(tiny_msrvtt(tmp_path / "a") + ["--task", "base", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="no test video has both a caption and features"):
        train.main(tiny_msrvtt(tmp_path / "b", empty=("video4", "video5")) +
                   ["--eval_only", "--ckpt", str(tmp_path / "run" / "best.pt")])
    assert not (tmp_path / "run" / "eval").exists()


def test_close_meteor_never_waits_for_the_lock_a_meteor_error_left_held(monkeypatch):
    """H1: pycocoevalcap's compute_score raises without releasing its lock; closing at exit must not wait on it.
    And METEOR is never asked to score nothing."""
    jvm = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE)
    fake = types.SimpleNamespace(lock=threading.Lock(), meteor_p=jvm)
    fake.lock.acquire()
    monkeypatch.setattr(train, "METEOR", fake)
    closing = threading.Thread(target=train.close_meteor, daemon=True)
    closing.start()
    closing.join(10)
    assert not closing.is_alive() and fake.meteor_p.poll() is not None and train.METEOR is None
    with pytest.raises(ValueError, match="no videos to score"):
        train.caption_scores({}, {})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (METEOR)")
def test_a_meteor_error_does_not_hang_the_exit():
    """H1: the real METEOR failing ("Error: specify Meteor stats"): the process still ends."""
    code = "import train; train.get_meteor().compute_score({}, {})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Meteor stats" in done.stderr


def test_resume_refuses_fewer_epochs_a_foreign_last_pt_and_a_config_json_that_is_no_object(tmp_path):
    """W7, T3, T4: --resume --epochs 1 on a 2-epoch run would rewrite config.json to 1 epoch while its history has 2;
    a last.pt without --resume's fields and a config.json holding a JSON list are named. Nothing is rewritten."""
    out = tmp_path / "run"
    args = tiny_msrvtt(tmp_path) + ["--task", "base", "--out", str(out)]
    train.main(args + ["--epochs", "2"])
    before = snapshot(out)
    with pytest.raises(SystemExit, match=f"--resume: {re.escape(str(out))} has trained 2 epochs already, more than "
                                         "--epochs 1"):
        train.main(args + ["--resume"])
    assert snapshot(out) == before
    shutil.copy(out / "best.pt", out / "last.pt")
    with pytest.raises(SystemExit, match=r"last\.pt is not a checkpoint of train.py: it lacks the fields \['opt"):
        train.main(args + ["--resume", "--epochs", "3"])
    (out / "config.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"config\.json holds a JSON list, not an object"):
        train.main(args + ["--resume", "--epochs", "3"])


def test_empty_training_captions_are_counted(tmp_path, capsys):
    """W7: captions that tokenize to nothing were trained on without a word."""
    args = tiny_msrvtt(tmp_path) + ["--task", "base"]
    train.main(args + ["--out", str(tmp_path / "run")])
    assert "warning" not in capsys.readouterr().out
    blank_captions(tmp_path, ("video0", "video2"))
    train.main(args + ["--out", str(tmp_path / "blank")])
    assert "warning: 4 training captions are empty once tokenized" in capsys.readouterr().out


def test_a_nan_loss_stops_training_with_one_line(tmp_path, monkeypatch):
    """W5: a loss that is NaN or inf (an lr too large) stops the run before a NaN model is saved."""
    monkeypatch.setattr(train, "train_epoch", lambda *a: {"loss": float("nan"), "cap": float("nan")})
    with pytest.raises(SystemExit, match="^error: epoch 1: the loss is nan: lower --lr$"):
        train.main(tiny_msrvtt(tmp_path) + ["--task", "base", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "best.pt").exists()


def test_a_full_disk_while_saving_a_checkpoint_names_the_file(tmp_path, monkeypatch):
    """T5: one OSError naming the file and the full disk (torch.save to a file raised two chained RuntimeErrors naming
    neither); the old last.pt survives and no temporary is left."""
    path = tmp_path / "last.pt"
    train.save_checkpoint(tiny_checkpoint(), path)
    before = path.read_bytes()
    real = pathlib.Path.write_bytes

    def full_disk(self, data):
        real(self, bytes(data)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match=f"No space left on device: '{re.escape(str(path))}'"):
        train.save_checkpoint(tiny_checkpoint(), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_ctrl_c_ends_in_one_line_with_exit_130_and_no_temporary(tmp_path, monkeypatch, capsys):
    """U8: Ctrl-C (here, while last.pt is being written) ends in one line, not a traceback, with the shell's status
    130 for an interrupt, and leaves no temporary file; --resume then continues."""
    out = tmp_path / "run"
    args = tiny_msrvtt(tmp_path) + ["--task", "base", "--out", str(out)]
    real = pathlib.Path.write_bytes

    def interrupted(self, data):
        if "last.pt" in self.name:
            real(self, bytes(data)[:100])
            raise KeyboardInterrupt
        return real(self, data)
    monkeypatch.setattr(pathlib.Path, "write_bytes", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted; --resume continues from the last epoch"
    assert (out / "best.pt").is_file() and not (out / "last.pt").exists()
    assert not [p for p in out.iterdir() if "tmp" in p.name]


def group_processes(pgid):
    """The live (not zombie) processes of a process group, from /proc."""
    alive = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(group) == pgid and state != "Z":
            alive.append(stat.parent.name)
    return alive


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").is_file(), reason="reads /proc")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "Ctrl-C"])
def test_killing_the_default_run_leaves_no_process_behind(tmp_path, how):
    """H2, U8: `python train.py` trains Base and DAP in two worker processes, each with METEOR's JVM (when Java is
    installed). Killed with SIGTERM or kill -9, or stopped with Ctrl-C (SIGINT to the terminal's process group), it
    leaves no worker, resource tracker or JVM behind; Ctrl-C and SIGTERM end in one line with status 130, and leave
    no temporary file."""
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        run = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY[:-2], "--epochs", "500", "--out",
                                str(tmp_path / "run")], cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.time() + 300
    while not ("base | epoch=1" in log.read_text() and "dap  | epoch=1" in log.read_text()):  # both workers, METEOR
        assert run.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.5)
    if how == "Ctrl-C":
        os.killpg(run.pid, signal.SIGINT)
    else:
        os.kill(run.pid, getattr(signal, how))
    status = run.wait(60)
    deadline = time.time() + 60
    while group_processes(run.pid):
        assert time.time() < deadline, f"still running after {how}: {group_processes(run.pid)}"
        time.sleep(0.5)
    if how != "SIGKILL":
        assert status == 130 and "Traceback" not in log.read_text()
        assert log.read_text().strip().splitlines()[-1] == "interrupted; --resume continues from the last epoch"
        assert not [p for p in (tmp_path / "run").rglob("*") if "tmp" in p.name]


# --- annotations and feature files: checked where they are read, one line naming the file and field

def edit_json(path, change):
    """Rewrite the JSON file at path with change(value): in place (None), or a new value."""
    value = json.loads(path.read_text())
    path.write_text(json.dumps(value if (new := change(value)) is None else new))


VATEX_FILES = ["vatex_training_v1.0.json", "vatex_validation_v1.0.json",
               "vatex_public_test_english_v1.1.json"]


def write_vatex_files(root, items=None):
    """VATEX's three files, 2 videos each (or `items`, a {file: [item]} dict), in root -> root."""
    for k, name in enumerate(VATEX_FILES):
        default = [{"videoID": f"v{2 * k + i}", "enCap": ["a man is cooking", "a dog runs"]}
                   for i in range(2)]
        (root / name).write_text(json.dumps((items or {}).get(name, default)))
    return root


MALFORMED_MSRVTT = {  # T1, U4: change of videodatainfo.json -> the error's end
    "top-level list": (lambda i: [i], "the top level is a list, not an object"),
    "no videos": (lambda i: i.__delitem__("videos"), "videos is missing"),
    "videos an object": (lambda i: i.update(videos={}), "videos is an object, not a list"),
    "no split": (lambda i: i["videos"][3].__delitem__("split"), r"videos\[3\]\.split is missing"),
    "unknown split": (lambda i: i["videos"][3].update(split="training"),
                      r'videos\[3\]\.split is "training", not one of train, validate, val, test'),
    "integer id": (lambda i: i["videos"][2].update(video_id=2),
                   r"videos\[2\]\.video_id is 2, not a string"),
    "category music": (lambda i: i["videos"][0].update(category="music"),
                       r'videos\[0\]\.category is "music", not an integer'),
    "boolean category": (lambda i: i["videos"][5].update(category=True),
                         r"videos\[5\]\.category is true, not an integer"),
    "null caption": (lambda i: i["sentences"][10].update(caption=None),
                     r"sentences\[10\]\.caption is null, not a string"),
    "sentence a string": (lambda i: i["sentences"].__setitem__(1, "a man"),
                          r'sentences\[1\] is "a man", not an object'),
    "sentence without id": (lambda i: i["sentences"][4].__delitem__("video_id"),
                            r"sentences\[4\]\.video_id is missing"),
}


@pytest.mark.parametrize("case", MALFORMED_MSRVTT)
def test_malformed_msrvtt_annotations_name_the_file_and_the_field(tmp_path, case):
    """T1, U4: a missing key, a wrong type, a null caption, a top-level list, an integer id
    (refused: ids are strings), a category that is no integer were KeyError, TypeError or
    AttributeError tracebacks: one error at load time naming the file and the field."""
    tiny_msrvtt(tmp_path)
    change, message = MALFORMED_MSRVTT[case]
    info = tmp_path / "ann" / "videodatainfo.json"
    edit_json(info, change)
    with pytest.raises(ValueError, match=f"^{re.escape(str(info))}: {message}$"):
        train.load_msrvtt(tmp_path / "ann")


MALFORMED_VATEX = {  # W1, T1: change of vatex_training_v1.0.json -> the error's end
    "enCap a string": (lambda v: v[1].update(enCap="a man is cooking"),
                       r'\[1\]\.enCap is "a man is cooking", not a list'),
    "null caption": (lambda v: v[0]["enCap"].append(None),
                     r"\[0\]\.enCap\[2\] is null, not a string"),
    "top-level object": (lambda v: {"videos": v}, "the top level is an object, not a list"),
    "integer id": (lambda v: v[0].update(videoID=7), r"\[0\]\.videoID is 7, not a string"),
    "no enCap": (lambda v: v[1].__delitem__("enCap"), r"\[1\]\.enCap is missing"),
}


@pytest.mark.parametrize("case", MALFORMED_VATEX)
def test_malformed_vatex_annotations_name_the_file_and_the_field(tmp_path, case):
    """W1: "enCap": "a man is cooking" made every character a caption, silently; the others were
    tracebacks."""
    change, message = MALFORMED_VATEX[case]
    edit_json(write_vatex_files(tmp_path) / VATEX_FILES[0], change)
    where = re.escape(str(tmp_path / VATEX_FILES[0]))
    with pytest.raises(ValueError, match=f"^{where}: {message}$"):
        train.load_vatex(tmp_path)


def test_unreadable_annotation_files_are_one_line_naming_the_file(tmp_path):
    """T2, U4: a videodatainfo.json that is not JSON, a truncated release zip (BadZipFile), a
    malformed category.txt; through main: one line, exit 1, no output folder."""
    args = tiny_msrvtt(tmp_path) + ["--out", str(tmp_path / "run")]
    info, release = tmp_path / "ann" / "videodatainfo.json", tmp_path / "ann" / "release.zip"
    info.write_text("<html>not found</html>")
    with pytest.raises(SystemExit, match=f"^error: {re.escape(str(info))} is not valid JSON "
                                         r"\(Expecting value: line 1 column 1 \(char 0\)\)$"):
        train.main(args)
    with zipfile.ZipFile(release, "w") as z:
        z.writestr("videodatainfo.json", info.read_text())
    release.write_bytes(release.read_bytes()[:100])  # a download cut short
    info.unlink()
    with pytest.raises(SystemExit, match=f"^error: {re.escape(str(release))} is not a readable zip "
                                         r"\(File is not a zip file\): download it again$"):
        train.main(args)
    release.unlink()
    (tmp_path / "b").mkdir()
    tiny_msrvtt(tmp_path / "b")
    (tmp_path / "b" / "ann" / "category.txt").write_text("music\t0\npeople\tone\n")
    with pytest.raises(ValueError, match=r"category\.txt: each line must be a category's name, a "
                                         "tab and its number$"):
        train.load_msrvtt(tmp_path / "b" / "ann")
    assert not (tmp_path / "run").exists()


def test_a_video_listed_twice_is_refused(tmp_path):
    """W2: the same video in train and test leaked training into the scores; a train entry listed
    twice doubled its pairs; a VATEX duplicate replaced the first entry's captions. All silent:
    now one error naming both places."""
    tiny_msrvtt(tmp_path)
    info = tmp_path / "ann" / "videodatainfo.json"
    for copy in ({"video_id": "video0", "category": 0, "split": "test"},    # in train and test
                 {"video_id": "video1", "category": 0, "split": "train"}):  # twice in train
        edit_json(info, lambda i: i["videos"].__setitem__(5, copy))
        first = f"{re.escape(str(info))} videos\\[{copy['video_id'][-1]}\\]"
        with pytest.raises(ValueError, match=f"^video '{copy['video_id']}' is listed twice, in "
                                             f"{first} and {re.escape(str(info))} videos\\[5\\]$"):
            train.load_msrvtt(tmp_path / "ann")
    one = {"videoID": "v0", "enCap": ["a cat sleeps"]}
    for where in (VATEX_FILES[0], VATEX_FILES[2]):  # twice in one file; in two splits
        (tmp_path / "vatex").mkdir(exist_ok=True)
        write_vatex_files(tmp_path / "vatex", {where: [one] * (1 + (where == VATEX_FILES[0]))})
        with pytest.raises(ValueError, match=r"^video 'v0' is listed twice, in \S+training_v1\.0\."
                                             rf"json\[0\] and \S+{re.escape(where)}\[\d\]$"):
            train.load_vatex(tmp_path / "vatex")


def test_feature_files_that_are_no_hdf5_are_named(tmp_path):
    """U4: --feats image=x.npy (one .npy, not a folder of them), a text file, a truncated HDF5
    file: one error naming the file and what --feats takes (was h5py's OSError, naming none)."""
    import h5py
    np.save(tmp_path / "x.npy", np.ones((3, 4), np.float32))
    (tmp_path / "notes.h5").write_text("not HDF5")
    with h5py.File(tmp_path / "full.h5", "w") as f:
        f["v0"] = np.ones((30, 64), np.float32)
    (tmp_path / "cut.h5").write_bytes((tmp_path / "full.h5").read_bytes()[:3000])
    for name in ("x.npy", "notes.h5", "cut.h5"):
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / name))} is not a "
                                             r"readable HDF5 file \(.*\); --feats takes folders of "
                                             r"<video_id>\.npy files or HDF5 files$"):
            train.load_features({"image": tmp_path / name}, ["v0"], n_frames=2)
    feats, _ = train.load_features({"image": tmp_path / "full.h5"}, ["v0"], n_frames=2)
    assert feats["image"].shape == (1, 2, 64)


def test_a_scored_video_whose_captions_have_no_word_is_dropped_and_named(tmp_path):
    """U5: a test video whose captions all tokenize to nothing was scored against empty references
    (all of the test split so: `max() arg is an empty sequence`). It is dropped with a warning
    naming it and the folder, as a video without captions; training captions without a word stay,
    counted (test_empty_training_captions_are_counted)."""
    args = train.get_args(tiny_msrvtt(tmp_path))
    blank_captions(tmp_path, ("video4", "video1"))
    messages = []
    _, data, _, _ = train.load_data(args, log=messages.append)
    assert data["test"].ids == ["video5"] and "video1" in data["train"].ids
    dropped = f"dropping 1 videos .* in {re.escape(str(tmp_path / 'ann'))}: \\['video4'\\]$"
    assert any(re.search(dropped, m) for m in messages), messages
