"""CPU speed paths, opt-in: `--fast` on train.py, plan.py and bench.py, or `fast.apply(net)` in your own code.

The components use the modules a reader expects (nn.Mish, nn.Conv1d, nn.Dropout, torch.softmax). Each class here
computes the same function faster on a CPU, and `apply` swaps it into a built network in place. Parameters and
state_dict keys do not change, so a checkpoint moves freely between the two paths.

They are not bit-equal to the plain modules, so they are off by default:
- the exp-form Mish and the written-out softmax round differently (within 2e-6 relative, tested);
- the trimmed convolution sums fewer (zero) terms, in another order;
- Dropout draws its mask with rand instead of bernoulli, so a --fast run takes another random path.

`WorkerThreadStep` is the training step's schedule: the transformer's forward and backward run on a worker thread,
beside the other networks', half the CPU threads each. It is on with --fast on a CPU with 2+ threads.

Measured side by side, with the CPU named: docs/speed.md#the-fast-paths.
Tests: python -m pytest test_all.py -k fast
"""
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F


class Mish(nn.Module):
    """x tanh(softplus(x)) (Misra 2019) with one exp: for e = exp(x), tanh(log(1 + e)) = e (e + 2) / (e (e + 2) + 2).
    Torch's CPU Mish kernel was a fifth of a td-official decision's operator time. Below SMALL elements, where the
    extra operators cost more, and in fp16, whose range is too small for e (e + 2), torch's kernel stays. In fp32
    the ratio is 1 above x = 20, so the clamp is exact."""
    SMALL = 2048  # where torch's ~6 ns per element equals one exp-form pass plus four extra operator calls

    def forward(self, x):
        if x.dtype == torch.float16 or x.numel() < self.SMALL:
            return F.mish(x)
        e = torch.exp(x.clamp(max=20.0))
        n = e * (e + 2.0)
        return x * (n / (n + 2.0))


class HorizonConv1d(nn.Conv1d):
    """nn.Conv1d with 'same' padding (stride 1, padding k // 2) that skips the taps which read only padding.
    On a horizon of L <= k // 2 steps, taps farther than L - 1 from the centre multiply zeros: at the official
    U-Net's H = 1 bottleneck the centre tap alone is one matrix product; at L = 2 three of five taps remain.
    While no gradient is recorded (planning) the trimmed kernel is kept contiguous, refreshed when the weight
    changes (an optimizer step or load_state_dict bumps weight._version; .to() makes a new tensor)."""

    def _trimmed(self, L):
        """The taps that can reach an input on a horizon of L steps: (C_out, C_in, 2L - 1)."""
        c = self.kernel_size[0] // 2
        w = self.weight[:, :, c - L + 1: c + L]
        if torch.is_grad_enabled() and w.requires_grad:
            return w  # training: a view, so the gradient flows into the full kernel
        key = (L, self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_cache_key", None) != key:
            self._cache, self._cache_key = w.detach().contiguous(), key
        return self._cache

    def forward(self, x):
        L, c = x.shape[-1], self.kernel_size[0] // 2
        if L > c:  # every tap reaches an input somewhere
            return super().forward(x)
        if L == 1:  # the centre tap: (B, C_in) @ (C_in, C_out)
            return F.linear(x[:, :, 0], self._trimmed(1)[:, :, 0], self.bias)[:, :, None]
        return F.conv1d(x, self._trimmed(L), self.bias, padding=L - 1)


class Dropout(nn.Module):
    """Inverted dropout, as nn.Dropout: each element zeroed w.p. p, the rest scaled by 1 / (1 - p); the identity
    in eval mode. The keep mask is uniform >= p: torch's CPU bernoulli_ behind nn.Dropout took 0.87 ms on the
    training's (64, 14, 128) activations against 0.33 ms for torch.rand_like (AMD EPYC, 1 thread)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x) >= self.p  # True w.p. 1 - p
        return x * keep * (1.0 / (1.0 - self.p))


class Softmax(nn.Module):
    """Softmax over the last dimension as max, exp, sum and divide: torch's CPU kernel took 1.0 ms on the
    training's (64, 4, 14, 14) attention scores against 0.25 ms for these four (AMD EPYC, 1 thread)."""

    def forward(self, x):
        x = (x - x.amax(dim=-1, keepdim=True).detach()).exp()  # shift-invariant: the max gets no gradient
        return x / x.sum(dim=-1, keepdim=True)  # exp(-inf) = 0 keeps masked keys hidden


def _fast_version(m: nn.Module):
    """The fast module that computes what m computes, sharing its parameters; None if there is none."""
    if type(m) is nn.Mish:
        return Mish()
    if type(m) is nn.Dropout:
        return Dropout(m.p).train(m.training)
    if type(m) is nn.Softmax and m.dim in (-1, None):
        return Softmax()
    k = m.kernel_size[0] if type(m) is nn.Conv1d else 0
    if k > 1 and k % 2 == 1 and m.stride == (1,) and m.dilation == (1,) and m.groups == 1 \
            and m.padding == (k // 2,) and m.padding_mode == "zeros":
        conv = HorizonConv1d(m.in_channels, m.out_channels, k, padding=k // 2, bias=m.bias is not None,
                             device="meta")  # no storage: the parameters are m's own
        conv.weight, conv.bias = m.weight, m.bias
        return conv.train(m.training)
    return None


def apply(net: nn.Module) -> nn.Module:
    """Swap the fast modules into net, in place, and return it. Parameters are shared, not copied, so an
    optimizer built before or after sees the same tensors."""
    for name, child in list(net.named_children()):
        fast = _fast_version(child)
        if fast is None:
            apply(child)
        else:
            setattr(net, name, fast)
    return net


def uses_fast(net: nn.Module) -> bool:
    return any(isinstance(m, (Mish, HorizonConv1d, Dropout, Softmax)) for m in net.modules())


class WorkerThreadStep:
    """The training step's forward and backward passes with the first part on a worker thread and the others on
    the calling thread, each thread's kernels on half the CPU threads. The networks share no parameters, so each
    part's backward fills only its own networks' gradients. The first part may draw random numbers (dropout); the
    others must not (their draws are made before), so the order of draws is the plain step's."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="transformer")
        self.threads = threads // 2
        torch.set_num_threads(self.threads)

    @staticmethod
    def _forward_backward(loss_fn, *args) -> dict:
        losses = loss_fn(*args)
        sum(losses.values()).backward()
        return losses

    def __call__(self, *parts) -> dict:
        """Each part is (loss_fn, *args), loss_fn returning a dict of losses. Returns every part's losses."""
        future = self.pool.submit(self._forward_backward, *parts[0])
        losses = {k: v for part in parts[1:] for k, v in self._forward_backward(*part).items()}
        return {**losses, **future.result()}
