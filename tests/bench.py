"""Benchmark (not a test): batched, cached beam search vs a per-video, no-cache reference; training speed.

    python tests/bench.py [--videos 500] [--threads N]

Paper configuration (Sec. 4.3): d=512, 1 decoder layer, vocabulary 10,000, image+motion+audio x 28
frames, beam 5, max_len 30. Weights are random (the speed of decoding does not depend on them), so the
head is scaled up to give peaked word distributions like a trained model's, and the two searches must
return the same captions.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dap  # noqa: E402
from dap import BOS, EOS, PAD  # noqa: E402


@torch.no_grad()
def reference_beam_search(model, feats, beam_size, max_len):
    """One video at a time, recomputing every prefix from scratch: the straightforward algorithm."""
    alpha, captions = model.cfg.length_penalty, []
    for b in range(next(iter(feats.values())).size(0)):
        memory = model.encode({m: f[b:b + 1] for m, f in feats.items()})
        beams = [([], 0.0, False)]  # (words, sum of log p, finished)
        for t in range(max_len - 1):
            alive = [words for words, _, done in beams if not done]
            if not alive:
                break
            tokens = torch.tensor([[BOS] + words for words in alive])
            x = model.embedding(tokens)                       # the whole prefix, every step
            causal = torch.ones(t + 1, t + 1, dtype=torch.bool).tril()
            for layer in model.layers:
                x = layer(x, memory.expand(len(alive), -1, -1), causal)
            logits = model.head(x[:, -1])                     # the head only where it is needed
            logits[:, [PAD, BOS]] = float("-inf")
            logp, candidates, i = logits.log_softmax(-1), [], 0
            for words, total, done in beams:
                if done:
                    candidates.append((total / len(words) ** alpha, words, total, True))
                    continue
                top_logp, top_words = logp[i].topk(beam_size)  # only a beam's k best words can survive
                for lp, w in zip(top_logp.tolist(), top_words.tolist()):
                    s = total + lp
                    candidates.append((s / (len(words) + 1) ** alpha, words + [w], s, w == EOS))
                i += 1
            candidates.sort(key=lambda c: -c[0])
            beams = [(words, total, done) for _, words, total, done in candidates[:beam_size]]
        best = max(beams, key=lambda c: c[1] / len(c[0]) ** alpha)[0]
        captions.append([w for w in best if w != EOS])
    return captions


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dap.Config(feature_dims={"image": 512, "motion": 2048, "audio": 128}, vocab_size=10000,
                     d_model=512, n_layers=1, max_len=30, n_attributes=500)
    model = dap.CaptionModel(cfg)
    with torch.no_grad():
        model.head.weight.mul_(8.0)  # peaked distributions, as after training
    feats = {m: torch.randn(args.videos, 28, d) for m, d in cfg.feature_dims.items()}
    print(f"CPU threads: {torch.get_num_threads()}, videos: {args.videos}, beam 5, max_len 30, d=512, V=10,000")

    model.eval()
    start = time.perf_counter()
    batched = []
    for i in range(0, args.videos, 100):  # 100 videos x 5 beams decoded together
        batched += model.generate({m: f[i:i + 100] for m, f in feats.items()}, beam_size=5).tolist()
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    reference = reference_beam_search(model, feats, beam_size=5, max_len=30)
    t_reference = time.perf_counter() - start
    ours = [[w for w in row if w != PAD] for row in batched]
    same = sum(a == b for a, b in zip(ours, reference))
    mean_len = sum(map(len, ours)) / len(ours)
    print(f"batched cached beam search : {args.videos / t_batched:8.1f} videos/s ({t_batched:.1f} s)")
    print(f"per-video no-cache search  : {args.videos / t_reference:8.1f} videos/s ({t_reference:.1f} s)")
    print(f"speed-up: {t_reference / t_batched:.1f}x; identical captions: {same}/{args.videos}; "
          f"mean caption length {mean_len:.1f} words")
    assert same == args.videos, "the batched search must return the reference's captions"

    model.train()
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
