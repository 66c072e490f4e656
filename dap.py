"""
CLIP-DAP in one file: a Transformer video captioner on frozen backbone features, trained with
Dual Attribute Prediction (DAP), an auxiliary noisy-OR multiple-instance attribute task.

Paper: "CLIP Meets Video Captioners: Attribute-Aware Representation Learning Promotes Accurate
Captioning", Bang Yang and Yuexian Zou (arXiv 2111.15162). Equation numbers below are the paper's.
Where the paper is silent, the authors' code (github.com/yangbang18/CLIP-Captioner) decides;
the file it comes from is named next to the line. The file follows the paper: Sec. 3 (encoder,
embedding, decoder, caption loss), Sec. 4.1 (APNet, noisy-OR, attribute loss), Sec. 4.2 (sparse
sampling, VAP, TAP, Eq. 12), then generation. It imports torch and the standard library only:
copy it on its own.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, UNK, BOS, EOS = 0, 1, 2, 3  # special token ids; a vocabulary must put its words after them
LN_EPS = 1e-12                   # every LayerNorm (config/archs.yaml: layer_norm_eps)


@dataclass
class Config:
    feature_dims: dict = field(default_factory=lambda: {"image": 512, "motion": 2048, "audio": 128})
    vocab_size: int = 10000
    d_model: int = 512          # d_h: 512 for MSR-VTT, 1024 for VATEX (Sec. 4.3)
    n_layers: int = 1           # Transformer decoder layers (Sec. 4.3)
    n_heads: int = 0            # 0 -> d_model // 64 (footnote 4)
    ffn_mult: int = 4           # FFN width = 4 * d_model (footnote 4)
    attn_dropout: float = 0.1   # "dropout probability of 0.1 on attention layers
    dropout: float = 0.5        #  whereas 0.5 on other layers" (Sec. 4.3)
    max_len: int = 30           # T_max, BOS and EOS included (Sec. 4.3)
    n_attributes: int = 500     # K (Sec. 4.3)
    vap: bool = True            # video-based attribute prediction (Sec. 4.2)
    tap: bool = True            # text-based attribute prediction (Sec. 4.2)
    sparse_sampling: bool = True
    lambda_v: float = 1.0       # lambda_1 in Eq. 12
    lambda_t: float = 1.0       # lambda_2 in Eq. 12

    def __post_init__(self):
        self.n_heads = self.n_heads or max(1, self.d_model // 64)
        assert self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads"


class Dropout(nn.Dropout):
    """nn.Dropout whose Bernoulli(1 - p) mask is drawn, on CPU, from uniform numbers: the same law,
    drawn 4x faster than by torch's CPU bernoulli_ (which took 7% of a training step)."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * ((torch.rand_like(x) >= self.p) * (1 / (1 - self.p)))


def unpack(x, real):
    """The rows (N, ...) of the N True entries of real (B, T), in order -> (B, T, ...), 0 elsewhere.

    Training computes the decoder only at the real positions of its padded captions, and the APNets
    only on the real (kept) instances; unpack puts them back where a (B, T) layout is needed."""
    out = x.new_zeros(*real.shape, *x.shape[1:])
    out[real] = x
    return out


# ----------------------------------------------------------------------------------------------
# Sec. 3: encoder (Eq. 1, 5), embedding (Eq. 2), decoder and head (Eq. 3), caption loss (Eq. 4)


class Encoder(nn.Module):
    """Eq. 5, F = LN(FC(Backbone(V))) per modality; the M modalities are concatenated in time."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.ModuleDict({  # models/Encoder.py, Embedder
            m: nn.Sequential(nn.Linear(dim, cfg.d_model), nn.LayerNorm(cfg.d_model, LN_EPS),
                             Dropout(cfg.dropout))
            for m, dim in cfg.feature_dims.items()})

    def forward(self, feats):
        missing = [m for m in self.proj if m not in feats]
        if missing:
            raise KeyError(f"features for modalities {missing} are missing; the model was built "
                           f"for {list(self.proj)} (pass zeros for a video that lacks one, e.g. "
                           "no soundtrack)")
        # frozen backbone features (B, N, D_m) -> (B, M*N, d); no positional encoding, no
        # self-attention; cast to the model's dtype (float32 features into a half or double model)
        dtype = next(self.parameters()).dtype
        return torch.cat([self.proj[m](feats[m].to(dtype)) for m in self.proj], dim=1)


class Embedding(nn.Module):
    """Eq. 2 and Eq. 11, e_t = LN(W^w[y_t] + W^p[t]); shared by the decoder and TAP."""

    def __init__(self, cfg):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=PAD)
        self.position = nn.Embedding(cfg.max_len, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, LN_EPS)
        self.drop = Dropout(cfg.dropout)

    def forward(self, tokens, start=0, real=None):
        """tokens (B, T) at positions start.. -> (B, T, d); with real (B, T), (N, d) for those."""
        positions = torch.arange(start, start + tokens.size(1), device=tokens.device)
        e = self.word(tokens) + self.position(positions)                         # (B, T, d)
        return self.drop(self.norm(e if real is None else e[real]))              # or (N, d)


@dataclass
class Cache:
    """The keys and values (rows, h, T, d/h) one attention layer has computed while generating: a
    row per hypothesis (self-attention) or per video (cross-attention)."""
    k: torch.Tensor = None  # None: empty, before the first decoding step
    v: torch.Tensor = None

    def select(self, rows):
        """Keep (and reorder) the batch rows in rows."""
        self.k, self.v = self.k.index_select(0, rows), self.v.index_select(0, rows)


class Attention(nn.Module):
    """Multi-head attention; generating, it appends to a Cache instead of recomputing the prefix."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.p_drop = cfg.n_heads, cfg.attn_dropout
        self.q, self.k, self.v, self.out = (nn.Linear(cfg.d_model, cfg.d_model) for _ in range(4))

    def split_heads(self, x):  # (B, T, d) -> (B, h, T, d/h)
        return x.view(x.size(0), x.size(1), self.n_heads, -1).transpose(1, 2)

    def forward(self, x, memory=None, mask=None, cache=None, real=None):
        """Self-attention when memory is None, cross-attention over memory (B, L, d) otherwise.

        x: (B, T, d); in training, the N real tokens (N, d) of a (B, T) batch, real marking them: no
        projection is computed for PAD, only the attention itself sees the (B, T) layout. Generating
        k hypotheses per video, x is (B*k, 1, d): cross-attention takes a video's k hypotheses as k
        queries of its memory, whose keys and values are computed once, not once per hypothesis.
        """
        q = self.q(x) if real is None else unpack(self.q(x), real)                # (B', T, d)
        if memory is not None:
            q = q.view(memory.size(0), -1, q.size(-1))        # (B, k*T, d): a video's hypotheses
        if memory is not None and cache is not None and cache.k is not None:
            k, v = cache.k, cache.v         # cross-attention: the video's keys/values, from step 0
        else:
            source = x if memory is None else memory
            k, v = self.k(source), self.v(source)
            if memory is None and real is not None:
                k, v = unpack(k, real), unpack(v, real)
            k, v = self.split_heads(k), self.split_heads(v)                     # (B', h, T, d/h)
            if memory is None and cache is not None and cache.k is not None:  # self-attn: append
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            if cache is not None:
                cache.k, cache.v = k, v
        y = F.scaled_dot_product_attention(self.split_heads(q), k, v, attn_mask=mask,
                                           dropout_p=self.p_drop if self.training else 0.0)
        y = y.transpose(1, 2).flatten(2)                                          # (B', T', d)
        return self.out(y.reshape(x.shape) if real is None else y[real])         # x's layout


class DecoderLayer(nn.Module):
    """A post-LN Transformer decoder layer: causal self-attention, cross-attention over F, FFN.

    Each sublayer: x = LN(x + Dropout(sublayer(x))); the FFN is Linear-ReLU-Linear with no inner
    dropout (models/components/SubLayers.py; config/archs.yaml, hidden_act: relu).
    """

    def __init__(self, cfg):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(cfg), Attention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model), nn.ReLU(),
                                 nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model))
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model, LN_EPS) for _ in range(3))
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, memory, causal=None, cache=(None, None), real=None):
        x = self.norm1(x + self.drop(self.self_attn(x, mask=causal, cache=cache[0], real=real)))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory=memory, cache=cache[1], real=real)))
        return self.norm3(x + self.drop(self.ffn(x)))


def caption_loss(logits, targets, batch_size=None):
    """Eq. 4, teacher forcing: -sum_t log p(y_t | Y_<t, V) over the non-PAD targets, / batch size.

    logits: (B, T, V) for the inputs BOS w1..wn, targets: (B, T), w1..wn EOS PAD...; or (N, V) and
    (N,) for N positions and batch_size = B. The authors sum over tokens and average over videos
    (misc/Crit/crit_lang.py, misc/Crit/base.py).
    """
    batch_size = batch_size or targets.size(0)
    nll = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=PAD,
                          reduction="sum")
    return nll / batch_size


# ----------------------------------------------------------------------------------------------
# Sec. 4.1: attribute prediction as multiple-instance learning (Eq. 6: P_raw = sigmoid(APNet(X)))


def real_instances(p_raw, valid=None):
    """p_raw (B, L, K) and valid (B, L) bool (None: all real) -> the real instances' rows (N, K) and
    valid; p_raw already (N, K), the rows of valid's True entries in order, passes as it is."""
    if p_raw.dim() == 2:
        return p_raw, valid
    if valid is None:
        valid = torch.ones(p_raw.shape[:2], dtype=torch.bool, device=p_raw.device)
    return p_raw[valid], valid


def noisy_or(p_raw, valid=None):
    """Eq. 7, p_k = 1 - prod_l (1 - P_raw[k, l]), in log space, over a video's real instances.

    p_raw: (B, L, K) instance probabilities, valid: (B, L) bool, True for a real instance (None:
    all); or p_raw (N, K), the real instances alone (training computes no others).
    """
    p_raw, valid = real_instances(p_raw, valid)
    # log(1 - P_raw), kept finite (models/Predictor/pred_attribute.py)
    log_not = (1 - p_raw).clamp(min=1e-12).log()
    return 1 - unpack(log_not, valid).sum(dim=1).exp()  # (B, K); the others count as P_raw = 0


def attribute_loss(p_raw, labels, valid=None):
    """Eq. 8-10, L_ap = L_bce + L_reg per video, averaged over the batch.

    p_raw, valid: as noisy_or's; labels: (B, K) multi-hot.
    """
    p_raw, valid = real_instances(p_raw, valid)
    K = p_raw.size(1)
    labels = labels.float()
    # clamped before the logarithms (misc/Crit/crit_attribute.py)
    p = noisy_or(p_raw, valid).clamp(0.01, 0.99)
    k_pos = labels.sum(dim=1)                                                       # (B,)
    bce = -(labels * p.log() + (1 - labels) * (1 - p).log()).sum(dim=1)    # Eq. 8, summed over K
    bce = bce / k_pos.clamp(min=1)                                          # ... over K_pos
    # Eq. 9, L_reg = max(mean(P_raw) - K_pos / K, 0) over the real instances: keeps the prediction
    # conservative
    sum_p_raw = unpack(p_raw.sum(dim=1), valid).sum(dim=1)                          # (B,)
    mean_p_raw = sum_p_raw / (valid.sum(dim=1) * K).clamp(min=1)
    reg = (mean_p_raw - k_pos / K).clamp(min=0)
    return (bce + reg).mean()                                                       # Eq. 10


# ----------------------------------------------------------------------------------------------
# Sec. 4.2: Dual Attribute Prediction: VAP from sparsely sampled F', TAP from a caption's E (Eq. 11)


def sparse_sample(valid, training=True):
    """Keep N' = ceil(L * r) of each video's L instances, r ~ U(0, 1], without replacement.

    valid: (B, L) bool. Returns a (B, L) bool mask of the kept instances (all of them in eval).
    """
    if not training:
        return valid
    n_valid = valid.sum(dim=1)                                               # (B,)
    r = 1.0 - torch.rand(n_valid.shape, device=valid.device)                 # U(0, 1], per video
    n_keep = torch.ceil(n_valid * r).long().clamp(min=1)                     # (B,)
    scores = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)  # invalid: last
    rank = scores.argsort(dim=1).argsort(dim=1)                              # a random order
    return valid & (rank < n_keep.unsqueeze(1))


# ----------------------------------------------------------------------------------------------
# The captioner with Dual Attribute Prediction (Fig. 2)


def init_weights(module):
    """xavier_uniform for every Linear and Embedding weight, zero biases and PAD row; LayerNorm
    (1, 0), torch's default (models/Framework.py, Seq2SeqBase._init_weights)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.xavier_uniform_(module.weight)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])


class CaptionModel(nn.Module):
    """Fig. 2: encoder (Eq. 5), embedding (Eq. 2), decoder and head (Eq. 3), two APNets (Eq. 6)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.embedding = Embedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.drop = Dropout(cfg.dropout)                     # models/Decoder.py, before the head
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # models/Head.py, NaiveHead
        # Eq. 6, APNet = one FC layer; "do not share the same APNet" for video and text (Sec. 4.2)
        self.vap_net = nn.Linear(cfg.d_model, cfg.n_attributes) if cfg.vap else None
        self.tap_net = nn.Linear(cfg.d_model, cfg.n_attributes) if cfg.tap else None
        with torch.no_grad():
            self.apply(init_weights)

    def encode(self, feats):
        """Learned video features F (Eq. 5): dict of (B, N, D_m) -> (B, M*N, d)."""
        return self.encoder(feats)

    def decode(self, embeddings, memory, caches=None, start=0, real=None):
        """Eq. 3, next-token logits (B, T, V) from the embedded tokens E (B, T, d) at start.. and F.

        real: (B, T) bool, a prefix of each row (BOS w1..wn): E and the logits hold only those N
        positions, (N, d) -> (N, V). Causal attention never lets them see a later, PAD, position, so
        training computes nothing for PAD (MSR-VTT's captions fill about a third of max_len).
        """
        T = embeddings.size(1) if real is None else real.size(1)
        if start + T > self.cfg.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_len={self.cfg.max_len}")
        causal = (None if T == 1 else  # (T, start + T): position start + t sees 0..start + t
                  torch.ones(T, start + T, dtype=torch.bool, device=memory.device).tril(start))
        x = embeddings
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, causal, (None, None) if caches is None else caches[i], real)
        return self.head(self.drop(x))

    def video_attribute_p_raw(self, memory):
        """Eq. 6 with X = F (or the sampled F'): instance probabilities (B, M*N, K) or (N', K)."""
        return torch.sigmoid(self.vap_net(memory))

    def text_attribute_p_raw(self, embeddings):
        """Eq. 6 with X = E (Eq. 11), the embedded decoder inputs BOS w1..wn: (B, T, K), (N, K)."""
        return torch.sigmoid(self.tap_net(embeddings))

    def forward(self, feats, captions, attributes=None):
        """Eq. 12, L = L_cap + lambda_1 L_ap^V + lambda_2 L_ap^T; returns each part and the total.

        captions: (B, T) BOS w1..wn EOS PAD...; attributes: (B, K) multi-hot (for VAP and TAP).
        """
        cfg = self.cfg
        if (cfg.vap or cfg.tap) and attributes is None:
            raise ValueError("attribute labels (B, K) are required when VAP or TAP is on")
        memory = self.encode(feats)                                               # (B, L, d)
        inputs, targets = captions[:, :-1], captions[:, 1:]
        real = targets != PAD                     # (B, T) the positions Eq. 4 scores: BOS w1..wn
        embeddings = self.embedding(inputs, real=real)           # E (N, d) there, one dropout draw
        logits = self.decode(embeddings, memory, real=real)                     # (N, V), no PAD
        out = {"cap": caption_loss(logits, targets[real], len(targets))}
        out["loss"] = out["cap"]
        if cfg.vap:  # video-based attribute prediction from sparsely sampled F' (APNet on F' only)
            all_instances = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
            kept = sparse_sample(all_instances, self.training and cfg.sparse_sampling)
            out["vap"] = attribute_loss(self.video_attribute_p_raw(memory[kept]), attributes, kept)
            out["loss"] = out["loss"] + cfg.lambda_v * out["vap"]
        if cfg.tap:  # text-based: the decoder's own input embeddings where the target is not PAD
            # (misc/Crit/crit_attribute.py, NoisyOrMILWithEmbs on "input_embs";
            # misc/Crit/prepare.py)
            out["tap"] = attribute_loss(self.text_attribute_p_raw(embeddings), attributes, real)
            out["loss"] = out["loss"] + cfg.lambda_t * out["tap"]
        return out

    @torch.no_grad()
    def predict_attributes(self, feats=None, captions=None):
        """Noisy-OR attribute probabilities (B, K) from every video instance (VAP) or captions
        (TAP)."""
        if (feats is None) == (captions is None):
            raise ValueError("give either feats (video-based) or captions (text-based)")
        if feats is not None:
            if self.vap_net is None:
                raise ValueError("this model was trained without VAP (cfg.vap=False)")
            return noisy_or(self.video_attribute_p_raw(self.encode(feats)))
        if self.tap_net is None:
            raise ValueError("this model was trained without TAP (cfg.tap=False)")
        p_raw = self.text_attribute_p_raw(self.embedding(captions[:, :-1]))
        return noisy_or(p_raw, captions[:, 1:] != PAD)

    # ------------------------------------------------------------------------------------------
    # Generation: batched beam search with a key/value cache (beam_size=1 is greedy search)

    def next_log_probs(self, tokens, memory, caches, step):
        """log p(y | Y_<t, V) (B, V) for the last tokens (B, 1); PAD and BOS are never produced."""
        logits = self.decode(self.embedding(tokens, step), memory, caches, step)[:, -1]
        log_p = logits.log_softmax(dim=-1)
        log_p[:, [PAD, BOS]] = float("-inf")  # their Beam forbids nothing (README, differences)
        return log_p

    @torch.no_grad()
    def generate(self, feats, beam_size=5, max_len=None, length_penalty=1.0):
        """Captions (B, T') of word ids, no BOS, EOS and what follows it set to PAD.

        The authors' beam rule (misc/Decoding/Beam.py, models/Translator.py), all videos at once:
        each step keeps the beam_size best continuations of the live hypotheses by summed log p; one
        that ends with EOS leaves the beam for the video's finished list; a video is done when
        beam_size hypotheses have finished (or at max_len, when, if none has finished, its live ones
        count). The answer is the finished hypothesis with the best sum(log p) / length ** alpha
        (length: words + EOS; alpha = length_penalty). Done videos leave the decoding batch.
        """
        memory = self.encode(feats)                                      # (B, L, d): once per video
        B, k, V, device = memory.size(0), beam_size, self.cfg.vocab_size, memory.device
        steps = (max_len or self.cfg.max_len) - 1                         # tokens after BOS
        caches = [(Cache(), Cache()) for _ in self.layers]                # (self, cross) per layer
        tokens = torch.full((B, 1), BOS, dtype=torch.long, device=device)  # a row per hypothesis
        sum_logp = torch.zeros(B, 1, dtype=memory.dtype, device=device)   # (videos, hypotheses)
        seqs = torch.full((B, 1, steps), PAD, dtype=torch.long, device=device)
        best_score = torch.full((B,), float("-inf"), dtype=memory.dtype, device=device)  # per video
        best = torch.full((B, steps), PAD, dtype=torch.long, device=device)
        n_finished = torch.zeros(B, dtype=torch.long, device=device)
        active = torch.arange(B, device=device)                           # videos still decoding
        for t in range(steps):
            n, hyps = sum_logp.shape                                      # hyps: 1 at t=0, then k
            log_p = self.next_log_probs(tokens, memory, caches, t).view(n, hyps, V)
            candidates = (sum_logp.unsqueeze(-1) + log_p).view(n, hyps * V)
            sum_logp, top = candidates.topk(min(k, hyps * V), dim=1)     # (n, k), best first
            origin, word = top // V, top % V
            seqs = seqs.gather(1, origin.unsqueeze(-1).expand(-1, -1, steps))
            seqs[:, :, t] = word
            ended = (sum_logp > float("-inf")) & (word == EOS)
            # finished hypotheses are collected in rank order until the video has beam_size of them
            taken = ended & (n_finished[active, None] + ended.long().cumsum(dim=1) <= k)
            score = torch.where(taken, sum_logp / (t + 1) ** length_penalty, float("-inf"))
            score, i = score.max(dim=1)
            better = score > best_score[active]          # strictly: the earlier one wins a tie
            best_score[active[better]] = score[better]
            best[active[better]] = seqs[better, i[better]]
            n_finished[active] += taken.sum(dim=1)
            if t == steps - 1:                           # max_len: with nothing finished, the
                none = n_finished[active] == 0           # best live hypothesis is the answer
                best[active[none]] = seqs[none, 0]
                break
            sum_logp = sum_logp.masked_fill(word == EOS, float("-inf"))            # not extended
            keep = (n_finished[active] < k) & (sum_logp > float("-inf")).any(dim=1)
            if not keep.any():
                break
            parent = torch.arange(n, device=device).unsqueeze(1) * hyps + origin   # (n, k) rows
            for self_cache, _ in caches:
                self_cache.select(parent[keep].view(-1))         # each hypothesis' own prefix
            if not keep.all():                                   # done videos leave the batch
                videos = keep.nonzero().view(-1)
                for _, cross_cache in caches:
                    cross_cache.select(videos)                   # the video's keys and values, once
                memory, active, seqs = memory[videos], active[videos], seqs[videos]
                sum_logp = sum_logp[videos]
            tokens = word[keep].view(-1, 1)
        return finalize(best)


def finalize(tokens):
    """Set EOS and everything after it to PAD and drop all-PAD trailing columns."""
    after_eos = (tokens == EOS).long().cumsum(dim=1) > 0
    tokens = tokens.masked_fill(after_eos, PAD)
    width = int((tokens != PAD).sum(dim=1).max().item()) if tokens.numel() else 0
    return tokens[:, :max(width, 1)]
