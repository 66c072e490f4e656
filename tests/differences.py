"""Measurement (not a test): the effect of each remaining difference from the authors' code on a model
trained on the default SYNTHETIC toy data (README, "Differences from the authors' code").

    python tests/differences.py [--seed 0]

It trains the default toy DAP model (train.py's toy recipe), then on the test videos:
  1. beam search as the authors' Beam runs it (first input <pad>, every word producible; the per-video
     transcription conftest.reference_beam_search, which tests/test_golden.py checks against their code)
     vs dap.py's (first input <bos>, <pad> and <bos> never produced): how many captions change, and the
     caption metrics of both;
  2. mAP as the authors compute it (probabilities clamped to [0.01, 0.99], ties in torch.sort's order,
     TAP on each video's first caption only) vs train.py's (unclamped, TAP on every caption).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import reference_beam_search  # noqa: E402  (it puts the repository root on sys.path)
import train  # noqa: E402
from dap import BOS, PAD  # noqa: E402


def authors_map(probs, labels):
    """misc/Crit/crit_attribute.py, NoisyOrMIL's AP: clamp, torch.sort (descending), mean precision at positives."""
    _, indices = probs.clamp(0.01, 0.99).sort(dim=1, descending=True)
    aps = []
    for order, label in zip(indices, labels.bool()):
        hits = label[order].float()
        if hits.sum() > 0:
            aps.append(((hits.cumsum(0) / torch.arange(1, len(hits) + 1)) * hits).sum() / hits.sum())
    return 100 * torch.stack(aps).mean().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    args = train.get_args(["--seed", str(parser.parse_args().seed), "--threads", "1", "--no_progress"])
    torch.set_num_threads(1)
    _, data, vocab, attributes = train.load_data(args, log=lambda *a: None)
    model, _ = train.train_model("dap", data, vocab, attributes, args.recipe, log=lambda *a: None,
                                 progress=False)
    test = data["test"]
    train_captions = [c for refs in data["train"].refs for c in refs]
    refs = dict(enumerate(test.refs))
    ours = [train.decode_caption(r, vocab) for r in model.generate(test.feats, beam_size=5).tolist()]
    print(f"SYNTHETIC toy, seed {args.recipe.seed}, DAP model, {len(ours)} test videos, beam 5")
    for name, first, never in [("theirs as is (PAD first, nothing forbidden)", PAD, ()),
                               ("PAD first only", PAD, (PAD, BOS)), ("nothing forbidden only", BOS, ())]:
        theirs = [" ".join(vocab[w] for w in c) for c in reference_beam_search(model, test.feats, 5, first=first,
                                                                                 never=never)]
        changed = sum(a != b for a, b in zip(ours, theirs))
        scores = train.caption_scores(refs, dict(enumerate(theirs)), meteor=False)
        print(f"{name:45s}: {changed}/{len(ours)} captions differ; CIDEr {scores['CIDEr']:.1f}, "
              f"Meta-Sum {scores['Meta-Sum']:.1f} (B4+R+C)")
    scores = train.caption_scores(refs, dict(enumerate(ours)), meteor=False)
    print(f"{'dap.py':45s}: CIDEr {scores['CIDEr']:.1f}, Meta-Sum {scores['Meta-Sum']:.1f} (B4+R+C); "
          f"Novel {train.diversity(ours, train_captions, vocab)['Novel']:.1f}")
    vap = model.predict_attributes(test.feats)
    tap = model.predict_attributes(captions=test.tokens)
    first = torch.tensor([list(test.pair_video.tolist()).index(v) for v in range(len(test.ids))])
    print(f"mAP-VAP: ours {train.mean_average_precision(vap, test.labels):.2f}, "
          f"theirs (clamped) {authors_map(vap, test.labels):.2f}")
    print(f"mAP-TAP: ours (every caption) {train.mean_average_precision(tap, test.labels[test.pair_video]):.2f}, "
          f"theirs (clamped, first caption) {authors_map(tap[first], test.labels):.2f}")


if __name__ == "__main__":
    main()
