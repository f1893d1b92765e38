"""The project's test suite: every component against an oracle, the data path on small generated D4RL files,
the environments, and the command line run in subprocesses with tiny budgets.

Run it all:            python -m pytest test_all.py
One part:              python -m pytest test_all.py -k transformer   (diffusion, data, envs, cli, speed, reliability)
No GPU and no network are needed. Comparisons print their max difference (pytest -s shows them).
"""

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types
import urllib.error

import h5py
import mujoco
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import GaussianDiffusion, TemporalUnet, cosine_beta_schedule, linear_beta_schedule
from inverse_dynamics import Critic, InverseDynamics, select_candidate
from transformer import SelfAttention, TrajectoryTransformer, causal_mask
import data
import envs
import bench
import config
import diagnose
import fast as fastpaths
import machine
import plan
import sources
import train

torch.set_num_threads(1)  # 2-core CI: the suite runs one thread, no pools


# ====================================================================================================
# transformer
# ====================================================================================================
TINY = dict(half_dim=16, n_layer=2, n_head=2, ffn_dim=32)


def _tiny_transformer(seed=0, state_dim=3, max_len=16, causal=True, dropout=0.1):
    torch.manual_seed(seed)
    return TrajectoryTransformer(state_dim, dropout=dropout, max_len=max_len, causal=causal, **TINY).eval()


def _batch(seed, B=2, L=10, S=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, S, generator=g), torch.randn(B, L, 1, generator=g)


def test_transformer_attention_matches_sdpa():
    torch.manual_seed(0)
    attn = SelfAttention(32, 4).eval()
    x = torch.randn(3, 9, 32)
    pos = torch.arange(9)
    B, T, D, nh = 3, 9, 32, 4
    with torch.no_grad():
        q, k, v = (lin(x).view(B, T, nh, D // nh).transpose(1, 2) for lin in (attn.q, attn.k, attn.v))
        for is_causal in (True, False):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
            ref = attn.out(ref.transpose(1, 2).reshape(B, T, D))
            out = attn(x, causal_mask(pos, pos) if is_causal else None)
            diff = (out - ref).abs().max().item()
            print(f"attention vs sdpa (is_causal={is_causal}) max diff {diff:.2e}")
            assert diff < 1e-5
    # the gradient through the attention is SDPA's, with torch's softmax and with fast.Softmax (row max detached)
    for is_causal in (True, False):
        grads = []
        for use_sdpa in (True, False):
            xg = x.clone().requires_grad_()
            if use_sdpa:
                q, k, v = (lin(xg).view(B, T, nh, D // nh).transpose(1, 2) for lin in (attn.q, attn.k, attn.v))
                y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
                y = attn.out(y.transpose(1, 2).reshape(B, T, D))
            else:
                y = attn(xg, causal_mask(pos, pos) if is_causal else None)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            grads.append(xg.grad)
        assert (grads[0] - grads[1]).abs().max().item() < 1e-5


def test_fast_dropout():
    """fast.Dropout is inverted dropout, as nn.Dropout: each element zeroed w.p. p, the rest scaled by 1 / (1 - p),
    so the mean is kept; its gradient is the same mask and scale; eval mode and p = 0 are the identity."""
    from fast import Dropout
    torch.manual_seed(0)
    x = torch.rand(200, 500) + 1.0  # no zeros of its own
    drop = Dropout(0.1).train()
    xg = x.clone().requires_grad_()
    y = drop(xg)
    zeroed = (y == 0)
    assert abs(zeroed.float().mean().item() - 0.1) < 0.005  # 100k draws: the std of the fraction is 0.001
    assert torch.allclose(y[~zeroed], x[~zeroed] / 0.9)
    assert abs(y.mean().item() / x.mean().item() - 1.0) < 0.01
    y.sum().backward()
    assert torch.allclose(xg.grad, (~zeroed).float() / 0.9)
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)


def test_transformer_no_causal_leak():
    for causal in (True, False):
        model = _tiny_transformer(causal=causal)
        states, rtg = _batch(1)
        j = 4
        states2, rtg2 = states.clone(), rtg.clone()
        states2[:, j] += 1.0
        rtg2[:, j] -= 1.0
        with torch.no_grad():
            a_s, a_r = model(states, rtg)
            b_s, b_r = model(states2, rtg2)
        before = max((a_s[:, :j] - b_s[:, :j]).abs().max().item(), (a_r[:, :j] - b_r[:, :j]).abs().max().item())
        after = max((a_s[:, j:] - b_s[:, j:]).abs().max().item(), (a_r[:, j:] - b_r[:, j:]).abs().max().item())
        print(f"causal={causal}: change at positions < {j}: {before:.2e}, at >= {j}: {after:.2e}")
        assert after > 1e-3
        if causal:
            assert before < 1e-6
        else:
            assert before > 1e-3  # the official (unmasked) model does leak: the check can fail


def test_transformer_kv_cache_matches_uncached():
    model = _tiny_transformer(max_len=12)
    for c in (1, 3, 5):
        states, rtg = _batch(c, L=c)
        n_steps = 12 - c + 1  # fills max_len exactly
        with torch.no_grad():
            s_ref, r_ref = model.rollout(states, rtg, n_steps, use_cache=False)
            s_kv, r_kv = model.rollout(states, rtg, n_steps, use_cache=True)
            first_s, first_r = model(states, rtg)
        diff = max((s_ref - s_kv).abs().max().item(), (r_ref - r_kv).abs().max().item())
        print(f"c={c}, n_steps={n_steps}: cached vs uncached rollout max diff {diff:.2e}")
        assert s_kv.shape == (2, n_steps, 3) and r_kv.shape == (2, n_steps, 1)
        assert diff < 1e-5
        assert (s_kv[:, 0] - first_s[:, -1]).abs().max().item() < 1e-5  # step 1 = prediction after the history
        assert (r_kv[:, 0] - first_r[:, -1]).abs().max().item() < 1e-5
    with pytest.raises(ValueError):
        model.rollout(states, rtg, 12 - 5 + 2)  # c + n_steps - 1 > max_len


def test_transformer_noncausal_rollout_ignores_cache():
    model = _tiny_transformer(max_len=12, causal=False)
    states, rtg = _batch(7, L=3)
    with torch.no_grad():
        s_a, r_a = model.rollout(states, rtg, 6, use_cache=True)
        s_b, r_b = model.rollout(states, rtg, 6, use_cache=False)
    diff = max((s_a - s_b).abs().max().item(), (r_a - r_b).abs().max().item())
    print(f"non-causal rollout, use_cache True vs False max diff {diff:.2e}")
    assert diff == 0.0


def test_transformer_masked_loss_equals_truncated():
    model = _tiny_transformer()
    states, rtg = _batch(3, L=10)
    mask = torch.ones(2, 10)
    mask[:, 7:] = 0
    garbage_s, garbage_r = states.clone(), rtg.clone()
    garbage_s[:, 7:] = 1e3  # padded steps must add nothing
    garbage_r[:, 7:] = -1e3
    with torch.no_grad():
        full, parts = model.loss(garbage_s, garbage_r, mask)
        trunc, _ = model.loss(states[:, :7], rtg[:, :7])
    print(f"masked vs truncated loss: {full.item():.6f} vs {trunc.item():.6f}")
    assert abs(full.item() - trunc.item()) < 1e-5
    assert abs(parts["state"] + parts["rtg"] - full.item()) < 1e-5


def _roundtrip(make, inputs):
    a = make(0).eval()
    b = make(1).eval()
    with torch.no_grad():
        before = a(*inputs)
        b_before = b(*inputs)
    b.load_state_dict(a.state_dict(), strict=True)
    with torch.no_grad():
        after = b(*inputs)
    before, after, b_before = (x if isinstance(x, tuple) else (x,) for x in (before, after, b_before))
    assert max((x - y).abs().max().item() for x, y in zip(before, b_before)) > 1e-4  # different seeds differ
    diff = max((x - y).abs().max().item() for x, y in zip(before, after))
    return diff


def test_transformer_state_dict_roundtrip():
    states, rtg = _batch(4)

    def make_tf(seed):
        torch.manual_seed(seed)
        return TrajectoryTransformer(3, max_len=16, **TINY)

    def make_id(seed):
        torch.manual_seed(seed)
        return InverseDynamics(3, 2, hidden=16)

    def make_critic(seed):
        torch.manual_seed(seed)
        return Critic(3, 2, hidden=16)

    a = torch.randn(2, 10, 2)
    for name, make, inputs in (("TrajectoryTransformer", make_tf, (states, rtg)),
                               ("InverseDynamics", make_id, (states, states + 0.1)),
                               ("Critic", make_critic, (states, a))):
        diff = _roundtrip(make, inputs)
        print(f"{name} state_dict round trip max diff {diff:.2e}")
        assert diff == 0.0


def _toy_trajectories(n=64, L=10, seed=0):
    """States on a circle turning by a fixed angle per step (plus a slowly rising third coordinate);
    return-to-go decreasing linearly from a random start."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    t = torch.arange(L, dtype=torch.float32)[None, :]
    angle = phase + 0.4 * t
    states = torch.stack([torch.cos(angle), torch.sin(angle), 0.1 * t.expand(n, L)], dim=-1)  # (n, L, 3)
    rtg = (1.0 + torch.rand(n, 1, generator=g) - 0.1 * t)[..., None]                         # (n, L, 1)
    return states, rtg


def _fit(loss_fn, params, lr, steps=300):
    """Adam on loss_fn() for `steps` steps; returns the loss before and after training."""
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        first = loss_fn().item()
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_fn().item()
    return first, last


def test_transformer_learns_toy_dynamics():
    torch.manual_seed(0)
    model = TrajectoryTransformer(3, dropout=0.0, max_len=16, **TINY)
    states, rtg = _toy_trajectories()
    first, last = _fit(lambda: model.loss(states, rtg)[0], model.parameters(), lr=3e-3)
    print(f"transformer toy loss {first:.4f} -> {last:.4f} ({first / last:.1f}x)")
    assert first / last >= 5.0


def test_inverse_dynamics_learns_and_masks():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(256, 4, generator=g)
    s_next = s + 0.3 * torch.randn(256, 4, generator=g)
    w = torch.randn(4, 2, generator=g)
    a = torch.tanh(((s_next - s) / 0.3) @ w)  # action = known function of (s, s')
    torch.manual_seed(0)
    model = InverseDynamics(4, 2, hidden=32)
    first, last = _fit(lambda: model.loss(s, s_next, a), model.parameters(), lr=3e-3)
    print(f"inverse dynamics toy loss {first:.4f} -> {last:.4f} ({first / last:.1f}x)")
    assert first / last >= 5.0

    mask = torch.ones(256)
    mask[200:] = 0
    a_pad = a.clone()
    a_pad[200:] = 1e3
    with torch.no_grad():
        masked = model.loss(s, s_next, a_pad, mask).item()
        trunc = model.loss(s[:200], s_next[:200], a[:200]).item()
    print(f"inverse dynamics masked vs truncated loss: {masked:.6f} vs {trunc:.6f}")
    assert abs(masked - trunc) < 1e-6


def test_inverse_dynamics_critic_learns_and_masks():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(256, 3, generator=g)
    a = torch.rand(256, 2, generator=g) * 2 - 1
    rtg = (s[:, :1] - a.pow(2).sum(-1, keepdim=True))  # (256, 1): trailing singleton accepted
    torch.manual_seed(0)
    critic = Critic(3, 2, hidden=32)
    first, last = _fit(lambda: critic.loss(s, a, rtg), critic.parameters(), lr=1e-3)
    with torch.no_grad():
        mask = (torch.arange(256) < 100).float()
        masked = critic.loss(s, a, rtg.squeeze(-1) + 1e3 * (1 - mask), mask).item()
        trunc = critic.loss(s[:100], a[:100], rtg[:100]).item()
    print(f"critic toy loss {first:.4f} -> {last:.4f} ({first / last:.1f}x); masked {masked:.6f} vs {trunc:.6f}")
    assert first / last >= 5.0
    assert abs(masked - trunc) < 1e-6
    assert critic(s, a).shape == (256,)


def test_inverse_dynamics_select_candidate():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 7, generator=g)
    assert torch.equal(select_candidate(q, temperature=0), q.argmax(-1))
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    n = 40000
    for temperature in (1.0, 2.0):
        idx = select_candidate(logits.expand(n, 4), temperature, generator=torch.Generator().manual_seed(1))
        freq = torch.bincount(idx, minlength=4).float() / n
        target = torch.softmax(logits / temperature, dim=0)
        diff = (freq - target).abs().max().item()
        print(f"select_candidate T={temperature}: frequency vs softmax max diff {diff:.4f}")
        assert diff < 0.01  # about 4 standard errors at n = 40000
    with pytest.raises(ValueError):
        select_candidate(q, temperature=-1.0)


# ====================================================================================================
# diffusion
# ====================================================================================================
def tiny_diffusion(H=8, S=3, T=100, schedule="cosine", seed=0):
    torch.manual_seed(seed)
    net = TemporalUnet(S, dim=8, dim_mults=(1, 2), horizon=H)
    return GaussianDiffusion(net, H, S, n_timesteps=T, schedule=schedule)


def test_diffusion_unet_default_size():
    n = sum(p.numel() for p in TemporalUnet(17).parameters())
    print(f"TemporalUnet(S=17, dim=64, mults=(1,2,4,8)) parameters: {n:,}")
    assert 15e6 < n < 17e6
    eps = TemporalUnet(17, horizon=8)(torch.randn(2, 8, 17), torch.tensor([0, 99]), torch.randn(2, 1), torch.ones(2))
    assert eps.shape == (2, 8, 17)


def test_diffusion_cosine_schedule_closed_form():
    T, s = 100, 0.008
    d = tiny_diffusion(T=T)
    t = torch.arange(T + 1, dtype=torch.float64)
    closed = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    clipped = d.betas >= 0.999
    print("cosine: betas clipped at 0.999 at indices", clipped.nonzero().flatten().tolist())
    # alphas_cumprod[i] is alpha_bar after i+1 steps; every product before the first clipped beta is exact
    first_clip = int(clipped.nonzero()[0]) if clipped.any() else T
    diff = (d.alphas_cumprod[:first_clip] - closed[1:first_clip + 1]).abs().max().item()
    print(f"cosine alpha_bar max |diff| vs closed form: {diff:.3e}; alpha_bar_T = {d.alphas_cumprod[-1].item():.3e}")
    assert diff < 1e-12 and first_clip >= T - 1
    assert d.alphas_cumprod[-1] < 1e-3
    assert (d.betas > 0).all() and (d.betas <= 0.999).all()
    for name in ["betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "sqrt_alphas_cumprod"]:
        buf = getattr(d, name)
        assert buf.dtype == torch.float64 and buf.device == next(d.model.parameters()).device
    assert cosine_beta_schedule(T).dtype == torch.float64


def test_diffusion_linear_schedule():
    betas = linear_beta_schedule(100)
    assert betas.dtype == torch.float64
    assert abs(betas[0].item() - 1e-3) < 1e-15 and abs(betas[-1].item() - 2e-2) < 1e-15
    d = tiny_diffusion(schedule="linear")
    ab99 = d.alphas_cumprod[99].item()
    print(f"linear alpha_bar_99 = {ab99:.4f}")
    assert abs(ab99 - 0.35) < 0.01
    with pytest.raises(ValueError):
        GaussianDiffusion(TemporalUnet(3, dim=8, dim_mults=(1, 2)), 8, 3, schedule="quadratic")


def test_diffusion_q_sample_moments():
    d = tiny_diffusion()
    torch.manual_seed(1)
    N = 200_000
    x0 = torch.randn(1, 8, 3).expand(N, 8, 3)
    for ti in [0, 30, 99]:
        t = torch.full((N,), ti, dtype=torch.long)
        x_t = d.q_sample(x0, t)
        ab = d.alphas_cumprod[ti].item()
        mean_diff = (x_t.mean(0) - math.sqrt(ab) * x0[0]).abs().max().item()
        var_diff = (x_t.var(0) - (1 - ab)).abs().max().item()
        print(f"q_sample t={ti}: max |mean diff| {mean_diff:.2e}, max |var diff| {var_diff:.2e}")
        assert mean_diff < 0.015 and var_diff < 0.03


def test_diffusion_posterior_coefficients():
    d = tiny_diffusion()
    b, ab = d.betas, d.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    coef1 = b * ab_prev.sqrt() / (1 - ab)
    coef2 = (1 - ab_prev) * (1 - b).sqrt() / (1 - ab)
    var = b * (1 - ab_prev) / (1 - ab)
    diffs = [(d.posterior_mean_coef1 - coef1).abs().max().item(), (d.posterior_mean_coef2 - coef2).abs().max().item(),
             (d.posterior_variance - var).abs().max().item()]
    print("posterior coef1, coef2, var max |diff|:", diffs)
    assert max(diffs) < 1e-12 and d.posterior_variance[0] == 0
    # the mean from the coefficients equals the Bayes closed form: q(x_{t-1} | x_0) q(x_t | x_{t-1}) is a
    # product of Gaussians N(sqrt(ab_prev) x_0, 1 - ab_prev) * N(x_t / sqrt(alpha), beta / alpha) in x_{t-1}
    torch.manual_seed(2)
    x0, x_t = torch.randn(5, 8, 3, dtype=torch.float64), torch.randn(5, 8, 3, dtype=torch.float64)
    t = torch.tensor([1, 17, 50, 98, 99])
    mean, post_var, log_var = d.q_posterior(x0, x_t, t)
    bt, abp = b[t][:, None, None], ab_prev[t][:, None, None]
    prec = 1 / (1 - abp) + (1 - bt) / bt
    closed_mean = (abp.sqrt() * x0 / (1 - abp) + (1 - bt).sqrt() * x_t / bt) / prec
    diffs = [(mean - closed_mean).abs().max().item(), (post_var - 1 / prec).abs().max().item()]
    print(f"posterior mean, variance max |diff| vs Bayes closed form: {diffs}")
    assert max(diffs) < 1e-10 and torch.allclose(log_var, post_var.log(), rtol=0, atol=1e-12)
    # at t = 0 the posterior is a point mass at x_0
    mean0, var0, _ = d.q_posterior(x0, x_t, torch.zeros(5, dtype=torch.long))
    assert (mean0 - x0).abs().max() < 1e-12 and (var0 == 0).all()


def test_diffusion_guidance():
    d = tiny_diffusion()
    torch.manual_seed(3)
    x, t, r = torch.randn(4, 8, 3), torch.tensor([0, 5, 50, 99]), torch.randn(4, 1)
    with torch.no_grad():
        eps_c = d.model(x, t, r, torch.ones(4))
        eps_u = d.model(x, t, r, torch.zeros(4))
        diffs = [(d.guided_output(x, t, r, 1.0) - eps_c).abs().max().item(),
                 (d.guided_output(x, t, r, 0.0) - eps_u).abs().max().item(),
                 (d.guided_output(x, t, r, 1.7) - (eps_u + 1.7 * (eps_c - eps_u))).abs().max().item()]
        print("guidance w=1 vs cond, w=0 vs uncond, batched vs two passes (w=1.7) max |diff|:", diffs)
        assert max(diffs) < 1e-5
        assert (eps_c - eps_u).abs().max() > 1e-3  # the condition actually reaches the output
        # one weight per row (the sweep batches its weights) equals each row guided alone
        w = torch.tensor([1.0, 1.2, 2.0, 3.0])[:, None, None]
        rows = torch.cat([d.guided_output(x[i:i + 1], t[i:i + 1], r[i:i + 1], float(w[i])) for i in range(4)])
        assert (d.guided_output(x, t, r, w) - rows).abs().max() < 1e-5
        # a dropped row ignores the return value
        assert torch.allclose(eps_u, d.model(x, t, r + 5.0, torch.zeros(4)), atol=0, rtol=0)


def test_diffusion_refine_and_sample_keep_first_state():
    d = tiny_diffusion()
    torch.manual_seed(4)
    x, r = torch.randn(5, 8, 3), torch.randn(5, 1)
    assert torch.equal(d.refine(x, 0, r), x)
    for k, add_noise in [(1, True), (5, True), (100, True), (5, False)]:
        y = d.refine(x, k, r, w=1.2, add_noise=add_noise)
        assert torch.equal(y[:, 0], x[:, 0]) and torch.isfinite(y).all()
        assert (y[:, 1:] - x[:, 1:]).abs().max() > 0
    s = d.sample(x[:, 0], r)
    assert s.shape == x.shape and torch.equal(s[:, 0], x[:, 0]) and torch.isfinite(s).all()
    with pytest.raises(ValueError):
        d.refine(x, 101, r)
    with pytest.raises(ValueError):
        d.refine(x[:, :4], 2, r)


def test_diffusion_bad_horizon():
    with pytest.raises(ValueError, match="H=12 must be divisible by 8"):
        TemporalUnet(17, horizon=12)
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny_diffusion(H=7)


def test_diffusion_state_dict_round_trip():
    d1, d2 = tiny_diffusion(seed=0), tiny_diffusion(seed=1)
    sd = d1.state_dict()
    assert "betas" in sd and "posterior_log_variance_clipped" in sd
    d2.load_state_dict(sd, strict=True)
    for k, v in d2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x, r = torch.randn(3, 8, 3), torch.randn(3, 1)
    torch.manual_seed(5)
    y1 = d1.refine(x, 3, r)
    torch.manual_seed(5)
    y2 = d2.refine(x, 3, r)
    print(f"state_dict round trip: refine max |diff| {(y1 - y2).abs().max().item():.1e}")
    assert torch.equal(y1, y2)


def circle_batch(B, H=8, speed=0.5):
    """Trajectories on the unit circle; return +1 for counter-clockwise, -1 for clockwise."""
    direction = torch.randint(0, 2, (B,)) * 2 - 1  # (B,) in {-1, +1}
    phase = torch.rand(B) * 2 * math.pi
    angle = phase[:, None] + direction[:, None] * speed * torch.arange(H)  # (B, H)
    x0 = torch.stack([angle.cos(), angle.sin()], dim=-1)  # (B, H, 2)
    return x0, direction[:, None].float()


def test_diffusion_learns_toy_curves():
    torch.manual_seed(0)
    net = TemporalUnet(2, dim=16, dim_mults=(1, 2), horizon=8)
    d = GaussianDiffusion(net, 8, 2)  # cosine, T = 100, clip_denoised = 10
    x_eval, r_eval = circle_batch(512)

    def eval_loss():
        with torch.no_grad():
            state = torch.get_rng_state()
            torch.manual_seed(123)  # the same t, noise and dropout for every evaluation
            value = d.loss(x_eval, r_eval).item()
            torch.set_rng_state(state)
            return value

    before = eval_loss()
    opt = torch.optim.Adam(d.parameters(), lr=4e-3)
    for _ in range(600):
        loss = d.loss(*circle_batch(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"toy curves: diffusion loss {before:.3f} -> {after:.3f} (factor {before / after:.1f})")
    assert after < before / 5
    # the return condition selects the family: plans from (1, 0) turn the way the return's sign says
    start = torch.tensor([[1.0, 0.0]]).repeat(128, 1)
    for sign in [1.0, -1.0]:
        plan = d.sample(start, torch.full((128, 1), sign), w=1.2)
        angle = torch.atan2(plan[..., 1], plan[..., 0])  # (B, H)
        step = torch.remainder(angle[:, 1:] - angle[:, :-1] + math.pi, 2 * math.pi) - math.pi  # (B, H-1)
        frac = (step.sign() == sign).float().mean().item()
        radius = plan.norm(dim=-1).mean().item()
        print(f"return {sign:+.0f}: fraction of steps turning that way {frac:.2f}, mean radius {radius:.3f}")
        assert frac > 0.85 and abs(radius - 1) < 0.1
    # v-prediction needs no clamp to stay on the data from pure noise (the last beta is 0.999): x_0 is
    # sqrt(ab) x_t - sqrt(1 - ab) v, with no division by sqrt(ab_t) ~ 5e-4
    d.clip_denoised = False
    radius = d.sample(start, torch.ones(128, 1), w=1.2).norm(dim=-1).mean().item()
    print(f"no clamp: mean radius {radius:.3f}")
    assert abs(radius - 1) < 0.1
    d.clip_denoised = True
    # the condition determines the data here, so the conditional and unconditional outputs must differ
    with torch.no_grad():
        torch.manual_seed(7)
        x0, r = circle_batch(512)
        for t in (10, 50, 90):
            tt = torch.full((512,), t)
            x_t = d.q_sample(x0, tt)
            x_t[:, 0] = x0[:, 0]
            out_c, out_u = d.model(x_t, tt, r, torch.ones(512)), d.model(x_t, tt, r, torch.zeros(512))
            eps_c, eps_u = d.eps_from_output(x_t, tt, out_c), d.eps_from_output(x_t, tt, out_u)
            x0_c, x0_u = d.predict_x0(x_t, tt, out_c), d.predict_x0(x_t, tt, out_u)
            gap_eps = ((eps_c - eps_u)[:, 1:].pow(2).mean() / eps_c[:, 1:].pow(2).mean()).sqrt().item()
            gap_x0 = ((x0_c - x0_u)[:, 1:].pow(2).mean() / x0_c[:, 1:].pow(2).mean()).sqrt().item()
            print(f"t={t}: rms(eps_c - eps_u) / rms(eps_c) = {gap_eps:.3f}, same for x0: {gap_x0:.3f}")
            # low noise: x_t pins x_0 and the gap shows in eps; high noise: eps ~ x_t and the gap shows in x_0
            assert (gap_eps if t <= 50 else gap_x0) > 0.05


def test_diffusion_high_noise_matches_trivial_predictor():
    """At the highest t, eps ~ sqrt(1 - ab_t) x_t almost exactly; after a short fit on toy data the model's
    eps-MSE must come within 2x of that trivial predictor (the t = T - 1 step starts every chain from noise)."""
    torch.manual_seed(0)
    d = GaussianDiffusion(TemporalUnet(2, dim=16, dim_mults=(1, 2), horizon=8), 8, 2)
    opt = torch.optim.Adam(d.parameters(), lr=4e-3)
    for _ in range(150):
        loss = d.loss(*circle_batch(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    x0, r = circle_batch(1024)
    with torch.no_grad():
        for t in (d.n_timesteps - 1, int(0.9 * d.n_timesteps)):
            tt = torch.full((1024,), t)
            noise = torch.randn_like(x0)
            x_t = d.q_sample(x0, tt, noise)
            x_t[:, 0] = x0[:, 0]
            eps = d.eps_from_output(x_t, tt, d.model(x_t, tt, r, torch.ones(1024)))
            model = (eps - noise)[:, 1:].pow(2).mean().item()
            trivial = (d.sqrt_one_minus_alphas_cumprod[t].float() * x_t - noise)[:, 1:].pow(2).mean().item()
            print(f"t={t}: eps-MSE model {model:.3e}, trivial predictor {trivial:.3e}")
            assert model <= 2 * trivial


def test_fast_mish_and_softmax_equal_torch():
    """fast.Mish (one exp) equals nn.Mish, and fast.Softmax equals torch.softmax (with -inf entries), up to float
    rounding, values and gradients, Mish from -100 to 100."""
    from fast import Mish, Softmax
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.randn(1000) * 3]).requires_grad_()
    assert x.numel() >= Mish.SMALL  # the exp form, not torch's kernel
    ours, ref = Mish()(x), F.mish(x)
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-6)
    g_ours, = torch.autograd.grad(ours.sum(), x)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-5)
    a = (torch.randn(6, 4, 9, 9) * 5).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    a.requires_grad_()
    ours, ref = Softmax()(a), torch.softmax(a, dim=-1)
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-7)
    weights = torch.randn_like(ours)
    g_ours, = torch.autograd.grad((ours * weights).sum(), a)
    g_ref, = torch.autograd.grad((ref * weights).sum(), a)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)


def test_fast_apply_swaps_modules_sharing_parameters():
    """The components are plain (nn.Mish, nn.Conv1d, nn.Dropout, nn.Softmax); fast.apply swaps in fast.py's modules
    in place, sharing the parameters (same objects, same state_dict keys), and the networks compute the same
    function to float tolerance: the U-Net at H = 1, 2 and 8, the transformer's rollout."""
    fast = fastpaths
    torch.manual_seed(0)
    for H in (1, 2, 8):
        dim_mults = {1: (1,), 2: (1, 2), 8: (1, 2)}[H]
        plain = TemporalUnet(5, dim=8, dim_mults=dim_mults, horizon=H).eval()
        assert not fast.uses_fast(plain) and any(type(m) is nn.Mish for m in plain.modules())
        quick = fast.apply(copy.deepcopy(plain))
        assert fast.uses_fast(quick) and not any(type(m) in (nn.Mish, nn.Dropout) for m in quick.modules())
        n_fast_convs = sum(isinstance(m, fast.HorizonConv1d) for m in quick.modules())
        n_same_convs = sum(type(m) is nn.Conv1d and m.kernel_size[0] == 5 for m in plain.modules())
        assert n_fast_convs == n_same_convs > 0
        assert list(quick.state_dict()) == list(plain.state_dict())
        x, t, r, c = torch.randn(3, H, 5), torch.tensor([0, 40, 99]), torch.randn(3, 1), torch.tensor([1.0, 0.0, 1.0])
        with torch.no_grad():
            torch.testing.assert_close(quick(x, t, r, c), plain(x, t, r, c), rtol=1e-5, atol=1e-6)
    tf = TrajectoryTransformer(4, half_dim=8, n_layer=2, n_head=2, ffn_dim=16, max_len=12).eval()
    params = [id(p) for p in tf.parameters()]
    states, rtg = torch.randn(2, 3, 4), torch.randn(2, 3, 1)
    ref = tf.rollout(states, rtg, 5)
    fast.apply(tf)
    assert [id(p) for p in tf.parameters()] == params  # shared, not copied
    assert isinstance(tf.blocks[0].attn.softmax, fast.Softmax) and isinstance(tf.blocks[0].drop, fast.Dropout)
    assert not tf.blocks[0].drop.training
    for a, b in zip(tf.rollout(states, rtg, 5), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fast_horizon_conv_equals_conv1d():
    """HorizonConv1d's trimmed kernels (centre tap at H = 1, three taps at H = 2) and its plain path at H > 2
    equal F.conv1d, with gradients; without gradients (the cached kernel) too, also after the weight changes by
    an optimizer step, an EMA update and load_state_dict (a stale cache fails here)."""
    from fast import HorizonConv1d
    torch.manual_seed(0)
    conv = HorizonConv1d(16, 24, 5, padding=2)

    def check(B, H, grad):
        x = torch.randn(B, 16, H, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            y = conv(x)
        ref = F.conv1d(x.detach(), conv.weight.detach(), conv.bias.detach(), padding=2)
        assert y.shape == ref.shape == (B, 24, H)
        torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-6)
        if grad:
            x2 = x.detach().requires_grad_()
            g_ours = torch.autograd.grad(y.square().sum(), (x, conv.weight))
            g_ref = torch.autograd.grad(F.conv1d(x2, conv.weight, conv.bias, padding=2).square().sum(), (x2, conv.weight))
            for a, b in zip(g_ours, g_ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    for B, H in ((9, 1), (3, 1), (9, 2), (3, 3), (3, 8)):
        check(B, H, grad=True)
        check(B, H, grad=False)
    other = HorizonConv1d(16, 24, 5, padding=2)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    for H in (1, 2):
        for change in ("optimizer", "ema", "load"):
            check(4, H, grad=False)  # fills the cache
            if change == "optimizer":
                opt.zero_grad()
                conv(torch.randn(4, 16, 1)).sum().backward()
                opt.step()
            elif change == "ema":
                with torch.no_grad():
                    conv.weight.lerp_(other.weight, 0.5)
            else:
                conv.load_state_dict(other.state_dict())
                other = HorizonConv1d(16, 24, 5, padding=2)
            check(4, H, grad=False)


def test_diffusion_unet_reads_full_resolution_skip():
    """The output must depend on the full-resolution features through their skip, not only through the
    stride-2 bottleneck: with the first downsampling fed zeros, two inputs must still give different outputs.
    (Diffuser's and DD's U-Nets drop that skip; then both outputs would be equal.)"""
    torch.manual_seed(0)
    net = TemporalUnet(3, dim=8, dim_mults=(1, 2, 4), horizon=8)
    net.downs[0][2].register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),))
    t, r, c = torch.tensor([5, 50]), torch.randn(2, 1), torch.ones(2)
    with torch.no_grad():
        diff = (net(torch.randn(2, 8, 3), t, r, c) - net(torch.randn(2, 8, 3), t, r, c)).abs().max().item()
    print(f"output change through the full-resolution skip alone: {diff:.3e}")
    assert diff > 1e-3


def test_diffusion_x0_clamp_per_dimension():
    low, high = torch.tensor([-1.0, -2.0, 0.0]), torch.tensor([1.0, 0.5, 3.0])
    d = GaussianDiffusion(TemporalUnet(3, dim=8, dim_mults=(1, 2), horizon=8), 8, 3, x_low=low, x_high=high)
    t = torch.full((4,), 99)
    x0 = d.predict_x0(torch.zeros(4, 8, 3), t, 100 * torch.randn(4, 8, 3))  # v far off: x_0 = -sqrt(1-ab) v
    assert torch.equal(x0.amin((0, 1)), low) and torch.equal(x0.amax((0, 1)), high)
    assert set(dict(d.named_buffers())) >= {"x_low", "x_high"}  # so they are saved in the state_dict


# ------------------------------------------------------------------------------------------ oracles
# The diffusion arithmetic against float64 closed forms computed here from the betas (never from the module's
# buffers), for both parameterizations and both schedules, with stand-in nets whose output is known.
def closed_schedule(schedule, T=100):
    """(betas, alpha_bar, alpha_bar_prev) as float64 numpy arrays, from the papers' formulas: cosine is Nichol &
    Dhariwal Eq. 17 with betas clipped at 0.999, linear is 1e-3..2e-2 (the official code). Index t is DDPM's step t+1."""
    if schedule == "cosine":
        s = 0.008
        f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    else:
        betas = 1e-3 + (2e-2 - 1e-3) * np.arange(T) / (T - 1)
    ab = np.cumprod(1 - betas)
    return betas, ab, np.concatenate([[1.0], ab[:-1]])


class StopDenoising(Exception):
    """Raised by KnownNet to end a chain once a test has the calls it needs."""


class KnownNet(nn.Module):
    """A stand-in denoiser net with a known output, out = 0.5 x_t + b for a fixed (H, S) pattern b in [-1, 1],
    whatever the timestep and the condition. Records every call's (t, x_t, returns, use_cond); with stop_after = n
    it raises StopDenoising after recording call n."""

    def __init__(self, H=8, S=3, stop_after=None):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))  # GaussianDiffusion reads the device off a parameter
        self.b, self.stop_after, self.calls = torch.linspace(-1, 1, H * S).reshape(H, S), stop_after, []

    def forward(self, x, t, returns, use_cond):
        self.calls.append((t.clone(), x.detach().clone(), returns.clone(), use_cond.clone()))
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise StopDenoising
        return 0.5 * x + self.b


def oracle_x0_eps(prediction, ab_t, x_t, out, low=None, high=None):
    """float64 x_0 and eps implied by the net output `out` at x_t (tensors), alpha_bar_t a float; x_0 clamped to
    [low, high] per dimension when given. eps-prediction: DDPM Eq. 15; v: Salimans & Ho, v = sqrt(ab) eps - sqrt(1-ab) x_0."""
    X, O = x_t.double(), out.double()
    a, b = math.sqrt(ab_t), math.sqrt(1 - ab_t)
    x0, eps = ((X - b * O) / a, O) if prediction == "eps" else (a * X - b * O, a * O + b * X)
    if low is not None:
        x0 = torch.maximum(torch.minimum(x0, torch.as_tensor(high, dtype=torch.float64)),
                           torch.as_tensor(low, dtype=torch.float64))
    return x0, eps


def oracle_posterior(betas, ab, ab_prev, t, x0, x_t):
    """float64 mean and variance of q(x_{t-1} | x_t, x_0), DDPM Eq. 7."""
    coef1 = betas[t] * math.sqrt(ab_prev[t]) / (1 - ab[t])
    coef2 = (1 - ab_prev[t]) * math.sqrt(1 - betas[t]) / (1 - ab[t])
    return coef1 * x0.double() + coef2 * x_t.double(), betas[t] * (1 - ab_prev[t]) / (1 - ab[t])


def assert_close64(got, want, *terms, rel=1e-5, what=""):
    """|got - want| <= rel * (the largest term that went into want, at least 1): float32 rounding, not a slip."""
    scale = max([1.0] + [float(torch.as_tensor(x).double().abs().max()) for x in terms])
    err = float((got.double() - want).abs().max())
    assert err <= rel * scale, f"{what}: max |diff| {err:.3e} against a tolerance of {rel * scale:.3e}"


ORACLE_LOW, ORACLE_HIGH = [-1.5, -0.5, -2.5], [1.0, 2.0, 0.5]  # a data range per dimension, for the clamp


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_oracle_x0_eps_posterior_and_last_step(prediction, schedule):
    """Catches: a sign or coefficient slip in the eps or v arithmetic (predict_x0, eps_from_output), in the
    posterior's coefficients or variance (q_posterior), in one reverse step's mean (p_sample) or in the training
    target (loss: eps, or v); the clamp binding on one side only; and the last reverse step (t = 0) adding noise.
    Each is compared with a float64 closed form computed here from the betas, at t = 0, 1, T/2 and T - 1, with and
    without the x_0 clamp."""
    T, H, S, B = 100, 8, 3, 4
    betas, ab, ab_prev = closed_schedule(schedule, T)
    bound = {"low": False, "high": False}
    for clip in (False, True):
        d = GaussianDiffusion(KnownNet(H, S), H, S, n_timesteps=T, schedule=schedule, prediction=prediction,
                              clip_denoised=clip, x_low=ORACLE_LOW, x_high=ORACLE_HIGH)
        x_t = torch.randn(B, H, S, generator=torch.Generator().manual_seed(0))
        returns, cond_state = torch.zeros(B, 1), x_t[:, 0].clone()
        for ti in (0, 1, T // 2, T - 1):
            t = torch.full((B,), ti)
            out = 0.5 * x_t + d.model.b
            x0, eps = oracle_x0_eps(prediction, ab[ti], x_t, out, *((ORACLE_LOW, ORACLE_HIGH) if clip else ()))
            # the largest intermediate: eps divides by sqrt(ab), up to 2000x at T - 1; v's terms are O(1)
            terms = (x_t / math.sqrt(ab[ti]), out / math.sqrt(ab[ti])) if prediction == "eps" else (x_t, out)
            assert_close64(d.predict_x0(x_t, t, out), x0, *terms, what=f"predict_x0 t={ti} clip={clip}")
            assert_close64(d.eps_from_output(x_t, t, out), eps, x_t, out, what=f"eps_from_output t={ti}")
            if clip:
                bound["low"] |= bool((x0 == torch.tensor(ORACLE_LOW, dtype=torch.float64)).any())
                bound["high"] |= bool((x0 == torch.tensor(ORACLE_HIGH, dtype=torch.float64)).any())
            mean, var = oracle_posterior(betas, ab, ab_prev, ti, x0.float(), x_t)
            got_mean, got_var, got_log = d.q_posterior(x0.float(), x_t, t)
            assert_close64(got_mean, mean, x0, x_t, what=f"posterior mean t={ti}")
            assert abs(float(got_var.flatten()[0]) - var) <= 1e-6 * var, (ti, float(got_var.flatten()[0]), var)  # fp32
            if ti > 0:  # the log-variance p_sample uses; at t = 0 it is clipped to t = 1's (and never used)
                assert abs(float(got_log.flatten()[0]) - math.log(var)) < 1e-5, ti
            # one reverse step: at temperature 0 it is the posterior mean of the x_0 the net implies, whatever t
            step = d.p_sample(x_t.clone(), t, returns, 1.0, cond_state, temperature=0.0)
            assert torch.equal(step[:, 0], cond_state)
            assert_close64(step[:, 1:], mean[:, 1:], x0, x_t, what=f"p_sample mean t={ti}")
            if ti == 0:  # the last step returns the posterior mean, x_0 itself, with no noise at any temperature
                assert_close64(mean, x0, x0, what="the posterior mean at t = 0 is x_0")
                steps = []
                for seed in (1, 2):
                    torch.manual_seed(seed)
                    steps.append(d.p_sample(x_t.clone(), t, returns, 1.0, cond_state, temperature=1.0))
                assert torch.equal(steps[0], steps[1]), "the last reverse step (t = 0) added noise"
                assert_close64(steps[0][:, 1:], x0[:, 1:], x0, what="the last reverse step returns x_0")
            if not clip:  # the training target: eps, or v = sqrt(ab) eps - sqrt(1 - ab) x_0; the first state inpainted
                x0_data, noise = x_t.flip(0), torch.randn(B, H, S, generator=torch.Generator().manual_seed(ti))
                a, s = math.sqrt(ab[ti]), math.sqrt(1 - ab[ti])
                xt = a * x0_data.double() + s * noise.double()
                xt[:, 0] = x0_data[:, 0].double()
                target = noise.double() if prediction == "eps" else a * noise.double() - s * x0_data.double()
                want = float(((0.5 * xt + d.model.b.double() - target)[:, 1:] ** 2).mean())
                got = float(d.loss(x0_data, returns, (t, noise, torch.ones(B))))
                assert abs(got - want) <= 1e-5 * want, (f"loss target t={ti}", got, want)
    assert bound["low"] and bound["high"], f"the clamp's two sides were not both exercised: {bound}"


def test_diffusion_step_noise_has_the_posterior_variance():
    """Catches: a reverse step's noise with the wrong variance (the variance used as a standard deviation, beta_t
    for beta~_t, the clipped log-variance of another step) or without the temperature. For both schedules and
    both parameterizations, at t = 1, T/2 and T - 1 and alpha in {1, 0.5}: the step's mean is known (KnownNet and
    the closed forms), and the residuals of n = N (H - 1) S = 42,000 independent draws (N = 2000 rows, positions
    1..H-1) must have mean-square alpha^2 beta~_t. With the mean known, the mean square of n draws of N(0, v) has
    mean v and standard deviation v sqrt(2 / n) (chi-square with n degrees of freedom, normal at this n): the test
    allows 6 of them (|ratio - 1| < 0.042; a false failure about once in 5e8 runs), and 6 standard errors
    sqrt(v / n) for the residuals' mean."""
    T, H, S, N = 100, 8, 3, 2000
    n = N * (H - 1) * S
    worst = 0.0
    for schedule in ("cosine", "linear"):
        betas, ab, ab_prev = closed_schedule(schedule, T)
        for prediction in ("eps", "v"):
            d = GaussianDiffusion(KnownNet(H, S), H, S, n_timesteps=T, schedule=schedule, prediction=prediction,
                                  clip_denoised=False)
            x_t = torch.randn(1, H, S, generator=torch.Generator().manual_seed(1)).expand(N, H, S).contiguous()
            for ti in (1, T // 2, T - 1):
                x0, _ = oracle_x0_eps(prediction, ab[ti], x_t, 0.5 * x_t + d.model.b)
                mean, var = oracle_posterior(betas, ab, ab_prev, ti, x0, x_t)
                for alpha in (1.0, 0.5):
                    torch.manual_seed(10 + ti)
                    y = d.p_sample(x_t.clone(), torch.full((N,), ti), torch.zeros(N, 1), 1.0, x_t[:, 0], alpha)
                    r = (y.double() - mean)[:, 1:]
                    v = alpha ** 2 * var
                    ratio = float(r.pow(2).mean()) / v
                    worst = max(worst, abs(ratio - 1))
                    assert abs(ratio - 1) < 6 * math.sqrt(2 / n), (schedule, prediction, ti, alpha, ratio)
                    assert abs(float(r.mean())) < 6 * math.sqrt(v / n), (schedule, prediction, ti, alpha)
    print(f"reverse-step noise: worst |mean square / (alpha^2 beta~_t) - 1| = {worst:.4f} "
          f"(allowed {6 * math.sqrt(2 / n):.4f})")


def refine_first_call(d, x_init, k, temperature=1.0, add_noise=True):
    """(t, x_t) of refine's first call to the net, which then stops the chain (d.model is a KnownNet)."""
    d.model.calls.clear()
    d.model.stop_after = 1
    with pytest.raises(StopDenoising):
        d.refine(x_init, k, torch.zeros(x_init.shape[0], 1), w=1.0, add_noise=add_noise, temperature=temperature)
    t, x, _, _ = d.model.calls[0]
    B = x_init.shape[0]  # guidance may batch the conditional and unconditional passes: 2B rows of x
    return t[:B], x[:B]


def test_diffusion_refine_noises_the_plan_to_exactly_level_k():
    """Catches: refine noising the plan to another level than k (q_sample at timestep k - 2 or k instead of k - 1,
    while k steps denoise it), its first denoising step at another timestep than k - 1, the temperature missing
    from (or doubled in) the initial draw, and add_noise=False noising anyway. For every k in 1..T, both schedules
    and alpha in {1, 0.5}, a stand-in net records refine's first call (t and x_t) and stops the chain. Over
    N = 1024 copies of one plan x_0 (entries of magnitude 50..150), x_k must be a draw of
    q(x_k | x_0) = N(sqrt(ab_{k-1}) x_0, v), v = alpha^2 (1 - ab_{k-1}): the slope of the per-entry means on x_0
    within 6 standard errors sqrt(v / (N sum x_0^2)) (+2e-7 for float32 rounding) of sqrt(ab_{k-1}), and the pooled
    variance about those means within 6 standard deviations sqrt(2 / dof) of v. Levels k - 1 and k + 1 are asserted
    to lie more than 2 tolerances away, so a level off by one cannot pass."""
    T, H, S, N = 100, 8, 3, 1024
    g = torch.Generator().manual_seed(0)
    plan0 = (50 + 100 * torch.rand(1, H, S, generator=g)) * torch.randn(1, H, S, generator=g).sign()
    x_init = plan0.expand(N, H, S).contiguous()
    E = (H - 1) * S
    x0 = plan0[0, 1:].double()  # (H-1, S): the entries that are noised
    sum_sq, dof = float(x0.pow(2).sum()), N * E - E
    worst_sep = math.inf
    for schedule in ("cosine", "linear"):
        _, ab, _ = closed_schedule(schedule, T)
        a_level = np.concatenate([[1.0], np.sqrt(ab)])  # level 0..T: sqrt(alpha_bar) of x_k's mean
        d = GaussianDiffusion(KnownNet(H, S), H, S, n_timesteps=T, schedule=schedule)
        for alpha in (1.0, 0.5):
            v_level = alpha ** 2 * np.concatenate([[0.0], 1 - ab])
            for k in range(1, T + 1):
                torch.manual_seed(k)
                t, x = refine_first_call(d, x_init, k, alpha)
                assert (t == k - 1).all(), f"k={k}: the first denoising step ran at t={t[0].item()}, not k - 1"
                assert torch.equal(x[:, 0], x_init[:, 0]), "the current state was noised"
                xe = x[:, 1:].double()  # (N, H-1, S)
                m = xe.mean(0)
                a_hat = float((m * x0).sum()) / sum_sq
                v_hat = float((xe - m).pow(2).sum()) / dof
                tol_a = 6 * math.sqrt(v_level[k] / (N * sum_sq)) + 2e-7
                tol_v = 6 * math.sqrt(2 / dof)
                assert abs(a_hat - a_level[k]) < tol_a, (schedule, alpha, k, a_hat, a_level[k], "mean: wrong level")
                assert abs(v_hat / v_level[k] - 1) < tol_v, (schedule, alpha, k, v_hat, v_level[k], "variance: wrong level")
                for j in (k - 1, k + 1):  # the check can fail: a neighbouring level is rejected by the same bounds
                    if j <= T:
                        sep = max(abs(a_level[j] - a_level[k]) / tol_a, abs(v_level[j] / v_level[k] - 1) / tol_v)
                        worst_sep = min(worst_sep, sep)
        for k in (1, T // 2, T):  # the official variant: the plan is taken as x_k itself, no noise
            t, x = refine_first_call(d, x_init, k, add_noise=False)
            assert (t == k - 1).all() and torch.equal(x, x_init), f"add_noise=False changed the plan (k={k})"
            _, x = refine_first_call(d, x_init, k, temperature=0.0)  # alpha = 0: x_k = sqrt(ab) x_0 exactly
            assert_close64(x[:, 1:], math.sqrt(ab[k - 1]) * x_init[:, 1:].double(), x_init, rel=1e-6,
                           what=f"refine's x_k at alpha = 0, k={k}")
    print(f"refine level: the nearest neighbouring level lies {worst_sep:.1f} tolerances away")
    assert worst_sep > 2


def test_diffusion_temperature_scales_exactly_the_noise():
    """Catches: the temperature alpha left out of, or applied twice to, the draws of sample(): its x_T must be
    alpha z (std alpha, mean 0: the bounds of the variance test, 6 standard deviations of the chi-square), and
    with alpha = 0 both sample() and refine() are deterministic, each the chain of posterior means computed here in
    float64 (sample from x_T = 0, refine from x_k = sqrt(ab_k) x_0), for both parameterizations and schedules.
    Refine's initial draw and each step's noise are scaled by alpha in the two tests above."""
    T, H, S, N = 100, 8, 3, 2000
    n = N * (H - 1) * S
    d = GaussianDiffusion(KnownNet(H, S), H, S, n_timesteps=T)
    cond_state = torch.randn(N, S, generator=torch.Generator().manual_seed(0))
    for alpha in (1.0, 0.5, 0.2):
        d.model.calls.clear()
        d.model.stop_after = 1
        torch.manual_seed(1)
        with pytest.raises(StopDenoising):
            d.sample(cond_state, torch.zeros(N, 1), w=1.0, temperature=alpha)
        t, x, _, _ = d.model.calls[0]
        t, x = t[:N], x[:N]  # guidance may batch the conditional and unconditional passes: 2N rows
        assert (t == T - 1).all() and torch.equal(x[:, 0], cond_state)
        z = x[:, 1:].double() / alpha
        assert abs(float(z.pow(2).mean()) - 1) < 6 * math.sqrt(2 / n), (alpha, float(z.std()), "x_T is not alpha z")
        assert abs(float(z.mean())) < 6 / math.sqrt(n)
    # alpha = 0: no draw is left, and the result is the chain of posterior means
    B = 3
    x_init = torch.randn(B, H, S, generator=torch.Generator().manual_seed(2))
    for schedule in ("cosine", "linear"):
        betas, ab, ab_prev = closed_schedule(schedule, T)
        for prediction in ("eps", "v"):
            d = GaussianDiffusion(KnownNet(H, S), H, S, n_timesteps=T, schedule=schedule, prediction=prediction)
            low, high = d.x_low.tolist(), d.x_high.tolist()  # the default clamp, +-10
            for k in (T, 7):
                x = torch.zeros(B, H, S, dtype=torch.float64) if k == T else math.sqrt(ab[k - 1]) * x_init.double()
                x[:, 0] = x_init[:, 0].double()
                for ti in range(k - 1, -1, -1):
                    x0, _ = oracle_x0_eps(prediction, ab[ti], x, 0.5 * x + d.model.b.double(), low, high)
                    x, _ = oracle_posterior(betas, ab, ab_prev, ti, x0, x)
                    x[:, 0] = x_init[:, 0].double()
                got = []
                for seed in (3, 4):
                    torch.manual_seed(seed)
                    got.append(d.sample(x_init[:, 0], torch.zeros(B, 1), w=1.0, temperature=0.0) if k == T else
                               d.refine(x_init, k, torch.zeros(B, 1), w=1.0, temperature=0.0))
                assert torch.equal(got[0], got[1]), f"alpha = 0 is not deterministic ({schedule}, {prediction}, k={k})"
                assert_close64(got[0], x, x, rel=1e-4, what=f"alpha = 0 chain ({schedule}, {prediction}, k={k})")


# ====================================================================================================
# data
# ====================================================================================================
ROOT = pathlib.Path(data.__file__).resolve().parent


def write_d4rl(path, n=20, obs_dim=11, act_dim=3, terminals=None, timeouts="auto", next_obs=True, seed=0, **override):
    """A small D4RL-layout hdf5 file. `timeouts=None` leaves the key out; `override` replaces (or, if None, drops) keys."""
    rng = np.random.default_rng(seed)
    arrays = {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": np.zeros(n, bool) if terminals is None else np.asarray(terminals),
    }
    if timeouts is not None:
        arrays["timeouts"] = np.zeros(n, bool) if isinstance(timeouts, str) else np.asarray(timeouts)
    if next_obs:
        arrays["next_observations"] = rng.normal(size=(n, obs_dim)).astype(np.float32)
    arrays.update(override)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if v is not None:
                f.create_dataset(k, data=v)
    return {k: v for k, v in arrays.items() if v is not None}


def flags(n, at):
    x = np.zeros(n, bool)
    x[list(at)] = True
    return x


def one_line_error(fn, *words):
    with pytest.raises(data.UsageError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------ episodes
def test_data_episodes_terminal_timeout_and_partial(tmp_path):
    p = tmp_path / "hop.hdf5"
    a = write_d4rl(p, n=16, terminals=flags(16, [4]), timeouts=flags(16, [11]))
    d = data.load("hopper-medium-v2", path=p)
    assert d.episode_starts.tolist() == [0, 5, 12]
    assert d.episode_lengths.tolist() == [5, 7, 4]
    assert d.episode_terminal.tolist() == [True, False, False]
    assert len(d.observations) == 16  # timeout transitions are kept (the official loader drops them)
    want = [a["rewards"][0:5].sum(), a["rewards"][5:12].sum(), a["rewards"][12:].sum()]
    print("max return diff", np.abs(d.episode_returns - want).max())
    np.testing.assert_allclose(d.episode_returns, want, rtol=1e-6)
    assert any("partial episode" in n for n in d.notes)
    s = d.summary()
    assert "16 transitions" in s and "3 episodes" in s


def test_data_no_timeouts_key_cuts_at_max_steps(tmp_path):
    p = tmp_path / "kitchen.hdf5"
    write_d4rl(p, n=700, obs_dim=59, act_dim=9, terminals=flags(700, [99]), timeouts=None)
    d = data.load("kitchen-mixed-v0", path=p)  # FrankaKitchen-v1 episodes have 280 steps
    assert d.episode_starts.tolist() == [0, 100, 380, 660]
    assert d.episode_lengths.tolist() == [100, 280, 280, 40]
    assert d.episode_terminal.tolist() == [True, False, False, False]
    assert any("no timeouts key" in n and "280" in n for n in d.notes)
    assert "no timeouts key" in d.summary()


def test_data_float_flags_and_float64_without_next_observations(tmp_path):
    p = tmp_path / "pen.hdf5"
    rng = np.random.default_rng(1)
    obs, act, rew = rng.normal(size=(30, 45)), rng.normal(size=(30, 24)), rng.normal(size=30)
    write_d4rl(p, n=30, obs_dim=45, act_dim=24, next_obs=False, observations=obs, actions=act, rewards=rew,
               terminals=flags(30, [9]).astype(np.float32), timeouts=flags(30, [29]).astype(np.float64))
    d = data.load("pen-human-v1", path=p)
    assert d.observations.dtype == np.float32 and d.actions.dtype == np.float32 and d.rewards.dtype == np.float32
    assert d.next_observations is None and any("next_observations" in n for n in d.notes)
    print("max obs diff", np.abs(d.observations - obs).max())
    np.testing.assert_allclose(d.observations, obs, rtol=1e-6)
    assert d.episode_lengths.tolist() == [10, 20] and d.episode_terminal.tolist() == [True, False]
    # without next_observations the next state is the following step, unknown at an episode's last step
    s = data.WindowSampler(d, length=4)
    b = s.sample(256, torch.Generator().manual_seed(0))
    norm = d.normalizer.normalize(d.observations)
    pos = b["start"][:, None] + torch.arange(4)
    for i in range(256):
        for j in range(4):
            t = int(pos[i, j])
            if b["next_mask"][i, j] == 1:
                assert t not in (9, 29)
                assert torch.allclose(b["next_states"][i, j], torch.as_tensor(norm[t + 1]), atol=1e-6)
            elif b["mask"][i, j] == 1:
                assert t in (9, 29)


def test_data_next_observations_used_at_last_step(tmp_path):
    p = tmp_path / "hop.hdf5"
    a = write_d4rl(p, n=10, terminals=flags(10, [4]), timeouts=flags(10, [9]))
    d = data.load("hopper-medium-v2", path=p)
    s = data.WindowSampler(d, length=3)
    b = s.sample(128, torch.Generator().manual_seed(0))
    norm_next = d.normalizer.normalize(a["next_observations"])
    last = torch.where(b["start"] < 5, 4, 9)  # (B,) last step of each window's episode
    pos = torch.minimum(b["start"][:, None] + torch.arange(3), last[:, None])  # (B, L)
    want = torch.as_tensor(norm_next)[pos]
    real = b["mask"].bool()
    print("max next_states diff", (b["next_states"][real] - want[real]).abs().max().item())
    assert torch.allclose(b["next_states"][real], want[real], atol=1e-6)
    assert torch.equal(b["next_mask"], b["mask"])  # next state known at every real step


# ------------------------------------------------------------------------------------------ validation
def test_data_missing_key(tmp_path):
    p = tmp_path / "f.hdf5"
    write_d4rl(p, rewards=None)
    one_line_error(lambda: data.load("hopper-medium-v2", path=p), str(p), "'rewards'", "missing")


def test_data_mismatched_lengths(tmp_path):
    p = tmp_path / "f.hdf5"
    write_d4rl(p, actions=np.zeros((19, 3), np.float32))
    one_line_error(lambda: data.load("hopper-medium-v2", path=p), str(p), "'actions'", "19")


def test_data_wrong_dims(tmp_path):
    p = tmp_path / "f.hdf5"
    write_d4rl(p, obs_dim=17)
    one_line_error(lambda: data.load("hopper-medium-v2", path=p), str(p), "'observations'", "11", "Hopper-v4")
    write_d4rl(p, act_dim=6)
    one_line_error(lambda: data.load("hopper-medium-v2", path=p), str(p), "'actions'", "3")


def test_data_nan_and_inf(tmp_path):
    p = tmp_path / "f.hdf5"
    obs = np.zeros((20, 11), np.float32)
    obs[3, 2] = np.nan
    write_d4rl(p, observations=obs)
    one_line_error(lambda: data.load("hopper-medium-v2", path=p), str(p), "'observations'", "NaN")
    rew = np.zeros(20, np.float32)
    rew[7] = np.inf
    write_d4rl(p, rewards=rew)
    one_line_error(lambda: data.load("hopper-medium-v2", path=p), str(p), "'rewards'", "inf")


def test_data_bad_flags(tmp_path):
    p = tmp_path / "f.hdf5"
    write_d4rl(p, terminals=np.full(20, 2.0))
    one_line_error(lambda: data.load("hopper-medium-v2", path=p), str(p), "'terminals'", "0/1")


def test_data_empty_dataset_and_empty_file(tmp_path):
    p = tmp_path / "f.hdf5"
    write_d4rl(p, n=0)
    one_line_error(lambda: data.load("hopper-medium-v2", path=p), str(p), "empty")
    q = tmp_path / "zero.hdf5"
    q.write_bytes(b"")
    one_line_error(lambda: data.load("hopper-medium-v2", path=q), str(q), "corrupt")


def test_data_truncated_file(tmp_path):
    p = tmp_path / "f.hdf5"
    write_d4rl(p, n=5000)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    one_line_error(lambda: data.load("hopper-medium-v2", path=p), str(p), "truncated or corrupt")


def test_data_missing_path(tmp_path):
    p = tmp_path / "nope.hdf5"
    one_line_error(lambda: data.load("hopper-medium-v2", path=p), str(p), "does not exist", "--dataset")


def test_data_unknown_name_suggests():
    msg = one_line_error(lambda: sources.get_info("hoper-medium-v2"), "hoper-medium-v2", "hopper-medium-v2", "--list")
    print(msg)


# ------------------------------------------------------------------------------------------ returns-to-go
def test_data_returns_to_go_hand_computed(tmp_path):
    np.testing.assert_allclose(data.returns_to_go([1.0, 2.0, 3.0, 4.0]), [10.0, 9.0, 7.0, 4.0])
    # discount 0.5: R3 = 4, R2 = 3 + 2 = 5, R1 = 2 + 2.5 = 4.5, R0 = 1 + 2.25 = 3.25
    np.testing.assert_allclose(data.returns_to_go([1.0, 2.0, 3.0, 4.0], 0.5), [3.25, 4.5, 5.0, 4.0])
    p = tmp_path / "f.hdf5"
    rew = np.array([1, 2, 3, 4, 10, 20], np.float32)  # two episodes: [1, 2, 3, 4] and [10, 20]
    write_d4rl(p, n=6, rewards=rew, timeouts=flags(6, [3, 5]))
    d = data.load("hopper-medium-v2", path=p, rtg_scale=10.0)
    np.testing.assert_allclose(d.rtg, [1.0, 0.9, 0.7, 0.4, 3.0, 2.0], rtol=1e-6)
    d = data.load("hopper-medium-v2", path=p, rtg_scale=10.0, discount=0.5)
    print("max rtg diff", np.abs(d.rtg - [0.325, 0.45, 0.5, 0.4, 2.0, 2.0]).max())
    np.testing.assert_allclose(d.rtg, [0.325, 0.45, 0.5, 0.4, 2.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(d.episode_returns, [10.0, 30.0])  # returns stay raw and undiscounted
    # the denoiser's condition: its own discount, raw, independent of the transformer's
    d = data.load("hopper-medium-v2", path=p, rtg_scale=10.0, cond_discount=0.5)
    np.testing.assert_allclose(d.rtg, [1.0, 0.9, 0.7, 0.4, 3.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(d.cond_rtg, [3.25, 4.5, 5.0, 4.0, 20.0, 20.0], rtol=1e-6)
    w = data.WindowSampler(d, 3).sample(64, torch.Generator().manual_seed(0))
    expect = torch.as_tensor(d.cond_rtg)[w["start"]]
    assert torch.allclose(w["cond_rtg"][:, 0, 0], expect)


# ------------------------------------------------------------------------------------------ windows
def mixed_file(tmp_path, seed=0):
    """Episodes of many lengths (some shorter than the window), ending on terminals, timeouts and the data end."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 25, size=40)
    ends = np.cumsum(lengths) - 1
    n = int(lengths.sum()) + 6  # 6 more steps: a partial episode at the end
    is_term = rng.random(40) < 0.5
    p = tmp_path / "mixed.hdf5"
    write_d4rl(p, n=n, terminals=flags(n, ends[is_term]), timeouts=flags(n, ends[~is_term]), seed=seed)
    return p


def test_data_windows_stay_inside_episodes(tmp_path):
    d = data.load("hopper-medium-v2", path=mixed_file(tmp_path))
    L = 8
    s = data.WindowSampler(d, length=L)
    # valid starts follow the documented rule, computed here by a plain loop
    want = []
    for st, n, term in zip(d.episode_starts, d.episode_lengths, d.episode_terminal):
        want += [st + k for k in range(n if term else max(n - L, 0) + 1)]
    assert s.starts.tolist() == want and len(s) == len(want)
    b = s.sample(4096, torch.Generator().manual_seed(0))
    pos = (b["start"][:, None] + torch.arange(L)).numpy()
    ep = np.searchsorted(d.episode_starts, pos, side="right") - 1  # (B, L) episode id of each position
    real = b["mask"].numpy() == 1
    assert real[:, 0].all()
    assert (ep[real] == np.broadcast_to(ep[:, :1], ep.shape)[real]).all(), "a window crosses an episode boundary"
    norm = torch.as_tensor(d.normalizer.normalize(d.observations))
    diff = (b["states"][torch.as_tensor(real)] - norm[pos[real]]).abs().max().item()
    print("max window state diff", diff)
    assert diff < 1e-6
    assert torch.allclose(b["rtg"][..., 0][torch.as_tensor(real)], torch.as_tensor(d.rtg[pos[real]]))
    assert b["states"].shape == (4096, L, 11) and b["actions"].shape == (4096, L, 3) and b["rtg"].shape == (4096, L, 1)


def test_data_padding_repeats_last_state_masked(tmp_path):
    p = tmp_path / "f.hdf5"
    # episode 0: 3 steps ending on a terminal; episode 1: 2 steps ending on a timeout (shorter than the window)
    write_d4rl(p, n=5, terminals=flags(5, [2]), timeouts=flags(5, [4]))
    d = data.load("hopper-medium-v2", path=p)
    s = data.WindowSampler(d, length=5)
    assert s.starts.tolist() == [0, 1, 2, 3]
    b = s.sample(64, torch.Generator().manual_seed(0))
    norm = torch.as_tensor(d.normalizer.normalize(d.observations))
    seen = set()
    for i in range(64):
        st = int(b["start"][i])
        seen.add(st)
        last, terminal_ep = (2, True) if st < 3 else (4, False)
        n_real = last - st + 1
        assert b["mask"][i].tolist() == [1.0] * n_real + [0.0] * (5 - n_real)
        pad = slice(n_real, 5)
        assert torch.equal(b["states"][i, pad], norm[last].expand(5 - n_real, -1))  # repeats the last state
        assert (b["actions"][i, pad] == 0).all() and (b["rtg"][i, pad] == 0).all()
        assert (b["next_mask"][i, pad] == 0).all()
        want_terminal = [terminal_ep and j >= n_real - 1 for j in range(5)]  # the terminal step and its padding
        assert b["terminal"][i].tolist() == want_terminal
    assert seen == {0, 1, 2, 3}


def test_data_same_seed_same_batch(tmp_path):
    d = data.load("hopper-medium-v2", path=mixed_file(tmp_path))
    s = data.WindowSampler(d, length=6)
    a = s.sample(32, torch.Generator().manual_seed(7))
    b = s.sample(32, torch.Generator().manual_seed(7))
    c = s.sample(32, torch.Generator().manual_seed(8))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["start"], c["start"])
    g = torch.Generator().manual_seed(3)  # a saved generator state reproduces the continuation
    s.sample(32, g)
    state = g.get_state()
    x = s.sample(32, g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(x["start"], s.sample(32, g2)["start"])


# ------------------------------------------------------------------------------------------ normalizer, scores
def test_data_normalizer_roundtrip_and_constant_dim():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(500, 4))
    x[:, 2] = 5.0  # a constant dimension
    n = data.Normalizer.fit(x)
    assert float(n.std[2]) == pytest.approx(data.Normalizer.STD_FLOOR) and n.n_floored == 1
    z = n.normalize(x)
    assert np.abs(z[:, 2]).max() < 1e-5 and np.abs(z[:, [0, 1, 3]].mean(0)).max() < 1e-5
    np.testing.assert_allclose(z[:, [0, 1, 3]].std(0), 1.0, rtol=1e-5)
    back = n.unnormalize(z)
    print("max numpy roundtrip diff", np.abs(back - x).max())
    assert np.abs(back - x).max() < 1e-4
    t = torch.as_tensor(x, dtype=torch.float32).reshape(50, 10, 4)  # (B, H, S)
    zt = n.normalize(t)
    assert zt.dtype == torch.float32 and zt.shape == (50, 10, 4)
    print("max numpy/torch diff", (zt.reshape(500, 4) - torch.as_tensor(z, dtype=torch.float32)).abs().max().item())
    assert torch.allclose(zt.reshape(500, 4), torch.as_tensor(z, dtype=torch.float32), atol=1e-5)
    m = data.Normalizer.from_state_dict(n.state_dict())
    assert torch.equal(m.mean, n.mean) and torch.equal(m.std, n.std)
    assert all(torch.is_tensor(v) for v in n.state_dict().values())


def test_data_normalizer_range_both_bounds_per_dimension():
    """Catches: the x_0 clamp's range wrong on either side: Normalizer.fit's low or high other than each dimension's
    data minimum or maximum in normalized units (min and max swapped or shared, a bound not divided by the std), or
    config.model_args handing the denoiser low and high swapped; and normalize/unnormalize not round-tripping.
    Data with a known minimum and maximum per dimension, each at its own row; the denoiser built along plan.py's
    path (model_args -> build_networks) clamps a huge positive x_0 to every dimension's high and a huge negative
    one to its low. Both normalizers: ours (std floored) and the official one (std + 1e-5)."""
    rng = np.random.default_rng(3)
    lo, hi = np.array([-3.0, 0.5, -10.0, 2.0]), np.array([5.0, 0.75, -4.0, 9.0])
    S = len(lo)
    x = lo + (hi - lo) * rng.uniform(0.05, 0.95, size=(300, S))  # strictly inside the range ...
    for i in range(S):  # ... but for one row per dimension and bound, each its own row
        x[10 + i, i], x[200 + i, i] = lo[i], hi[i]
    for eps in (0.0, 1e-5):
        n = data.Normalizer.fit(x, eps)
        mean, std = x.mean(0), x.std(0) + eps  # every std here lies above the floor
        np.testing.assert_allclose(n.mean.numpy(), mean, rtol=1e-6)
        np.testing.assert_allclose(n.std.numpy(), std, rtol=1e-6)
        np.testing.assert_allclose(n.low.numpy(), (lo - mean) / std, rtol=1e-6, atol=1e-6, err_msg="low bound")
        np.testing.assert_allclose(n.high.numpy(), (hi - mean) / std, rtol=1e-6, atol=1e-6, err_msg="high bound")
        z = n.normalize(x)
        np.testing.assert_allclose(z.min(0), n.low.numpy(), atol=1e-5)  # the bounds are attained, per dimension
        np.testing.assert_allclose(z.max(0), n.high.numpy(), atol=1e-5)
        np.testing.assert_allclose(n.unnormalize(z), x, rtol=1e-6, atol=1e-6)  # the round trip, numpy
        zt = n.normalize(torch.as_tensor(x, dtype=torch.float32))
        assert torch.allclose(n.unnormalize(zt).double(), torch.as_tensor(x), rtol=1e-5, atol=1e-5)  # torch
        assert torch.allclose(zt.double(), torch.as_tensor(z), atol=1e-5)
    cfg = config.Config(horizon=4, context=3, unet_dim=8, unet_mults="1,2", tf_half_dim=8, tf_layers=1, tf_heads=2,
                        tf_ffn=16, invdyn_hidden=16, use_critic=False)
    den = config.build_networks(config.model_args(cfg, S, 2, n))["ema"]
    t = torch.full((2,), 50)
    big = torch.tensor([-1e4, 1e4])[:, None, None].expand(2, 4, S)  # v-prediction: x_0 = sqrt(ab) x_t - sqrt(1-ab) v
    x0 = den.predict_x0(torch.zeros(2, 4, S), t, big)
    assert torch.equal(x0[0], n.high.expand(4, S)) and torch.equal(x0[1], n.low.expand(4, S)), (x0[:, 0], n.low, n.high)


def test_data_reference_scores_equal_d4rl_infos():
    ref = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3),
           "pen": (96.262799, 3076.8331017826877), "hammer": (-274.856578, 12794.134825156867),
           "door": (-56.512833, 2880.5693087298737), "relocate": (-6.425911, 4233.877797728884),
           "kitchen": (0.0, 4.0)}
    assert len(sources.DATASETS) == 15 + 12 + 3 + 3  # D4RL locomotion, Adroit, Kitchen, bundled
    for name, info in sources.DATASETS.items():
        assert (info.ref_min, info.ref_max) == ref[name.split("-")[0]], name
    assert sources.normalized_score("hopper-medium-v2", 3234.3) == pytest.approx(100.0)
    np.testing.assert_allclose(sources.normalized_score("kitchen-mixed-v0", np.array([0.0, 2.0, 4.0])), [0, 50, 100])
    assert sources.get_info("pen-human-v1").url == "http://rail.eecs.berkeley.edu/datasets/offline_rl/hand_dapg_v1/pen-human-v1.hdf5"
    assert sources.get_info("walker2d-medium-replay-v2").url.endswith("/gym_mujoco_v2/walker2d_medium_replay-v2.hdf5")


def test_data_bundled_dataset_matches_readme():
    d = data.load("halfcheetah-medium-sb3")
    assert len(d.observations) == 100000 and len(d.episode_lengths) == 100
    with h5py.File(ROOT / "datasets" / "halfcheetah-medium-sb3.hdf5") as f:
        recorded = f["metadata/episode_returns"][()]
    print("max episode return diff vs metadata", np.abs(d.episode_returns - recorded).max())
    np.testing.assert_allclose(d.episode_returns, recorded, rtol=1e-4)
    assert d.episode_returns.mean() == pytest.approx(3951.9, abs=0.05)
    assert sources.normalized_score("halfcheetah-medium-sb3", d.episode_returns.mean()) == pytest.approx(34.1, abs=0.05)
    s = d.summary()
    assert "100000 transitions" in s and "100 episodes" in s


# ------------------------------------------------------------------------------------------ download, minari
def test_data_download_failure_one_line(tmp_path):
    url = "http://127.0.0.1:9/x.hdf5"  # the discard port: refused at once, never leaves the machine
    dest = tmp_path / "cache" / "x.hdf5"
    one_line_error(lambda: sources.download(url, dest, timeout=0.5), url, str(dest), "--dataset")
    assert not dest.exists() and not list(dest.parent.glob("*.part"))


def test_data_download_failure_through_load(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    info = sources.get_info("hopper-medium-v2")
    one_line_error(lambda: data.load("hopper-medium-v2"), info.url, str(tmp_path / info.filename), "--dataset")
    one_line_error(lambda: data.load("hopper-medium-v2", download=False), str(tmp_path / info.filename))


def test_data_download_checks_file_before_rename(tmp_path):
    src = tmp_path / "src.hdf5"
    write_d4rl(src, n=50)
    dest = tmp_path / "cache" / "hopper_medium-v2.hdf5"
    sources.download(src.as_uri(), dest)  # file:// URL: the same streaming path, no network
    assert dest.read_bytes() == src.read_bytes()
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(src.read_bytes()[:1000])
    dest2 = tmp_path / "cache" / "other.hdf5"
    one_line_error(lambda: sources.download(bad.as_uri(), dest2), bad.as_uri(), str(dest2))
    assert not dest2.exists() and not list(dest2.parent.glob("*.part"))


class FakeEpisode:
    def __init__(self, T, terminated, rng):
        self.observations = {"observation": rng.normal(size=(T + 1, 59)),
                             "achieved_goal": {"microwave": rng.normal(size=(T + 1, 1))}}
        self.actions = rng.normal(size=(T, 9)).astype(np.float32)
        self.rewards = rng.integers(0, 2, size=T).astype(np.float64)
        self.terminations = flags(T, [T - 1] if terminated else [])
        self.truncations = np.zeros(T, bool)  # the last episode ends with neither flag set


def test_data_kitchen_from_minari(monkeypatch):
    rng = np.random.default_rng(0)
    eps = [FakeEpisode(50, True, rng), FakeEpisode(30, False, rng)]
    fake = types.SimpleNamespace(load_dataset=lambda i, download=False: types.SimpleNamespace(
        iterate_episodes=lambda: iter(eps), spec=types.SimpleNamespace(data_path=f"/minari/{i}")))
    monkeypatch.setitem(sys.modules, "minari", fake)
    d = data.load("kitchen-partial-v0")
    assert str(d.path) == "/minari/D4RL/kitchen/partial-v2"
    assert d.episode_lengths.tolist() == [50, 30] and d.episode_terminal.tolist() == [True, False]
    np.testing.assert_allclose(d.observations[:50], eps[0].observations["observation"][:50], rtol=1e-6)
    np.testing.assert_allclose(d.next_observations[50:], eps[1].observations["observation"][1:], rtol=1e-6)
    np.testing.assert_allclose(d.episode_returns, [eps[0].rewards.sum(), eps[1].rewards.sum()])
    monkeypatch.setitem(sys.modules, "minari", None)  # not installed
    one_line_error(lambda: data.load("kitchen-partial-v0"), "kitchen-partial-v0", "pip install minari", "--dataset")


# ------------------------------------------------------------------------------------------ CLI
def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "D4RL_DATASET_DIR": "/nonexistent-d4rl"})


def test_data_cli_list_and_summary():
    r = run_cli("--list")
    assert r.returncode == 0, r.stderr
    for name, info in sources.DATASETS.items():
        line = next(l for l in r.stdout.splitlines() if l.split()[0] == name)
        assert info.env_id in line and f" {info.obs_dim} " in line and f" {info.act_dim} " in line
    r = run_cli("--env", "halfcheetah-medium-sb3")
    assert r.returncode == 0, r.stderr
    assert "100000 transitions" in r.stdout and "100 episodes" in r.stdout and "normalized" in r.stdout


def test_data_cli_error_is_one_line():
    r = run_cli("--env", "halfcheetah-medum-v2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "halfcheetah-medium-v2" in r.stderr
    r = run_cli("--env", "hopper-medium-v2", "--no-download")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "/nonexistent-d4rl/hopper_medium-v2.hdf5" in r.stderr


def test_data_make_env_delegates_to_envs():
    info = sources.get_info("halfcheetah-medium-sb3")
    env = data.make_env("halfcheetah-medium-sb3", seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (info.obs_dim,) and env.action_space.shape == (info.act_dim,)
    env.close()


# ====================================================================================================
# envs
# ====================================================================================================
ALL_INFOS = list(sources.DATASETS.values())


def _id(kind, model, name):
    obj = {"body": mujoco.mjtObj.mjOBJ_BODY, "site": mujoco.mjtObj.mjOBJ_SITE, "joint": mujoco.mjtObj.mjOBJ_JOINT}
    i = mujoco.mj_name2id(model, obj[kind], name)
    assert i >= 0, f"{name} not in model"
    return i


@pytest.mark.parametrize("info", ALL_INFOS, ids=lambda i: i.name)
def test_envs_build_reset_step(info):
    env = data.make_env(info.name, seed=0)
    assert env.observation_space.shape == (info.obs_dim,) and env.action_space.shape == (info.act_dim,)
    obs, _ = env.reset()
    assert obs.shape == (info.obs_dim,) and np.all(np.isfinite(obs))
    first = obs.copy()
    for _ in range(3):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert obs.shape == (info.obs_dim,) and np.all(np.isfinite(obs)) and math.isfinite(reward)
        assert not truncated  # every limit is >= 100 steps
    assert not np.array_equal(obs, first)  # the sim moved
    assert env.spec.max_episode_steps == info.max_episode_steps
    env.close()


@pytest.mark.parametrize("name", ["hopper-medium-v2", "relocate-human-v1", "kitchen-mixed-v0"])
def test_envs_seeding(name):
    def rollout(seed, reset_seed=None):
        env = data.make_env(name, seed=seed)
        first, _ = env.reset(seed=reset_seed)
        actions = [env.action_space.sample() for _ in range(2)]
        stepped = [env.step(a)[0] for a in actions]
        second, _ = env.reset()  # no seed: continues the env's stream
        return first, np.concatenate([*actions, *stepped, second])

    (a0, a), (b0, b), (c0, c) = rollout(3), rollout(3), rollout(4)
    assert np.array_equal(a0, b0) and np.array_equal(a, b)
    assert not np.array_equal(a0, c0) and not np.array_equal(a, c)
    assert np.array_equal(rollout(4, reset_seed=3)[0], a0)  # an explicit reset seed wins


# ----------------------------------------------------------------------------- Adroit

def _d4rl_reward(task, m, d):
    """D4RL hand_manipulation_suite/{pen,door,hammer,relocate}_v0.py reward, written out from the sim state."""
    palm = d.site_xpos[_id("site", m, "S_grasp")]
    if task == "pen":
        obj = d.xpos[_id("body", m, "Object")]
        goal = d.site_xpos[_id("site", m, "eps_ball")]
        top, bot = d.site_xpos[_id("site", m, "object_top")], d.site_xpos[_id("site", m, "object_bottom")]
        ttop, tbot = d.site_xpos[_id("site", m, "target_top")], d.site_xpos[_id("site", m, "target_bottom")]
        dist = np.linalg.norm(obj - goal)
        sim = np.dot((top - bot) / np.linalg.norm(top - bot), (ttop - tbot) / np.linalg.norm(ttop - tbot))
        r = -dist + sim + 10 * (dist < 0.075 and sim > 0.9) + 50 * (dist < 0.075 and sim > 0.95)
        return r - 5 * (obj[2] < 0.075)
    if task == "door":
        handle = d.site_xpos[_id("site", m, "S_handle")]
        door = d.qpos[m.jnt_qposadr[_id("joint", m, "door_hinge")]]
        r = -0.1 * np.linalg.norm(palm - handle) - 0.1 * (door - 1.57) ** 2 - 1e-5 * np.sum(d.qvel ** 2)
        return r + 2 * (door > 0.2) + 8 * (door > 1.0) + 10 * (door > 1.35)
    if task == "hammer":
        obj = d.xpos[_id("body", m, "Object")]
        tool, nail = d.site_xpos[_id("site", m, "tool")], d.site_xpos[_id("site", m, "S_target")]
        goal = d.site_xpos[_id("site", m, "nail_goal")]
        r = -0.1 * np.linalg.norm(palm - obj) - np.linalg.norm(tool - nail) - 10 * np.linalg.norm(nail - goal)
        r -= 1e-2 * np.linalg.norm(d.qvel)
        r += 2 * (obj[2] > 0.04 and tool[2] > 0.04)
        return r + 25 * (np.linalg.norm(nail - goal) < 0.02) + 75 * (np.linalg.norm(nail - goal) < 0.01)
    obj, target = d.xpos[_id("body", m, "Object")], d.site_xpos[_id("site", m, "target")]  # relocate
    r = -0.1 * np.linalg.norm(palm - obj)
    if obj[2] > 0.04:
        r += 1.0 - 0.5 * np.linalg.norm(palm - target) - 0.5 * np.linalg.norm(obj - target)
    return r + 10 * (np.linalg.norm(obj - target) < 0.1) + 20 * (np.linalg.norm(obj - target) < 0.05)


@pytest.mark.parametrize("task", ["pen", "door", "hammer", "relocate"])
def test_envs_adroit_reward_matches_d4rl(task):
    env = data.make_env(f"{task}-expert-v1", seed=1)
    env.reset()
    m, d = env.unwrapped.model, env.unwrapped.data
    diffs = []
    for _ in range(5):
        _, reward, _, _, _ = env.step(env.action_space.sample())
        diffs.append(abs(reward - _d4rl_reward(task, m, d)))
    print(f"{task}: max |wrapped reward - D4RL formula| = {max(diffs):.3e}")
    assert max(diffs) < 1e-10
    if task != "pen":  # gymnasium-robotics' own reward, from the same state and action, has the flipped sign
        a, qpos, qvel = env.action_space.sample(), d.qpos.copy(), d.qvel.copy()
        raw = env.unwrapped.step(a)[1]
        env.unwrapped.set_state(qpos, qvel)
        assert raw - env.step(a)[1] > 1e-3  # = 0.2 * ||palm - object||


def test_envs_pen_truncates_at_100_steps():
    env = data.make_env("pen-human-v1", seed=0)
    env.reset()
    for t in range(1, 101):
        _, _, terminated, truncated, _ = env.step(np.zeros(24, dtype=np.float32))  # mid-range action holds the pen
        assert not terminated
        assert truncated == (t == 100)


def test_envs_pen_terminates_on_drop():
    env = data.make_env("pen-human-v1", seed=0)
    env.reset()
    m, d = env.unwrapped.model, env.unwrapped.data
    _, r_up, terminated, _, _ = env.step(np.zeros(24, dtype=np.float32))
    assert not terminated and d.xpos[_id("body", m, "Object")][2] > envs.PEN_DROP_HEIGHT
    qpos, qvel = d.qpos.copy(), d.qvel.copy()
    # lower the pen by 0.2 along the world z axis (~0.24 -> ~0.04, below D4RL's 0.075): the slide joint
    # OBJT* is expressed in the pen's rotated frame, so pick the one whose world axis is vertical
    slide = [_id("joint", m, f"OBJT{c}") for c in "xyz"]
    j = max(slide, key=lambda j: abs(d.xaxis[j][2]))
    qpos[m.jnt_qposadr[j]] -= 0.2 * np.sign(d.xaxis[j][2])
    env.unwrapped.set_state(qpos, qvel)
    _, reward, terminated, truncated, _ = env.step(np.zeros(24, dtype=np.float32))
    z = d.xpos[_id("body", m, "Object")][2]
    print(f"pen z after the drop: {z:.4f}; reward {reward:.4f} vs formula {_d4rl_reward('pen', m, d):.4f}")
    assert z < envs.PEN_DROP_HEIGHT and terminated and not truncated
    assert abs(reward - _d4rl_reward("pen", m, d)) < 1e-10 and reward < r_up - 4  # the -5 drop penalty


# ----------------------------------------------------------------------------- legacy dynamics

LOCO_V2 = ["halfcheetah-medium-v2", "hopper-medium-v2", "walker2d-medium-v2"]


def _old_capsule_model(xml_path):
    """Compile the XML with every capsule as MuJoCo < 2.1.2 weighed it: a cylinder of half-height l + r/2."""
    spec = mujoco.MjSpec.from_file(xml_path)
    for g in spec.geoms:
        if g.type == mujoco.mjtGeom.mjGEOM_CAPSULE:
            g.type = mujoco.mjtGeom.mjGEOM_CYLINDER
            if np.isnan(g.fromto[0]):
                g.size[1] += g.size[0] / 2
            else:  # HalfCheetah's torso: a fromto capsule, lengthened by r/2 at each end
                a, b = np.array(g.fromto[:3]), np.array(g.fromto[3:])
                u = (b - a) / np.linalg.norm(b - a) * g.size[0] / 2
                g.fromto[:3], g.fromto[3:] = a - u, b + u
    return spec.compile()


@pytest.mark.parametrize("name,heavier", [("halfcheetah-medium-v2", 0.0), ("hopper-medium-v2", 0.036),
                                          ("walker2d-medium-v2", 0.043)])
def test_envs_legacy_dynamics(name, heavier):
    new = data.make_env(name, legacy_dynamics=False).unwrapped
    env = data.make_env(name, legacy_dynamics=True)
    m = env.unwrapped.model
    table = envs.LEGACY_BODY_INERTIA[sources.DATASETS[name].env_id]
    for body, (mass, inertia, *frame) in table.items():
        b = _id("body", m, body)
        assert m.body_mass[b] == mass and np.array_equal(m.body_inertia[b], inertia)
        if frame:
            assert np.array_equal(m.body_ipos[b], frame[0]) and np.array_equal(m.body_iquat[b], frame[1])
    ratio = new.model.body_mass.sum() / m.body_mass.sum() - 1
    print(f"{name}: MuJoCo 3 bodies are {100 * ratio:.2f}% heavier than the legacy ones")
    assert abs(ratio - heavier) < 1e-3
    # oracle: MuJoCo's own compile of the old cylinder approximation, and the mass matrix at a random state
    old = _old_capsule_model(env.unwrapped.fullpath)
    fields = ["body_mass", "body_inertia", "body_ipos", "body_iquat", "body_subtreemass", "body_invweight0",
              "dof_invweight0", "dof_M0", "actuator_acc0"]
    worst = max(np.abs(getattr(m, f) - getattr(old, f)).max() for f in fields)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    full = []
    for model in (m, old):  # (nv, nv) joint-space inertia at the stepped state
        d = mujoco.MjData(model)
        d.qpos[:], d.qvel[:] = env.unwrapped.data.qpos, env.unwrapped.data.qvel
        mujoco.mj_forward(model, d)
        full.append(np.zeros((model.nv, model.nv)))
        mujoco.mj_fullM(model, d, full[-1])
    worst_qm = np.abs(full[0] - full[1]).max()
    print(f"{name}: max |patched - cylinder-compiled| model fields {worst:.2e}, qM {worst_qm:.2e}")
    assert worst < 1e-12 and worst_qm < 1e-12
    assert np.abs(new.model.body_inertia - m.body_inertia).max() > 1e-3  # the patch changed something
    # contact margins: every geom has the same one (the premise of halving), and legacy halves it
    assert np.all(new.model.geom_margin == new.model.geom_margin[0])
    assert np.array_equal(m.geom_margin, new.model.geom_margin / 2)


# What D4RL's own environments return: gym.make(NAME) with d4rl 1.1 (TimeLimit > NormalizedBoxEnv > gym's
# mujoco-py env) on gym 0.23.1 + mujoco-py 2.1.2.14 + the MuJoCo 2.1.0 binaries (numpy 2.4.6, Python 3.11),
# the stack scripts/legacy_d4rl/setup.sh builds. Printed verbatim by `python scripts/legacy_d4rl/reference.py steps`:
# from the state (qpos, qvel), the observation after the last action and every step's reward. The "free" cases
# never touch the floor or a joint limit and hold actions outside [-1, 1] (D4RL clips them); the "limit" cases
# push joints past their range in the air; the "contact" cases land on the floor. The comment on each case
# counts the MuJoCo steps (frame_skip per env step) that had a contact or an active joint limit.
MUJOCO_PY_STEPS = {
    'halfcheetah-medium-v2/free': dict(  # MuJoCo steps with a contact 0 / with a joint limit 0 / all 25
        qpos=[0.0, 1.0, 0.1, 0.2, -0.3, 0.2, 0.3, -0.4, 0.1],
        qvel=[1.0, 0.5, -0.5, 2.0, -1.5, 1.0, -2.0, 1.5, -1.0],
        actions=[[0.5, -1.5, 0.25, 1.25, -0.75, 0.0], [-1.0, 0.8, 2.0, -0.3, 0.6, -1.2],
                 [0.9, 0.1, -0.6, -2.5, 1.0, 0.4], [-0.2, -0.9, 0.7, 0.3, -1.1, 1.5],
                 [1.3, 0.45, -0.35, 0.6, -0.05, -0.8]],
        obs=[0.7784323423345973, 0.009425866965518472, 0.3490252653021414, -0.07983934983970635,
             0.005236647154227551, 0.2679740088558674, -0.6466319509431072, 0.21233319961816874, 1.8326416231772953,
             -2.689982530109771, -2.539498491197294, 3.8440578567413564, 11.170099139568347, -4.817199100038662,
             10.910733349926474, 2.3511664419890597, -12.228009840919421],
        rewards=[0.9633448513409986, -0.3517483036076689, 0.2606709390890814, 1.0585835900509117,
                 1.5552460734342337],
    ),
    'hopper-medium-v2/free': dict(  # MuJoCo steps with a contact 0 / with a joint limit 0 / all 20
        qpos=[0.0, 1.75, 0.05, -0.6, -0.8, 0.1],
        qvel=[0.5, 0.3, -0.4, -1.0, -1.0, 1.0],
        actions=[[0.5, -1.5, 0.25], [1.2, 0.8, -0.6], [-0.9, 0.1, 2.0], [0.3, -1.1, 0.7], [-0.4, 0.65, -0.95]],
        obs=[1.75454256804219, 0.062128002535976355, -0.5934733199261857, -0.8701695659113143, 0.1639539474113431,
             0.47036700237485446, -0.10048955341198955, 0.06788925182881275, -0.21534906518002253,
             -1.5810277674052369, 1.528561727521355],
        rewards=[1.4369004485215708, 1.5062951404066336, 1.5917350670294246, 1.468617773054114, 1.4302568277884768],
    ),
    'walker2d-medium-v2/free': dict(  # MuJoCo steps with a contact 0 / with a joint limit 0 / all 20
        qpos=[0.0, 1.75, 0.05, -0.6, -0.8, 0.1, -0.4, -1.0, -0.2],
        qvel=[0.5, 0.3, -0.4, -1.0, -1.0, 1.0, -1.5, 0.5, -0.5],
        actions=[[1.5, -0.2, 0.05, 0.1, -0.1, 0.0], [-0.2, 0.1, 0.1, -1.25, 0.15, -0.05],
                 [0.15, 0.05, -0.1, 0.2, 0.2, 0.05], [-2.0, -0.1, 0.05, 0.05, -0.2, 0.1],
                 [0.2, 0.05, -0.05, 0.1, -0.05, -0.1]],
        obs=[1.7546614205863664, 0.05350317603628157, -0.5876156869367041, -0.8982315242626899, 0.15444868172589454,
             -0.45000578067533914, -0.9615006771492545, -0.1881080610403297, 0.31100321364744815, -0.18729043523207,
             -2.6028405908310233, -3.7184156533289774, -0.5957091391146021, 0.9399088171307489, -4.831959338924938,
             1.9666476482896413, -0.015381686664368177],
        rewards=[1.6757398692567576, 1.6366611623564105, 1.5233969678199262, 1.4030534224745446, 1.2501144119696805],
    ),
    'halfcheetah-medium-v2/limit': dict(  # MuJoCo steps with a contact 0 / with a joint limit 1 / all 40
        qpos=[0.0, 1.0, 0.0, 1.06, 0.795, -0.41, -1.01, 0.88, 0.51],
        qvel=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        actions=[[0.5, 0.5, -0.5, -0.5, 0.5, 0.5], [0.5, 0.5, -0.5, -0.5, 0.5, 0.5],
                 [0.5, 0.5, -0.5, -0.5, 0.5, 0.5], [0.5, 0.5, -0.5, -0.5, 0.5, 0.5],
                 [0.5, 0.5, -0.5, -0.5, 0.5, 0.5], [0.5, 0.5, -0.5, -0.5, 0.5, 0.5],
                 [0.5, 0.5, -0.5, -0.5, 0.5, 0.5], [0.5, 0.5, -0.5, -0.5, 0.5, 0.5]],
        obs=[0.22227109665506234, 0.047176770866409604, 0.2662918882440451, 0.258037953581162, -0.2513069591492548,
             -0.4449561335830299, 0.168402363802371, 0.16245189433240326, -0.036997539757120945,
             -3.9655063447052057, -0.20703037538005437, -0.5057166546621866, -0.2632656671025234,
             -0.32530446106131283, 0.893699349549283, 0.6527678603435849, -0.3255848939404238],
        rewards=[0.06976348341189081, -0.1179877519842232, -0.18238423645672786, -0.026106769574472347,
                 -0.13103424370208258, -0.3683823588135473, -0.39579092902484436, -0.2497190797033194],
    ),
    'hopper-medium-v2/limit': dict(  # MuJoCo steps with a contact 0 / with a joint limit 31 / all 32
        qpos=[0.0, 1.75, 0.0, 0.0005, 0.0005, 0.7859],
        qvel=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        actions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                 [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        obs=[1.729922597423052, -0.0006519845190655959, -9.689287786416234e-06, -1.0343568414494342e-05,
             0.785388083583314, -0.0012930238184931306, -0.6276145402203953, -0.010948548625385543,
             -0.00855127964629681, -0.008584229770415602, -0.008581924753451984],
        rewards=[0.9994496887289903, 0.9988311245951237, 0.9986686702911861, 0.998669222803953, 0.9986777058410804,
                 0.9986861349452644, 0.9986945104578172, 0.9987028327179117],
    ),
    'walker2d-medium-v2/limit': dict(  # MuJoCo steps with a contact 0 / with a joint limit 32 / all 32
        qpos=[0.0, 1.75, 0.0, 0.0005, 0.0005, 0.7859, 0.0005, 0.0005, -0.7859],
        qvel=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        actions=[[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                 [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                 [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]],
        obs=[1.7299154977156164, -0.0006553118883201097, -1.1009767379869354e-05, -1.0555383464379594e-05,
             0.7853972511924107, 3.292966467556333e-06, -3.839710311429204e-07, -0.7853872733231492,
             -0.0016752650344829135, -0.627730365711682, -0.01100730798958166, -0.008466210192541082,
             -0.008774226834427756, -0.008196195534669687, -0.008287165781942895, -0.008441527050047595,
             0.008062206630132173],
        rewards=[0.999314839941496, 0.9985220347000487, 0.9982907574602023, 0.9982831651481913, 0.9982925298809149,
                 0.9983018208776447, 0.9983110390979846, 0.9983201854845344],
    ),
    'halfcheetah-medium-v2/contact': dict(  # MuJoCo steps with a contact 36 / with a joint limit 0 / all 60
        qpos=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        qvel=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        actions=[[-0.5, 0.125, -0.375, 0.25, -0.25, 0.375], [-0.125, 0.5, 0.0, -0.5, 0.125, -0.375],
                 [0.25, -0.25, 0.375, -0.125, 0.5, 0.0], [-0.5, 0.125, -0.375, 0.25, -0.25, 0.375],
                 [-0.125, 0.5, 0.0, -0.5, 0.125, -0.375], [0.25, -0.25, 0.375, -0.125, 0.5, 0.0],
                 [-0.5, 0.125, -0.375, 0.25, -0.25, 0.375], [-0.125, 0.5, 0.0, -0.5, 0.125, -0.375],
                 [0.25, -0.25, 0.375, -0.125, 0.5, 0.0], [-0.5, 0.125, -0.375, 0.25, -0.25, 0.375],
                 [-0.125, 0.5, 0.0, -0.5, 0.125, -0.375], [0.25, -0.25, 0.375, -0.125, 0.5, 0.0]],
        obs=[-0.09217167577329792, 0.02773295261451056, -0.0043336743571587115, -0.020022294028515197,
             0.07863699175238158, -0.13296264415226652, 0.12203465195174168, -0.13754758766247333,
             0.24431548468800465, 0.710746730496858, 0.5515612457479272, 2.949497102343208, -3.09477341380141,
             -2.1207181387731007, -1.621868142652667, 3.373853494075865, -1.8270082236455558],
        rewards=[-0.200096481590251, -0.3384460753668146, 0.1653946597646995, 0.10219863391051394,
                 -0.3771731580769235, -0.12335585747092262, -0.0248822442157155, -0.3441751115377638,
                 -0.02556276550183474, 0.09629032602076636, -0.2508245417501255, -0.03191712708974999],
    ),
    'hopper-medium-v2/contact': dict(  # MuJoCo steps with a contact 32 / with a joint limit 33 / all 48
        qpos=[0.0, 1.22, 0.0, 0.0, 0.0, 0.0],
        qvel=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        actions=[[-0.5, 0.125, -0.375], [-0.125, 0.5, 0.0], [0.25, -0.25, 0.375], [-0.5, 0.125, -0.375],
                 [-0.125, 0.5, 0.0], [0.25, -0.25, 0.375], [-0.5, 0.125, -0.375], [-0.125, 0.5, 0.0],
                 [0.25, -0.25, 0.375], [-0.5, 0.125, -0.375], [-0.125, 0.5, 0.0], [0.25, -0.25, 0.375]],
        obs=[1.203115585979338, -0.12090507742289282, -0.13141649157357502, -0.0010537826514320026,
             0.011343216491614185, -0.2753964116867875, -0.04897320392360191, -2.012185130407624,
             -1.9887934714865882, -0.35930815781705916, 0.8118815084533479],
        rewards=[0.9770526506659879, 0.9485389687535203, 0.942454323812815, 0.9266270732209773, 0.9267530512934057,
                 0.9120065325645521, 0.8272861074944879, 0.7510646983645828, 0.7383196881886364, 0.7172915551844772,
                 0.6937112427985274, 0.7173242026164749],
    ),
    'walker2d-medium-v2/contact': dict(  # MuJoCo steps with a contact 38 / with a joint limit 45 / all 48
        qpos=[0.0, 1.22, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        qvel=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        actions=[[-0.25, 0.0625, -0.1875, 0.125, -0.125, 0.1875], [-0.0625, 0.25, 0.0, -0.25, 0.0625, -0.1875],
                 [0.125, -0.125, 0.1875, -0.0625, 0.25, 0.0], [-0.25, 0.0625, -0.1875, 0.125, -0.125, 0.1875],
                 [-0.0625, 0.25, 0.0, -0.25, 0.0625, -0.1875], [0.125, -0.125, 0.1875, -0.0625, 0.25, 0.0],
                 [-0.25, 0.0625, -0.1875, 0.125, -0.125, 0.1875], [-0.0625, 0.25, 0.0, -0.25, 0.0625, -0.1875],
                 [0.125, -0.125, 0.1875, -0.0625, 0.25, 0.0], [-0.25, 0.0625, -0.1875, 0.125, -0.125, 0.1875],
                 [-0.0625, 0.25, 0.0, -0.25, 0.0625, -0.1875], [0.125, -0.125, 0.1875, -0.0625, 0.25, 0.0]],
        obs=[1.1913110062396415, -0.4199181800430349, -0.47605223547588216, 0.006967262728911426,
             0.08652338371678973, -0.46978480626037455, 0.004136920095036948, 0.04342472045417617,
             -0.7282465450644786, -0.562364852190004, -7.919214507708182, -8.464299006767495, -0.6008902906380647,
             2.1336888512856738, -8.849408155753109, 0.25665357389522797, 0.6283733031607971],
        rewards=[0.9458678896863971, 0.828593733161538, 0.79612712991068, 0.7751949440862533, 0.697177124928797,
                 0.6362243868549435, 0.5605077675973321, 0.42015299900067493, 0.3709220409962259,
                 0.33878323971408286, 0.3039315827505643, 0.2721879943587217],
    ),
}


@pytest.mark.parametrize("key", list(MUJOCO_PY_STEPS))
def test_envs_legacy_dynamics_matches_mujoco_py(key):
    """legacy_dynamics=True reproduces D4RL's simulator to round-off; today's MuJoCo 3 dynamics do not."""
    ref = MUJOCO_PY_STEPS[key]
    gap = {}
    for legacy in (True, False):
        env = data.make_env(key.split("/")[0], legacy_dynamics=legacy)
        env.reset(seed=0)
        env.unwrapped.set_state(np.array(ref["qpos"]), np.array(ref["qvel"]))
        rewards = []
        for a in ref["actions"]:
            obs, r, terminated, truncated, _ = env.step(np.array(a))
            assert not truncated and (not terminated or not legacy)
            rewards.append(r)
        gap[legacy] = max(np.abs(obs - ref["obs"]).max(), np.abs(np.subtract(rewards, ref["rewards"])).max())
    print(f"{key}: max |obs or reward diff| to mujoco-py: legacy dynamics {gap[True]:.1e}, today's {gap[False]:.1e}")
    assert gap[True] < 1e-9
    assert gap[False] > 1e-6  # three orders above the bound: legacy dynamics are what close the gap


@pytest.mark.parametrize("name", ["pen-human-v1", "kitchen-partial-v0"])
def test_envs_legacy_dynamics_rejects_other_envs(name):
    with pytest.raises(ValueError, match="legacy_dynamics") as err:
        data.make_env(name, legacy_dynamics=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", LOCO_V2)
def test_envs_locomotion_clips_actions_like_d4rl(name):
    """D4RL's NormalizedBoxEnv clips actions to [-1, 1]; gymnasium's env passes them on (MuJoCo clamps the
    control, but the control cost sees the raw action). Ours clips: a and clip(a) give the same step."""
    info = sources.DATASETS[name]
    a = 2.5 * np.linspace(-1.0, 1.0, info.act_dim)  # (A,) entries outside [-1, 1]
    steps = []
    for env, action in ((data.make_env(name, legacy_dynamics=False), a),
                        (data.make_env(name, legacy_dynamics=False), np.clip(a, -1, 1)),
                        (envs._make(info, None), a)):  # the last: gymnasium's env without our wrappers
        env.reset(seed=0)
        obs, reward, *_ = env.step(action)
        steps.append((obs, reward))
    (obs, r), (obs_clip, r_clip), (obs_raw, r_raw) = steps
    print(f"{name}: reward {r:.4f}, with clipped action {r_clip:.4f}, unwrapped gymnasium {r_raw:.4f}")
    assert np.array_equal(obs, obs_clip) and r == r_clip
    assert np.array_equal(obs, obs_raw) and r_raw < r - 1e-3  # same dynamics, a larger control cost


def test_envs_dims_mismatch_is_an_error():
    info = dataclasses.replace(sources.DATASETS["hopper-medium-v2"], obs_dim=12)
    with pytest.raises(ValueError, match="registered with"):
        envs.make_env(info)


# ----------------------------------------------------------------------------- kitchen

@pytest.mark.parametrize("name", ["kitchen-complete-v0", "kitchen-partial-v0", "kitchen-mixed-v0"])
def test_envs_kitchen_tasks_and_reward(name):
    env = data.make_env(name, seed=0)
    obs, _ = env.reset()
    assert obs.shape == (59,)
    inner = env.unwrapped
    assert sorted(inner.goal) == sorted(envs.KITCHEN_TASKS[name.split("-")[1]])
    assert ("bottom burner" in inner.goal) == (name == "kitchen-mixed-v0")  # D4RL's task lists
    rewards = [env.step(np.zeros(9))[1] for _ in range(3)]
    assert rewards == [0.0, 0.0, 0.0]  # nothing completed
    # open the microwave (D4RL goal -0.75): reward 1 once, then 0 because the task is removed
    qpos, qvel = inner.data.qpos.copy(), inner.data.qvel.copy()
    qpos[22] = -0.75
    inner.robot_env.set_state(qpos, qvel)
    steps = [env.step(np.zeros(9)) for _ in range(3)]
    assert [s[1] for s in steps] == [1.0, 0.0, 0.0] and not any(s[2] for s in steps)


# ====================================================================================================
# glue
# ====================================================================================================
ROOT_DIR = pathlib.Path(train.__file__).resolve().parent
# A model small enough that a handful of steps and a 1000-step evaluation take seconds on one core.
TINY_FLAGS = ["--tf-half-dim", "8", "--tf-layers", "1", "--tf-heads", "2", "--tf-ffn", "16", "--unet-dim", "8",
              "--unet-mults", "1,2", "--invdyn-hidden", "16", "--no-use-critic", "--n-candidates", "1",
              "--batch-size", "8", "--horizon", "4", "--refine-steps", "2", "--n-timesteps", "10", "--threads", "1"]


def run_script(*args, check=True, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT_DIR, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check:
        assert p.returncode == 0, f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def cheetah_file(path, episodes=3, steps=60, seed=0):
    """A small HalfCheetah-shaped (17/6) D4RL-layout file: `episodes` episodes ending on timeouts."""
    n = episodes * steps
    timeouts = np.zeros(n, bool)
    timeouts[steps - 1::steps] = True
    write_d4rl(path, n=n, obs_dim=17, act_dim=6, timeouts=timeouts, seed=seed)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("glue")
    f = cheetah_file(d / "tiny.hdf5")
    out = d / "run"
    p = run_script("train.py", "--env", "halfcheetah-medium-sb3", "--dataset", f, "--steps", "12", "--save-every", "6",
                "--log-every", "4", "--eval-episodes", "0", "--out", out, *TINY_FLAGS)
    return {"file": f, "out": out, "stdout": p.stdout}


def test_precision_default_is_strict_fp32(tiny_run, monkeypatch):
    """The default training step uses no reduced precision: the start-up line says fp32, a product under the
    default settings matches float64 to 1e-5, and where oneDNN's path would compute in bf16 (AMX) the choice
    falls back to MKL's fp32 products."""
    line = next(l for l in tiny_run["stdout"].splitlines() if "matmul:" in l)
    assert "matmul: fp32" in line, line
    assert train.Config().reduced_precision is False and train.Config().amp is False
    cpu = torch.device("cpu")
    try:
        desc = machine.set_matmul_precision(cpu)
        assert desc.startswith("fp32"), desc
        err = machine.matmul_probe_error()
        print(desc, f"probe error {err:.2e}")
        assert err < 1e-5
        monkeypatch.setattr(machine, "matmul_probe_error", lambda: 2.3e-3)  # what an AMX CPU measured
        desc = machine.set_matmul_precision(cpu)
        assert desc.startswith("fp32 (MKL") and torch.backends.mkldnn.matmul.fp32_precision == "ieee", desc
        assert machine.set_matmul_precision(cpu, reduced=True).startswith("bf16")
    finally:
        machine.set_matmul_precision(cpu, onednn=False)




def test_precision_no_onednn_trains_through_mkl(tmp_path):
    """--no-onednn sends the training's fp32 products to MKL whatever the probe says, and says so at start-up."""
    p = run_script("train.py", "--env", "halfcheetah-medium-sb3", "--dataset", cheetah_file(tmp_path / "tiny.hdf5"),
                   "--steps", "2", "--eval-episodes", "0", "--out", tmp_path / "run", "--no-onednn", *TINY_FLAGS)
    line = next(l for l in p.stdout.splitlines() if "matmul:" in l)
    assert "matmul: fp32 (MKL)" in line, line
    assert json.loads((tmp_path / "run" / "config.json").read_text())["onednn"] is False


def test_precision_default_gradients_match_float64(tmp_path):
    """Under the default settings every network's gradient, at the CPU preset's sizes and batch, matches a
    float64 copy's to 1e-5 relative per parameter. The start-up probe checks forward products only; the
    backward pass multiplies by transposed operands and sums over the batch, shapes the probe does not make."""
    import copy
    cfg = config.resolve_config({"env": "halfcheetah-medium-sb3"})  # its row: the CPU preset, H = 8, C = 7
    d = data.load("halfcheetah-medium-sb3", str(cheetah_file(tmp_path / "tiny.hdf5")), rtg_scale=cfg.rtg_scale,
                  discount=cfg.discount, cond_discount=cfg.cond_discount)
    batch = data.WindowSampler(d, cfg.context + cfg.horizon - 1).sample(64, torch.Generator().manual_seed(0))
    win = {k: v[:, :cfg.horizon] for k, v in batch.items() if v.dim() >= 2}
    torch.manual_seed(0)
    nets = config.build_networks(config.model_args(cfg, 17, 6, d.normalizer))
    draws = nets["diffusion"].training_draws(win["states"])
    losses = {"transformer": lambda m, b, w: m.loss(b["states"], b["rtg"], b["mask"])[0],
              "diffusion": lambda m, b, w: m.loss(w["states"], w["cond_rtg"][:, 0], draws),
              "invdyn": lambda m, b, w: m.loss(w["states"], w["next_states"], w["actions"], w["next_mask"])}
    cpu = torch.device("cpu")
    try:
        print(machine.set_matmul_precision(cpu))  # what train.py sets
        for name, loss in losses.items():
            grads = {}
            for dtype in (torch.float32, torch.float64):
                m = copy.deepcopy(nets[name]).to(dtype).eval()  # eval: no dropout draws to match
                cast = lambda t: t.to(dtype) if t.is_floating_point() else t
                with torch.no_grad():
                    b, w = ({k: cast(v) for k, v in x.items()} for x in (batch, win))
                loss(m, b, w).backward()
                grads[dtype] = {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
            g32, g64 = grads[torch.float32], grads[torch.float64]
            scale = max(float(g.norm()) for g in g64.values())
            worst = max(float((g32[n] - g64[n]).norm() / g64[n].norm()) for n in g64
                        if g64[n].norm() > 1e-6 * scale)  # a gradient that is zero in exact arithmetic has no digits
            print(f"{name}: worst relative gradient error {worst:.1e}")
            assert worst < 1e-5, (name, worst)
    finally:
        machine.set_matmul_precision(cpu, onednn=False)


def test_precision_flags_read_back_as_promised(monkeypatch):
    """Catches: machine.set_matmul_precision leaving out a flag it promises, or setting the opposite one. CUDA:
    strict turns TF32 off for matmuls and cuDNN convolutions ("ieee"), --reduced-precision on for both ("tf32").
    CPU: strict sends fp32 products to oneDNN ("bf16" allowed inside its fp32 path) only where the probe measures
    fp32 accuracy, else MKL ("ieee"); onednn=False is MKL; reduced allows bf16. torch.backends' flags are plain
    settings, read back here on a machine without CUDA. Each call starts from the opposite of its promise."""
    be, cpu, cuda = torch.backends, torch.device("cpu"), torch.device("cuda")
    saved = (be.cuda.matmul.fp32_precision, be.cudnn.conv.fp32_precision, be.mkldnn.matmul.fp32_precision)
    flags = lambda: (be.cuda.matmul.fp32_precision, be.cudnn.conv.fp32_precision)  # noqa: E731
    try:
        for reduced, want in ((False, "ieee"), (True, "tf32")):
            be.cuda.matmul.fp32_precision = be.cudnn.conv.fp32_precision = "tf32" if want == "ieee" else "ieee"
            be.mkldnn.matmul.fp32_precision = "none"
            desc = machine.set_matmul_precision(cuda, reduced=reduced)
            assert flags() == (want, want), (reduced, flags(), desc)
            assert be.mkldnn.matmul.fp32_precision == "none"  # the CPU's path is not the CUDA call's business
        for err, want in ((2e-7, "bf16"), (2.3e-3, "ieee")):  # what an AMD EPYC and an AMX Xeon measured
            monkeypatch.setattr(machine, "matmul_probe_error", lambda: err)
            be.mkldnn.matmul.fp32_precision = "ieee" if want == "bf16" else "bf16"
            desc = machine.set_matmul_precision(cpu)
            assert be.mkldnn.matmul.fp32_precision == want and desc.startswith("fp32"), (err, desc)
            be.mkldnn.matmul.fp32_precision = "bf16"
            assert machine.set_matmul_precision(cpu, onednn=False) == "fp32 (MKL)"
            assert be.mkldnn.matmul.fp32_precision == "ieee"
            be.mkldnn.matmul.fp32_precision = "ieee"
            assert machine.set_matmul_precision(cpu, reduced=True).startswith("bf16")
            assert be.mkldnn.matmul.fp32_precision == "bf16"
            be.cuda.matmul.fp32_precision = be.cudnn.conv.fp32_precision = "tf32"
            machine.set_matmul_precision(cpu)
            assert flags() == ("tf32", "tf32")  # the CPU call leaves CUDA's flags alone
    finally:
        be.cuda.matmul.fp32_precision, be.cudnn.conv.fp32_precision = saved[:2]
        be.mkldnn.matmul.fp32_precision = saved[2]

def test_cli_keep_at_keeps_planning_copies(tmp_path):
    """--keep-at keeps a planning-only copy at each asked-for step (later saves do not overwrite it), each
    loads in plan.py and acts, and a bad list is refused with a one-line error before anything is written."""
    f = cheetah_file(tmp_path / "tiny.hdf5")
    out = tmp_path / "run"
    run_script("train.py", "--env", "halfcheetah-medium-sb3", "--dataset", f, "--steps", "9", "--save-every", "100",
               "--keep-at", "3,6,9", "--eval-episodes", "0", "--out", out, *TINY_FLAGS)
    kept = sorted(p.name for p in (out / "keep").iterdir())
    assert kept == ["step3.pt", "step6.pt", "step9.pt"], kept
    weights = []
    for name in kept:
        ckpt = plan.load_checkpoint(out / "keep" / name)
        assert ckpt["planning_only"] and ckpt["step"] == int(name[4:-3]) and "optimizer" not in ckpt
        weights.append(ckpt["models"]["transformer"]["state_head.2.weight"].clone())
        planner = plan.Planner.from_checkpoint(out / "keep" / name, device="cpu")
        planner.reset(1)
        a = planner.act(np.zeros((1, 17), np.float32))
        assert a.shape == (1, 6) and np.all(np.abs(a) <= 1)
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    final = plan.load_checkpoint(out / "checkpoint.pt")["models"]["transformer"]["state_head.2.weight"]
    assert torch.equal(final, weights[2])
    proc = run_script("train.py", "--env", "halfcheetah-medium-sb3", "--dataset", f, "--keep-at", "5k",
                      "--out", tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "--keep-at" in proc.stderr and not (tmp_path / "bad").exists(), proc.stderr


def test_cli_train_writes_run_directory(tiny_run):
    out = tiny_run["out"]
    assert (out / "checkpoint.pt").is_file() and (out / "config.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 8, 12]
    assert all(math.isfinite(v) for r in rows if "loss" in r for v in r["loss"].values())
    assert set(rows[0]["loss"]) == {"transformer", "diffusion", "invdyn"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["env"] == "halfcheetah-medium-sb3" and cfg["horizon"] == 4 and cfg["context"] == 3
    best = data.load("halfcheetah-medium-sb3", path=tiny_run["file"]).episode_returns.max()
    assert cfg["target_return"] == pytest.approx(float(best))  # target 0 resolves to the data's best episode
    # start-up facts are printed: data summary, parameter counts, resolved config
    s = tiny_run["stdout"]
    assert "180 transitions" in s and "3 episodes" in s and "M parameters" in s and "config:" in s
    ckpt = train.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 12
    assert set(ckpt["models"]) == {"transformer", "diffusion", "ema", "invdyn"}


def test_cli_plan_json_after_train(tiny_run, tmp_path):
    js = tmp_path / "r.json"
    p = run_script("plan.py", "--checkpoint", tiny_run["out"] / "checkpoint.pt", "--episodes", "1", "--json", js,
                "--threads", "1")
    r = json.loads(js.read_text())
    for key in ("env", "planner", "episodes", "return_mean", "return_std", "normalized_score_mean",
                "normalized_score_std", "ms_per_call", "ms_per_env_decision"):
        assert key in r, key
    assert r["env"] == "halfcheetah-medium-sb3" and r["planner"] == "td" and r["episodes"] == 1
    assert all(math.isfinite(r[k]) for k in ("return_mean", "normalized_score_mean", "ms_per_call"))
    assert abs(r["normalized_score_mean"] - float(sources.normalized_score("halfcheetah-medium-sb3", r["return_mean"]))) < 1e-6
    assert "episode 0 (seed 100)" in p.stdout and "normalized score" in p.stdout


def test_cli_resume_continues_from_saved_step(tiny_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    p = run_script("train.py", "--env", "halfcheetah-medium-sb3", "--dataset", tiny_run["file"], "--steps", "16",
                "--log-every", "4", "--eval-episodes", "0", "--out", out, "--resume", "--threads", "1")
    assert "resuming from step 12" in p.stdout
    ckpt = train.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 16
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16]
    assert ckpt["config"]["horizon"] == 4  # the checkpoint's config wins on resume


def test_cli_plan_missing_checkpoint_one_line_error(tmp_path):
    p = run_script("plan.py", "--checkpoint", tmp_path / "nope" / "checkpoint.pt", check=False)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_cli_help_lists_config_flags():
    p = run_script("train.py", "--help")
    for flag in ("--env", "--dataset", "--steps", "--seed", "--device", "--out", "--resume", "--eval-episodes"):
        assert flag in p.stdout, flag


def test_cli_config_precedence():
    """Config defaults < the env's table row < explicit flags."""
    cfg = train.resolve_config({"env": "hopper-medium-v2"})
    assert (cfg.horizon, cfg.refine_steps, cfg.guidance, cfg.target_return) == (16, 5, 1.2, 3100)
    assert cfg.context == 15 and cfg.steps == 1_000_000 and cfg.unet_dim == 64  # official sizes for D4RL names
    cfg = train.resolve_config({"env": "hopper-medium-v2", "horizon": 8, "context": 2})
    assert cfg.horizon == 8 and cfg.context == 2
    cfg = train.resolve_config({"env": "pen-human-v1"})
    assert (cfg.horizon, cfg.refine_steps, cfg.guidance, cfg.lr) == (16, 2, 1.3, 1e-4)
    quick = train.resolve_config({"env": "halfcheetah-medium-sb3"})
    assert quick.target_return == 0 and quick.steps < 100_000  # CPU-sized; the target is read off the data


OFFICIAL = dict(  # the official code at 214039d, for a halfcheetah name
    causal=False, schedule="linear", n_timesteps=100, prediction="eps", unet_full_skip=False, unet_time_mult=2,
    x0_clamp=False, cond_discount=1.0, cond_scale=1000.0, cond_target=0.0, cond_drop_prob=0.5, refine_noise=False,
    refine_steps=5, guidance=1.1, invdyn_clamp_loss=True, invdyn_next_own_stats=True, n_candidates=32,
    use_critic=True, critic_temperature=1.0, critic_lr_decay=False, ema_copy_each_step=True, norm_eps=1e-5,
    episode_split="official")


def deviation_table_settings() -> set:
    """The settings named in the first column of docs/deviations.md's table."""
    rows = [l for l in (ROOT_DIR / "docs" / "deviations.md").read_text().splitlines() if l.startswith("| ")]
    return {s.strip(" `") for row in rows[1:] for s in row.split("|")[1].split(",") if s.strip(" `—-")}


def test_config_method_official_resolves_and_matches_the_deviation_table():
    """--method official sets every official method choice (the family's k and w even on a bundled name), keeps
    the preset's sizes and budget, and yields to explicit flags; ours differs from it in exactly the settings
    docs/deviations.md lists, so a new departure without an entry there fails here."""
    for env in ("halfcheetah-medium-replay-sb3", "halfcheetah-medium-v2"):
        off = config.resolve_config({"env": env, "method": "official"})
        for k, v in OFFICIAL.items():
            assert getattr(off, k) == v, (env, k, getattr(off, k), v)
    ours = config.resolve_config({"env": "halfcheetah-medium-replay-sb3"})
    off = config.resolve_config({"env": "halfcheetah-medium-replay-sb3", "method": "official"})
    assert (off.steps, off.unet_dim, off.target_return, off.lr) == (ours.steps, ours.unet_dim, ours.target_return, ours.lr)
    assert config.resolve_config({"env": "hopper-medium-sb3", "method": "official"}).refine_steps == 5
    assert config.resolve_config({"env": "hopper-medium-sb3", "method": "official"}).guidance == 1.2
    flag = config.resolve_config({"env": "halfcheetah-medium-sb3", "method": "official", "causal": True})
    assert flag.causal is True and flag.schedule == "linear"
    differ = {f.name for f in dataclasses.fields(config.Config)
              if getattr(ours, f.name) != getattr(off, f.name)} - {"method"}
    print("ours differs from official in:", sorted(differ))
    assert differ == deviation_table_settings(), (differ ^ deviation_table_settings())
    with pytest.raises(data.UsageError, match="--method"):
        config.resolve_config({"env": "halfcheetah-medium-sb3", "method": "paper"})


def test_cli_method_official_trains_and_plans(tmp_path):
    """A short --method official --preset cpu run trains (official split, eps, linear schedule, no clamp, 32
    candidates with the critic, undiscounted condition) and its checkpoint plans in plan.py."""
    f = cheetah_file(tmp_path / "tiny.hdf5")
    out = tmp_path / "run"
    small = ["--tf-half-dim", "8", "--tf-layers", "1", "--tf-heads", "2", "--tf-ffn", "16", "--unet-dim", "8",
             "--unet-mults", "1,2", "--invdyn-hidden", "16", "--critic-hidden", "16", "--batch-size", "8",
             "--horizon", "4", "--threads", "1"]
    run_script("train.py", "--env", "halfcheetah-medium-sb3", "--dataset", f, "--method", "official", "--preset",
               "cpu", "--steps", "4", "--eval-episodes", "0", "--out", out, *small)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["method"], cfg["schedule"], cfg["prediction"], cfg["n_candidates"], cfg["cond_discount"]) == (
        "official", "linear", "eps", 32, 1.0)
    ckpt = plan.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["model_args"]["diffusion"]["clip_denoised"] is False and "critic" in ckpt["models"]
    assert ckpt["model_args"]["unet"]["full_skip"] is False and ckpt["model_args"]["unet"]["time_mult"] == 2
    p = run_script("plan.py", "--checkpoint", out / "checkpoint.pt", "--episodes", "1", "--threads", "1",
                   "--json", tmp_path / "r.json")
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["k"], r["guidance"], r["candidates"], r["refine_noise"]) == (5, 1.1, 32, False), r
    assert math.isfinite(r["return_mean"]), p.stdout[-500:]


# ------------------------------------------------------------------------------------------ every method builds what it says
# For ours and --method official: the networks, data and planner each method builds, probed for behaviour (not for
# fields). docs/deviations.md's table drives it: every setting in its first column has a probe in METHOD_PROBES,
# which must observe the configured value under both methods, and different values under the two.
METHOD_TINY = {"horizon": 4, "batch_size": 8, "tf_half_dim": 8, "tf_layers": 1, "tf_heads": 2, "tf_ffn": 16,
               "unet_dim": 8, "unet_mults": "1,2", "invdyn_hidden": 16, "critic_hidden": 16}
METHOD_CONST_DIM = 5  # a constant state dimension in the probes' file


@pytest.fixture(scope="module")
def method_builds(tmp_path_factory):
    """For --method ours and official on the bundled halfcheetah name (its row: the CPU preset): the config that
    config.resolve_config gives, one training step of train.train in-process on a small file (the loaded data,
    the first sampled window and the denoiser's and inverse dynamics' loss calls recorded), and its checkpoint,
    from which method_planner rebuilds the planner along plan.py's path (model_args -> build_networks). The file:
    3 episodes of 60 steps ending on timeouts, then 10 steps the data end inside; dimension 5 constant;
    next_observations drawn as 3 + 2 z, unlike the observations; rewards in [0.5, 1.5]. Ours also trains once with the critic on
    (critic_ckpt), so that the critic's learning rate can be read."""
    tmp = tmp_path_factory.mktemp("methods")
    n, ep = 190, 60
    rng = np.random.default_rng(7)
    obs = rng.normal(size=(n, 17)).astype(np.float32)
    obs[:, METHOD_CONST_DIM] = 2.0
    timeouts = np.zeros(n, bool)
    timeouts[ep - 1:3 * ep:ep] = True
    f = tmp / "methods.hdf5"
    arrays = write_d4rl(f, n=n, obs_dim=17, act_dim=6, timeouts=timeouts, seed=7, observations=obs,
                        next_observations=(3 + 2 * rng.normal(size=(n, 17))).astype(np.float32),
                        rewards=rng.uniform(0.5, 1.5, n).astype(np.float32))  # positive: so is the target
    builds = {}
    for method in ("ours", "official"):
        given = {"env": "halfcheetah-medium-sb3", "method": method, **METHOD_TINY}
        rec = {"load": [], "batch": [], "diffusion": [], "invdyn": []}
        with pytest.MonkeyPatch.context() as mp:
            def record(owner, attr, name):
                orig = getattr(owner, attr)

                def wrapper(*args, **kwargs):
                    out = orig(*args, **kwargs)
                    rec[name].append(out if name in ("load", "batch") else (args[1:], kwargs))
                    return out
                mp.setattr(owner, attr, wrapper)

            record(data, "load", "load")
            record(data.WindowSampler, "sample", "batch")
            record(GaussianDiffusion, "loss", "diffusion")
            record(InverseDynamics, "loss", "invdyn")

            def run(name, **extra):
                return train.train({**given, "dataset": str(f), "out": str(tmp / name), "steps": 1,
                                    "lr_decay_steps": 2, "eval_episodes": 0, "threads": 1, "device": "cpu",
                                    "legacy_dynamics": False, **extra})
            out = run(method)
            critic_out = run(method + "-critic", use_critic=True) if method == "ours" else out
        builds[method] = dict(cfg=config.resolve_config(given), file=arrays, ckpt=out / "checkpoint.pt",
                              critic_ckpt=critic_out / "checkpoint.pt", **{k: v[0] for k, v in rec.items()})
    machine.set_matmul_precision(torch.device("cpu"), onednn=False)
    return builds


def method_planner(m, kind="td"):
    """The planner plan.py builds from the method's checkpoint; torch's generator seeded, so a probe's draws are fixed."""
    torch.manual_seed(0)
    return plan.Planner.from_checkpoint(m["ckpt"], device="cpu", planner=kind)


def record_decision(planner, obs, reward=None, stop_first=False):
    """planner.act(obs, reward), recording the transformer's rollouts, the arguments of refine or sample, every call
    of the denoiser's net (its inputs and output), each guided output with its w, and the critic's calls.
    stop_first: end the decision at the net's first call."""
    rec = dict(rollouts=[], refine=[], sample=[], net=[], guided=[], critic=0)
    tf, den = planner.transformer, planner.denoiser

    def spy(obj, name, log):
        orig = getattr(obj, name)

        def wrapper(*args, **kwargs):
            out = orig(*args, **kwargs)
            log.append((args, kwargs, out))
            return out
        setattr(obj, name, wrapper)  # an instance attribute hides the method until it is deleted

    spy(tf, "rollout", rec["rollouts"])
    spy(den, "guided_output", rec["guided"])
    for name in ("refine", "sample"):
        orig = getattr(den, name)
        setattr(den, name, lambda *a, _orig=orig, _name=name, **k: (rec[_name].append((a, k)), _orig(*a, **k))[1])

    def pre(mod, args):
        rec["net"].append([a.clone() for a in args])
        if stop_first:
            raise StopDenoising

    hooks = [den.model.register_forward_pre_hook(pre),
             den.model.register_forward_hook(lambda mod, args, out: rec["net"][-1].append(out.clone()))]
    if planner.critic is not None:
        hooks.append(planner.critic.register_forward_hook(lambda *a: rec.__setitem__("critic", rec["critic"] + 1)))
    try:
        planner.act(obs, reward)
    except StopDenoising:
        pass
    finally:
        for h in hooks:
            h.remove()
        for obj, name in ((tf, "rollout"), (den, "guided_output"), (den, "refine"), (den, "sample")):
            del obj.__dict__[name]
    return rec


def discounted_rtg(rewards, starts, lengths, gamma):
    """sum_k gamma^k r_{t+k} within each episode, computed here (float64)."""
    out = np.zeros(len(rewards))
    for s, l in zip(starts, lengths):
        acc = 0.0
        for t in range(s + l - 1, s - 1, -1):
            acc = float(rewards[t]) + gamma * acc
            out[t] = acc
    return out


def probe_causal(m):
    """Whether the transformer's outputs before position j ignore token j (causal) or change with it."""
    tf = method_planner(m).transformer
    s, r = _batch(0, B=2, L=6, S=17)
    s2 = s.clone()
    s2[:, 4] += 1.0
    with torch.no_grad():
        a, b = tf(s, r)[0], tf(s2, r)[0]
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-4  # the change reaches the output: the probe can see
    return bool((a[:, :4] - b[:, :4]).abs().max() < 1e-6)


def probe_schedule(m):
    """The schedule whose closed-form alpha_bar at T/2 and T - 1 matches what q_sample does: the mean of x_t over
    N x H x S = 278,528 draws from x_0 = 10 estimates 10 sqrt(alpha_bar) to a standard error of 2e-3."""
    den = method_planner(m).denoiser
    T, N = den.n_timesteps, 4096
    x0 = torch.full((N, den.horizon, den.state_dim), 10.0)
    torch.manual_seed(0)
    est = {ti: float(den.q_sample(x0, torch.full((N,), ti)).double().mean()) / 10 for ti in (T // 2, T - 1)}
    for name in ("cosine", "linear"):
        _, ab, _ = closed_schedule(name, T)
        if all(abs(v - math.sqrt(ab[ti])) < 1e-3 for ti, v in est.items()):
            return name
    return f"neither (sqrt alpha_bar {est})"


def probe_prediction(m):
    """Which arithmetic turns a stand-in network output into x_0 and eps: eps-prediction's or v's (x_0 compared
    where the data-range clamp does not bind)."""
    den = method_planner(m).denoiser
    T, H, S = den.n_timesteps, den.horizon, den.state_dim
    _, ab, _ = closed_schedule(m["cfg"].schedule, T)
    g = torch.Generator().manual_seed(0)
    x_t, out = 0.3 * torch.randn(4, H, S, generator=g), 0.3 * torch.randn(4, H, S, generator=g)
    t = torch.full((4,), T // 2)
    x0, eps = den.predict_x0(x_t, t, out).double(), den.eps_from_output(x_t, t, out).double()
    for name in ("eps", "v"):
        want_x0, want_eps = oracle_x0_eps(name, ab[T // 2], x_t, out)
        inside = (want_x0 > den.x_low + 1e-3) & (want_x0 < den.x_high - 1e-3)
        if (inside.float().mean() > 0.5 and (x0 - want_x0)[inside].abs().max() < 1e-5
                and (eps - want_eps).abs().max() < 1e-5):
            return name
    return "neither"


def probe_x0_clamp(m):
    """Whether a huge out-of-range network output gives an x_0 clamped to the data's range (True) or not."""
    den = method_planner(m).denoiser
    H, S = den.horizon, den.state_dim
    x0 = den.predict_x0(torch.zeros(1, H, S), torch.tensor([den.n_timesteps // 2]), torch.full((1, H, S), 1e4))
    if torch.equal(x0[0], den.x_low.expand(H, S)):  # both arithmetics give x_0 ~ -1e4 here
        return True
    return False if bool((x0 < -100).all()) else "partly clamped"


def probe_unet_full_skip(m):
    """Whether the U-Net's output depends on its input with the first downsampling fed zeros, i.e. through the
    full-resolution skip alone (test_diffusion_unet_reads_full_resolution_skip's probe)."""
    import copy
    den = method_planner(m).denoiser
    net = copy.deepcopy(den.model)
    net.downs[0][2].register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),))
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(2, den.horizon, den.state_dim, generator=g) for _ in range(2))
    t, r, c = torch.tensor([5, 50]), torch.randn(2, 1, generator=g), torch.ones(2)
    with torch.no_grad():
        return bool((net(x1, t, r, c) - net(x2, t, r, c)).abs().max() > 1e-6)


def probe_unet_time_mult(m):
    """The time-embedding MLP's hidden width in units of its input's, measured on what flows through it."""
    den = method_planner(m).denoiser
    widths = []
    hooks = [c.register_forward_hook(lambda mod, a, out: widths.append(out.shape[-1])) for c in den.model.time_mlp]
    with torch.no_grad():
        den.model(torch.zeros(1, den.horizon, den.state_dim), torch.tensor([3]), torch.zeros(1, 1), torch.ones(1))
    for h in hooks:
        h.remove()
    return max(widths) // widths[0]


def probe_refine_noise(m):
    """Whether the td planner's denoiser first sees a noised plan (True) or the transformer's plan itself."""
    planner = method_planner(m)
    obs = m["file"]["observations"][:2]
    rec = record_decision(planner, obs, stop_first=True)
    s_now = planner.normalizer.normalize(torch.as_tensor(obs))
    plan_x = torch.cat([s_now[:, None], rec["rollouts"][0][2][0]], dim=1).repeat_interleave(planner.N, 0)
    return not torch.equal(rec["net"][0][0][: plan_x.shape[0]], plan_x)


def probe_refine_steps(m):
    """The number of denoising steps (net calls; guidance batches both passes into one) in one td decision."""
    return len(record_decision(method_planner(m), m["file"]["observations"][:2])["net"])


def probe_guidance(m):
    """The w of the guided output out_u + w (out_c - out_u) formed from the net's two passes (1 without them)."""
    rec = record_decision(method_planner(m), m["file"]["observations"][:2])
    (x, *_), _, g = rec["guided"][0]
    out = rec["net"][0][-1]
    if out.shape[0] == x.shape[0]:
        return 1.0
    out_c, out_u = out.chunk(2)
    return round(float(((g - out_u) * (out_c - out_u)).sum() / (out_c - out_u).pow(2).sum()), 4)


def probe_n_candidates(m):
    """Plans per environment that the td planner refines."""
    (x, *_), _ = record_decision(method_planner(m), m["file"]["observations"][:2])["refine"][0]
    return x.shape[0] // 2


def probe_use_critic(m):
    """Whether a decision calls a critic."""
    return record_decision(method_planner(m), m["file"]["observations"][:2])["critic"] > 0


def probe_cond_target(m):
    """The planner's denoiser condition over two steps with a reward in between: 0 when it is the current,
    decremented return-to-go (planner.R), else the fixed value it is."""
    planner = method_planner(m)
    obs = m["file"]["observations"]
    conds = []
    for t, reward in ((0, None), (1, np.array([3.0, 5.0]))):
        (_, _, returns, use_cond, _) = record_decision(planner, obs[t:t + 2], reward)["net"][0]
        conds.append(returns[use_cond == 1])  # (B*N, 1): the conditioned rows
    current = planner.R.repeat_interleave(planner.N, 0)
    if torch.allclose(conds[1], current, atol=1e-7) and not torch.allclose(conds[0], conds[1]):
        return 0.0
    if torch.equal(conds[0], conds[1]) and bool((conds[1] == conds[1][0]).all()):
        return float(conds[1][0])
    return "neither fixed nor the current return-to-go"


def probe_sample_temperature(m):
    """alpha of diffusion from noise: the rms of x_T over 128 environments x N candidates x (H - 1) x S entries
    (standard error under 0.9%, so the 0.05 grid it is rounded to lies over 4 standard errors away), seeded."""
    planner = method_planner(m, "diffusion")
    obs = m["file"]["observations"][:128]
    x = record_decision(planner, obs, stop_first=True)["net"][0][0][: 128 * planner.N]
    return round(float(x[:, 1:].double().pow(2).mean().sqrt()) * 20) / 20


def probe_temperature(m):
    """alpha of the td planner's refinement, read off its draws over 64 environments: the initial noise,
    (x_k - sqrt(ab_{k-1}) plan) / sqrt(1 - ab_{k-1}), where the plan is noised; a reverse step's noise, the second
    step's input minus the first step's posterior mean over the posterior's standard deviation, where k >= 2.
    The rms of what is measured, on a 0.05 grid."""
    planner, B = method_planner(m), 64
    den, k = planner.denoiser, planner.k
    obs = m["file"]["observations"][:B]
    rec = record_decision(planner, obs)
    BN = B * planner.N
    betas, ab, ab_prev = closed_schedule(m["cfg"].schedule, den.n_timesteps)
    s_now = planner.normalizer.normalize(torch.as_tensor(obs))
    plan_x = torch.cat([s_now[:, None], rec["rollouts"][0][2][0]], dim=1).repeat_interleave(planner.N, 0)
    (x_k, t, *_), _, out = rec["guided"][0]  # the first step: its input x_k (BN rows) and the guided output
    z = []
    if not torch.equal(x_k, plan_x):  # the plan was noised to level k
        z.append((x_k - math.sqrt(ab[k - 1]) * plan_x)[:, 1:].double() / math.sqrt(1 - ab[k - 1]))
    if len(rec["guided"]) > 1:  # a reverse step that draws noise (the last one, t = 0, draws none)
        mean, _, _ = den.q_posterior(den.predict_x0(x_k, t, out), x_k, t)
        (x_next, *_), _, _ = rec["guided"][1]
        sigma = math.sqrt(betas[k - 1] * (1 - ab_prev[k - 1]) / (1 - ab[k - 1]))
        z.append((x_next - mean)[:, 1:].double() / sigma)
    assert z and x_k.shape[0] == BN, "this method's refinement draws no noise that could show alpha"
    return round(float(torch.cat([v.flatten() for v in z]).pow(2).mean().sqrt()) * 20) / 20


def probe_cond_discount(m):
    """The discount that links the loaded denoiser condition to the rewards: c_t - r_t = gamma c_{t+1} inside an
    episode, gamma fitted by least squares over every step."""
    d = m["load"]
    num = den = 0.0
    for s, l in zip(d.episode_starts, d.episode_lengths):
        c, r = d.cond_rtg[s:s + l].astype(np.float64), d.rewards[s:s + l].astype(np.float64)
        num += float(((c[:-1] - r[:-1]) * c[1:]).sum())
        den += float((c[1:] ** 2).sum())
    return round(num / den, 4)


def probe_cond_scale(m):
    """What the denoiser's training condition is divided by: the data's discounted return-to-go at each window's
    first step over the condition the loss got; 0 when that is the largest magnitude in the data (computed here
    from the rewards with the config's discount), i.e. 'read off the data'."""
    d, batch = m["load"], m["batch"]
    (_, cond, *_), _ = m["diffusion"]  # loss(x0, returns, draws)
    raw = discounted_rtg(d.rewards, d.episode_starts, d.episode_lengths, m["cfg"].cond_discount)
    scale = float(np.median(raw[batch["start"].numpy()] / cond[:, 0].double().numpy()))
    return 0.0 if math.isclose(scale, float(np.abs(raw).max()), rel_tol=1e-5) else round(scale, 3)


def probe_invdyn_clamp_loss(m):
    """Whether the training's inverse-dynamics loss clamps the prediction to [-1, 1]: its recorded arguments,
    given to a stand-in that predicts 5 everywhere, give the clamped loss (True) or the raw one (False)."""
    (s, s_next, a, mask), kwargs = m["invdyn"]
    big = InverseDynamics(17, 6, hidden=4)
    with torch.no_grad():
        big.net[-1].weight.zero_()
        big.net[-1].bias.fill_(5.0)
        loss = float(big.loss(s, s_next, a, mask, **kwargs))
    for clamped, pred in ((True, 1.0), (False, 5.0)):  # the masked mean of the squared error, computed here
        if math.isclose(loss, float(((pred - a).pow(2).mean(-1) * mask).sum() / mask.sum()), rel_tol=1e-5):
            return clamped
    return "neither"


def probe_invdyn_next_own_stats(m):
    """Whether the sampled windows' next states are normalized by the next states' own statistics (True) or by
    the states' normalizer (False); the next states are drawn as 3 + 2 z, so the two differ by O(1)."""
    d, batch = m["load"], m["batch"]
    nxt = d.next_observations.astype(np.float64)
    got = batch["next_states"][:, 0].double().numpy()
    raw = nxt[batch["start"].numpy()]
    eps = m["cfg"].norm_eps
    std = nxt.std(0) + eps if eps > 0 else np.maximum(nxt.std(0), data.Normalizer.STD_FLOOR)
    if np.allclose(got, (raw - nxt.mean(0)) / std, atol=1e-4):
        return True
    return False if np.allclose(got, d.normalizer.normalize(raw), atol=1e-4) else "neither"


def probe_episode_split(m):
    """How the file was cut: 'ours' keeps every row and ends episodes at the timeouts; 'official' drops the timeout
    rows and the data's last row, and cuts pieces of max episode steps across episodes."""
    d, f = m["load"], m["file"]
    n, n_timeouts = len(f["rewards"]), int(f["timeouts"].sum())
    if len(d.rewards) == n and d.episode_lengths.tolist() == [60, 60, 60, 10]:
        return "ours"
    if len(d.rewards) == n - n_timeouts - 1 and d.episode_lengths.tolist() == [n - n_timeouts - 1]:
        return "official"
    return f"neither ({len(d.rewards)} rows, episodes {d.episode_lengths.tolist()})"


def probe_norm_eps(m):
    """The constant dimension's std in the loaded normalizer: the floor 1e-2 (ours, reported as 0) or 0 + eps."""
    s = float(m["load"].normalizer.std[METHOD_CONST_DIM])
    return 0.0 if math.isclose(s, data.Normalizer.STD_FLOOR, rel_tol=1e-6) else s


def probe_critic_lr_decay(m):
    """Whether the critic's learning rate has decayed after one step (lr_decay_steps = 2)."""
    groups = plan.load_checkpoint(m["critic_ckpt"])["optimizer"]["param_groups"]
    g = next(g for g in groups if g["name"] == "critic")
    return g["lr"] < g["initial_lr"] * (1 - 1e-6)


def probe_ema_copy_each_step(m):
    """Whether the EMA denoiser equals the trained one after step 1 (copied at every step before ema_start; with
    ema_every = 2 ours copies at even steps only)."""
    models = plan.load_checkpoint(m["ckpt"])["models"]
    return all(torch.equal(v, models["diffusion"][k]) for k, v in models["ema"].items())


METHOD_PROBES = {
    "causal": probe_causal, "schedule": probe_schedule, "prediction": probe_prediction, "x0_clamp": probe_x0_clamp,
    "unet_full_skip": probe_unet_full_skip, "unet_time_mult": probe_unet_time_mult,
    "refine_noise": probe_refine_noise, "refine_steps": probe_refine_steps, "guidance": probe_guidance,
    "n_candidates": probe_n_candidates, "use_critic": probe_use_critic, "cond_target": probe_cond_target,
    "sample_temperature": probe_sample_temperature, "temperature": probe_temperature,
    "cond_discount": probe_cond_discount,
    "cond_scale": probe_cond_scale, "invdyn_clamp_loss": probe_invdyn_clamp_loss,
    "invdyn_next_own_stats": probe_invdyn_next_own_stats, "episode_split": probe_episode_split,
    "norm_eps": probe_norm_eps, "critic_lr_decay": probe_critic_lr_decay,
    "ema_copy_each_step": probe_ema_copy_each_step,
}


def _agrees(seen, want) -> bool:
    if isinstance(want, (bool, str)) or isinstance(seen, (bool, str)):
        return type(seen) is type(want) and seen == want
    return math.isclose(seen, want, rel_tol=1e-3, abs_tol=1e-9)


@pytest.mark.parametrize("setting", sorted(deviation_table_settings()))
def test_method_builds_what_it_says(method_builds, setting):
    """Catches: a method setting that the config resolves but the code does not build (--method official's
    networks, data, training or planner silently built as ours, or the reverse), e.g. model_args dropping
    causal, the schedule, the prediction, the skip, the clamp or the time width; a planner ignoring refine_noise,
    cond_target or sample_temperature; the loader ignoring cond_discount, norm_eps or episode_split. For each
    setting of docs/deviations.md's table, its probe in METHOD_PROBES observes the behaviour of what each method
    built; it must equal the method's resolved setting, and differ between the methods (so the probe can see the
    difference). A deviation added to the table without a probe fails here."""
    probe = METHOD_PROBES.get(setting)
    assert probe is not None, f"docs/deviations.md lists {setting!r}: add a behaviour probe to METHOD_PROBES"
    seen = {}
    for method, m in method_builds.items():
        seen[method] = probe(m)
        want = getattr(m["cfg"], setting)
        assert _agrees(seen[method], want), f"--method {method}: {setting} is {want!r}, but it builds {seen[method]!r}"
    print(f"{setting}: {seen}")
    assert not _agrees(seen["ours"], seen["official"]), f"the probe for {setting} cannot tell the methods apart: {seen}"


def test_method_probes_cover_exactly_the_deviation_table():
    """Catches: a probe left behind for a setting no longer in docs/deviations.md (the other direction, a row
    without a probe, fails test_method_builds_what_it_says)."""
    assert set(METHOD_PROBES) == deviation_table_settings(), set(METHOD_PROBES) ^ deviation_table_settings()


def test_mutants_list_still_applies():
    """Catches: a stale mutant in scripts/mutants.py, whose original line was edited away or now occurs twice, so
    that the mutation score in docs/reliability.md would silently stop measuring it: --list checks that each
    mutant's original substring occurs exactly once in its file and exits non-zero otherwise."""
    p = run_script("scripts/mutants.py", "--list", check=False, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    n = int(p.stdout.split()[-2])
    assert n >= 30 and p.stdout.splitlines()[-1] == f"{n} mutants", p.stdout[-500:]


def test_cli_config_legacy_dynamics_one_default_per_name(tmp_path):
    """One default per name, everywhere: on for D4RL's own locomotion names (their data came from mujoco-py on
    MuJoCo 2.x), off for every other name; data.make_env builds the same dynamics as train.py and plan.py."""
    import envs
    for name, info in sources.DATASETS.items():
        want = info.source == "d4rl" and info.family == "locomotion"
        assert data.legacy_by_default(name) is want, name
    for name in ("hopper-medium-v2", "hopper-medium-sb3"):
        env = data.make_env(name)
        mass = env.unwrapped.model.body_mass[1:].sum()
        legacy = sum(m for m, *_ in envs.LEGACY_BODY_INERTIA["Hopper-v4"].values())
        assert bool(abs(mass - legacy) < 1e-9) is data.legacy_by_default(name), (name, mass, legacy)
    parse = lambda *argv: train.resolve_config(vars(train.build_parser().parse_args(list(argv))))  # noqa: E731
    assert parse("--env", "walker2d-medium-v2", "--no-legacy-dynamics").legacy_dynamics is False
    assert parse("--env", "halfcheetah-medium-sb3", "--legacy-dynamics").legacy_dynamics is True
    # a flag the environment cannot honour fails at start-up, before the run directory exists
    out = tmp_path / "run"
    with pytest.raises(train.UsageError, match="legacy-dynamics covers") as err:
        train.train({"env": "pen-human-v1", "legacy_dynamics": True, "out": str(out)})
    assert "\n" not in str(err.value) and not out.exists()


def hopper_rollout_file(path, legacy: bool | None, steps=40):
    """A Hopper D4RL-layout file of one random-action rollout simulated in the given dynamics, with
    infos/qpos and infos/qvel (legacy=None: the same file without them)."""
    import envs
    env = envs.make_env(sources.get_info("hopper-medium-v2"), seed=0, legacy_dynamics=bool(legacy))
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    rows = {k: [] for k in ("observations", "actions", "next_observations", "rewards", "qpos", "qvel")}
    for _ in range(steps):
        u = env.unwrapped
        a = rng.uniform(-0.3, 0.3, 3)
        rows["qpos"].append(u.data.qpos.copy()), rows["qvel"].append(u.data.qvel.copy())
        nxt, r, term, trunc, _ = env.step(a)
        for k, v in (("observations", obs), ("actions", a), ("next_observations", nxt), ("rewards", r)):
            rows[k].append(v)
        obs = nxt
        if term:
            break
    n = len(rows["rewards"])
    arrays = {k: np.asarray(v, np.float32) for k, v in rows.items() if k not in ("qpos", "qvel")}
    arrays.update(terminals=np.zeros(n, bool), timeouts=flags(n, [n - 1]))
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        if legacy is not None:
            f.create_dataset("infos/qpos", data=np.asarray(rows["qpos"], np.float32))
            f.create_dataset("infos/qvel", data=np.asarray(rows["qvel"], np.float32))
    return path


def test_data_dynamics_read_off_the_data(tmp_path):
    """The evaluation's simulator is the one that reproduces the data's recorded steps: mujoco-py's for a file
    simulated in it, MuJoCo 3's for one collected on MuJoCo 3, whatever the name; without infos/qpos the
    name's default stays, and the reason says so. Training records the choice and prints it."""
    for legacy in (True, False):
        d = data.load("hopper-medium-v2", hopper_rollout_file(tmp_path / f"{legacy}.hdf5", legacy))
        got, why = data.choose_dynamics(d)
        print(legacy, why)
        assert got is legacy and "read off the data" in why
    d = data.load("hopper-medium-v2", hopper_rollout_file(tmp_path / "none.hdf5", None))
    got, why = data.choose_dynamics(d)
    assert got is True and "default" in why and "infos/qpos" in why, why
    # the README's example: MuJoCo-3 data under a D4RL name trains and evaluates in MuJoCo 3's dynamics
    for name, want in (("False", False), ("none", True)):
        out = tmp_path / f"run-{name}"
        p = run_script("train.py", "--env", "hopper-medium-v2", "--dataset", tmp_path / f"{name}.hdf5", "--preset",
                       "cpu", "--steps", "2", "--eval-episodes", "0", "--out", out, *TINY_FLAGS)
        assert json.loads((out / "config.json").read_text())["legacy_dynamics"] is want
        line = next(l for l in p.stdout.splitlines() if l.startswith("evaluation dynamics:"))
        print(line)
        assert ("read off the data" in line) is (name != "none"), line


def test_cli_legacy_dynamics_kept_by_resume_and_plan(tiny_run, tmp_path, monkeypatch):
    """The resolved value is saved in the config: a resume keeps it unless a flag is given, and plan.py
    evaluates in it unless --[no-]legacy-dynamics is given."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    ckpt_path = out / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["config"]["legacy_dynamics"] is False  # halfcheetah-medium-sb3 resolves to today's dynamics
    ckpt["config"]["legacy_dynamics"] = True  # as if the run had started with --legacy-dynamics
    torch.save(ckpt, ckpt_path)
    common = ["--env", "halfcheetah-medium-sb3", "--dataset", tiny_run["file"], "--log-every", "4",
              "--eval-episodes", "0", "--out", out, "--resume", "--threads", "1"]
    run_script("train.py", *common, "--steps", "13")
    assert train.load_checkpoint(ckpt_path)["config"]["legacy_dynamics"] is True  # kept, not re-resolved

    made = []

    class Made(Exception):
        pass

    def fake_make_env(name, seed=None, **kwargs):  # records what evaluate asks for, then stops it
        made.append(kwargs.get("legacy_dynamics"))
        raise Made

    monkeypatch.setattr(data, "make_env", fake_make_env)
    for flags, want in (([], True), (["--no-legacy-dynamics"], False)):
        with pytest.raises(Made):
            plan.main(["--checkpoint", str(ckpt_path), "--episodes", "1", "--threads", "1", *flags])
        assert made[-1] is want, flags
    monkeypatch.undo()
    run_script("train.py", *common, "--steps", "14", "--no-legacy-dynamics")
    assert train.load_checkpoint(ckpt_path)["config"]["legacy_dynamics"] is False  # an explicit flag wins


def test_cli_every_dataset_has_one_table_row():
    """The per-env settings live in one table, covering every registered dataset."""
    assert set(config.ENV_TABLE) == set(sources.DATASETS)
    for name, row in config.ENV_TABLE.items():
        cfg = train.resolve_config({"env": name})
        levels = len(cfg.unet_mults.split(","))
        assert cfg.horizon % 2 ** (levels - 1) == 0, name  # the U-Net accepts every row's horizon


def test_plan_planner_api_acts_within_bounds(tiny_run):
    planner = plan.Planner.from_checkpoint(tiny_run["out"] / "checkpoint.pt", device="cpu")
    env = data.make_env("halfcheetah-medium-sb3", seed=0)
    obs, _ = env.reset(seed=0)
    planner.reset()
    reward = None
    for _ in range(planner.cfg.context + 3):  # run past the context so the history slides
        a = planner.act(obs, reward)
        assert a.shape == (6,) and np.all(a >= -1) and np.all(a <= 1)
        obs, reward, *_ = env.step(a)
    # the target return is decremented by r / scale and floored at a third of its start
    assert planner.R.shape == (1, 1)
    assert planner.R.item() >= planner.R0 * planner.cfg.rtg_floor - 1e-6
    batch = planner.act(np.stack([obs, obs]), None)  # a new batch size restarts the episodes
    assert batch.shape == (2, 6) and planner.t == 1


def test_plan_x0_clamp_travels_with_checkpoint(tiny_run):
    """The denoiser clamps x_0 to each dimension's normalized data range, read from the checkpoint."""
    ckpt = train.load_checkpoint(tiny_run["out"] / "checkpoint.pt")
    obs = data.load("halfcheetah-medium-sb3", path=tiny_run["file"]).observations.astype(np.float64)
    mean, std = obs.mean(0), np.maximum(obs.std(0), data.Normalizer.STD_FLOOR)
    low = torch.as_tensor((obs.min(0) - mean) / std, dtype=torch.float32)
    assert torch.allclose(ckpt["normalizer"]["low"], low, atol=1e-5)
    for name in ("ema", "diffusion"):
        assert torch.allclose(ckpt["models"][name]["x_low"], low, atol=1e-5)
    planner = plan.Planner.from_checkpoint(tiny_run["out"] / "checkpoint.pt", device="cpu")
    den = planner.denoiser
    assert torch.equal(den.x_low, ckpt["models"]["ema"]["x_low"]) and torch.equal(den.x_high, ckpt["models"]["ema"]["x_high"])
    x0 = den.predict_x0(torch.zeros(2, den.horizon, den.state_dim), torch.full((2,), 5), 1e3 * torch.ones(2, den.horizon, den.state_dim))
    assert torch.equal(x0[0, 0], den.x_low)


def test_cli_plan_diagnose_writes_png_and_json(tiny_run, tmp_path):
    png = tmp_path / "diag.png"
    run_script("diagnose.py", "--checkpoint", tiny_run["out"] / "checkpoint.pt", "--diagnose", png, "--ks", "1,2",
               "--threads", "1")
    assert png.is_file() and png.stat().st_size > 10_000
    r = json.loads(png.with_suffix(".json").read_text())
    T = r["summary"]["T"]
    assert r["per_t"]["t"] == list(range(T)) and len(r["per_t"]["eps_mse_model"]) == T
    assert [p["k"] for p in r["plan_error_vs_k"]] == [0, 1, 2, T]
    vals = [*r["per_t"]["eps_mse_model"], *r["per_t"]["eps_mse_trivial"], *r["per_t"]["cond_gap_ratio"],
            *(p["s1_mse"] for p in r["plan_error_vs_k"]), *r["summary"]["target_effect_rms"].values()]
    assert all(math.isfinite(v) and v >= 0 for v in vals)
    # the trivial predictor is nearly exact at the last step and poor at the first
    assert r["per_t"]["eps_mse_trivial"][-1] < 1e-2 < r["per_t"]["eps_mse_trivial"][0]


def test_cli_plan_sweep_k_by_w(tiny_run, tmp_path):
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    run_script("bench.py", "--checkpoint", tiny_run["out"] / "checkpoint.pt", "--sweep-k", "--ks", "1,2",
               "--guidances", "1.0,2.0", "--episodes", "2", "--no-endpoints", "--json", js, "--plot", png,
               "--threads", "1", timeout=600)
    rows = json.loads(js.read_text())
    assert [(r["planner"], r["k"], r["guidance"]) for r in rows] == [
        ("transformer", 0, rows[0]["guidance"]), ("td", 1, 1.0), ("td", 1, 2.0), ("td", 2, 1.0), ("td", 2, 2.0)]
    assert all(r["episodes"] == len(r["returns"]) == 2 and r["ms_benchmark"] > 0 for r in rows)
    assert png.is_file()


def test_plan_planner_variants_calls(tiny_run):
    ck = tiny_run["out"] / "checkpoint.pt"
    tf = plan.Planner.from_checkpoint(ck, device="cpu", planner="transformer")
    td = plan.Planner.from_checkpoint(ck, device="cpu")
    dd = plan.Planner.from_checkpoint(ck, device="cpu", planner="diffusion")
    H = td.cfg.horizon
    assert tf.k == 0 and tf.calls_per_decision() == (H - 1) + 1
    assert td.k == 2 and td.calls_per_decision() == (H - 1) + 2 + 1
    assert dd.calls_per_decision() == td.denoiser.n_timesteps + 1
    with pytest.raises(train.UsageError):
        plan.Planner.from_checkpoint(ck, device="cpu", refine_steps=td.denoiser.n_timesteps + 1)
    with pytest.raises(train.UsageError):
        plan.Planner.from_checkpoint(ck, device="cpu", n_candidates=4)  # no critic in this checkpoint


def test_speed_benchmark_tiny_has_every_row(tiny_run, tmp_path):
    js = tmp_path / "b.json"
    p = run_script("bench.py", "--checkpoint", tiny_run["out"] / "checkpoint.pt", "--benchmark", "--decisions", "2",
                "--reference-decisions", "1", "--reference-scale", "tiny", "--ks", "1,2,5", "--json", js,
                "--threads", "1")
    b = json.loads(js.read_text())
    assert b["torch"] == torch.__version__ and b["device"]
    rows = b["rows"]
    for r in rows:
        assert set(r) >= {"planner", "decisions", "k", "batch", "ms_per_decision", "calls_per_decision"}
        assert r["ms_per_decision"] > 0
    got = {(r["planner"], r["k"], r["batch"]) for r in rows}
    for batch in (1, 10):
        assert ("transformer", 0, batch) in got and ("diffusion", 10, batch) in got
        assert {("td", k, batch) for k in (1, 2, 5)} <= got
    assert {r["planner"] for r in rows if r["batch"] == 1} >= {"td-official", "dd-reference"}
    assert all(r["batch"] == 1 for r in rows if r["planner"] in ("td-official", "dd-reference"))
    assert "diffusion / td(k=5)" in p.stdout and "dd-reference / td-official" in p.stdout


def test_cli_bench_video_png_strip(tiny_run, tmp_path):
    """diagnose.py --video renders an episode offscreen (MUJOCO_GL=egl) and writes the 6-frame PNG strip."""
    png = tmp_path / "strip.png"
    p = run_script("diagnose.py", "--checkpoint", tiny_run["out"] / "checkpoint.pt", "--video", png, "--video-steps", 12,
                   "--threads", "1")
    assert png.is_file() and png.stat().st_size > 1000 and "12 frames" in p.stdout


def test_plan_export_for_planning_acts_and_refuses_resume(tiny_run, tmp_path):
    dst = diagnose.export_for_planning(tiny_run["out"] / "checkpoint.pt", tmp_path / "slim" / "checkpoint.pt")
    slim = torch.load(dst, weights_only=True)
    assert "optimizer" not in slim and "diffusion" not in slim["models"] and "ema" in slim["models"]
    full = plan.Planner.from_checkpoint(tiny_run["out"] / "checkpoint.pt", device="cpu", planner="transformer")
    small = plan.Planner.from_checkpoint(dst, device="cpu", planner="transformer")
    obs = np.zeros(17, np.float32)
    assert np.array_equal(full.act(obs), small.act(obs))  # the same networks act the same
    p = run_script("train.py", "--env", "halfcheetah-medium-sb3", "--out", tmp_path / "slim", "--resume", check=False)
    assert p.returncode == 2 and "export for planning" in p.stderr


def test_plan_shipped_checkpoint_acts():
    """The checkpoint the README points at loads safely and acts within the bounds."""
    ck = ROOT_DIR / "checkpoints" / "halfcheetah-medium-sb3" / "checkpoint.pt"
    planner = plan.Planner.from_checkpoint(ck, device="cpu")
    assert planner.cfg.env == "halfcheetah-medium-sb3" and planner.k == config.ENV_TABLE["halfcheetah-medium-sb3"]["refine_steps"]
    env = data.make_env("halfcheetah-medium-sb3", seed=0)
    obs, _ = env.reset(seed=0)
    a = planner.act(obs)
    assert a.shape == (6,) and np.all(np.abs(a) <= 1) and np.all(np.isfinite(a))


# ====================================================================================================
# glue pinned: each test names the bug it catches
# ====================================================================================================
# Stand-in networks record what the planner hands them, so that each wire of Planner.act / decide is checked
# against a hand computation. B = environments, N = candidates, S = 4 state dims, A = 2 action dims.
class RecordingTransformer:
    """rollout(): records the history (calls), and every argument with the mode it ran in (log); its plan moves
    every state by +1 per step (so x[:, 1] != x[:, 2]). In train mode (dropout on) row j's plan moves a further
    0.1 (j + 1), so that N dropout rollouts differ. train() and eval() set the mode, as nn.Module's do."""

    def __init__(self):
        self.calls, self.log, self.training = [], [], False

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def rollout(self, hist_s, hist_r, n_steps):
        self.calls.append((hist_s.clone(), hist_r.clone()))
        steps = torch.arange(1, n_steps + 1, dtype=hist_s.dtype)[None, :, None]  # (1, n, 1)
        future = hist_s[:, -1:] + steps
        if self.training:
            future = future + 0.1 * torch.arange(1, hist_s.shape[0] + 1, dtype=hist_s.dtype)[:, None, None]
        self.log.append(dict(hist_s=hist_s.clone(), hist_r=hist_r.clone(), n_steps=n_steps, training=self.training,
                             future=future.clone()))
        return future, hist_r[:, -1:].expand(-1, n_steps, -1)


class RecordingDenoiser:
    """refine(): records k and its input; row j of the output is the input moved by 0.01 j after step 0.
    sample(): a plan of `horizon` states from cond_state, moving by +1 per step. calls: every argument either
    method received, by name, in call order."""
    n_timesteps, horizon = 10, 4

    def __init__(self):
        self.ks, self.inputs, self.outputs, self.calls = [], [], [], []

    def refine(self, x, k, cond, w, add_noise=True, temperature=1.0):
        out = x.clone()
        out[:, 1:] += 0.01 * torch.arange(x.shape[0], dtype=x.dtype)[:, None, None]
        self.ks.append(k)
        self.inputs.append(x.clone())
        self.outputs.append(out)
        self.calls.append(dict(method="refine", x=x.clone(), k=k, cond=cond.clone(), w=w, add_noise=add_noise,
                               temperature=temperature))
        return out

    def sample(self, cond_state, cond, w, temperature=1.0):
        self.calls.append(dict(method="sample", cond_state=cond_state.clone(), cond=cond.clone(), w=w,
                               temperature=temperature))
        return cond_state[:, None] + torch.arange(self.horizon, dtype=cond_state.dtype)[None, :, None]


class RecordingInvdyn:
    """a = (s_next - s)[:, :A]: records (s, s_next) and the actions it returned."""

    def __init__(self, A=2):
        self.A, self.calls = A, []

    def __call__(self, s, s_next):
        a = (s_next - s)[:, : self.A]
        self.calls.append((s.clone(), s_next.clone(), a.clone()))
        return a


class TableCritic:
    """Q values read from a fixed (B, N) table, whatever the (s, a) it receives."""

    def __init__(self, q):
        self.q = torch.as_tensor(q, dtype=torch.float32)

    def __call__(self, s, a):
        return self.q.flatten()


def stand_in_planner(q=None, kind="td", **settings):
    """A Planner (kind td or diffusion) over the stand-ins: C = 3, H = 4, k = 3, a normalizer with mean 0.5 + i and
    std 2; settings replace PlanConfig fields."""
    cfg = plan.PlanConfig(**{**dict(horizon=4, context=3, refine_steps=3, n_candidates=1, critic_temperature=0.0,
                                    target_return=100.0, rtg_scale=100.0), **settings})
    nets = {"transformer": RecordingTransformer(), "ema": RecordingDenoiser(), "invdyn": RecordingInvdyn()}
    if q is not None:
        nets["critic"] = TableCritic(q)
    S = 4
    norm = data.Normalizer(0.5 + np.arange(S, dtype=np.float32), np.full(S, 2.0, np.float32))
    planner = plan.Planner(cfg, nets, norm, "cpu", kind)
    planner.set_bounds(-1e3, 1e3)  # the stand-ins' actions are never clamped
    return planner, nets, norm


def test_glue_planner_normalizes_slides_history_and_decrements_rtg():
    """Catches: observations not normalized; a history that never slides (no torch.roll once t >= C); the
    return-to-go decrement's sign flipped or its floor removed. 7 steps (> C = 3) of 2 envs, rewards that
    reach the floor (R0 = 1, floor 1/3) on env 1 but not on env 0."""
    planner, nets, norm = stand_in_planner()
    C, R0, floor = 3, 1.0, 1.0 / 3.0
    obs = [np.array([[t, 10.0 + t, -t, 2.0], [5.0 * t, 1.0, 0.0, -t]], np.float32) for t in range(7)]
    rewards = [None] + [np.array([5.0, 30.0]) for _ in range(6)]  # received before calls 1..6
    planner.reset(2)
    for t in range(7):
        planner.act(obs[t], rewards[t])
    seen_r = []
    for t, (hist_s, hist_r) in enumerate(nets["transformer"].calls):
        got = [sum(float(r[i]) for r in rewards[1:t + 1]) for i in range(2)]  # rewards received so far
        seen_r.append([max(R0 - g / 100.0, R0 * floor) for g in got])
        first = max(0, t - C + 1)  # the last min(t + 1, C) steps, oldest first
        want_s = torch.stack([norm.normalize(torch.as_tensor(o)) for o in obs[first:t + 1]], dim=1)  # (B, c, S)
        want_r = torch.tensor(seen_r[first:t + 1]).T[..., None]  # (B, c, 1)
        assert torch.allclose(hist_s, want_s, atol=1e-6), f"call {t}: the history of states is wrong"
        assert torch.allclose(hist_r, want_r, atol=1e-6), f"call {t}: the history of returns-to-go is wrong"
    assert seen_r[-1][1] == pytest.approx(floor) and seen_r[-1][0] > floor  # env 1 sits on the floor, env 0 not
    # a negative target (data whose returns are negative): no reward keeps it, rewards lower it to its floor,
    # R0 - (1 - floor) |R0|, and never raise it (R0 * floor would lie above R0)
    planner.target = -200.0
    planner.reset(2)
    for t in range(4):
        planner.act(obs[t], None if t == 0 else np.array([0.0, 100.0]))
    R0 = -2.0
    assert planner.R[:, 0].tolist() == pytest.approx([R0, R0 - (1 - floor) * abs(R0)])


def test_glue_planner_decide_wiring_k_invdyn_and_critic():
    """Catches: inverse dynamics fed (x[:, 1], x[:, 2]) instead of (x[:, 0], x[:, 1]); the planner passing the
    denoiser another k than refine_steps; the critic always picking candidate 0 (critic_temperature = 0)."""
    q = [[0.0, 5.0, 1.0], [2.0, 0.0, 7.0]]  # the best candidates are 1 (env 0) and 2 (env 1)
    planner, nets, norm = stand_in_planner(q=q, n_candidates=3)
    obs = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 1.0, 2.0]], np.float32)
    a = planner.act(obs)
    den, inv = nets["ema"], nets["invdyn"]
    assert den.ks == [3]  # k = refine_steps
    s_now = norm.normalize(torch.as_tensor(obs)).repeat_interleave(3, 0)  # (B*N, S)
    assert torch.allclose(den.inputs[0][:, 0], s_now) and torch.allclose(den.inputs[0][:, 1], s_now + 1)
    s, s_next, acts = inv.calls[0]
    x = den.outputs[0]  # the refined plans (B*N, H, S)
    assert torch.equal(s, x[:, 0]) and torch.equal(s_next, x[:, 1]), "inverse dynamics got the wrong states"
    assert torch.allclose(s, s_now)
    want = acts.view(2, 3, -1)[torch.arange(2), torch.tensor([1, 2])]  # (B, A): the critic's argmax
    assert not torch.equal(want, acts.view(2, 3, -1)[:, 0])  # candidate 0 would give other actions
    np.testing.assert_array_equal(a, want.numpy())


def method_plan_settings(method):
    """The planning settings --method METHOD resolves to on a bundled halfcheetah name (ours: its row and the CPU
    preset; official: the published method's), i.e. what a planner must hand its networks."""
    cfg = config.resolve_config({"env": "halfcheetah-medium-replay-sb3", "method": method})
    return {k: getattr(cfg, k) for k in ("refine_steps", "guidance", "cond_target", "n_candidates", "refine_noise",
                                         "temperature", "sample_temperature", "critic_temperature", "proposals")}


WIRE_OBS = [np.array([[t, 1.0 - t, 0.5 * t, 2.0], [-t, 3.0, t * t, -1.0]], np.float32) for t in range(6)]
WIRE_REWARDS = [None] + [np.array([4.0 + t, 20.0 * t]) for t in range(1, 6)]  # env 1 reaches the floor at step 3


@pytest.mark.parametrize("method", ["ours", "official"])
def test_glue_planner_hands_each_network_what_the_config_says(method):
    """Catches: the denoiser conditioned on an earlier return-to-go than the current one (before the reward's
    decrement, or the history's first), on the return-to-go where cond_target fixes the condition (or the
    reverse); the denoiser handed another w, k, add_noise or temperature than the config's (the refinement's
    temperature given to the sampler, or the sampler's to the refinement); candidates that are not each
    environment's plan repeated N times; the diffusion planner not sampling from the current states. With
    --method METHOD's planning settings (also with temperatures 0.3 / 0.7 and no refinement noise), cond_target
    in {0 (the current return-to-go), 1, 0.6}, 6 steps of 2 environments with rewards, for the td and the
    diffusion planner: every argument the stand-ins record equals what the config and the episode say."""
    B, R0, floor, scale = 2, 1.0, 1.0 / 3.0, 100.0  # stand_in_planner: target 100, rtg_scale 100
    base = method_plan_settings(method)
    variants = [base, {**base, "temperature": 0.3, "sample_temperature": 0.7, "refine_noise": not base["refine_noise"]}]
    checked = 0
    for settings in variants:
        for cond_target in (0.0, 1.0, 0.6):
            s = {**settings, "cond_target": cond_target}
            N = s["n_candidates"]
            for kind in ("td", "diffusion"):
                planner, nets, norm = stand_in_planner(q=np.zeros((B, N)) if N > 1 else None, kind=kind, **s)
                tf, den = nets["transformer"], nets["ema"]
                planner.reset(B)
                for t in range(len(WIRE_OBS)):
                    planner.act(WIRE_OBS[t], WIRE_REWARDS[t])
                    got = np.sum([r for r in WIRE_REWARDS[1:t + 1]], axis=0) if t else np.zeros(B)
                    R = torch.tensor([max(R0 - g / scale, R0 * floor) for g in got], dtype=torch.float32)[:, None]
                    want_cond = torch.full((B * N, 1), cond_target) if cond_target else R.repeat_interleave(N, 0)
                    s_now = norm.normalize(torch.as_tensor(WIRE_OBS[t])).repeat_interleave(N, 0)  # (B*N, S)
                    assert len(den.calls) == t + 1
                    call = den.calls[-1]
                    where = f"{method} {kind} cond_target={cond_target} step {t}"
                    assert torch.allclose(call["cond"], want_cond, atol=1e-6), (where, call["cond"].flatten(), want_cond.flatten())
                    assert call["w"] == s["guidance"], where
                    if kind == "td":
                        assert call["method"] == "refine", where
                        assert (call["k"], call["add_noise"], call["temperature"]) == (
                            s["refine_steps"], s["refine_noise"], s["temperature"]), (where, call)
                        assert torch.allclose(call["x"][:, 0], s_now, atol=1e-6), where
                        steps = torch.arange(1, 4, dtype=torch.float32)[None, :, None]  # the stand-in's plan
                        assert torch.allclose(call["x"][:, 1:], s_now[:, None] + steps, atol=1e-6), where
                        assert tf.log[-1]["hist_s"].shape[0] == B and not tf.log[-1]["training"]  # one rollout per env
                    else:
                        assert call["method"] == "sample" and not tf.log, where  # no transformer, no refinement
                        assert call["temperature"] == s["sample_temperature"], (where, call["temperature"])
                        assert torch.allclose(call["cond_state"], s_now, atol=1e-6), where
                    checked += 1
                assert float(R[1]) == pytest.approx(floor) and float(R[0]) > floor  # env 1 sits on the floor
    print(f"{method}: {checked} decisions checked")


def test_glue_planner_dropout_proposals_are_n_rollouts_in_train_mode():
    """Catches: proposals="dropout" rolling out once per environment (N equal candidates) or with dropout off, or
    leaving the transformer in train mode afterwards (every later plan would be sampled). Stand-ins: one rollout
    over each environment's history repeated N times, in train mode, and eval mode after the decision; the
    denoiser refines exactly those N rollouts. The real (tiny) transformer: its N candidates per environment
    differ pairwise with dropout and are identical with proposals="mean"; it is in eval mode after either."""
    B, N, H = 2, 3, 4
    planner, nets, norm = stand_in_planner(q=np.zeros((B, N)), n_candidates=N, proposals="dropout")
    tf, den = nets["transformer"], nets["ema"]
    planner.reset(B)
    for t in range(3):
        planner.act(WIRE_OBS[t], WIRE_REWARDS[t])
        log = tf.log[-1]
        assert log["training"] and not tf.training, "dropout off during the rollout, or left on after it"
        hist_s, hist_r = tf.calls[-1]
        assert log["hist_s"].shape[0] == B * N
        assert torch.equal(log["hist_s"], planner.hist_s[:, : t + 1].repeat_interleave(N, 0))
        assert torch.equal(log["hist_r"], planner.hist_r[:, : t + 1].repeat_interleave(N, 0))
        x = den.calls[-1]["x"]
        assert torch.equal(x[:, 1:], log["future"]), "the denoiser did not get the N rollouts"
        s_now = norm.normalize(torch.as_tensor(WIRE_OBS[t])).repeat_interleave(N, 0)
        assert torch.allclose(x[:, 0], s_now, atol=1e-6)
    torch.manual_seed(0)
    real = TrajectoryTransformer(4, half_dim=8, n_layer=1, n_head=2, ffn_dim=16, dropout=0.1, max_len=6).eval()
    for proposals in ("dropout", "mean"):
        planner, nets, _ = stand_in_planner(q=np.zeros((B, N)), n_candidates=N, proposals=proposals)
        planner.transformer = real
        planner.reset(B)
        planner.act(WIRE_OBS[1])
        x = nets["ema"].calls[-1]["x"].view(B, N, H, 4)
        gaps = [float((x[b, i, 1:] - x[b, j, 1:]).abs().max()) for b in range(B) for i in range(N) for j in range(i)]
        print(f"proposals={proposals}: smallest difference between two candidates {min(gaps):.2e}")
        assert (min(gaps) > 1e-4) if proposals == "dropout" else (max(gaps) == 0.0), (proposals, gaps)
        assert not real.training


def test_glue_diffusion_refine_and_sample_call_the_net_k_and_t_times():
    """Catches: refine running 1 denoising step instead of k (refine or _denoise). The net is called once per
    step, at timesteps k-1, ..., 0, with or without guidance (guidance batches both passes in one call)."""
    d = tiny_diffusion(T=10)
    seen = []
    forward = d.model.forward
    d.model.forward = lambda x, t, r, u: (seen.append(t.tolist()), forward(x, t, r, u))[1]  # count the calls
    x, r = torch.randn(2, 8, 3), torch.randn(2, 1)
    for w in (1.0, 1.5):
        seen.clear()
        d.refine(x, 4, r, w=w)
        assert [ts[0] for ts in seen] == [3, 2, 1, 0], (w, seen)
    seen.clear()
    d.sample(x[:, 0], r, w=1.0)
    assert [ts[0] for ts in seen] == list(range(9, -1, -1))


class RecordingUnet(nn.Module):
    """A stand-in denoiser net: records its inputs and predicts 0."""

    def __init__(self):
        super().__init__()
        self.p, self.seen = nn.Parameter(torch.zeros(())), []

    def forward(self, x, t, returns, use_cond):
        self.seen.append(x.detach().clone())
        return x * 0 + self.p


def test_glue_diffusion_loss_inpaints_first_state():
    """Catches: the first-state inpainting removed from the training loss (x_t[:, 0] = x0[:, 0])."""
    net = RecordingUnet()
    d = GaussianDiffusion(net, horizon=8, state_dim=3, n_timesteps=10)
    x0 = torch.randn(16, 8, 3)
    d.loss(x0, torch.randn(16, 1))
    x_t = net.seen[0]
    assert torch.equal(x_t[:, 0], x0[:, 0])  # the current state is never noised
    assert (x_t[:, 1:] - x0[:, 1:]).abs().min() > 0  # the rest is


def test_glue_transformer_positions_matter():
    """Catches: the positional encoding removed. Identical tokens at every position give identical outputs
    without it (each position attends to copies of one token); with it, every position predicts differently."""
    for causal in (True, False):
        tf = _tiny_transformer(dropout=0.0, causal=causal)
        s, r = torch.randn(1, 1, 3).expand(1, 6, 3), torch.randn(1, 1, 1).expand(1, 6, 1)
        pred_s, pred_r = tf(s, r)
        gaps = (pred_s[:, 1:] - pred_s[:, :-1]).abs().amax(-1)  # (1, 5) change between neighbouring positions
        print(f"causal={causal}: smallest change between positions {gaps.min().item():.2e}")
        assert gaps.min() > 1e-4


def test_glue_ema_update_closed_form():
    """Catches: the EMA decay inverted (lerp weight d instead of 1 - d). ema_every 2, ema_start 4, d = 0.9:
    odd steps change nothing, step 2 copies, steps 4 and 6 give ema <- 0.9 ema + 0.1 model."""
    cfg = train.Config(ema_decay=0.9, ema_every=2, ema_start=4)
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    w = lambda m: m.weight.detach().clone()  # noqa: E731
    before = w(ema)
    train.ema_update(ema, model, 1, cfg)
    assert torch.equal(w(ema), before)  # not an update step
    train.ema_update(ema, model, 2, cfg)
    assert torch.equal(w(ema), w(model))  # before ema_start: a copy
    for step in (3, 4, 5, 6):
        with torch.no_grad():
            model.weight += 1.0  # the model moves every step
        want = 0.9 * w(ema) + 0.1 * w(model) if step % 2 == 0 else w(ema)
        train.ema_update(ema, model, step, cfg)
        assert torch.allclose(w(ema), want, atol=1e-6), step


@pytest.fixture(scope="module")
def recorded_train(tmp_path_factory):
    """train.train() in-process for 3 steps on a hopper-shaped file whose short terminal episodes (3 and 4
    steps < the window of C + H - 1 = 6) put zeros in the masks, with every loss and every sampled batch
    recorded. lr decays over 2 steps to 10%."""
    tmp = tmp_path_factory.mktemp("recorded")
    f = any_file(tmp / "short.hdf5", lengths=[3, 4, 30], terminal=[True, True, False])
    calls = {"batch": [], "transformer": [], "diffusion": [], "invdyn": [], "critic": []}
    with pytest.MonkeyPatch.context() as mp:
        def record(cls, attr, name):
            orig = getattr(cls, attr)

            def wrapper(self, *args, **kwargs):
                out = orig(self, *args, **kwargs)
                calls[name].append(out if name == "batch" else
                                   [a.detach().clone() if torch.is_tensor(a) else a for a in args])
                return out
            mp.setattr(cls, attr, wrapper)

        record(data.WindowSampler, "sample", "batch")
        record(TrajectoryTransformer, "loss", "transformer")
        record(GaussianDiffusion, "loss", "diffusion")
        record(InverseDynamics, "loss", "invdyn")
        record(Critic, "loss", "critic")
        out = train.train({"env": "hopper-medium-v2", "dataset": str(f), "out": str(tmp / "run"), "steps": 3,
                           "log_every": 1, "lr": 1e-3, "lr_decay_steps": 2, "lr_final_frac": 0.1,
                           "eval_episodes": 0, "horizon": 4, "context": 3, "batch_size": 16, "use_critic": True,
                           "n_candidates": 1, "legacy_dynamics": False, "tf_half_dim": 8, "tf_layers": 1,
                           "tf_heads": 2, "tf_ffn": 16, "unet_dim": 8, "unet_mults": "1,2", "invdyn_hidden": 16,
                           "critic_hidden": 16, "n_timesteps": 10, "threads": 1, "device": "cpu"})
    return calls, out


def test_glue_train_step_losses_get_masks_and_first_condition(recorded_train):
    """Catches: a mask dropped (None) from the transformer, inverse-dynamics or critic loss; the denoiser
    conditioned on the window's last return-to-go instead of its first (cond_rtg[:, 0] -> [:, -1])."""
    calls, out = recorded_train
    cond_scale = json.loads((out / "config.json").read_text())["cond_scale"]
    H = 4
    assert all(len(calls[k]) == 3 for k in calls)
    for batch, tf, diff, inv, critic in zip(*(calls[k] for k in ("batch", "transformer", "diffusion", "invdyn",
                                                                  "critic"))):
        assert (batch["mask"][:, :H] == 0).any() and (batch["next_mask"][:, :H] == 0).any()  # padding is there
        states, rtg, mask = tf
        assert torch.equal(states, batch["states"]) and torch.equal(rtg, batch["rtg"])
        assert mask is not None and torch.equal(mask, batch["mask"]), "transformer loss without the mask"
        x0, cond = diff[:2]
        assert torch.equal(x0, batch["states"][:, :H])
        assert not torch.equal(batch["cond_rtg"][:, 0], batch["cond_rtg"][:, H - 1])  # first and last differ
        assert torch.allclose(cond, batch["cond_rtg"][:, 0] / cond_scale), "denoiser not on the first return"
        assert inv[3] is not None and torch.equal(inv[3], batch["next_mask"][:, :H]), "invdyn loss without mask"
        assert torch.equal(inv[0], batch["states"][:, :H]) and torch.equal(inv[1], batch["next_states"][:, :H])
        assert critic[3] is not None and torch.equal(critic[3], batch["mask"][:, :H]), "critic loss without mask"
        assert torch.equal(critic[2], batch["rtg"][:, :H, 0])


def test_glue_lr_schedule_closed_form(recorded_train):
    """Catches: the learning-rate decay removed (scheduler.step() dropped, or lr_lambda returning 1). The logged
    lr after step s is lr * (1 - (1 - final_frac) * min(s, decay) / decay), with decay 2 and final_frac 0.1."""
    _, out = recorded_train
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    want = [(s, 1e-3 * (1 - 0.9 * min(s, 2) / 2)) for s in (1, 2, 3)]
    assert [s for s, _ in got] == [1, 2, 3]
    for (_, g), (_, w) in zip(got, want):
        assert g == pytest.approx(w, rel=1e-6), (got, want)


@pytest.mark.parametrize("fast", [False, True])
def test_glue_fused_step_equals_per_network_steps(tmp_path, fast):
    """One optimizer with a group per network and one backward of the losses' sum (or, with --fast on a CPU with
    2 threads, one backward per part, the transformer's on a worker thread) give the losses of four optimizers
    and four backward passes, one per network (the official step), over 5 steps to float tolerance."""
    from diffusion import GaussianDiffusion as GD
    f = cheetah_file(tmp_path / "tiny.hdf5")
    given = {"env": "halfcheetah-medium-sb3", "dataset": str(f), "out": str(tmp_path / "run"), "steps": 5,
             "log_every": 1, "eval_episodes": 0, "horizon": 4, "context": 3, "batch_size": 8, "use_critic": True,
             "n_candidates": 1, "tf_half_dim": 8, "tf_layers": 1, "tf_heads": 2, "tf_ffn": 16, "unet_dim": 8,
             "unet_mults": "1,2", "invdyn_hidden": 16, "critic_hidden": 16, "n_timesteps": 10, "threads": 2,
             "device": "cpu", "fast": fast, "ema_start": 2, "seed": 3}
    threads = torch.get_num_threads()
    try:
        out = train.train(given)
        cfg = train.Config(**json.loads((out / "config.json").read_text()))
        logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        # the per-network reference, drawing random numbers in the same order as train.py
        d = data.load(cfg.env, cfg.dataset, rtg_scale=cfg.rtg_scale, discount=cfg.discount,
                      cond_discount=cfg.cond_discount)
        sampler = data.WindowSampler(d, cfg.context + cfg.horizon - 1)
        torch.manual_seed(cfg.seed)
        nets = plan.build_networks(train.model_args(cfg, 17, 6, d.normalizer))
        if fast:  # the same modules as the run: fast.Dropout draws its mask its own way
            nets = {k: fastpaths.apply(v) for k, v in nets.items()}
        opts = {k: (torch.optim.AdamW(nets[k].parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
                    if k == "diffusion" else torch.optim.Adam(nets[k].parameters(), lr=cfg.lr, fused=True))
                for k in ("transformer", "diffusion", "invdyn", "critic")}
        scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, train.lr_lambda(cfg)) for k, o in opts.items()}
        gen = torch.Generator().manual_seed(cfg.seed * 1000)
        for m in nets.values():
            m.train()
        for step in range(5):
            batch = sampler.sample(cfg.batch_size, gen)
            win = {k: v[:, :cfg.horizon] for k, v in batch.items() if v.dim() >= 2}
            draws = GD.training_draws(nets["diffusion"], win["states"])
            losses = {"transformer": nets["transformer"].loss(batch["states"], batch["rtg"], batch["mask"])[0],
                      "diffusion": nets["diffusion"].loss(win["states"], win["cond_rtg"][:, 0] / cfg.cond_scale, draws),
                      "invdyn": nets["invdyn"].loss(win["states"], win["next_states"], win["actions"], win["next_mask"]),
                      "critic": nets["critic"].loss(win["states"], win["actions"], win["rtg"][..., 0], win["mask"])}
            for k, loss in losses.items():
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
                scheds[k].step()
            for k, v in losses.items():
                assert logged[step][k] == pytest.approx(float(v.detach()), rel=1e-4, abs=1e-6), (step, k)
    finally:
        torch.set_num_threads(threads)
        machine.set_matmul_precision(torch.device("cpu"), onednn=False)


# ====================================================================================================
# reliability
# ====================================================================================================
REL_ROOT = pathlib.Path(data.__file__).resolve().parent
# Tiny models and budgets: every subprocess below trains in about a second on one CPU thread.
REL_TINY = ["--tf-half-dim", "8", "--tf-layers", "1", "--tf-heads", "2", "--tf-ffn", "16", "--unet-dim", "8",
            "--unet-mults", "1,2", "--invdyn-hidden", "16", "--no-use-critic", "--n-candidates", "1",
            "--batch-size", "8", "--horizon", "4", "--refine-steps", "2", "--n-timesteps", "10", "--threads", "1",
            "--eval-episodes", "0", "--device", "cpu"]
REL_ENV = "halfcheetah-medium-sb3"


def rel_run(args, timeout=120, **env):
    """Run `python <args>` from the repository root, offline: http(s) goes to a closed local port."""
    full_env = dict(os.environ, MUJOCO_GL="egl", PYTHONUNBUFFERED="1", http_proxy="http://127.0.0.1:9",
                    https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
                    HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="", **env)
    return subprocess.run([sys.executable] + [str(a) for a in args], cwd=REL_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def rel_train(out, *extra, dataset=None, **kw):
    return rel_run(["train.py", "--env", REL_ENV, "--out", out, "--dataset", dataset] + REL_TINY + list(extra), **kw)


def rel_tiny_dataset(path, seed=0, **override):
    """3 episodes of 60 steps, each ending on a timeout, in HalfCheetah's dims."""
    n, timeouts = 180, np.zeros(180, bool)
    timeouts[[59, 119, 179]] = True
    return write_d4rl(path, n=n, obs_dim=17, act_dim=6, timeouts=timeouts, seed=seed, **override)


def rel_snapshot(folder) -> dict:
    """Every entry under folder: a file's sha256, or "dir"; equal snapshots mean a byte-identical folder."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def rel_one_line_error(proc, *words) -> str:
    """Exit code 2 (docs/reliability.md), exactly one non-empty stderr line starting with 'error:', no traceback, the
    words."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (f"exit {proc.returncode}, not 2\nstdout: {proc.stdout[-2000:]}\n"
                                  f"stderr: {proc.stderr[-2000:]}")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    print(lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def rel_run_dir(tmp_path_factory):
    """A real tiny run directory (20 steps, a checkpoint at 10 and at the end) and its dataset."""
    tmp = tmp_path_factory.mktemp("rel")
    ds = tmp / "tiny.hdf5"
    rel_tiny_dataset(ds)
    run = tmp / "run"
    proc = rel_train(run, "--steps", 20, "--save-every", 10, dataset=ds)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoint.pt").is_file() and (run / "config.json").is_file()
    return run, ds


def rel_check_refused(proc, run, before, fresh=None, *words):
    """The command failed with one line and exit code 2, `run` (the --out it was given) is byte-identical, and a
    fresh --out was never created."""
    msg = rel_one_line_error(proc, *words)
    assert rel_snapshot(run) == before, "the existing run directory changed"
    if fresh is not None:
        assert not pathlib.Path(fresh).exists(), f"{fresh} was created by a failed run"
    return msg


# ------------------------------------------------------------------------------------------ bad input
def rel_resume(run, dataset, *extra, **kw):
    """`--resume` the existing run directory `run` with another --dataset (bad input must leave it untouched)."""
    return rel_run(["train.py", "--env", REL_ENV, "--out", run, "--resume", "--dataset", dataset, "--steps", 30]
                   + REL_TINY + list(extra), **kw)


def test_reliability_unknown_env(rel_run_dir):
    run, ds = rel_run_dir
    before = rel_snapshot(run)
    proc = rel_run(["train.py", "--env", "halfcheetah-medum-v2", "--out", run, "--resume"] + REL_TINY)
    rel_check_refused(proc, run, before, None, "halfcheetah-medum-v2", "did you mean", "halfcheetah-medium-v2",
                      "--list")


def test_reliability_missing_dataset_file(rel_run_dir, tmp_path):
    run, _ = rel_run_dir
    before = rel_snapshot(run)
    proc = rel_resume(run, tmp_path / "nope.hdf5")
    rel_check_refused(proc, run, before, None, "nope.hdf5", "does not exist", "--dataset")
    proc = rel_train(tmp_path / "new", "--steps", 5, dataset=tmp_path / "nope.hdf5")  # a new run is not created
    rel_check_refused(proc, run, before, tmp_path / "new", "nope.hdf5", "does not exist", "--dataset")


def test_reliability_missing_dataset_file_debug_traceback(rel_run_dir, tmp_path):
    proc = rel_train(tmp_path / "new", "--steps", 5, "--debug", dataset=tmp_path / "nope.hdf5")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UsageError" in proc.stderr, proc.stderr
    assert not (tmp_path / "new").exists()


def test_reliability_truncated_or_corrupt_hdf5(rel_run_dir, tmp_path):
    run, _ = rel_run_dir
    before = rel_snapshot(run)
    good = tmp_path / "good.hdf5"
    rel_tiny_dataset(good)
    raw = good.read_bytes()
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(raw[: len(raw) // 2])  # an interrupted copy
    proc = rel_resume(run, cut)
    rel_check_refused(proc, run, before, None, "cut.hdf5", "truncated or corrupt")
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))  # not hdf5 at all
    proc = rel_resume(run, junk)
    rel_check_refused(proc, run, before, None, "junk.hdf5", "truncated or corrupt")


def test_reliability_missing_key(rel_run_dir, tmp_path):
    run, _ = rel_run_dir
    before = rel_snapshot(run)
    rel_tiny_dataset(tmp_path / "nokey.hdf5", actions=None)
    proc = rel_resume(run, tmp_path / "nokey.hdf5")
    rel_check_refused(proc, run, before, None, "'actions'", "missing")


def test_reliability_wrong_dims(rel_run_dir, tmp_path):
    run, _ = rel_run_dir
    before = rel_snapshot(run)
    write_d4rl(tmp_path / "hopper.hdf5", n=60, obs_dim=11, act_dim=3)  # hopper's dims under a halfcheetah name
    proc = rel_resume(run, tmp_path / "hopper.hdf5")
    rel_check_refused(proc, run, before, None, "'observations'", "(60, 11)", "(N, 17)", "HalfCheetah")


def test_reliability_nan_in_data(rel_run_dir, tmp_path):
    run, _ = rel_run_dir
    before = rel_snapshot(run)
    rewards = np.zeros(180, np.float32)
    rewards[7], rewards[9] = np.nan, np.inf
    rel_tiny_dataset(tmp_path / "nan.hdf5", rewards=rewards)
    proc = rel_resume(run, tmp_path / "nan.hdf5")
    rel_check_refused(proc, run, before, None, "'rewards'", "2 NaN/inf")


def test_reliability_empty_dataset(rel_run_dir, tmp_path):
    run, _ = rel_run_dir
    before = rel_snapshot(run)
    write_d4rl(tmp_path / "empty.hdf5", n=0, obs_dim=17, act_dim=6)
    proc = rel_resume(run, tmp_path / "empty.hdf5")
    rel_check_refused(proc, run, before, None, "empty", "0 transitions")


def test_reliability_resume_other_env(rel_run_dir):
    run, _ = rel_run_dir
    before = rel_snapshot(run)
    proc = rel_run(["train.py", "--env", "hopper-medium-v2", "--out", run, "--resume", "--steps", 30] + REL_TINY)
    rel_check_refused(proc, run, before, None, "hopper-medium-v2", REL_ENV, "--env " + REL_ENV)


def test_reliability_old_checkpoint_format(rel_run_dir, tmp_path):
    run, _ = rel_run_dir
    old = tmp_path / "old"
    shutil.copytree(run, old)
    ckpt = torch.load(old / "checkpoint.pt", weights_only=True)
    ckpt["format_version"] = 0
    torch.save(ckpt, old / "checkpoint.pt")
    before = rel_snapshot(old)
    proc = rel_run(["train.py", "--env", REL_ENV, "--out", old, "--resume", "--steps", 30] + REL_TINY)
    rel_check_refused(proc, old, before, None, "format version 0", f"version {train.FORMAT_VERSION}", "retrain")
    proc = rel_run(["plan.py", "--checkpoint", old / "checkpoint.pt", "--episodes", 1, "--device", "cpu"])
    rel_check_refused(proc, old, before, None, "format version 0")


def test_reliability_cuda_without_cuda(rel_run_dir):
    run, _ = rel_run_dir
    before = rel_snapshot(run)
    args = ["train.py", "--env", REL_ENV, "--out", run, "--resume", "--steps", 30] + REL_TINY + ["--device", "cuda"]
    proc = rel_run(args, CUDA_VISIBLE_DEVICES="")  # no CUDA device visible, whatever the machine has
    rel_check_refused(proc, run, before, None, "--device cuda", "no CUDA", "--device cpu")


def test_reliability_offline_download(rel_run_dir, tmp_path):
    """An existing run of a D4RL name whose file is not cached (a copy of the tiny run, relabelled), resumed
    offline: the download fails in one line and the run directory stays byte-identical."""
    info = sources.get_info("halfcheetah-medium-v2")
    run = tmp_path / "d4rl-run"
    shutil.copytree(rel_run_dir[0], run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["config"].update(env=info.name, dataset="")  # as if trained on the downloaded file
    torch.save(ckpt, run / "checkpoint.pt")
    (run / "config.json").write_text(json.dumps(ckpt["config"], indent=2))
    before = rel_snapshot(run)
    cache = tmp_path / "cache"
    t0 = time.time()
    proc = rel_run(["train.py", "--env", info.name, "--out", run, "--resume", "--steps", 30] + REL_TINY, timeout=60,
                   D4RL_DATASET_DIR=str(cache))
    print(f"offline download failed after {time.time() - t0:.1f} s")
    rel_check_refused(proc, run, before, None, info.url, str(cache / info.filename), "--dataset")
    assert not cache.exists() or not any(cache.iterdir()), "a partial download was left in the cache"


def test_reliability_out_holds_another_run(rel_run_dir):
    run, _ = rel_run_dir
    before = rel_snapshot(run)
    proc = rel_train(run, "--steps", 5, "--seed", 7, dataset=rel_run_dir[1])
    rel_check_refused(proc, run, before, None, str(run), "already holds a run", "--resume", "--out")


# ------------------------------------------------------------------------------------------ checkpoints
def test_reliability_checkpoint_loads_weights_only(rel_run_dir, tmp_path):
    run, _ = rel_run_dir
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key in ("models", "model_args", "optimizer", "scheduler", "step", "config", "normalizer", "rng", "versions"):
        assert key in ckpt, key
    assert set(ckpt["models"]) == {"transformer", "diffusion", "ema", "invdyn"}
    assert set(ckpt["model_args"]) == {"transformer", "unet", "diffusion", "invdyn"}  # no critic: --no-use-critic
    assert [g["name"] for g in ckpt["optimizer"]["param_groups"]] == ["transformer", "diffusion", "invdyn"]
    assert ckpt["step"] == 20
    assert type(ckpt["config"]) is dict and ckpt["config"]["env"] == REL_ENV
    assert all(isinstance(v, (str, int, float, bool)) for v in ckpt["config"].values())
    assert all(torch.is_tensor(v) for v in ckpt["normalizer"].values())
    assert all(type(v) in (str, int) for v in ckpt["versions"].values())  # not TorchVersion: a class
    assert {"torch", "data"} <= set(ckpt["rng"]) and not {"python", "numpy"} & set(ckpt["rng"])  # nothing draws those
    # a file that would run code on load (a pickled global outside torch's allow-list) is refused, in one line
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": pathlib.PurePosixPath("x")}, evil)
    proc = rel_run(["plan.py", "--checkpoint", evil, "--episodes", 1, "--device", "cpu"])
    rel_one_line_error(proc, "could not be read", "weights_only=True", "is it a train.py checkpoint")


def test_reliability_kill_and_resume(rel_run_dir, tmp_path):
    """SIGKILL a run after its first checkpoint, then SIGKILL a second checkpoint write halfway (a partial temp
    file), then --resume: the old checkpoint is intact, metrics logged after it are dropped, and the final
    weights, the EMA included, equal an uninterrupted run's bit for bit. --ema-start 4 makes the EMA average
    before the first checkpoint (step 10 or later), so the resumed EMA must come from the checkpoint."""
    _, ds = rel_run_dir
    steps = 400
    common = ["--steps", "400", "--save-every", "10", "--log-every", "50", "--seed", "3", "--ema-start", "4"]
    ref = rel_train(tmp_path / "ref", *common, dataset=ds)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    env = dict(os.environ, MUJOCO_GL="egl", PYTHONUNBUFFERED="1")
    args = [sys.executable, "train.py", "--env", REL_ENV, "--out", str(out), "--dataset", str(ds)] + REL_TINY + common
    proc = subprocess.Popen(args, cwd=REL_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own (exit {proc.returncode}) before the kill"
    ckpt_path = out / "checkpoint.pt"
    killed_at = torch.load(ckpt_path, weights_only=True)["step"]
    print(f"killed after the checkpoint at step {killed_at} of {steps}")
    assert 0 < killed_at < steps

    # a checkpoint write killed halfway (train.atomic_write over the existing file) leaves the old one loadable
    saved = ckpt_path.read_bytes()
    code = ("import os, signal, sys, train\n"
            "def write(fh):\n"
            "    fh.write(open(sys.argv[1], 'rb').read()[:2000])  # the first bytes of a checkpoint\n"
            "    fh.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the write\n"
            "train.atomic_write(train.Path(sys.argv[1]), write)\n")
    half = subprocess.run([sys.executable, "-c", code, str(ckpt_path)], cwd=REL_ROOT, env=env, capture_output=True)
    assert half.returncode == -signal.SIGKILL, half.stderr[-2000:]
    assert (out / "checkpoint.pt.tmp").is_file(), "the partial write never happened: this test could not fail"
    assert ckpt_path.read_bytes() == saved and train.load_checkpoint(ckpt_path)["step"] == killed_at
    # a metrics row logged after the checkpoint, before the kill, belongs to no run once we resume from it
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": killed_at + 5, "loss": {"transformer": 1.0}, "lr": 0.0, "it_per_s": 1.0}) + "\n")

    res = rel_run(["train.py", "--env", REL_ENV, "--out", out, "--resume", "--dataset", ds] + REL_TINY + common)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from step {killed_at}" in res.stdout
    assert not (out / "checkpoint.pt.tmp").exists()  # the next save replaced the partial file
    steps_logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [r["step"] for r in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text()
                                                   .splitlines())] == list(range(50, 401, 50)), steps_logged
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    w = "model.final.1.weight"  # the EMA averages: it is neither the denoiser nor a stale copy of it
    assert not torch.equal(a["models"]["ema"][w], a["models"]["diffusion"][w])
    worst = 0.0
    for name, sd in a["models"].items():
        for k, v in sd.items():
            worst = max(worst, (v.double() - b["models"][name][k].double()).abs().max().item())
            assert torch.equal(v, b["models"][name][k]), f"{name}.{k} differs after kill and resume"
    print(f"resumed vs uninterrupted: max |diff| over every weight = {worst:.1e}")


def rel_losses(path) -> list:
    return [r["loss"] for r in map(json.loads, pathlib.Path(path).read_text().splitlines()) if "loss" in r]


def test_reliability_determinism(rel_run_dir, tmp_path):
    run, ds = rel_run_dir
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        proc = rel_train(tmp_path / name, "--steps", 50, "--log-every", 1, "--seed", seed, dataset=ds)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = rel_losses(tmp_path / name / "metrics.jsonl")
    assert len(runs["a"]) == 50 and runs["a"] == runs["b"], "same seed, different losses"
    assert runs["a"] != runs["c"], "the seed changes nothing: this test could not fail"

    returns = []
    for i in range(2):
        res = rel_run(["plan.py", "--checkpoint", run / "checkpoint.pt", "--episodes", 1, "--device", "cpu",
                       "--threads", 1, "--json", tmp_path / f"eval{i}.json"])
        assert res.returncode == 0, res.stderr[-3000:]
        returns.append(json.loads((tmp_path / f"eval{i}.json").read_text())["returns"])
    print(f"evaluation returns: {returns}")
    assert returns[0] == returns[1] and np.isfinite(returns[0]).all()


def test_reliability_eval_every_leaves_the_training_stream(rel_run_dir, tmp_path):
    """An evaluation during training (--eval-every) draws from its own seeded fork of torch's generator: the
    run's later diffusion noise, condition dropout and transformer dropout are those of a run without it, so
    the losses and the final weights are equal. Catches: plan.evaluate seeding the global generator."""
    _, ds = rel_run_dir
    common = ["--steps", 12, "--log-every", 1, "--seed", 4, "--eval-episodes", 1]
    for name, extra in (("plain", ["--eval-every", 0]), ("evals", ["--eval-every", 4])):
        proc = rel_train(tmp_path / name, *common, *extra, dataset=ds)
        assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(l) for l in (tmp_path / "evals" / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval" in r for r in evals) == 3  # steps 4 and 8, and the end
    assert rel_losses(tmp_path / "plain" / "metrics.jsonl") == rel_losses(tmp_path / "evals" / "metrics.jsonl")
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["models"] for n in ("plain", "evals"))
    for net in a:
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)


RANK_PROBE = """
import sys, torch
sys.path.insert(0, sys.argv.pop(1))
dump = sys.argv.pop(1)
import data, train
seen = {"first_windows": None, "evaluations": 0}
sample, restore, evaluate, finish = data.WindowSampler.sample, train.Run.restore, train.evaluate, train.Run.finish
def probe_sample(self, *a):
    batch = sample(self, *a)
    seen["first_windows"] = seen["first_windows"] or batch["start"].tolist()
    return batch
def probe_restore(self, *a):
    out = restore(self, *a)
    seen["torch_rng"] = torch.get_rng_state()  # the torch stream (noise, dropout) this rank starts from
    return out
def probe_evaluate(*a, **k):
    seen["evaluations"] += 1
    return evaluate(*a, **k)
def probe_finish(self, nets):
    torch.save(dict(seen, models={k: m.state_dict() for k, m in nets.items()}), f"{dump}/rank{self.rank}.pt")
    return finish(self, nets)
data.WindowSampler.sample, train.Run.restore, train.evaluate, train.Run.finish = (
    probe_sample, probe_restore, probe_evaluate, probe_finish)
sys.exit(train.main())
"""


def test_reliability_torchrun_two_ranks(rel_run_dir, tmp_path):
    """Two gloo ranks: each rank's final weights (dumped by a probe that wraps train.py from outside) must be
    equal; their first windows and their torch streams (diffusion noise, dropout) must differ (each rank draws
    its own); only rank 0 logs, writes files and evaluates. Catches: every rank seeded alike (Run.restore's
    `if rank:`)."""
    _, ds = rel_run_dir
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    dump.mkdir()
    (tmp_path / "probe.py").write_text(RANK_PROBE)
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", tmp_path / "probe.py", REL_ROOT,
            dump, "--env", REL_ENV, "--dataset", ds, "--steps", 20, "--out", out, "--save-every", 10,
            "--log-every", 5, "--ema-start", 0] + REL_TINY + ["--eval-episodes", 1, "--batch-envs", 1]
    proc = rel_run(args, timeout=300, OMP_NUM_THREADS="1")  # EMA from step 0 agrees too
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, sd in r0["models"].items():
        for key, value in sd.items():
            assert torch.equal(value, r1["models"][name][key]), (name, key)  # the replicas stayed equal
    assert r0["first_windows"] != r1["first_windows"]  # the ranks drew different windows
    assert not torch.equal(r0["torch_rng"], r1["torch_rng"])  # and draw different noise and dropout
    assert (r0["evaluations"], r1["evaluations"]) == (1, 0) and proc.stdout.count("[eval step 20]") == 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for key, value in ckpt["models"]["transformer"].items():  # rank 0's checkpoint holds those weights
        assert torch.equal(value, r0["models"]["transformer"][key])
    rows = rel_losses(out / "metrics.jsonl")  # only rank 0 logs: one row per 5 steps, not two
    assert len(rows) == 4, rows
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint.pt", "config.json", "curves.png", "metrics.jsonl"]
    assert ckpt["step"] == 20


# ====================================================================================================
# any dataset: the cpu preset, termination end to end, Minari ids, the longest horizon (walker2d H = 32)
# ====================================================================================================
# Model sizes small enough for seconds on one core; the planning settings (H, k, w) are left to the table.
ANY_TINY = ["--tf-half-dim", "8", "--tf-layers", "1", "--tf-heads", "2", "--tf-ffn", "16", "--unet-dim", "8",
            "--invdyn-hidden", "16", "--n-timesteps", "10", "--batch-size", "8", "--threads", "1", "--device", "cpu"]


def any_file(path, lengths, terminal, obs_dim=11, act_dim=3, seed=0):
    """A D4RL-layout file of episodes with the given lengths, each ending on a terminal or a timeout.
    Rewards are constant per episode (episode e earns e + 1 per step), so episode returns are known by hand."""
    ends = np.cumsum(lengths) - 1
    n = int(sum(lengths))
    rewards = np.concatenate([np.full(l, e + 1.0, np.float32) for e, l in enumerate(lengths)])
    term = flags(n, [e for e, t in zip(ends, terminal) if t])
    write_d4rl(path, n=n, obs_dim=obs_dim, act_dim=act_dim, terminals=term,
               timeouts=flags(n, [e for e, t in zip(ends, terminal) if not t]), seed=seed, rewards=rewards)
    return path


# ------------------------------------------------------------------------------------------ the cpu preset
def test_any_preset_cpu_applies_and_yields_to_flags():
    cpu = config.PRESETS["cpu"]
    cfg = train.resolve_config({"env": "hopper-medium-v2", "preset": "cpu"})
    assert {k: getattr(cfg, k) for k in cpu} == cpu  # every preset value lands
    assert (cfg.horizon, cfg.refine_steps, cfg.guidance, cfg.context) == (16, 5, 1.2, 15)  # the row's planning
    assert cfg.target_return == 0 and cfg.preset == "cpu"  # the preset's target (read off the data) beats the row's
    # explicit flags beat the preset and the row
    cfg = train.resolve_config({"env": "hopper-medium-v2", "preset": "cpu", "steps": 7, "lr": 1e-3, "unet_dim": 8,
                                "target_return": 900.0, "horizon": 8})
    assert (cfg.steps, cfg.lr, cfg.unet_dim, cfg.target_return, cfg.horizon) == (7, 1e-3, 8, 900.0, 8)
    assert cfg.batch_size == cpu["batch_size"] and cfg.tf_layers == cpu["tf_layers"]
    # the bundled rows name the preset instead of holding copies of its values, and --preset '' undoes it
    for name in ("halfcheetah-medium-sb3", "hopper-medium-sb3"):
        row = config.ENV_TABLE[name]
        assert row["preset"] == "cpu" and not set(row) & set(cpu), name
        cfg = train.resolve_config({"env": name})
        assert {k: getattr(cfg, k) for k in cpu} == cpu, name
    assert train.resolve_config({"env": "hopper-medium-sb3"}).horizon == 16
    off = train.resolve_config({"env": "halfcheetah-medium-sb3", "preset": ""})
    assert (off.steps, off.unet_dim, off.lr, off.use_critic) == (1_000_000, 64, 2e-4, True)
    for fam in ("halfcheetah", "hopper", "walker2d"):  # the preset's U-Net (3 levels) accepts every family's H
        cfg = train.resolve_config({"env": f"{fam}-medium-v2", "preset": "cpu"})
        assert cfg.horizon % 2 ** (len(cfg.unet_mults.split(",")) - 1) == 0, fam
    with pytest.raises(train.UsageError, match="unknown --preset 'gpu'"):
        train.resolve_config({"env": "hopper-medium-v2", "preset": "gpu"})
    assert "--preset" in run_script("train.py", "--help").stdout


def test_any_target_from_data_is_the_best_episode():
    assert config.target_from_data(np.array([650.0, 853.1, 345.5])) == 853.1
    assert config.target_from_data([-5.0, -2.0]) == -2.0


def test_any_preset_cli_own_file_target_and_resume(tmp_path):
    """The README's command on a file of its own: row + preset + flags, the target read off the file, and a resume
    that names neither the preset nor the file keeps both (they were resolved into the saved config)."""
    f = any_file(tmp_path / "mine.hdf5", lengths=[30, 12, 40, 25], terminal=[True, True, False, True])
    want_target = max(30 * 1.0, 12 * 2.0, 40 * 3.0, 25 * 4.0)  # episode e earns e + 1 per step: 120
    run = tmp_path / "run"
    p = rel_run(["train.py", "--env", "hopper-medium-v2", "--dataset", f, "--preset", "cpu", "--steps", 4,
                 "--eval-episodes", 0, "--out", run] + ANY_TINY, D4RL_DATASET_DIR=str(tmp_path / "no-cache"))
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["target_return"] == pytest.approx(want_target) and cfg["preset"] == "cpu"
    assert (cfg["horizon"], cfg["refine_steps"], cfg["guidance"]) == (16, 5, 1.2)  # hopper's row
    assert (cfg["lr"], cfg["save_every"], cfg["unet_mults"], cfg["use_critic"]) == (5e-4, 2000, "1,2,4", False)
    assert (cfg["unet_dim"], cfg["batch_size"], cfg["steps"]) == (8, 8, 4)  # the flags given
    p = rel_run(["train.py", "--env", "hopper-medium-v2", "--out", run, "--resume", "--steps", 6, "--threads", 1,
                 "--device", "cpu"], D4RL_DATASET_DIR=str(tmp_path / "no-cache"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from step 4" in p.stdout
    ckpt = train.load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 6
    resumed = ckpt["config"]
    assert resumed["dataset"] == str(f) and resumed["target_return"] == pytest.approx(want_target)
    assert {k: resumed[k] for k in cfg if k not in ("steps", "resume")} == \
        {k: cfg[k] for k in cfg if k not in ("steps", "resume")}


def test_any_bundled_hopper_matches_readme(tmp_path):
    """datasets/hopper-medium-sb3.hdf5 is the file datasets/README.md describes, and its row trains."""
    d = data.load("hopper-medium-sb3")
    assert d.path == ROOT / "datasets" / "hopper-medium-sb3.hdf5" and d.info.env_id == "Hopper-v4"
    assert len(d.observations) == 100000 and len(d.episode_lengths) == 484
    assert int(d.episode_terminal.sum()) == 483 and not d.episode_terminal[-1]  # the last one ends with the data
    assert (d.episode_lengths.min(), d.episode_lengths.max()) == (134, 264)
    with h5py.File(ROOT / "datasets" / "hopper-medium-sb3.hdf5") as f:
        np.testing.assert_allclose(d.episode_returns, f["metadata/episode_returns"][()], rtol=1e-4)
    norm = sources.normalized_score("hopper-medium-sb3", d.episode_returns)
    assert round(float(norm.mean()), 1) == 20.6 and round(float(norm.max()), 1) == 26.8
    assert round(float(d.episode_returns.mean()), 1) == 650.1
    r = run_cli("--env", "hopper-medium-sb3")
    assert r.returncode == 0 and "484 episodes (483 end on a terminal)" in r.stdout and "mean 20.6" in r.stdout
    p = rel_run(["train.py", "--env", "hopper-medium-sb3", "--steps", 2, "--eval-episodes", 0, "--out",
                 tmp_path / "run"] + ANY_TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["horizon"], cfg["guidance"], cfg["preset"], cfg["lr"]) == (16, 1.2, "cpu", 5e-4)
    assert cfg["target_return"] == pytest.approx(d.episode_returns.max())  # 853.1, the best episode


def test_any_bundled_reference_scores_are_the_data_s_own():
    """sources.BUNDLED_REFERENCES, the one copy of each bundled file's references that scripts and tables read, is
    what the data compute (the mean, the best episode or source) and what datasets/README.md's table says."""
    readme = (ROOT / "datasets" / "README.md").read_text()
    for name, ref in sources.BUNDLED_REFERENCES.items():
        d = data.load(name)
        norm = sources.normalized_score(name, d.episode_returns)
        assert round(float(norm.mean()), 1) == ref["data mean"], name
        if "best episode" in ref:
            assert round(float(norm.max()), 1) == ref["best episode"], name
        else:  # a mix: the mean of its best source
            with h5py.File(d.path) as f:
                src = f["metadata/episode_source"][()]
            assert round(max(float(norm[src == s].mean()) for s in np.unique(src)), 1) == ref["best source"]
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        assert f"| {ref['data mean']} (" in row and f"| {ref['BC']} ± " in row, row


def test_any_optimizer_study_commands_parse():
    """scripts/optimizer_study.py's --help runs, and every plan.py command its stages would run parses with
    plan.py's own flags, so a renamed flag fails here and not in an hour-long study."""
    r = rel_run(["scripts/optimizer_study.py", "--help"])
    assert r.returncode == 0 and "select" in r.stdout, r.stderr[-2000:]
    import importlib.util
    spec = importlib.util.spec_from_file_location("optimizer_study", ROOT / "scripts" / "optimizer_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    p = argparse.ArgumentParser()
    plan.add_planner_flags(p)
    for a in ("--episodes", "--seed", "--batch-envs"):
        p.add_argument(a, type=int)
    p.add_argument("--json")
    flags = list(study.select_runs().values()) + [f for env in (study.HCMR, study.HOPPER)
                                                  for f, _ in study.report_flags(env, 0.5, 5).values()]
    assert any("--proposals dropout" in f for f in flags) and any("--sample-temperature 0.5" in f for f in flags)
    for f in flags:
        args = p.parse_args(["--checkpoint", "c.pt"] + f.split())
        assert args.proposals in (None, "dropout") and args.planner in ("td", "transformer", "diffusion"), f


# ------------------------------------------------------------------------------------------ termination
class EndingEnv:
    """A stand-in environment: episode `i` ends on a terminal after `length` steps, earning `rewards[t]` at step t.
    Its observation is (i, t, 0, ...); stepping it after its end is an error."""

    def __init__(self, i, length, rewards, obs_dim=11, act_dim=3):
        import gymnasium as gym
        self.i, self.length, self.rewards, self.t, self.obs_dim = i, length, rewards, 0, obs_dim
        self.action_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
        self.actions = []

    def _obs(self):
        o = np.zeros(self.obs_dim)
        o[:2] = self.i, self.t
        return o

    def reset(self, seed=None):
        return self._obs(), {}

    def step(self, action):
        assert self.t < self.length, f"env {self.i} was stepped after it terminated"
        self.actions.append(np.array(action))
        r = self.rewards[self.t]
        self.t += 1
        return self._obs(), r, self.t == self.length, False, {}

    def close(self):
        pass


def any_planner(S=11, A=3, target=600.0, horizon=4):
    """A real Planner on tiny random models; callers replace its decide() when they need known actions."""
    cfg = train.Config(horizon=horizon, context=horizon - 1, tf_half_dim=8, tf_layers=1, tf_heads=2, tf_ffn=16,
                       unet_dim=8, unet_mults="1,2", invdyn_hidden=16, n_timesteps=10, refine_steps=2,
                       n_candidates=1, use_critic=False, target_return=target)
    torch.manual_seed(0)
    norm = data.Normalizer(np.zeros(S, np.float32), np.ones(S, np.float32), -5 * np.ones(S), 5 * np.ones(S))
    nets = plan.build_networks(train.model_args(cfg, S, A, norm))
    return plan.Planner(cfg, nets, norm, "cpu")


def test_any_eval_terminated_env_stops_and_rtg_is_exact(monkeypatch):
    """Lockstep evaluation of 3 envs that terminate after 3, 7 and 5 steps: each env gets only its own row's
    actions and is never stepped after its end, and the target the planner conditions on at every call equals,
    per env, R0 - (rewards that env received so far) / scale, floored at R0 * rtg_floor, then frozen."""
    lengths = [3, 7, 5]
    rewards = [[10.0 * (i + 1) + t for t in range(n)] for i, n in enumerate(lengths)]  # env 1 reaches the floor
    made = {}

    def fake_make_env(name, seed=None, **kw):
        i = seed - 100
        made[i] = EndingEnv(i, lengths[i], rewards[i])
        return made[i]

    monkeypatch.setattr(data, "make_env", fake_make_env)
    planner = any_planner(target=100.0)
    seen_r, seen_s, calls = [], [], []

    def decide(hist_s, hist_r):  # row i acts (i, call, 0) / 10: distinct per env and per call
        c = len(calls)
        calls.append(c)
        seen_r.append(hist_r[:, -1, 0].clone())
        seen_s.append(hist_s[:, -1].clone())
        return torch.tensor([[i / 10, c / 10, 0.0] for i in range(hist_s.shape[0])])

    planner.decide = decide
    res = plan.evaluate(planner, "hopper-medium-v2", episodes=3, seed=100, batch_envs=3, progress=False)
    assert len(calls) == max(lengths)  # the loop ends when the last env ends
    R0, floor, scale = 0.1, 0.1 * planner.cfg.rtg_floor, planner.cfg.rtg_scale
    worst = 0.0
    for c in range(len(calls)):
        for i, n in enumerate(lengths):
            got_so_far = sum(rewards[i][:min(c, n)])  # before call c, env i received rewards of steps 0..c-1 (< n)
            want = max(R0 - got_so_far / scale, floor)
            worst = max(worst, abs(float(seen_r[c][i]) - want))
            assert float(seen_r[c][i]) == pytest.approx(want, abs=1e-6), (c, i)
            assert float(seen_s[c][i, 1]) == min(c, n)  # a finished env keeps its last observation
    print("max |target - hand computed| over every call and env:", worst)
    assert float(seen_r[-1][1]) == pytest.approx(floor)  # env 1's target hit the floor
    for i, n in enumerate(lengths):
        env = made[i]
        assert env.t == n and len(env.actions) == n  # stepped exactly until its terminal
        np.testing.assert_allclose(np.stack(env.actions), [[i / 10, c / 10, 0.0] for c in range(n)], rtol=1e-6)
    assert res["returns"] == [sum(r) for r in rewards]
    np.testing.assert_allclose(res["normalized_scores"], sources.normalized_score("hopper-medium-v2",
                                                                               np.array([sum(r) for r in rewards])))


def test_any_eval_lockstep_hopper_matches_solo_rollouts():
    """The real Hopper-v4, 3 episodes planned in lockstep with a fixed linear policy, falls at different steps;
    each episode's return equals the same policy's solo rollout from the same seed."""
    W = torch.as_tensor(np.random.default_rng(1).normal(size=(11, 3)) * 0.5, dtype=torch.float32)

    def policy(s):  # (B, S) -> (B, A)
        return torch.tanh(s @ W)

    planner = any_planner()
    planner.decide = lambda hist_s, hist_r: policy(hist_s[:, -1])
    res = plan.evaluate(planner, "hopper-medium-v2", episodes=3, seed=7, batch_envs=3, progress=False)
    solo, lengths = [], []
    for i in range(3):
        env = data.make_env("hopper-medium-v2", seed=7 + i, legacy_dynamics=planner.cfg.legacy_dynamics)
        obs, _ = env.reset(seed=7 + i)
        ret, t, done = 0.0, 0, False
        while not done:
            a = policy(torch.as_tensor(np.asarray(obs, np.float32))[None])[0].numpy()
            obs, r, term, trunc, _ = env.step(a)
            ret, t, done = ret + r, t + 1, term or trunc
        solo.append(ret)
        lengths.append(t)
    print("episode lengths", lengths, "lockstep", res["returns"], "solo", solo)
    assert max(lengths) < 1000 and len(set(lengths)) > 1  # they terminate, at different steps
    np.testing.assert_allclose(res["returns"], solo, rtol=1e-5)


def test_any_windows_terminal_absorbing_padded_and_masked(tmp_path):
    """Hopper-shaped file, hopper's H = 16: windows that reach a terminal are padded with the absorbing terminal
    state (action 0, return-to-go 0, mask 0, flagged terminal), every start of a terminal episode is used, and the
    transformer and inverse-dynamics losses do not see the padding."""
    L = 16
    lengths, terminal = [5, 20, 30], [True, True, False]
    f = any_file(tmp_path / "t.hdf5", lengths, terminal)
    d = data.load("hopper-medium-v2", path=f)
    s = data.WindowSampler(d, L)
    assert s.starts.tolist() == list(range(0, 5)) + list(range(5, 25)) + list(range(25, 25 + 30 - L + 1))
    b = s.sample(2048, torch.Generator().manual_seed(0))
    assert set(b["start"].tolist()) == set(s.starts.tolist())
    norm = d.normalizer.normalize(d.observations)  # (N, S)
    ends = np.cumsum(lengths)
    for k in range(len(b["start"])):
        st = int(b["start"][k])
        e = int(np.searchsorted(ends, st, side="right"))
        end = int(ends[e])
        n_real = min(L, end - st)
        pad = slice(n_real, L)
        assert b["mask"][k].tolist() == [1.0] * n_real + [0.0] * (L - n_real)
        np.testing.assert_array_equal(b["states"][k, :n_real].numpy(), norm[st:st + n_real])
        np.testing.assert_array_equal(b["states"][k, pad].numpy(), np.broadcast_to(norm[end - 1], (L - n_real, 11)))
        assert (b["actions"][k, pad] == 0).all() and (b["rtg"][k, pad] == 0).all() and (b["next_mask"][k, pad] == 0).all()
        # return-to-go: (e + 1) per remaining step of the episode, scaled; after the terminal nothing is earned
        want_rtg = [(e + 1) * (end - (st + j)) / 1000 for j in range(n_real)]
        np.testing.assert_allclose(b["rtg"][k, :n_real, 0].numpy(), want_rtg, rtol=1e-6)
        assert b["terminal"][k].tolist() == [terminal[e] and st + j >= end - 1 for j in range(L)]
        if not terminal[e]:
            assert n_real == L  # a timeout episode's windows are never padded here (it is longer than L)
    # the losses ignore the padding: garbage in every padded slot changes nothing; a real slot does change them
    torch.manual_seed(0)
    tf = TrajectoryTransformer(11, max_len=L, **TINY).eval()
    inv = InverseDynamics(11, 3, hidden=16)
    pad = b["mask"] == 0  # (B, L)
    assert pad.any()

    def losses(bb):
        return (tf.loss(bb["states"], bb["rtg"], bb["mask"])[0].item(),
                inv.loss(bb["states"], bb["next_states"], bb["actions"], bb["next_mask"]).item())

    junk = {k: v.clone() for k, v in b.items()}
    for key in ("states", "next_states", "actions", "rtg"):
        junk[key][pad] = 1e3
    assert losses(junk) == losses(b)
    junk["states"][:, 0] += 1.0  # a real step
    a, c = losses(junk), losses(b)
    assert a[0] != c[0] and a[1] != c[1]


# ------------------------------------------------------------------------------------------ Minari by id
class FakeMinariDataset:
    """The parts of minari.MinariDataset the loader reads: iterate_episodes(), observation/action spaces, env_spec,
    storage.metadata (ref scores, the env spec as JSON) and spec.data_path."""

    def __init__(self, dataset_id, env_id="Hopper-v4", episodes=((60, True), (40, False), (80, True)), refs=(-20.0, 3000.0)):
        import gymnasium as gym
        rng = np.random.default_rng(0)
        spec = gym.spec(env_id)
        S, A = spec.make().observation_space.shape[0], spec.make().action_space.shape[0]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (S,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (A,), np.float32)
        self.env_spec = spec
        self.episodes = []
        for T, term in episodes:
            self.episodes.append(types.SimpleNamespace(
                observations=rng.normal(size=(T + 1, S)), actions=rng.uniform(-1, 1, (T, A)).astype(np.float32),
                rewards=rng.uniform(0, 5, T), terminations=flags(T, [T - 1] if term else []),
                truncations=flags(T, [] if term else [T - 1])))
        meta = {"dataset_id": dataset_id, "env_spec": spec.to_json()}
        if refs is not None:
            meta.update(ref_min_score=refs[0], ref_max_score=refs[1])
        self.storage = types.SimpleNamespace(metadata=meta)
        self.spec = types.SimpleNamespace(data_path=f"/minari/{dataset_id}/data")

    def iterate_episodes(self):
        return iter(self.episodes)


def fake_minari(monkeypatch, **datasets):
    loaded = []

    def load_dataset(dataset_id, download=False):
        loaded.append(dataset_id)
        if dataset_id not in datasets:
            raise FileNotFoundError(f"Dataset {dataset_id} not found locally")
        return datasets[dataset_id]

    monkeypatch.setitem(sys.modules, "minari", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(sources, "_MINARI_INFOS", {})
    return loaded


def test_any_minari_id_loads_trains_and_scores(monkeypatch, tmp_path):
    name = "minari:mujoco/hopper/medium-v0"
    ds = FakeMinariDataset("mujoco/hopper/medium-v0")
    fake_minari(monkeypatch, **{"mujoco/hopper/medium-v0": ds})
    info = sources.get_info(name)
    assert (info.env_id, info.obs_dim, info.act_dim, info.max_episode_steps) == ("Hopper-v4", 11, 3, 1000)
    assert (info.ref_min, info.ref_max, info.family, info.minari_id) == (-20.0, 3000.0, "minari", "mujoco/hopper/medium-v0")
    d = data.load(name)  # the same loading, validation and window path as every dataset
    assert str(d.path) == "/minari/mujoco/hopper/medium-v0/data"
    assert d.episode_lengths.tolist() == [60, 40, 80] and d.episode_terminal.tolist() == [True, False, True]
    np.testing.assert_allclose(d.observations[60:100], ds.episodes[1].observations[:40], rtol=1e-6)
    np.testing.assert_allclose(d.next_observations[:60], ds.episodes[0].observations[1:], rtol=1e-6)
    np.testing.assert_allclose(d.episode_returns, [e.rewards.sum() for e in ds.episodes], rtol=1e-6)
    assert len(data.WindowSampler(d, 16)) == 60 + (40 - 16 + 1) + 80
    assert sources.normalized_score(name, 1490.0) == pytest.approx(50.0)
    # planning settings: hopper's row by the recorded env id, the target read off the data
    cfg = train.resolve_config({"env": name})
    assert (cfg.horizon, cfg.refine_steps, cfg.guidance, cfg.target_return) == (16, 5, 1.2, 0)
    assert cfg.out == os.path.join("runs", "minari-mujoco-hopper-medium-v0-s0")
    # the real training entry point, then an evaluation episode in the env rebuilt from the recorded spec
    out = train.train({"env": name, "preset": "cpu", "steps": 2, "eval_episodes": 1, "out": str(tmp_path / "run"),
                       "tf_half_dim": 8, "tf_layers": 1, "tf_heads": 2, "tf_ffn": 16, "unet_dim": 8,
                       "invdyn_hidden": 16, "n_timesteps": 10, "batch_size": 8, "threads": 1, "device": "cpu"})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ev = next(r["eval"] for r in rows if "eval" in r)
    assert ev["env"] == name and len(ev["returns"]) == 1 and math.isfinite(ev["returns"][0])
    assert ev["normalized_score_mean"] == pytest.approx(100 * (ev["returns"][0] + 20.0) / 3020.0)
    assert json.loads((out / "config.json").read_text())["target_return"] == pytest.approx(d.episode_returns.max())


def test_any_minari_without_references_unknown_family_and_missing(monkeypatch):
    fake_minari(monkeypatch, **{"local/hopper-noref-v0": FakeMinariDataset("local/hopper-noref-v0", refs=None),
                                "local/pendulum-v0": FakeMinariDataset("local/pendulum-v0", env_id="Pendulum-v1")})
    name = "minari:local/hopper-noref-v0"
    assert not sources.has_reference_scores(name)
    assert "no reference returns" in data.load(name).summary()
    planner = any_planner()
    planner.decide = lambda hist_s, hist_r: torch.zeros(hist_s.shape[0], 3)
    res = plan.evaluate(planner, name, episodes=1, seed=0, batch_envs=1, progress=False)
    assert res["normalized_score_mean"] is None and res["normalized_scores"] == [None]
    assert math.isfinite(res["return_mean"]) and "no normalized score" in plan.format_result(res)
    json.dumps(res, allow_nan=False)  # strict JSON: no NaN for the missing score
    # an env of no known family: one clear error, unless the planning settings are given
    with pytest.raises(train.UsageError) as e:
        train.resolve_config({"env": "minari:local/pendulum-v0"})
    assert "Pendulum-v1" in str(e.value) and "--horizon" in str(e.value) and "\n" not in str(e.value)
    cfg = train.resolve_config({"env": "minari:local/pendulum-v0", "horizon": 8, "refine_steps": 3})
    assert (cfg.horizon, cfg.refine_steps, cfg.target_return) == (8, 3, 0)
    one_line_error(lambda: sources.get_info("minari:local/missing-v0"), "local/missing-v0", "minari download")
    monkeypatch.setitem(sys.modules, "minari", None)  # not installed
    monkeypatch.setattr(sources, "_MINARI_INFOS", {})
    one_line_error(lambda: sources.get_info(name), name, "pip install minari")


# ------------------------------------------------------------------------------------------ walker2d, H = 32
def test_any_walker2d_h32_trains_and_plans(tmp_path):
    """The longest horizon of the official table: walker2d-medium-v2's row (H = 32) with the cpu preset, on a tiny
    walker-shaped file: training, an evaluation episode on Walker2d-v4, and the planner's act()."""
    f = any_file(tmp_path / "walker.hdf5", lengths=[70, 50, 80], terminal=[False, True, False], obs_dim=17, act_dim=6)
    run = tmp_path / "run"
    p = rel_run(["train.py", "--env", "walker2d-medium-v2", "--dataset", f, "--preset", "cpu", "--steps", 3,
                 "--log-every", 1, "--eval-episodes", 1, "--out", run] + ANY_TINY, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["horizon"], cfg["context"], cfg["refine_steps"], cfg["guidance"], cfg["unet_mults"]) == \
        (32, 31, 5, 1.1, "1,2,4")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(v) for r in rows if "loss" in r for v in r["loss"].values())
    ev = next(r["eval"] for r in rows if "eval" in r)
    assert ev["env"] == "walker2d-medium-v2" and math.isfinite(ev["return_mean"])
    planner = plan.Planner.from_checkpoint(run / "checkpoint.pt", device="cpu")
    assert planner.denoiser.horizon == 32 and planner.calls_per_decision() == 31 + 5 + 1
    env = data.make_env("walker2d-medium-v2", seed=0)
    obs, _ = env.reset(seed=0)
    reward = None
    for _ in range(3):
        a = planner.act(obs, reward)
        assert a.shape == (6,) and np.all(np.abs(a) <= 1) and np.all(np.isfinite(a))
        obs, reward, *_ = env.step(a)


# ------------------------------------------------------------------------------------------ layout
SCRIPT_PATH = r"(?<![\w:/.$-])scripts/[\w./-]*\w"  # a `COMMIT:scripts/...` path names a file at that commit


def test_layout_every_script_answers_help_and_every_named_script_exists():
    """Every file under scripts/ is a script that answers --help with exit 0 and does no work: Python scripts
    through argparse, shell scripts after `bash -n` (their help names their own path), so a new script without a
    --help, or a function, flag or JSON key a script still names after a rename, fails here (a script that imports
    a moved function fails at import). Every `scripts/...` path named in the READMEs, docs/*.md, the modules and
    the scripts exists."""
    import re
    root = ROOT_DIR
    files = sorted(p for p in (root / "scripts").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    scripts = [p for p in files if p.suffix in (".py", ".sh")]
    assert [p for p in files if p not in scripts] == [root / "scripts" / "README.md"], "scripts/ holds only scripts"
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    for p in scripts:
        if p.suffix == ".sh":
            r = subprocess.run(["bash", "-n", p], capture_output=True, text=True)
            assert r.returncode == 0, f"{p}: {r.stderr}"
    procs = {p: subprocess.Popen([sys.executable if p.suffix == ".py" else "bash", p, "--help"], cwd=root, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in scripts}
    for p, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        rel = p.relative_to(root).as_posix()
        assert proc.returncode == 0 and out.strip(), f"{rel} --help: {proc.returncode}\n{out[-2000:]}\n{err[-2000:]}"
        if p.suffix == ".sh":
            assert rel in out, f"{rel} --help does not name its own path:\n{out}"
    pages = [root / "README.md", *(root / d / "README.md" for d in ("checkpoints", "datasets", "results", "scripts")),
             *root.glob("docs/*.md"), *root.glob("*.py"), *scripts]
    missing = {f"{page.relative_to(root)}: {m}" for page in pages if page.exists()
               for m in re.findall(SCRIPT_PATH, page.read_text()) if not (root / m).exists()}
    assert not missing, "named but missing:\n" + "\n".join(sorted(missing))
    for page in (root / "scripts" / "README.md", root / "results" / "README.md"):  # the maps' links and anchors
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve()
            headings = re.findall(r"^#+\s+(.*)$", dest.read_text(), re.M) if dest.suffix == ".md" else []
            assert dest.exists() and (not anchor or anchor in map(_markdown_anchor, headings)), (page, target)
    listed = (root / "results" / "README.md").read_text()
    unlisted = [p.name for p in (root / "results").iterdir() if p.name != "README.md" and f"`{p.name}" not in listed]
    assert not unlisted, f"results/README.md does not name {unlisted}"


IMPORT_ORDER = ["transformer", "diffusion", "inverse_dynamics", "fast", "sources", "envs", "data", "machine", "config",
                "plots", "plan", "train", "diagnose", "bench"]  # each module imports only those before it


def test_layout_imports_run_one_way():
    """Imports run one way (docs/usage.md): every module of the project imports only modules before it in
    IMPORT_ORDER, function-level imports included (parsed, not run), so training and planning never import the
    benchmark or the diagnostics; and bench.py still hands diagnose.py's flags on."""
    import ast
    root = ROOT_DIR
    modules = sorted(p.stem for p in root.glob("*.py") if p.stem != "test_all")
    assert sorted(IMPORT_ORDER) == modules, "place a new module in IMPORT_ORDER"
    for i, name in enumerate(IMPORT_ORDER):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        later = imported & set(IMPORT_ORDER[i:])
        assert not later, f"{name}.py imports {sorted(later)}, which come after it"
    p = run_script("bench.py", "--checkpoint", "x.pt", "--diagnose", "d.png", "--help")
    assert p.stdout.startswith("usage: diagnose.py") and "diagnose.py" in p.stderr


def test_envs_kitchen_kept_observation_does_not_change():
    """FrankaKitchen-v1 hands the same goal dicts to reset() and step() (gymnasium's passive checker warns about it;
    pytest.ini filters that warning): envs.KitchenObservation passes on the 'observation' entry alone, a fresh array
    at every step, so an observation a user keeps does not change when the env steps."""
    env = data.make_env("kitchen-mixed-v0", seed=0)
    obs, _ = env.reset()
    kept, copy = obs, obs.copy()
    for _ in range(3):
        nxt = env.step(np.full(9, 0.5, np.float32))[0]
        assert not np.shares_memory(nxt, kept)
        np.testing.assert_array_equal(kept, copy)  # what the user kept is unchanged
        assert not np.array_equal(nxt, copy)  # while the state moved
        kept, copy = nxt, nxt.copy()


# ---- walkthrough ----
WALKTHROUGH = pathlib.Path(__file__).resolve().parent / "docs" / "walkthrough.md"


def _walkthrough_blocks(tag):
    """[(argument, code, line)] for every ```python block of docs/walkthrough.md introduced by the line
    `<!-- tag -->` or `<!-- tag: argument -->`; line is the 1-based line of the fence's first code line."""
    import re
    text = WALKTHROUGH.read_text()
    pattern = re.compile(r"^<!-- " + tag + r"(?::\s*(\S+))?\s*-->\n```python\n(.*?)^```\s*$", re.M | re.S)
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start(2)) + 1) for m in pattern.finditer(text)]


# The definitions the walkthrough must quote, in this order of first appearance: (file, accepted qualified names).
WALKTHROUGH_ORDER = [
    ("diffusion.py", {"cosine_beta_schedule"}),
    ("diffusion.py", {"TemporalUnet", "TemporalUnet.forward"}),
    ("diffusion.py", {"GaussianDiffusion.loss"}),
    ("diffusion.py", {"GaussianDiffusion.guided_output"}),
    ("diffusion.py", {"GaussianDiffusion.p_sample"}),
    ("diffusion.py", {"GaussianDiffusion.refine"}),
    ("transformer.py", {"SelfAttention.forward", "TrajectoryTransformer.rollout"}),
    ("inverse_dynamics.py", {"InverseDynamics", "InverseDynamics.forward", "InverseDynamics.loss"}),
    ("plan.py", {"Planner.decide"}),
]


def _definitions(source):
    """{qualified name: (first line, last line)} of every def and class in source, 1-based, decorators included."""
    import ast
    spans = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                spans[name] = (first, child.end_lineno)
                visit(child, name + ".")
            else:
                visit(child, prefix)
    visit(ast.parse(source), "")
    return spans


def _whole_definition_problem(code, source_lines, first):
    """Why the quote `code`, found at 0-based line `first` of the source, is not one or more whole consecutive
    definitions; None when it is."""
    import re
    lines = code.splitlines()
    indent = lambda ln: len(ln) - len(ln.lstrip())
    i = 0
    while i < len(lines) and lines[i].lstrip().startswith("@"):
        i += 1
    if i == len(lines) or not re.match(r"\s*(def|class) ", lines[i]):
        return "it does not start with a def or class line (after decorators)"
    base = indent(lines[i])
    for j, ln in enumerate(lines[i + 1:], i + 1):
        if not ln.strip() or indent(ln) > base:
            continue
        if indent(ln) < base or not re.match(r"(def|class|@)", ln.lstrip()):
            return f"its line {j + 1} lies outside the definition: {ln!r}"
    after = next((ln for ln in source_lines[first + len(lines):] if ln.strip()), None)
    if after is not None and indent(after) > base:
        return f"it stops before the definition ends; the source goes on with {after!r}"
    return None


def test_walkthrough_quotes_are_verbatim():
    """Each `<!-- quote: FILE -->` block is a contiguous, verbatim run of whole lines of FILE, and one or more whole
    definitions: it starts at a def or class line (after decorators) and ends where that definition ends (the next
    non-blank source line is indented no deeper than the def, or the file ends). Together the quotes include the
    definitions of WALKTHROUGH_ORDER, in that order of first appearance."""
    root = WALKTHROUGH.parent.parent
    quotes = _walkthrough_blocks("quote")
    assert len(quotes) >= 10, f"expected at least 10 quotes in {WALKTHROUGH}, found {len(quotes)}"
    included = []  # per quote: (file, qualified names of the definitions it holds)
    for name, code, line in quotes:
        assert name, f"walkthrough.md:{line}: a quote block must name its file, <!-- quote: FILE -->"
        src = root / name
        assert src.is_file() and root in src.resolve().parents, f"walkthrough.md:{line}: {name} is not a file here"
        source = src.read_text()
        at = ("\n" + source).find("\n" + code)  # whole lines, in order, nothing between them
        if at < 0:
            src_lines = set(source.splitlines())
            missing = next(((i, ln) for i, ln in enumerate(code.splitlines()) if ln not in src_lines), None)
            if missing is not None:
                raise AssertionError(f"walkthrough.md:{line + missing[0]}: this quoted line is not in {name}:\n"
                                     f"    {missing[1]!r}")
            raise AssertionError(f"walkthrough.md:{line}: every line of this quote is in {name}, but not as one "
                                 f"contiguous block (lines added, dropped or reordered)")
        first = source.count("\n", 0, at)  # 0-based source line of the quote's first line
        problem = _whole_definition_problem(code, source.splitlines(), first)
        assert problem is None, f"walkthrough.md:{line}: this quote of {name} is not a whole function or class: {problem}"
        last = first + len(code.splitlines())  # 1-based source line of the quote's last line
        included.append((name, {q for q, (a, b) in _definitions(source).items() if first < a and b <= last}))
    where = []
    for file, names in WALKTHROUGH_ORDER:
        hit = next((i for i, (f, held) in enumerate(included) if f == file and held & names), None)
        assert hit is not None, f"the walkthrough quotes none of {sorted(names)} from {file}"
        where.append(hit)
    for (_, names), i, j in zip(WALKTHROUGH_ORDER[1:], where, where[1:]):
        assert i <= j, (f"the walkthrough first quotes {sorted(names)} in quote {j + 1}, before the definition it "
                        f"should follow (quote {i + 1}); expected order: {[sorted(n) for _, n in WALKTHROUGH_ORDER]}")


def test_walkthrough_snippets_run(monkeypatch):
    """Each `<!-- run -->` block runs from the repository root, in a fresh namespace, on one thread."""
    snippets = _walkthrough_blocks("run")
    assert len(snippets) >= 3, f"expected at least 3 runnable snippets in {WALKTHROUGH}, found {len(snippets)}"
    monkeypatch.chdir(WALKTHROUGH.parent.parent)
    t0 = time.perf_counter()
    with torch.random.fork_rng():  # the snippets seed torch; keep the suite's RNG as it was
        for i, (_, code, line) in enumerate(snippets):
            torch.set_num_threads(1)
            padded = "\n" * (line - 1) + code  # tracebacks then name the doc's own line numbers
            exec(compile(padded, str(WALKTHROUGH), "exec"), {"__name__": f"walkthrough_snippet_{i}"})
    elapsed = time.perf_counter() - t0
    torch.set_num_threads(1)
    print(f"{len(snippets)} walkthrough snippets ran in {elapsed:.1f} s")
    assert elapsed < 30, f"the walkthrough's snippets took {elapsed:.1f} s; keep them under 30 s on one thread"


def _markdown_anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    import re
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_docs_links_resolve():
    """Every relative link in the READMEs and docs/*.md names a file of this repository, and its #anchor (if any)
    a heading of that file. A renamed section or a moved file then fails here instead of in a reader's browser."""
    import re
    root = WALKTHROUGH.parent.parent
    pages = [root / "README.md", root / "checkpoints" / "README.md", root / "datasets" / "README.md",
             *sorted((root / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(root)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", dest.read_text(), flags=re.S), re.M)
                if anchor not in {_markdown_anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(root)}: {target} (no such heading)")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_docs_sections_cited_in_code_exist():
    """Every `README.md#anchor` or `docs/FILE.md#anchor` that a .py file of the project cites (comments, docstrings,
    help texts, scripts/ included) names a file and a heading that exist, and no code cites a README section by
    name in prose ('README, "Section"'). A renamed heading then fails here, not in a reader's search."""
    import re
    root = WALKTHROUGH.parent.parent
    broken = []
    for src in sorted([*root.glob("*.py"), *root.glob("scripts/**/*.py")]):
        if src.name == "test_all.py":
            continue  # its docstrings name the patterns themselves
        text = src.read_text()
        for path, anchor in re.findall(r"((?:docs/)?[A-Za-z_]+\.md)#([\w\-]+)", text):
            dest = root / path
            if not dest.is_file():
                broken.append(f"{src.relative_to(root)}: {path}#{anchor} (no such file)")
                continue
            headings = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", dest.read_text(), flags=re.S), re.M)
            if anchor not in {_markdown_anchor(h) for h in headings}:
                broken.append(f"{src.relative_to(root)}: {path}#{anchor} (no such heading)")
        broken += [f"{src.relative_to(root)}: cites {m!r} by name" for m in re.findall(r'README[\'s]*,? "[^"]+"', text)]
    assert not broken, "stale citations:\n  " + "\n  ".join(broken)


# ------------------------------------------------------------------------------------------ toy
def test_toy_refinement_repairs_off_data_plans():
    """scripts/toy.py in-process, reduced (32 points, 100 Adam steps per model, 64 samples, seed 0; about 10 s on
    one thread): the under-trained Transformer's dropout samples are mostly off the data's modes (about 30% on one),
    and GaussianDiffusion.refine at k = 20, with and without noise first, puts most of them on a mode (above 85%).
    Catches a refine that returns its input or barely moves it (a wrong noise level, a skipped or truncated
    denoising loop, the first state not pinned), a toy that stops calling the real components, and a drift of the
    toy's rows or JSON from its docstring contract."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("toy", ROOT / "scripts" / "toy.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    args = toy.parse_args(["--length", "32", "--steps", "100", "--samples", "64", "--seed", "0"])
    with torch.random.fork_rng():  # the toy seeds torch; keep the suite's RNG as it was
        result = toy.run(args, refine_ks=(20,), from_noise=False, progress=False)
    rows = {toy.row_label(r): r for r in result["rows"]}
    assert list(rows) == ["data", "transformer", "transformer_dropout", "refine k=20 (no noise)",
                          "refine k=20 (noise first)"], list(rows)
    for r in result["rows"]:
        assert set(r) == {"planner", "k", "add_noise", "temperature", "on_mode", "rms_to_mode", "mode_share"}, r
        assert abs(sum(r["mode_share"]) - 1) < 1e-3 and 0 <= r["on_mode"] <= 1, r
    assert rows["data"]["on_mode"] == 1.0 and abs(rows["data"]["rms_to_mode"] - 0.1) < 0.01  # noise std 0.1
    before = rows["transformer_dropout"]["on_mode"]
    assert before < 0.6, f"the dropout samples are already on the modes ({before:.0%}): nothing left to repair"
    for label in ("refine k=20 (no noise)", "refine k=20 (noise first)"):
        after = rows[label]["on_mode"]
        print(f"{label}: on a mode {before:.0%} -> {after:.0%}")
        assert after >= 0.85 and after >= before + 0.4, f"{label}: {before:.0%} -> {after:.0%} on a mode"
        assert rows[label]["rms_to_mode"] < rows["transformer_dropout"]["rms_to_mode"], rows[label]
    assert json.loads(toy.to_json(result)) == result  # the file the script writes holds exactly the result
