"""
Benchmark of extract.py: decode-only, end-to-end and model-only frames/s (not a test; pytest does not collect it).

    python tests/bench_extract.py                       # ../shared/data/videos, else a generated video
    python tests/bench_extract.py --videos DIR --copies 4 --workers 16 --device cuda --dtype fp32

"frames" are the N sampled frames per video that reach the backbone (N = --frames, default extract.FRAMES);
every decodable frame is decoded to find them. The backbone is ViT-B/32 with random weights in OpenAI's
layout: the same compute as the released checkpoint, which cannot be downloaded on every machine. Decoding
runs in parallel worker processes; the main process batches frames across videos for the backbone, with
pinned memory and non-blocking copies on a GPU.

Measured so far, at N = 28 (the former default): two runs of `--copies 2 --workers 2` on the four videos in
../shared/data/videos (two of them 720p, one 55 s long), and `--videos generated --copies 8 --skip_e2e` on an
MSR-VTT-like 320x240, 15-s clip:

| machine | decode only | end to end (ViT-B/32, fp32) | model only |
|---|---|---|---|
| 2 CPU cores, no GPU (development VM, shared with other jobs: load average 5-8) | 13-15 frames/s (shared videos), 82-105 frames/s (320x240, 15 s) | 2.9-3.3 frames/s | 2.6-3.4 frames/s |
| 1x H200 + 16 CPU cores | not measured yet | not measured yet (target >= 2,000 frames/s) | not measured yet |

On a CPU the backbone is the bottleneck; on a GPU decoding is (every frame of a video must be decoded to reach
the sampled ones), so throughput grows with --workers.
"""
import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import extract  # noqa: E402


def generated_video(folder: Path) -> Path:
    """An MSR-VTT-like clip: 320x240, 30 fps, 15 s (450 frames) of panning noise, H.264."""
    import av
    import numpy as np
    path = folder / "generated.mp4"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (240, 640, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        for k in range(450):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, k % 320:k % 320 + 320]), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def random_vit_b32(path: Path) -> Path:
    """A ViT-B/32 CLIP with random weights (OpenAI's model.py), saved as a state_dict in their key layout."""
    model = extract.package_module("clip", "model").CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)
    torch.save(model.state_dict(), path)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--videos", help="folder of videos, or 'generated' (default: ../shared/data/videos if present, "
                                    "else generated: an MSR-VTT-like 320x240, 15-s clip)")
    p.add_argument("--copies", type=int, default=4, help="each video is processed this many times")
    p.add_argument("--frames", type=int, default=extract.FRAMES)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(extract.AMP_DTYPES))
    p.add_argument("--batch_size", type=int, default=extract.BATCH_SIZE)
    p.add_argument("--skip_e2e", action="store_true", help="decode-only")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shared = ROOT.parent / "shared" / "data" / "videos"
        if args.videos == "generated" or (args.videos is None and not shared.is_dir()):
            sources = [generated_video(tmp)]
        else:
            sources = extract.find_videos([args.videos or shared])
        (tmp / "in").mkdir()
        videos = []
        for k in range(args.copies):  # distinct video_ids, same bytes
            for v in sources:
                link = tmp / "in" / f"{v.stem}_{k}{v.suffix}"
                os.symlink(v.resolve(), link)
                videos.append(link)
        print(f"{len(videos)} videos ({len(sources)} sources x {args.copies}), N = {args.frames}, "
              f"{args.workers} decode workers, {os.cpu_count()} CPUs, device {args.device}"
              + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "") + f", {args.dtype}")

        # decode only: the worker pool as extract() runs it, started before the clock
        threads = max(1, (os.cpu_count() or 1) // max(args.workers, 1))
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(int, range(args.workers)))  # start the processes
            t0 = time.time()
            results = list(pool.map(extract.decode_job, [str(v) for v in videos], [args.frames] * len(videos),
                                    ["ViT-B/32"] * len(videos), [threads] * len(videos)))
            dt = time.time() - t0
        ok = [r for r in results if r[1] is None]  # (samples, None) or (None, why it failed)
        print(f"decode only : {len(ok) * args.frames / dt:8.1f} frames/s  {len(ok) / dt:6.2f} videos/s  "
              f"({len(ok)} videos in {dt:.1f} s; failures: {[r[1] for r in results if r[1]]})")

        if args.skip_e2e:
            return
        weights = random_vit_b32(tmp / "vit-b-32-random.pt")
        t0 = time.time()
        summary = extract.extract(videos, tmp / "out", "ViT-B/32", weights, args.frames, args.device,
                                  args.batch_size, args.workers, args.dtype, progress=False)
        dt = time.time() - t0
        print(f"end to end  : {summary['frames'] / dt:8.1f} frames/s  {summary['done'] / dt:6.2f} videos/s  "
              f"({summary['done']} videos in {dt:.1f} s, model load and worker start included)")
        model, spec, _ = extract.load_backbone("ViT-B/32", weights, args.device)
        x = torch.randint(0, 256, (args.batch_size, 224, 224, 3), dtype=torch.uint8, device=args.device)
        amp = extract.AMP_DTYPES[args.dtype]
        with torch.inference_mode(), torch.autocast(args.device, dtype=amp or torch.float32, enabled=amp is not None):
            model(spec.to_input(x[:8]))
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0, reps = time.time(), 0
            while time.time() - t0 < 5:
                model(spec.to_input(x))
                reps += 1
            if args.device == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
        print(f"model only  : {reps * args.batch_size / dt:8.1f} frames/s  (batch {args.batch_size})")


if __name__ == "__main__":
    main()
