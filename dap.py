"""
CLIP-DAP in one file: a Transformer video captioner on frozen backbone features, trained with
Dual Attribute Prediction (DAP), an auxiliary noisy-OR multiple-instance attribute task.

Paper: "CLIP Meets Video Captioners: Attribute-Aware Representation Learning Promotes Accurate
Captioning", Bang Yang and Yuexian Zou (arXiv 2111.15162). Equation numbers below are the paper's.
The file follows the paper's order: Sec. 3.1-3.2 (encoder, embedding, decoder, caption loss), then
Sec. 4.1-4.2 (APNet, noisy-OR, attribute loss, video- and text-based attribute prediction), then
generation. It imports torch and the standard library only, so it can be copied on its own.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, UNK, BOS, EOS = 0, 1, 2, 3  # special token ids; a vocabulary must put its words after them


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
    length_penalty: float = 1.0  # beam hypotheses are ranked by sum(log p) / length ** alpha

    def __post_init__(self):
        self.n_heads = self.n_heads or max(1, self.d_model // 64)
        assert self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads"


# ----------------------------------------------------------------------------------------------
# Sec. 3.2: encoder, embedding, decoder


class Encoder(nn.Module):
    """Eq. 5, F = LN(FC(Backbone(V))) per modality; the M modalities are concatenated in time."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(dim, cfg.d_model), nn.LayerNorm(cfg.d_model),
                                                    nn.Dropout(cfg.dropout))
                                   for m, dim in cfg.feature_dims.items()})

    def forward(self, feats):
        missing = [m for m in self.proj if m not in feats]
        if missing:
            raise KeyError(f"features for modalities {missing} are missing; the model was built for "
                           f"{list(self.proj)} (pass zeros for a video that lacks one, e.g. no soundtrack)")
        # frozen backbone features (B, N, D_m) -> (B, M*N, d); no positional encoding, no self-attention
        return torch.cat([self.proj[m](feats[m]) for m in self.proj], dim=1)


class Embedding(nn.Module):
    """Eq. 2 and Eq. 11, e_t = LN(W^w[y_t] + W^p[t]); shared by the decoder and TAP."""

    def __init__(self, cfg):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=PAD)
        self.position = nn.Embedding(cfg.max_len, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens, start=0):
        positions = torch.arange(start, start + tokens.size(1), device=tokens.device)
        return self.drop(self.norm(self.word(tokens) + self.position(positions)))  # (B, T, d)


class Attention(nn.Module):
    """Multi-head attention that can append to a key/value cache for incremental decoding."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.p_drop = cfg.n_heads, cfg.attn_dropout
        self.q, self.k, self.v, self.out = (nn.Linear(cfg.d_model, cfg.d_model) for _ in range(4))

    def split_heads(self, x):  # (B, T, d) -> (B, h, T, d/h)
        return x.view(x.size(0), x.size(1), self.n_heads, -1).transpose(1, 2)

    def forward(self, x, memory=None, mask=None, cache=None):
        """Self-attention when memory is None, cross-attention over memory otherwise.

        cache (a dict, filled in place): the keys/values so far; cross-attention computes them once.
        """
        q = self.split_heads(self.q(x))                                    # (B, h, T, d/h)
        if memory is not None and cache:                                   # cross-attention, cached
            k, v = cache["k"], cache["v"]
        else:
            source = x if memory is None else memory
            k, v = self.split_heads(self.k(source)), self.split_heads(self.v(source))
            if cache:                                                      # self-attention: append
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            if cache is not None:
                cache.update(k=k, v=v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.p_drop if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(x.shape))  # (B, T, d)


class DecoderLayer(nn.Module):
    """A post-LN Transformer decoder layer: causal self-attention, cross-attention, FFN."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(cfg), Attention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model), nn.GELU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model))
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, memory, causal_mask=None, cache=None):
        cache = cache if cache is not None else {}
        x = self.norm1(x + self.drop(self.self_attn(x, mask=causal_mask, cache=cache.get("self"))))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory=memory, cache=cache.get("cross"))))
        return self.norm3(x + self.drop(self.ffn(x)))


# ----------------------------------------------------------------------------------------------
# Sec. 4.1: attribute prediction as multiple-instance learning


def noisy_or(p_raw, valid=None):
    """Eq. 7, p_k = 1 - prod_l (1 - P_raw[k, l]), in log space; invalid instances count as P_raw = 0.

    p_raw: (B, L, K) instance probabilities; valid: (B, L) bool, True for a real instance.
    """
    log_not = torch.log1p(-p_raw.clamp(max=1 - 1e-6))  # log(1 - P_raw); clamp keeps it finite
    if valid is not None:
        log_not = log_not.masked_fill(~valid.unsqueeze(-1), 0.0)
    return -torch.expm1(log_not.sum(dim=1))  # (B, K)


def attribute_loss(p_raw, labels, valid=None):
    """Eq. 8-10, L_ap = L_bce + L_reg per video, averaged over the batch.

    p_raw: (B, L, K); labels: (B, K) multi-hot; valid: (B, L) bool or None (all instances real).
    """
    B, L, K = p_raw.shape
    labels = labels.float()
    valid = torch.ones(B, L, dtype=torch.bool, device=p_raw.device) if valid is None else valid
    # p is clamped to [0.01, 0.99] before the logarithms of Eq. 8, as the authors' implementation does
    p = noisy_or(p_raw, valid).clamp(0.01, 0.99)
    k_pos = labels.sum(dim=1)                                                       # (B,)
    bce = -(labels * p.log() + (1 - labels) * (1 - p).log()).sum(dim=1)            # Eq. 8, summed over K
    bce = bce / k_pos.clamp(min=1)                                                  # ... normalised by K_pos
    # Eq. 9, L_reg = max(mean(P_raw) - K_pos / K, 0): keeps attribute prediction conservative
    mean_p_raw = (p_raw * valid.unsqueeze(-1)).sum(dim=(1, 2)) / (valid.sum(dim=1) * K).clamp(min=1)
    reg = (mean_p_raw - k_pos / K).clamp(min=0)
    return (bce + reg).mean()                                                       # Eq. 10


def sparse_sample(valid, training=True):
    """Sec. 4.2, keep N' = ceil(L * r) of each video's L instances, r ~ U(0, 1], without replacement.

    valid: (B, L) bool. Returns a (B, L) bool mask of the kept instances (all of them at evaluation).
    """
    if not training:
        return valid
    n_valid = valid.sum(dim=1)                                                   # (B,)
    r = 1.0 - torch.rand(n_valid.shape, device=valid.device)                     # U(0, 1], per video
    n_keep = torch.ceil(n_valid * r).long().clamp(min=1)                         # (B,)
    scores = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)  # invalid rank last
    rank = scores.argsort(dim=1).argsort(dim=1)                                  # random order per video
    return valid & (rank < n_keep.unsqueeze(1))


# ----------------------------------------------------------------------------------------------
# The captioner with Dual Attribute Prediction (Fig. 2)


class CaptionModel(nn.Module):
    """Encoder (Eq. 5) + embedding (Eq. 2) + decoder and head (Eq. 3) + the two APNets (Eq. 6)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.embedding = Embedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        # Eq. 6, APNet = one FC layer; "do not share the same APNet" for video and text (Sec. 4.2)
        self.vap_net = nn.Linear(cfg.d_model, cfg.n_attributes) if cfg.vap else None
        self.tap_net = nn.Linear(cfg.d_model, cfg.n_attributes) if cfg.tap else None

    def encode(self, feats):
        """Learned video features F (Eq. 5): dict of (B, N, D_m) -> (B, M*N, d)."""
        return self.encoder(feats)

    def decode(self, tokens, memory, caches=None, start=0):
        """Eq. 3, next-token logits (B, T, V) for tokens (B, T) at positions start.. given F."""
        if start + tokens.size(1) > self.cfg.max_len:
            raise ValueError(f"sequence of {start + tokens.size(1)} tokens exceeds max_len={self.cfg.max_len}")
        x = self.embedding(tokens, start)
        T = tokens.size(1)
        causal = None if T == 1 else torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        if causal is not None and start > 0:  # several new tokens after a cache: see the cache, too
            causal = torch.cat([torch.ones(T, start, dtype=torch.bool, device=tokens.device), causal], 1)
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, causal, None if caches is None else caches[i])
        return self.head(x)

    def caption_loss(self, memory, captions):
        """Eq. 4 with teacher forcing: -sum_t log p(y_t | Y_<t, V), PAD excluded, / batch size."""
        logits = self.decode(captions[:, :-1], memory)                            # (B, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), captions[:, 1:], ignore_index=PAD, reduction="sum")
        return nll / captions.size(0)  # the authors sum over tokens and average over videos

    def video_attribute_p_raw(self, memory):
        """Eq. 6 with X = F (or the sparsely sampled F'): instance probabilities (B, M*N, K)."""
        return torch.sigmoid(self.vap_net(memory))

    def text_attribute_p_raw(self, captions):
        """Eq. 6 with X = E (Eq. 11), the caption's tokens after BOS: (P_raw (B, T-1, K), valid (B, T-1))."""
        p_raw = torch.sigmoid(self.tap_net(self.embedding(captions)[:, 1:]))
        return p_raw, captions[:, 1:] != PAD

    def forward(self, feats, captions, attributes=None):
        """Eq. 12, L = L_cap + lambda_1 L_ap^V + lambda_2 L_ap^T; returns each part and the total."""
        cfg = self.cfg
        if (cfg.vap or cfg.tap) and attributes is None:
            raise ValueError("attribute labels (B, K) are required when VAP or TAP is on")
        memory = self.encode(feats)                                               # (B, L, d)
        out = {"cap": self.caption_loss(memory, captions)}
        out["loss"] = out["cap"]
        if cfg.vap:  # Sec. 4.2, video-based attribute prediction from sparsely sampled F'
            all_instances = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
            kept = sparse_sample(all_instances, self.training and cfg.sparse_sampling)
            out["vap"] = attribute_loss(self.video_attribute_p_raw(memory), attributes, kept)
            out["loss"] = out["loss"] + cfg.lambda_v * out["vap"]
        if cfg.tap:  # Sec. 4.2, text-based attribute prediction from a ground-truth caption
            p_raw, valid = self.text_attribute_p_raw(captions)
            out["tap"] = attribute_loss(p_raw, attributes, valid)
            out["loss"] = out["loss"] + cfg.lambda_t * out["tap"]
        return out

    @torch.no_grad()
    def predict_attributes(self, feats=None, captions=None):
        """Noisy-OR attribute probabilities (B, K) from all video instances (VAP) or a caption (TAP)."""
        if (feats is None) == (captions is None):
            raise ValueError("give either feats (video-based) or captions (text-based)")
        if feats is not None:
            if self.vap_net is None:
                raise ValueError("this model was trained without VAP (cfg.vap=False)")
            return noisy_or(self.video_attribute_p_raw(self.encode(feats)))
        if self.tap_net is None:
            raise ValueError("this model was trained without TAP (cfg.tap=False)")
        return noisy_or(*self.text_attribute_p_raw(captions))

    # ------------------------------------------------------------------------------------------
    # Generation: greedy and batched beam search with a key/value cache

    def new_caches(self):
        """Empty key/value caches, one per layer; the first decoding step fills them."""
        return [{"self": {}, "cross": {}} for _ in self.layers]

    def next_log_probs(self, tokens, memory, caches, step):
        """log p(y | Y_<t, V) (B, V) for the last tokens (B, 1); PAD and BOS can never be produced."""
        logits = self.decode(tokens, memory, caches, start=step)[:, -1]
        logits[:, [PAD, BOS]] = float("-inf")
        return logits.log_softmax(dim=-1)

    @torch.no_grad()
    def generate(self, feats, beam_size=5, max_len=None):
        """Captions (B, T') without BOS, EOS and what follows it set to PAD; beam_size=1 is greedy."""
        if beam_size == 1:
            return self.greedy(feats, max_len)
        return self.beam_search(feats, beam_size, max_len)

    @torch.no_grad()
    def greedy(self, feats, max_len=None):
        """Take the most probable word at each step until EOS or max_len (BOS and EOS included)."""
        memory = self.encode(feats)
        B, steps = memory.size(0), (max_len or self.cfg.max_len) - 1
        caches = self.new_caches()
        tokens = torch.full((B, 1), BOS, dtype=torch.long, device=memory.device)
        out = torch.full((B, steps), PAD, dtype=torch.long, device=memory.device)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        for t in range(steps):
            tokens = self.next_log_probs(tokens, memory, caches, t).argmax(dim=-1, keepdim=True)  # (B, 1)
            out[:, t] = tokens[:, 0].masked_fill(done, PAD)
            done |= tokens[:, 0] == EOS
            if done.all():
                break
        return finalize(out)

    @torch.no_grad()
    def beam_search(self, feats, beam_size=5, max_len=None):
        """All videos and beams at once; finished hypotheses stay in the beam with a frozen score.

        A hypothesis is ranked by sum(log p) / length ** alpha, length counting its words and EOS.
        """
        memory = self.encode(feats)
        B, k, steps, alpha = memory.size(0), beam_size, (max_len or self.cfg.max_len) - 1, self.cfg.length_penalty
        device = memory.device
        memory = memory.repeat_interleave(k, dim=0)                                # (B*k, L, d)
        caches = self.new_caches()
        tokens = torch.full((B * k, 1), BOS, dtype=torch.long, device=device)
        seqs = torch.full((B, k, steps), PAD, dtype=torch.long, device=device)
        sum_logp = torch.full((B, k), float("-inf"), device=device)
        sum_logp[:, 0] = 0.0                                                       # one live beam at t=0
        lengths = torch.zeros(B, k, device=device)
        finished = torch.zeros(B, k, dtype=torch.bool, device=device)
        V, offset = self.cfg.vocab_size, torch.arange(B, device=device).unsqueeze(1) * k  # offset: (B, 1)
        # a finished hypothesis has one continuation, PAD, that changes neither score nor length
        frozen = torch.full((V,), float("-inf"), device=device)
        frozen[PAD] = 0.0
        for t in range(steps):
            logp = self.next_log_probs(tokens, memory, caches, t).view(B, k, V)   # (B, k, V)
            logp = torch.where(finished.unsqueeze(-1), frozen, logp)
            new_len = lengths + (~finished).float()                                # (B, k)
            cand_sum = sum_logp.unsqueeze(-1) + logp                               # (B, k, V)
            cand_score = cand_sum / new_len.unsqueeze(-1).clamp(min=1) ** alpha
            top = cand_score.view(B, -1).topk(k, dim=-1).indices                  # (B, k) over k*V
            origin, word = top // V, top % V
            sum_logp = cand_sum.view(B, -1).gather(1, top)
            lengths = new_len.gather(1, origin)
            finished = finished.gather(1, origin) | (word == EOS)
            seqs = seqs.gather(1, origin.unsqueeze(-1).expand(-1, -1, steps))
            seqs[:, :, t] = word
            flat_origin = (origin + offset).view(-1)                               # rows of (B*k)
            for cache in caches:                                                   # reorder the beams
                cache["self"] = {n: kv.index_select(0, flat_origin) for n, kv in cache["self"].items()}
            tokens = word.view(-1, 1)
            if finished.all():
                break
        best = (sum_logp / lengths.clamp(min=1) ** alpha).argmax(dim=1)            # (B,)
        return finalize(seqs[torch.arange(B, device=device), best])


def finalize(tokens):
    """Set EOS and everything after it to PAD and drop all-PAD trailing columns."""
    after_eos = (tokens == EOS).long().cumsum(dim=1) > 0
    tokens = tokens.masked_fill(after_eos, PAD)
    width = int((tokens != PAD).sum(dim=1).max().item()) if tokens.numel() else 0
    return tokens[:, :max(width, 1)]
