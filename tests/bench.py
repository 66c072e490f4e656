"""Benchmark (not a test): dap.py's batched, cached beam search vs the authors' rule run one video at a
time without a cache (tests/conftest.py, reference_beam_search), in two regimes; then training speed.

    python tests/bench.py [--videos 200] [--threads N]

Paper configuration (Sec. 4.3): d=512, 1 decoder layer, vocabulary 10,000, image+motion+audio x 28
frames, beam 5, max_len 30. Weights are random (decoding speed does not depend on their values), with
the head scaled up for peaked word distributions like a trained model's (conftest.eos_biased), and:
  - max-length regime: no EOS bias, every caption runs to max_len (29 tokens);
  - realistic-length regime: EOS's logit raised so that captions end after about 8 tokens, as MSR-VTT's
    do (9.3 words on average in the training captions); done videos leave the batch, so the batched
    search does work only for live hypotheses.
The two searches must return identical captions.

Measured on the 2-core development CPU (no GPU, other jobs running), `python tests/bench.py --videos 100
--threads 1`, 2026-11-29:
  regime            mean length   batched        per video, no cache   speed-up   identical captions
  max-length        30.0 tokens    3.1 videos/s   0.70 videos/s          4.4x      100/100
  realistic-length   8.5 tokens   16.0 videos/s   2.72 videos/s          5.9x      100/100
  training (batch 64, DAP on, forward + backward + Adam): 17 video-caption pairs/s
On a CPU the vocabulary head (10,000 x 512 per hypothesis and step) bounds both searches alike; the batched
search saves the prefix recomputation and the finished videos.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import eos_biased, reference_beam_search  # noqa: E402  (it puts the repository root on sys.path)
import dap  # noqa: E402
from dap import BOS, EOS, PAD  # noqa: E402


def time_regime(model, feats, name):
    n = next(iter(feats.values())).size(0)
    start = time.perf_counter()
    batched = []
    for i in range(0, n, 100):  # 100 videos x 5 beams decoded together
        batched += model.generate({m: f[i:i + 100] for m, f in feats.items()}, beam_size=5).tolist()
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    reference = reference_beam_search(model, feats, beam_size=5)
    t_reference = time.perf_counter() - start
    ours = [[w for w in row if w != PAD] for row in batched]
    same = sum(a == b for a, b in zip(ours, reference))
    mean_len = sum(map(len, ours)) / len(ours) + 1  # + EOS
    print(f"{name:16s} mean length {mean_len:4.1f} tokens | batched {n / t_batched:7.1f} videos/s | "
          f"per video, no cache {n / t_reference:6.2f} videos/s | speed-up {t_reference / t_batched:5.1f}x | "
          f"identical {same}/{n}")
    assert same == n, "the batched search must return the reference's captions"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dap.Config(feature_dims={"image": 512, "motion": 2048, "audio": 128}, vocab_size=10000,
                     d_model=512, n_layers=1, max_len=30, n_attributes=500)
    feats = {m: torch.randn(args.videos, 28, d) for m, d in cfg.feature_dims.items()}
    print(f"CPU threads: {torch.get_num_threads()}, videos: {args.videos}, beam 5, max_len 30, d=512, V=10,000")
    for name, eos_logit in [("max-length", 0.0), ("realistic-length", 5.0)]:
        torch.manual_seed(0)
        model = eos_biased(dap.CaptionModel(cfg), scale=8.0, eos_logit=eos_logit).eval()
        time_regime(model, feats, name)

    model = dap.CaptionModel(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-3)
    B = 64
    caps = torch.randint(4, cfg.vocab_size, (B, cfg.max_len))
    caps[:, 0], caps[:, -1] = BOS, EOS
    labels = (torch.rand(B, cfg.n_attributes) < 0.03).float()
    batch = {m: torch.randn(B, 28, d) for m, d in cfg.feature_dims.items()}
    for step in range(12):
        if step == 2:
            start = time.perf_counter()
        loss = model(batch, caps, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    t_train = time.perf_counter() - start
    print(f"training (batch 64, DAP on, forward+backward+Adam): {10 * B / t_train:.0f} video-caption pairs/s")


if __name__ == "__main__":
    main()
