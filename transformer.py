"""Feasible-trajectory generator of Trajectory Diffuser (Huang et al., "Diffusion Models as Optimizers
for Efficient Planning in Offline RL", ECCV 2024, arXiv 2407.16142): a causal Transformer that, given
states and returns-to-go, predicts the next state and the next return-to-go, and rolls a plan out by
feeding its own predictions back in. The diffusion model then refines that plan.

One token per timestep: token_t = [Linear(S->D/2)(s_t) ; Linear(1->D/2)(R_t)] + PE(t), with sinusoidal
positions PE (Vaswani et al. 2017, Sec. 3.5) counted from the start of the window. Attention is written
out by hand (Vaswani Eq. 1); F.scaled_dot_product_attention is only the oracle in the tests.
Layers are post-LN, x = LayerNorm(x + Dropout(Sublayer(x))) (Vaswani Sec. 3.1, 5.4), as in the official
code, with a ReLU feed-forward and a LayerNorm on the embedded tokens.

Window contract (training and inference must agree on positions):
  * C = history context, H = planning horizon. Training windows have length L = C + H - 1, start at any
    step of an episode (position 0 = the window's first step) and are causally masked; position t is
    trained to predict token t+1. Padding goes at the END of a window (mask 0 there): a causal model
    never lets a real token see a later pad, whereas a leading pad would be attended to.
  * At inference the last c <= C history tokens (fewer at an episode's start) sit at positions 0..c-1,
    are prefilled in one pass, and H-1 tokens are generated at positions c..c+H-2 with no sliding, so
    every prediction used comes from a position <= L-2 that training covered. max_len must be >= L.
  * Default C = H - 1, the official history length: e.g. halfcheetah H=8 gives L=14, walker H=32 L=62.
  * The plan handed to the diffusion model is [s_now, future_states] of length H.

Shape legend: B = batch, L = window length (tokens), S = state dim, D = model width = 2 * half_dim,
nh = heads, hs = head size = D / nh, M = cache length.
Tests: python -m pytest test_all.py -k transformer
"""
import math

import torch
import torch.nn as nn


def sinusoidal_table(max_len, dim):
    """(max_len, dim) table with PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same)
    (Vaswani et al. 2017, Sec. 3.5; 10000 is their base wavelength)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]                     # (max_len, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)                                     # (max_len, dim/2)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : dim // 2]
    return table


def causal_mask(query_pos, key_pos):
    """Boolean (T, M) mask, True where a key lies in the query's future and must be hidden."""
    return key_pos[None, :] > query_pos[:, None]                                   # (1, M) > (T, 1) -> (T, M)


class SelfAttention(nn.Module):
    """Multi-head self-attention, softmax(Q K^T / sqrt(hs)) V (Vaswani Eq. 1), with an optional KV cache."""

    def __init__(self, dim, n_head):
        super().__init__()
        if dim % n_head != 0:
            raise ValueError(f"model width {dim} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)  # a module, so that fast.apply can swap in its CPU version

    def forward(self, x, mask=None, cache=None, pos=None):
        """x (B, T, D); mask (T, T or M) bool, True = hidden, None = full attention.
        cache: (k, v) tensors (B, nh, M, hs); this call's keys/values are written at indices `pos` (T,)
        and the queries attend over all M slots (the mask hides unwritten and future ones)."""
        B, T, D = x.shape
        nh, hs = self.n_head, D // self.n_head
        q = self.q(x).view(B, T, nh, hs).transpose(1, 2)                           # (B, T, D) -> (B, nh, T, hs)
        k = self.k(x).view(B, T, nh, hs).transpose(1, 2)                           # (B, T, D) -> (B, nh, T, hs)
        v = self.v(x).view(B, T, nh, hs).transpose(1, 2)                           # (B, T, D) -> (B, nh, T, hs)
        if cache is not None:
            cache_k, cache_v = cache
            cache_k.index_copy_(2, pos, k.to(cache_k.dtype))                       # fill slots pos of (B, nh, M, hs)
            cache_v.index_copy_(2, pos, v.to(cache_v.dtype))
            k, v = cache_k, cache_v
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)                            # (B, nh, T, hs) @ (B, nh, hs, M) -> (B, nh, T, M)
        if mask is not None:
            att = att.masked_fill(mask, float("-inf"))                             # the diagonal is never hidden: no all -inf row
        att = self.softmax(att)                                                    # over the keys; exp(-inf) = 0 hides masked ones
        y = att @ v                                                                # (B, nh, T, M) @ (B, nh, M, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)                                     # (B, nh, T, hs) -> (B, T, D)
        return self.out(y)


class Block(nn.Module):
    """Post-LN Transformer layer (Vaswani Sec. 3.1), as in the official code."""

    def __init__(self, dim, n_head, ffn_dim, dropout):
        super().__init__()
        self.attn = SelfAttention(dim, n_head)
        self.ln1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.ln2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)  # residual dropout on each sub-layer's output (Vaswani Sec. 5.4)

    def forward(self, x, mask=None, cache=None, pos=None):
        x = self.ln1(x + self.drop(self.attn(x, mask, cache, pos)))
        return self.ln2(x + self.drop(self.ffn(x)))


class TrajectoryTransformer(nn.Module):
    """Causal next-(state, return-to-go) predictor. Official sizes are the defaults: half_dim 256 (D 512),
    4 layers, 4 heads, FFN 512, dropout 0.1. max_len bounds the window (see the module's window contract).

    DEVIATION: the official model is trained with no attention mask, so every position but the last sees
    its own target; here causal=True (the default) masks the future. causal=False reproduces the official
    model for ablations; its rollout re-runs a sliding window of the last c tokens at every step, because a
    non-causal model's keys for old tokens change when a token is appended, so a KV cache would be wrong.
    """

    def __init__(self, state_dim, half_dim=256, n_layer=4, n_head=4, ffn_dim=512, dropout=0.1,
                 max_len=64, causal=True):
        super().__init__()
        dim = 2 * half_dim
        self.state_dim, self.max_len, self.causal = state_dim, max_len, causal
        self.n_head, self.head_size = n_head, dim // n_head
        self.state_embed = nn.Linear(state_dim, half_dim)
        self.rtg_embed = nn.Linear(1, half_dim)
        self.register_buffer("pos_table", sinusoidal_table(max_len, dim), persistent=False)  # rebuilt, not saved
        self.register_buffer("pos_ids", torch.arange(max_len), persistent=False)
        self.embed_drop = nn.Dropout(dropout)
        self.embed_ln = nn.LayerNorm(dim)  # from the official code, which normalizes the embedded tokens
        self.blocks = nn.ModuleList([Block(dim, n_head, ffn_dim, dropout) for _ in range(n_layer)])
        # Heads are two-layer MLPs with hidden width half_dim, from the official code. (The official
        # encoder also applies one more LayerNorm after the last post-LN layer; it only re-normalizes an
        # already normalized vector and is left out.)
        self.state_head = nn.Sequential(nn.Linear(dim, half_dim), nn.ReLU(), nn.Linear(half_dim, state_dim))
        self.rtg_head = nn.Sequential(nn.Linear(dim, half_dim), nn.ReLU(), nn.Linear(half_dim, 1))

    def _check(self, states, rtg):
        if states.dim() != 3 or states.shape[-1] != self.state_dim:
            raise ValueError(f"states must be (B, L, {self.state_dim}), got {tuple(states.shape)}")
        if rtg.shape != states.shape[:2] + (1,):
            raise ValueError(f"rtg must be {tuple(states.shape[:2]) + (1,)}, got {tuple(rtg.shape)}")
        if states.shape[1] > self.max_len:
            raise ValueError(f"window of {states.shape[1]} tokens exceeds max_len={self.max_len}")

    def _run(self, states, rtg, pos, caches=None):
        """Tokens at positions pos (T,) -> predictions (B, T, S), (B, T, 1). With caches, the keys and
        values of these tokens are stored at slots pos, and attention covers every cache slot."""
        x = torch.cat([self.state_embed(states), self.rtg_embed(rtg)], dim=-1)    # (B, T, D/2) x 2 -> (B, T, D)
        x = self.embed_ln(self.embed_drop(x + self.pos_table[pos]))                # + (T, D) positions
        key_pos = pos if caches is None else self.pos_ids[: caches[0][0].shape[2]]
        mask = causal_mask(pos, key_pos) if self.causal else None
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if caches is None else caches[i], pos)
        return self.state_head(x), self.rtg_head(x)

    def forward(self, states, rtg):
        """states (B, L, S), rtg (B, L, 1) -> (next_states (B, L, S), next_rtg (B, L, 1)); position t
        predicts token t+1."""
        self._check(states, rtg)
        return self._run(states, rtg, self.pos_ids[: states.shape[1]])

    def loss(self, states, rtg, mask=None):
        """Official loss MSE(state) + MSE(rtg) on next-token prediction. The target of position t is
        token t+1, counted only where mask[:, t+1] == 1 (mask (B, L) float, None = all ones).
        Returns (scalar loss, {"state": tensor, "rtg": tensor}), the parts detached for logging."""
        self._check(states, rtg)
        B, L, _ = states.shape
        if L < 2:
            raise ValueError(f"loss needs windows of at least 2 tokens, got {L}")
        if mask is None:
            mask = states.new_ones(B, L)
        elif mask.shape != (B, L):
            raise ValueError(f"mask must be {(B, L)}, got {tuple(mask.shape)}")
        pred_s, pred_r = self(states, rtg)
        weight = mask[:, 1:].to(states.dtype)                                      # (B, L-1): targets 1..L-1
        count = weight.sum().clamp_min(1.0)
        err_s = (pred_s[:, :-1] - states[:, 1:]).pow(2).mean(-1)                   # (B, L-1, S) -> (B, L-1)
        err_r = (pred_r[:, :-1] - rtg[:, 1:]).pow(2).squeeze(-1)                   # (B, L-1, 1) -> (B, L-1)
        loss_s = (err_s * weight).sum() / count
        loss_r = (err_r * weight).sum() / count
        return loss_s + loss_r, {"state": loss_s.detach(), "rtg": loss_r.detach()}

    @torch.no_grad()
    def rollout(self, states, rtg, n_steps, use_cache=True):
        """Autoregressive plan. History states (B, c, S), rtg (B, c, 1) at positions 0..c-1, with
        c + n_steps - 1 <= max_len. Returns (future_states (B, n_steps, S), future_rtg (B, n_steps, 1)):
        each prediction, state AND return-to-go, is fed back in as the next token. Call model.eval()
        first: dropout stays active in train mode.

        use_cache=True: one pass prefills the c history tokens into per-layer key/value caches of
        M = c + n_steps - 1 slots, then every generated token costs one token's work. The caches are
        preallocated and written by index.
        use_cache=False: re-run the whole growing sequence each step (the cache's oracle in the tests).
        causal=False (the official model): re-run a sliding window of the last c tokens each step, at positions
        0..c-1, as the official planner does; without a mask, earlier tokens see later ones, so nothing caches.

        DEVIATION: the official planner re-runs a sliding window of the last H-1 tokens at every step
        (H-1 tokens of work per step, O(H^2) per plan). Here the history is prefilled once, each new
        token is cached, and the history stays at positions 0..c-1 while generation continues at
        c, c+1, ..., the positions the causal training windows cover (see the window contract).
        """
        self._check(states, rtg)
        B, c, _ = states.shape
        if c < 1 or n_steps < 1 or c + n_steps - 1 > self.max_len:
            raise ValueError(f"need c >= 1, n_steps >= 1 and c + n_steps - 1 <= max_len={self.max_len}, "
                             f"got c={c}, n_steps={n_steps}")
        if not (use_cache and self.causal):
            for _ in range(n_steps):
                window = slice(None) if self.causal else slice(-c, None)          # (B, c, .) sliding, official
                pred_s, pred_r = self(states[:, window], rtg[:, window])
                states = torch.cat([states, pred_s[:, -1:]], dim=1)                # (B, c+i, S) -> (B, c+i+1, S)
                rtg = torch.cat([rtg, pred_r[:, -1:]], dim=1)
            return states[:, c:], rtg[:, c:]
        M = c + n_steps - 1
        caches = [(states.new_zeros(B, self.n_head, M, self.head_size),
                   states.new_zeros(B, self.n_head, M, self.head_size)) for _ in self.blocks]
        pred_s, pred_r = self._run(states, rtg, self.pos_ids[:c], caches)         # prefill positions 0..c-1
        s, r = pred_s[:, -1:], pred_r[:, -1:]                                      # (B, 1, S), (B, 1, 1)
        out_s, out_r = [s], [r]
        for p in range(c, M):
            s, r = self._run(s, r, self.pos_ids[p: p + 1], caches)                 # one token at position p
            out_s.append(s)
            out_r.append(r)
        return torch.cat(out_s, dim=1), torch.cat(out_r, dim=1)                    # n_steps x (B, 1, .) -> (B, n_steps, .)
