"""Trajectory optimizer: a return-conditioned DDPM over state trajectories.

Implements
- DDPM (Ho et al. 2020): forward process q(x_t | x_0) (Eq. 4), posterior q(x_{t-1} | x_t, x_0) (Eq. 6-7),
  epsilon-prediction loss (Eq. 14, Alg. 1) and ancestral sampling (Alg. 2);
- v-prediction (Salimans & Ho 2022, Sec. 4 and App. D): the net predicts v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0;
- the cosine noise schedule (Nichol & Dhariwal 2021, Eq. 17) and the linear one of the official code;
- classifier-free guidance (Ho & Salimans 2022, Eq. 6) on a return-to-go condition;
- the Decision Diffuser temporal U-Net (Ajay et al. 2023): Conv1d over the horizon, no attention;
- Trajectory Diffuser's refinement (Huang et al. 2024): noise a feasible plan to level k, denoise k steps.

Timestep convention, stated once: a timestep index t runs over 0..T-1 and names DDPM's step t+1, so
x_t is the sample after t+1 noising steps and alphas_cumprod[t] = prod_{i<=t} (1 - betas[i]).
t = 0 is the first noising step; sampling at t == 0 returns the posterior mean (no noise is added).
"Noise level k" (k in 0..T) therefore means timestep index k-1, and level 0 is the clean data.

Inpainting: the first state of every trajectory is the current state. It is never noised, it is left
out of the loss, and it is written back after every denoising step.

Shape legend: B = batch, H = planning horizon, S = state dim, C = channels, D = conditioning width.
Tests: python -m pytest test_all.py -k diffusion
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- noise schedules

def cosine_beta_schedule(T, s=0.008, device=None):
    """Nichol & Dhariwal Eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) * pi/2)."""
    steps = torch.arange(T + 1, dtype=torch.float64, device=device)
    f = torch.cos(((steps / T) + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=0.999)  # from Nichol & Dhariwal Sec. 3.2, because beta -> 1 near t = T is singular


def linear_beta_schedule(T, beta_start=1e-3, beta_end=2e-2, device=None):
    """The official Trajectory Diffuser schedule (from its code): with T = 100, alpha_bar_99 ~ 0.35."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64, device=device)


# ----------------------------------------------------------------------------- temporal U-Net

class SinusoidalPosEmb(nn.Module):
    """Transformer-style sinusoidal embedding of the diffusion timestep: (B,) -> (B, dim)."""

    def __init__(self, dim):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / (half - 1))  # from Vaswani et al., base 10000
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t):
        args = t.float()[:, None] * self.freqs[None, :]  # (B, 1) * (1, dim/2) -> (B, dim/2)
        return torch.cat([args.sin(), args.cos()], dim=-1)  # (B, dim)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish over the horizon: (B, C_in, H) -> (B, C_out, H)."""

    def __init__(self, c_in, c_out, kernel_size, n_groups):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                                   nn.GroupNorm(n_groups, c_out), nn.Mish())

    def forward(self, x):
        return self.block(x)


class ResidualTemporalBlock(nn.Module):
    """Two Conv1dBlocks; the conditioning vector is projected to C_out and added after the first."""

    def __init__(self, c_in, c_out, cond_dim, kernel_size, n_groups):
        super().__init__()
        self.blocks = nn.ModuleList([Conv1dBlock(c_in, c_out, kernel_size, n_groups),
                                     Conv1dBlock(c_out, c_out, kernel_size, n_groups)])
        self.cond_proj = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, c_out))
        self.residual = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cond):
        out = self.blocks[0](x) + self.cond_proj(cond)[:, :, None]  # (B, C_out, H) + (B, C_out, 1)
        out = self.blocks[1](out)
        return out + self.residual(x)


class TemporalUnet(nn.Module):
    """f_theta(x_t, t, R): x (B,H,S), t (B,) long, returns (B,1), use_cond (B,) -> v (default) or eps (B,H,S).

    use_cond is 1 for conditioned rows and 0 for dropped ones. A dropped row gets a zero return
    embedding (as Decision Diffuser does), so the unconditional model needs no extra parameters.
    """

    def __init__(self, state_dim, dim=64, dim_mults=(1, 2, 4, 8), kernel_size=5, n_groups=8, horizon=None,
                 time_mult=4, full_skip=True):
        super().__init__()
        self.horizon_divisor = 2 ** (len(dim_mults) - 1)  # one halving of H between consecutive levels
        if horizon is not None:
            self.check_horizon(horizon)
        chans = [state_dim] + [dim * m for m in dim_mults]
        cond_dim = 2 * dim  # time embedding (dim) ; return embedding (dim), 128 at dim = 64 as official
        # DEVIATION: the time MLP widens to time_mult * dim in between: 4 (64 -> 256 -> 64) is Decision
        # Diffuser's width, the default here; the official Trajectory Diffuser code uses 2 (64 -> 128 -> 64).
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_mult * dim), nn.Mish(),
                                      nn.Linear(time_mult * dim, dim))
        # official sizes at dim = 64: Linear(1 -> 128) -> Mish -> Linear(128 -> 64)
        self.returns_mlp = nn.Sequential(nn.Linear(1, 2 * dim), nn.Mish(), nn.Linear(2 * dim, dim))

        def block(c_in, c_out):
            return ResidualTemporalBlock(c_in, c_out, cond_dim, kernel_size, n_groups)

        n_levels = len(dim_mults)
        self.downs = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])):
            last = i == n_levels - 1
            down = nn.Conv1d(c_out, c_out, 3, stride=2, padding=1) if not last else nn.Identity()  # H -> H/2
            self.downs.append(nn.ModuleList([block(c_in, c_out), block(c_out, c_out), down]))
        self.mid = nn.ModuleList([block(chans[-1], chans[-1]), block(chans[-1], chans[-1])])
        self.ups = nn.ModuleList()
        for c_in, c_out in reversed(list(zip(chans[1:-1], chans[2:]))):
            up = nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1)  # H/2 -> H
            self.ups.append(nn.ModuleList([block(2 * c_out, c_in), block(c_in, c_in), up]))
        # DEVIATION: Diffuser's and Decision Diffuser's U-Nets store one skip per level but read one fewer, so the
        # full-resolution features reach the output only through the stride-2 bottleneck, and at the CPU sizes the
        # net could not learn the high-noise answer eps ~ x_t. This block reads the last skip (H, dim channels)
        # before the output head. Measured in docs/results.md#the-denoiser. full_skip=False is the official network.
        self.skip_full = block(2 * dim, dim) if full_skip else None
        self.final = nn.Sequential(Conv1dBlock(dim, dim, kernel_size, n_groups), nn.Conv1d(dim, state_dim, 1))

    def check_horizon(self, H):
        if H % self.horizon_divisor != 0:
            raise ValueError(f"horizon H={H} must be divisible by {self.horizon_divisor} (2**(levels-1))")

    def forward(self, x, t, returns, use_cond):
        self.check_horizon(x.shape[1])
        r_emb = self.returns_mlp(returns) * use_cond[:, None].to(x.dtype)  # (B, dim); zero where dropped
        cond = torch.cat([self.time_mlp(t), r_emb], dim=-1)  # (B, dim) ; (B, dim) -> (B, D)
        h = x.transpose(1, 2)  # (B, H, S) -> (B, S, H): channels first for Conv1d
        skips = []
        for block1, block2, down in self.downs:
            h = block2(block1(h, cond), cond)
            skips.append(h)
            h = down(h)
        for blk in self.mid:
            h = blk(h, cond)
        for block1, block2, up in self.ups:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C, H') ; (B, C, H') -> (B, 2C, H')
            h = up(block2(block1(h, cond), cond))
        if self.skip_full is not None:
            h = self.skip_full(torch.cat([h, skips.pop()], dim=1), cond)  # (B, 2*dim, H) -> (B, dim, H)
        return self.final(h).transpose(1, 2)  # (B, S, H) -> (B, H, S)


# ----------------------------------------------------------------------------- Gaussian diffusion

def _at(a, t, x):
    """Gather the float64 schedule value at timestep t (B,) and broadcast to x: -> (B, 1, 1) in x.dtype."""
    return a.gather(0, t).to(x.dtype)[:, None, None]


class GaussianDiffusion(nn.Module):
    """DDPM over state trajectories (B, H, S) with first-state inpainting and return guidance.

    The schedule lives in float64 buffers on the model's device and is cast per use, so keep this
    module in float32 (use autocast for lower precision; .half()/.float() would also cast the schedule).

    x_low, x_high: per-dimension bounds (S,) for the predicted x_0, in normalized units; None gives +-10.
    The last cosine step has beta = 0.999: DDPM Eq. 11 divides by sqrt(1 - beta) = 0.032 there.
    DEVIATION: DD maps states to [-1, 1] and clamps x_0 there; ours are Gaussian-normalized, so the clamp is each
    dimension's range in the training data (the Normalizer's low/high), kept as buffers that travel with the
    checkpoint. clip_denoised=False switches it off (the official code has no clamp).
    prediction: what the network outputs, "v" (default) or "eps" (DDPM, Diffuser, Decision Diffuser).
    DEVIATION: the official code and DD predict eps, and x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) divides
    the net's error by sqrt(ab_99) ~ 5e-4. With v, x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v has no division, and
    the implied eps is the exact high-noise answer sqrt(1 - ab_t) x_t plus sqrt(ab_t) times the net's term.
    Measured in docs/results.md#the-denoiser: with eps, sampling from noise without the clamp diverges.
    """

    def __init__(self, model, horizon, state_dim, n_timesteps=100, schedule="cosine", cond_drop_prob=0.5,
                 x_low=None, x_high=None, prediction="v", clip_denoised=True):
        super().__init__()
        if hasattr(model, "check_horizon"):
            model.check_horizon(horizon)
        self.model, self.horizon, self.state_dim = model, horizon, state_dim
        self.n_timesteps, self.cond_drop_prob, self.clip_denoised = n_timesteps, cond_drop_prob, clip_denoised
        if prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be 'v' or 'eps', got {prediction!r}")
        self.prediction = prediction
        device = next(model.parameters()).device
        for name, bound, default in (("x_low", x_low, -10.0), ("x_high", x_high, 10.0)):
            bound = torch.full((state_dim,), default) if bound is None else torch.as_tensor(bound)
            self.register_buffer(name, bound.detach().to(device, torch.float32).reshape(state_dim).clone())
        # DEVIATION: the default is the full cosine schedule with T = 100 (alpha_bar_T ~ 0); the official
        # code uses the linear 1e-3..2e-2 schedule (alpha_bar_99 ~ 0.35, never trained from pure noise).
        # With the full schedule one checkpoint refines at any k and also serves as the DD baseline.
        if schedule == "cosine":
            betas = cosine_beta_schedule(n_timesteps, device=device)
        elif schedule == "linear":
            betas = linear_beta_schedule(n_timesteps, device=device)
        else:
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
        alphas = 1 - betas
        ab = torch.cumprod(alphas, dim=0)  # alpha_bar_t
        ab_prev = torch.cat([torch.ones_like(ab[:1]), ab[:-1]])  # alpha_bar_{t-1}; 1 before the first step
        post_var = betas * (1 - ab_prev) / (1 - ab)  # DDPM Eq. 7, beta tilde; 0 at t = 0
        buffers = dict(
            betas=betas, alphas_cumprod=ab, alphas_cumprod_prev=ab_prev,
            sqrt_alphas_cumprod=ab.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - ab).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / ab).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / ab - 1).sqrt(),
            posterior_variance=post_var,
            # log of beta tilde with its t = 0 value (0) replaced by t = 1's, as improved-diffusion does
            posterior_log_variance_clipped=torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            posterior_mean_coef1=betas * ab_prev.sqrt() / (1 - ab),  # DDPM Eq. 7, coefficient of x_0
            posterior_mean_coef2=(1 - ab_prev) * alphas.sqrt() / (1 - ab),  # DDPM Eq. 7, coefficient of x_t
        )
        for name, value in buffers.items():
            self.register_buffer(name, value)

    # ------------------------------------------------------------------ forward process and posterior

    def q_sample(self, x0, t, noise=None):
        """x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I): DDPM Eq. 4."""
        noise = torch.randn_like(x0) if noise is None else noise
        return _at(self.sqrt_alphas_cumprod, t, x0) * x0 + _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x_0): DDPM Eq. 6-7."""
        mean = _at(self.posterior_mean_coef1, t, x_t) * x0 + _at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _at(self.posterior_variance, t, x_t), _at(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0(self, x_t, t, out):
        """x_0 from the network output `out`, clamped to [x_low, x_high] per dim.
        eps: x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) (DDPM Eq. 15); v: x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v."""
        if self.prediction == "eps":
            x0 = _at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * out
        else:
            x0 = _at(self.sqrt_alphas_cumprod, t, x_t) * x_t - _at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * out
        if not self.clip_denoised:
            return x0
        return torch.maximum(torch.minimum(x0, self.x_high.to(x0.dtype)), self.x_low.to(x0.dtype))  # (S,) broadcast

    def eps_from_output(self, x_t, t, out):
        """The eps the network output implies: itself, or sqrt(ab_t) v + sqrt(1 - ab_t) x_t for v."""
        if self.prediction == "eps":
            return out
        return _at(self.sqrt_alphas_cumprod, t, x_t) * out + _at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t

    # ------------------------------------------------------------------ training

    def training_draws(self, x0):
        """The random numbers of one loss evaluation on x0 (B, H, S), from torch's global RNG (so a checkpointed
        RNG state reproduces them): timesteps t (B,), noise (B, H, S) and the condition mask use_cond (B,),
        1 w.p. 1 - cond_drop_prob."""
        B = x0.shape[0]
        t = torch.randint(0, self.n_timesteps, (B,), device=x0.device)
        noise = torch.randn_like(x0)
        use_cond = (torch.rand(B, device=x0.device) >= self.cond_drop_prob).to(x0.dtype)
        return t, noise, use_cond

    def loss(self, x0, returns, draws=None):
        """MSE of the network output against its target (eps: DDPM Eq. 14 / Alg. 1; v: Salimans & Ho Sec. 4),
        with condition dropout for guidance. draws: (t, noise, use_cond) from training_draws, drawn here if None.

        The first state is inpainted: kept clean in x_t and left out of the loss.
        DEVIATION: Decision Diffuser's loss also covers the first state, where the target noise was
        never added; that term only teaches the net to predict noise it cannot see.
        """
        t, noise, use_cond = self.training_draws(x0) if draws is None else draws
        x_t = self.q_sample(x0, t, noise)
        x_t[:, 0] = x0[:, 0]  # inpaint the current state
        out = self.model(x_t, t, returns, use_cond)
        target = noise if self.prediction == "eps" else (
            _at(self.sqrt_alphas_cumprod, t, x0) * noise - _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)  # v
        return F.mse_loss(out[:, 1:], target[:, 1:])

    # ------------------------------------------------------------------ sampling

    def guided_output(self, x, t, returns, w):
        """out_u + w (out_c - out_u): Ho & Salimans Eq. 6 with their w = our w - 1 (w = 1: conditional).
        w is a float, or a (B, 1, 1) tensor of one weight per row.
        The eps implied by v is affine in v with the same coefficients for both, so guiding v guides eps.

        DEVIATION: one forward pass over 2B rows (official: two passes; equal, since every layer acts per row).
        """
        B = x.shape[0]
        if not torch.is_tensor(w) and w == 1.0:  # out_u + 1 (out_c - out_u) = out_c: one conditional pass
            return self.model(x, t, returns, torch.ones(B, device=x.device))
        use_cond = torch.cat([torch.ones(B, device=x.device), torch.zeros(B, device=x.device)])  # (2B,)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([returns, returns]), use_cond)
        out_c, out_u = out.chunk(2)  # (2B, H, S) -> 2 x (B, H, S)
        return out_u + w * (out_c - out_u)

    def p_sample(self, x, t, returns, w, cond_state, temperature=1.0):
        """One ancestral step x_t -> x_{t-1} (DDPM Alg. 2 line 4), then re-impose cond_state (B, S) at x[:, 0].
        temperature alpha scales the step's noise: x_{t-1} = mean + alpha sigma_t z (Decision Diffuser: 0.5)."""
        x0 = self.predict_x0(x, t, self.guided_output(x, t, returns, w))
        mean, _, log_var = self.q_posterior(x0, x, t)
        nonzero = (t != 0).to(x.dtype)[:, None, None]  # no noise at t == 0
        x = mean + nonzero * temperature * (0.5 * log_var).exp() * torch.randn_like(x)
        x[:, 0] = cond_state
        return x

    def _denoise(self, x, k, returns, w, cond_state, temperature=1.0):
        """Run timesteps k-1, ..., 0. Device work only: the timestep tensors are made once, up front."""
        ts = torch.arange(k - 1, -1, -1, device=x.device)  # (k,)
        for i in range(k):
            x = self.p_sample(x, ts[i].expand(x.shape[0]), returns, w, cond_state, temperature)
        return x

    def _check_inputs(self, x, returns):
        if x.shape[1:] != (self.horizon, self.state_dim) or returns.shape != (x.shape[0], 1):
            raise ValueError(f"expected x (B,{self.horizon},{self.state_dim}) and returns (B,1), "
                             f"got {tuple(x.shape)} and {tuple(returns.shape)}")

    @torch.no_grad()
    def refine(self, x_init, k, returns, w=1.2, add_noise=True, temperature=1.0):
        """Trajectory Diffuser's optimizer: noise the plan x_init (B, H, S) to level k, denoise k steps.

        k = 0 returns x_init unchanged; k = T is (nearly) sampling from scratch.
        add_noise=False is the official variant: x_init is taken as x_k itself.
        temperature alpha scales every noise draw: x_k = sqrt(ab_k) x_0 + alpha sqrt(1 - ab_k) z, and each
        reverse step's noise; at k = T this is sample() with the same alpha.
        """
        self._check_inputs(x_init, returns)
        if not 0 <= k <= self.n_timesteps:
            raise ValueError(f"refine steps k={k} must lie in 0..{self.n_timesteps}")
        if k == 0:
            return x_init.clone()
        cond_state = x_init[:, 0].clone()
        x = x_init.clone()
        # DEVIATION: the official code adds no noise before refining; we draw x_k ~ q(x_k | x_0 = plan),
        # so the denoiser sees inputs from its training distribution at every level.
        if add_noise:
            t = torch.full((x.shape[0],), k - 1, device=x.device, dtype=torch.long)
            x = self.q_sample(x_init, t, temperature * torch.randn_like(x_init))
            x[:, 0] = cond_state
        return self._denoise(x, k, returns, w, cond_state, temperature)

    @torch.no_grad()
    def sample(self, cond_state, returns, w=1.2, temperature=1.0):
        """Decision Diffuser baseline: from noise x_T = alpha z with x[:, 0] = cond_state (B, S), denoise all T
        steps, each step's noise scaled by alpha too. DD samples at alpha = 0.5 (its p_sample draws 0.5 z, its
        chain starts at 0.5 z; its paper's Table A1 ablates alpha); alpha = 1 is DDPM's Alg. 2."""
        x = temperature * torch.randn(cond_state.shape[0], self.horizon, self.state_dim, device=cond_state.device,
                                      dtype=cond_state.dtype)
        self._check_inputs(x, returns)
        x[:, 0] = cond_state
        return self._denoise(x, self.n_timesteps, returns, w, cond_state, temperature)
