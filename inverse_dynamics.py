"""Action extraction and candidate selection of Trajectory Diffuser (Huang et al., ECCV 2024,
arXiv 2407.16142). The planner produces states only; an inverse-dynamics MLP turns the first two
planned states into an action, a_t = f([s_t ; s_{t+1}]) (the Decision Diffuser recipe the paper builds on).
Among several plans per decision, the official code scores each plan's action with a critic Q(s, a)
regressed on the Monte-Carlo return-to-go and samples one from softmax(Q); that is offered here too.

Sizes are the official ones: inverse dynamics 2S -> 256 -> 256 -> A with ReLU; critic
(S+A) -> 128 -> 128 -> 1 with Mish. Losses are masked means, so padded steps (mask 0) add nothing.

Shape legend: S = state dim, A = action dim, B = batch, N = candidates per decision,
"..." = any leading batch shape (e.g. (B, L) for windows).
Tests: python -m pytest test_all.py -k inverse_dynamics
"""
import torch
import torch.nn as nn


def masked_mean(err, mask=None):
    """Mean of err (...,) over the entries where mask (...,) is 1; None = plain mean."""
    if mask is None:
        return err.mean()
    if mask.shape != err.shape:
        raise ValueError(f"mask must have shape {tuple(err.shape)}, got {tuple(mask.shape)}")
    mask = mask.to(err.dtype)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


class InverseDynamics(nn.Module):
    """a_t = MLP([s_t ; s_{t+1}]), trained with MSE against the dataset actions.

    DEVIATION: the official code clamps the predicted action to the action bounds inside the training
    loss (so an output beyond a bound gets no gradient) and does not clamp at execution. Here training
    regresses the raw output, and the planner (plan.Planner.decide) clamps the executed action,
    because environments charge control costs on the action they are given."""

    def __init__(self, state_dim, action_dim, hidden=256, n_hidden=2, dropout=0.0):
        super().__init__()
        self.state_dim, self.action_dim = state_dim, action_dim
        layers, width = [], 2 * state_dim
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, action_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, s, s_next):
        """s, s_next (..., S) -> raw (unclamped) action (..., A)."""
        if s.shape != s_next.shape or s.shape[-1] != self.state_dim:
            raise ValueError(f"s and s_next must both be (..., {self.state_dim}), "
                             f"got {tuple(s.shape)} and {tuple(s_next.shape)}")
        return self.net(torch.cat([s, s_next], dim=-1))                            # (..., 2S) -> (..., A)

    def loss(self, s, s_next, a, mask=None, clamp=False):
        """Masked MSE: mean over A of the squared error, averaged over steps where mask (...,) is 1.
        clamp=True clamps the prediction to [-1, 1] first, as the official code does."""
        pred = self(s, s_next)
        pred = pred.clamp(-1.0, 1.0) if clamp else pred
        if a.shape != pred.shape:
            raise ValueError(f"actions must be {tuple(pred.shape)}, got {tuple(a.shape)}")
        return masked_mean((pred - a).pow(2).mean(-1), mask)                      # (..., A) -> (...,) -> scalar


class Critic(nn.Module):
    """Q(s, a) regressing the Monte-Carlo return-to-go, used only to pick among candidate plans."""

    def __init__(self, state_dim, action_dim, hidden=128):
        super().__init__()
        self.state_dim, self.action_dim = state_dim, action_dim
        self.net = nn.Sequential(nn.Linear(state_dim + action_dim, hidden), nn.Mish(),
                                 nn.Linear(hidden, hidden), nn.Mish(), nn.Linear(hidden, 1))
        for m in self.net:
            if isinstance(m, nn.Linear):  # from the official code, which uses Kaiming-uniform weights here
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")

    def forward(self, s, a):
        """s (..., S), a (..., A) -> predicted return-to-go (...,)."""
        if s.shape[-1] != self.state_dim or a.shape[-1] != self.action_dim or s.shape[:-1] != a.shape[:-1]:
            raise ValueError(f"s must be (..., {self.state_dim}) and a (..., {self.action_dim}) with the "
                             f"same leading shape, got {tuple(s.shape)} and {tuple(a.shape)}")
        return self.net(torch.cat([s, a], dim=-1)).squeeze(-1)                    # (..., S+A) -> (..., 1) -> (...,)

    def loss(self, s, a, rtg, mask=None):
        """Masked MSE against rtg (...,) (a trailing singleton (..., 1) is accepted)."""
        pred = self(s, a)
        if rtg.shape == pred.shape + (1,):
            rtg = rtg.squeeze(-1)                                                  # (..., 1) -> (...,)
        if rtg.shape != pred.shape:
            raise ValueError(f"rtg must be {tuple(pred.shape)}, got {tuple(rtg.shape)}")
        return masked_mean((pred - rtg).pow(2), mask)


def select_candidate(q, temperature=1.0, generator=None):
    """q (B, N) -> index (B,) drawn from softmax(q / temperature) (official: softmax over Q, temperature
    1); temperature 0 = argmax. Sampling uses the Gumbel-max trick, argmax(q / T + Gumbel noise), which
    draws exactly from the softmax, every row at once."""
    if q.dim() != 2:
        raise ValueError(f"q must be (B, N), got {tuple(q.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return q.argmax(dim=-1)
    u = torch.rand(q.shape, generator=generator, device=q.device)                 # (B, N) uniform in [0, 1)
    tiny = torch.finfo(u.dtype).tiny                                               # keeps log(0) out
    gumbel = -torch.log(-torch.log(u.clamp_min(tiny)))
    return (q.float() / temperature + gumbel).argmax(dim=-1)
