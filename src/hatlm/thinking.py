"""Thinking: the recurrent-depth thinker, its iteration with halting, and gradient refinement of thoughts.

    z0 = [e ; S]                                    (encoded prompt ; thought slots: learned mean + noise)
    repeat t = 1..T:  x  = inject(z, e0)            ("recall": z + norm(e0), or W[z ; norm(e0)], or z)
                      ρ  = relevance(z)             (cosine similarity to the focus, learned temperature)
                      u  = Thinker(x, key bias ρ)   (K bidirectional Mistral layers, shared weights)
                      α  = sigmoid(gate(u) + ρ)     (per position, in (0, 1))
                      z ← norm(z + α ⊙ (u − z))     until the change (or readout KL) < ε or T = T_max

Each ingredient is a HybridConfig switch (see its docstring for the papers behind them). The looped
arm uses the same module with a causal mask and no re-weighting. Training draws T from
`think_iters_train` (`sample_think_iters`) and differentiates only the last `backprop_iters`
iterations; `progressive_loss` is the deep-thinking progressive loss for train loops that want it.

`HatLM.think` (model.py) lays out [prompt ; thought slots], runs the optional encoder layers and calls
`Thinker.iterate`. `refine_thoughts` nudges the thought vectors after thinking by gradient steps on an
objective computed through the model's decoder; it is used by generation and evaluation alike. This
module depends only on the layers: it receives the model as an argument and never imports model.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatlm.config import ItersSpec, ModelConfig
from hatlm.errors import UserError
from hatlm.layers import Block, RMSNorm

if TYPE_CHECKING:  # only for annotations: thinking never imports the model at run time
    from hatlm.model import HatLM

REFINE_OBJECTIVES = ("entropy", "reread")
# α = sigmoid(logit) with the logit clamped: α stays strictly inside (0, 1) in float32 too
# (sigmoid(±15) = 3.1e-7 and 1 − 3.1e-7), whatever the parameters.
STEP_LOGIT_BOUND = 15.0


def thought_index(prompt_lengths: Tensor, m: int) -> Tensor:
    """[B, m]: where each row's thought vectors sit in [prompt ; thoughts ; …] (right after its prompt)."""
    return prompt_lengths[:, None] + torch.arange(m, device=prompt_lengths.device)


@dataclass
class ThinkResult:
    """What thinking produced, per row of the batch."""

    z: Tensor  # [B, P+m, d] refined sequence (row b: prompt_lengths[b] prompt positions, then m thoughts)
    z0: Tensor  # [B, P+m, d] the sequence before thinking
    prompt_lengths: Tensor  # [B]
    iterations: Tensor  # [B] thinking iterations each row used
    final_change: Tensor  # [B] ‖z_T − z_{T−1}‖ / ‖z_{T−1}‖ of each row's last iteration (0 if none)
    final_kl: Tensor | None = None  # [B] KL between the last two readouts (halting="kl" only)

    def thoughts(self, m: int) -> Tensor:
        """[B, m, d] the thought vectors of each row."""
        idx = thought_index(self.prompt_lengths, m)
        return self.z.gather(1, idx[..., None].expand(-1, -1, self.z.shape[-1]))

    def with_thoughts(self, thoughts: Tensor) -> ThinkResult:
        """A copy whose thought positions hold `thoughts` [B, m, d] (differentiable in them)."""
        B, m, d = thoughts.shape
        idx = thought_index(self.prompt_lengths, m)[..., None].expand(B, m, d)
        return dataclasses.replace(self, z=self.z.scatter(1, idx, thoughts))


# ------------------------------------------------------------------------------ randomised depth


def sample_think_iters(spec: ItersSpec, generator: torch.Generator | None = None) -> int:
    """Draw T from a training distribution (config.ItersSpec), always within [spec.lo, spec.hi].

    Uses `generator` (default: torch's global RNG, which training seeds and checkpoints), so the
    sequence of depths is reproducible from the seed.
    """
    if spec.kind == "fixed":
        return spec.lo
    if spec.kind == "uniform":
        return int(torch.randint(spec.lo, spec.hi + 1, (), generator=generator))
    lam = torch.tensor(spec.mean - 1.0, dtype=torch.float64)
    if spec.kind == "lognormal-poisson" and spec.mean > 1:
        # Huginn: λ ~ LogNormal(log r̄ − σ²/2, σ) has mean r̄; T = 1 + Poisson(λ).
        sigma = 0.5
        mu = math.log(spec.mean - 1.0) - sigma**2 / 2
        lam = torch.exp(mu + sigma * torch.randn((), dtype=torch.float64, generator=generator))
    t = 1 + int(torch.poisson(lam, generator=generator)) if float(lam) > 0 else 1
    return min(max(t, spec.lo), spec.hi)


# ------------------------------------------------------------------------------ the thinker


class Thinker(nn.Module):
    """K Mistral layers iterated with shared weights: input injection, relevance re-weighting (of the
    attention and of the step), per-position interpolation in (0, 1), state norm, halting.

    `causal=True` builds the looped arm's block: same ingredients, causal attention, no re-weighting
    (re-weighting compares every position with a focus that includes later ones).
    """

    def __init__(self, config: ModelConfig, causal: bool = False) -> None:
        super().__init__()
        h = config.hybrid
        d = config.hidden_size
        self.layers = nn.ModuleList(Block(config) for _ in range(h.thinker_layers))
        self.injection = h.injection
        self.inject_norm = RMSNorm(d, config.rms_norm_eps) if h.injection != "none" else None
        # "concat": W [z ; norm(e0)] with W = [I, 0] at init: it starts as no injection (which learned
        # fastest in notes/ablation.md) and learns how much of the input to take in.
        self.adapter = nn.Linear(2 * d, d, bias=False) if h.injection == "concat" else None
        self.state_norm = RMSNorm(d, config.rms_norm_eps) if h.state_norm else None
        self.interpolate = h.interpolate
        # α = sigmoid(gate(u) [+ ρ]): one interpolation weight per position.
        self.gate = nn.Linear(d, 1, bias=True) if h.interpolate else None
        self.use_reweight = h.reweight and not causal
        self.use_reweight_attention = h.reweight_attention and not causal
        # Learned temperature of the relevance (its sign is learned too); `temperature` for logging.
        self.reweight_temperature = nn.Parameter(torch.tensor(float(h.reweight_temperature)))
        self.backprop_iters = h.backprop_iters
        self.gate_bias_init = h.gate_bias_init
        self.temperature_init = h.reweight_temperature
        self.gradient_checkpointing = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The thinking path's own parameters at their documented init (layers are left alone)."""
        if self.gate is not None:
            self.gate.weight.zero_()
            self.gate.bias.fill_(self.gate_bias_init)
        self.reweight_temperature.fill_(self.temperature_init)
        if self.adapter is not None:
            d = self.adapter.out_features
            eye = torch.eye(d, dtype=self.adapter.weight.dtype, device=self.adapter.weight.device)
            self.adapter.weight.copy_(torch.cat([eye, torch.zeros_like(eye)], dim=1))
        for norm in (self.inject_norm, self.state_norm):
            if norm is not None:
                norm.weight.fill_(1.0)

    @property
    def temperature(self) -> float:
        """The learned relevance temperature (for training logs)."""
        return float(self.reweight_temperature.detach())

    def relevance(self, z: Tensor, valid: Tensor, focus: Tensor | None = None) -> Tensor:
        """ρ [B, N]: how relevant each position is to the current focus, as a logit.

        The focus is the mean of the `focus` positions (the thought slots: what the thinker is
        currently working out), or of all valid positions when `focus` is None or selects none of a
        row. c_i = cos(z_i, focus) is computed for every position, before and after the focus alike;
        ρ_i = τ · (c_i − mean of c over the row's valid positions), τ the learned temperature. So
        ρ > 0 for positions closer to the focus than average (listened to more, updated more), ρ < 0
        for the others (the reverse if τ turns negative), and ρ = 0 at padding positions.
        """
        zf = z.float()
        vf = valid.to(zf.dtype)
        sel = vf if focus is None else (focus & valid).to(zf.dtype)
        # Rows whose focus selects nothing fall back to all their valid positions.
        sel = torch.where(sel.sum(-1, keepdim=True) > 0, sel, vf)
        f = (zf * sel[..., None]).sum(1) / sel.sum(-1, keepdim=True).clamp(min=1.0)  # [B, d]
        c = (F.normalize(zf, dim=-1) * F.normalize(f, dim=-1)[:, None, :]).sum(-1)  # [B, N]
        c_mean = (c * vf).sum(-1, keepdim=True) / vf.sum(-1, keepdim=True).clamp(min=1.0)
        rho = self.reweight_temperature.float() * (c - c_mean) * vf
        return rho.to(z.dtype)

    def inject(self, z: Tensor, e0: Tensor | None) -> Tensor:
        """The block's input: the state with the encoded input fed in again (recall)."""
        if self.injection == "none" or e0 is None:
            return z
        e = self.inject_norm(e0)
        if self.injection == "add":
            return z + e
        return self.adapter(torch.cat([z, e], dim=-1))

    def step_size(self, u: Tensor, rho: Tensor | None) -> Tensor:
        """α [B, N, 1] ∈ (0, 1): the learned gate, shifted by the relevance, through a sigmoid."""
        logit = self.gate(u)
        if rho is not None:
            logit = logit + rho[..., None]
        return torch.sigmoid(logit.clamp(-STEP_LOGIT_BOUND, STEP_LOGIT_BOUND))

    def step(self, z: Tensor, e0: Tensor | None, rope, mask, valid: Tensor, focus: Tensor | None = None) -> Tensor:
        """One thinking iteration z [B, N, d] → z' [B, N, d]."""
        rho = self.relevance(z, valid, focus) if (self.use_reweight or self.use_reweight_attention) else None
        bias = None
        if self.use_reweight_attention:
            B, N = valid.shape
            bias = rho[:, None, None, :].expand(B, 1, N, N)  # every query listens more to relevant keys
        u = self.inject(z, e0)
        for layer in self.layers:
            u = layer(u, rope, mask, None, None, bias)
        if self.interpolate:
            z = z + self.step_size(u, rho if self.use_reweight else None) * (u - z)
        else:
            z = u
        return self.state_norm(z) if self.state_norm is not None else z

    def iterate(
        self,
        z: Tensor,
        rope,
        mask,
        valid: Tensor,
        max_iters: int,
        halting_threshold: float,
        *,
        e0: Tensor | None = None,
        focus: Tensor | None = None,
        halting: str = "change",
        readout: Callable[[Tensor], Tensor] | None = None,
        backprop_iters: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Up to `max_iters` steps from z (e0: what is injected; None = z as given).

        A row halts once its criterion falls under `halting_threshold` (0 = never): "change" is the
        relative change ‖z_t − z_{t−1}‖/‖z_{t−1}‖, "kl" is KL(p_t ‖ p_{t−1}) of `readout(z)` → log-probs
        [B, V] (Huginn's exit criterion). In training (grad enabled) with backprop_iters = k > 0 only
        the last k iterations are differentiated: the first T − k run under no_grad (truncated
        backprop, Huginn), which bounds memory and lets T be sampled large; `backprop_iters`
        overrides the configured k for this call.
        → (z, iterations [B], final relative change [B], final KL [B] or None).
        """
        if e0 is None:
            e0 = z
        B = z.shape[0]
        vmask = valid[..., None].to(z.dtype)
        iterations = torch.zeros(B, dtype=torch.long, device=z.device)
        final_change = torch.zeros(B, dtype=torch.float32, device=z.device)
        use_kl = halting == "kl" and halting_threshold > 0 and readout is not None
        final_kl = torch.zeros(B, dtype=torch.float32, device=z.device) if use_kl else None
        halted = torch.zeros(B, dtype=torch.bool, device=z.device)
        grad = torch.is_grad_enabled()
        k = self.backprop_iters if backprop_iters is None else int(backprop_iters)
        first_grad = max(0, max_iters - k) if (grad and k > 0) else 0
        prev_logp = None
        if use_kl:
            with torch.no_grad():
                prev_logp = readout(z).float()
        for t in range(max_iters):
            with torch.set_grad_enabled(grad and t >= first_grad):
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    z_new = torch.utils.checkpoint.checkpoint(
                        self.step, z, e0, rope, mask, valid, focus, use_reentrant=False
                    )
                else:
                    z_new = self.step(z, e0, rope, mask, valid, focus)
            with torch.no_grad():
                num = ((z_new - z) * vmask).float().pow(2).sum((1, 2)).sqrt()
                den = (z * vmask).float().pow(2).sum((1, 2)).sqrt().clamp(min=1e-12)
                change = num / den
                crit = change
                if use_kl:
                    logp = readout(z_new).float()
                    kl = (logp.exp() * (logp - prev_logp)).sum(-1)
                    prev_logp = torch.where(halted[:, None], prev_logp, logp)
                    crit = kl
            active = ~halted
            # Halted rows keep their vectors: each row's result is independent of the batch.
            z = torch.where(active[:, None, None], z_new, z)
            iterations = iterations + active.long()
            final_change = torch.where(active, change, final_change)
            if use_kl:
                final_kl = torch.where(active, crit, final_kl)
            if halting_threshold > 0:
                halted = halted | (active & (crit < halting_threshold))
                if bool(halted.all()):
                    break
        return z, iterations, final_change, final_kl


def progressive_loss(
    loss_fn: Callable[[int, int], Tensor], max_iters: int, alpha: float, generator: torch.Generator | None = None
) -> tuple[Tensor, dict[str, int]]:
    """The deep-thinking progressive loss (Bansal et al. 2022, `deepthinking/utils/training.py`):
    (1 − α)·L(T_max from scratch) + α·L(n iterations without gradient, then k more with it),
    n ~ U[0, T_max), k ~ U[1, T_max − n]. `loss_fn(no_grad_iters, grad_iters)` computes the loss of
    a forward pass that runs `no_grad_iters` detached iterations then `grad_iters` differentiated ones
    (e.g. a model call with think_iters = n + k and backprop_iters = k). Returns (loss, the draws).
    """
    if not 0 <= alpha <= 1:
        raise UserError(f"progressive loss alpha must be in [0, 1]; got {alpha}")
    if max_iters < 1:
        raise UserError(f"progressive loss needs max_iters >= 1; got {max_iters}")
    n = int(torch.randint(0, max_iters, (), generator=generator))
    k = int(torch.randint(1, max_iters - n + 1, (), generator=generator))
    loss = torch.zeros(())
    if alpha < 1:
        loss = (1 - alpha) * loss_fn(0, max_iters)
    if alpha > 0:
        loss = loss + alpha * loss_fn(n, k)
    return loss, {"n": n, "k": k}


# ------------------------------------------------------------------------------ gradient refinement


def refine_objective(
    model: HatLM, ids: Tensor, prompt_lengths: Tensor, think: ThinkResult, thoughts: Tensor, objective: str
) -> Tensor:
    """The per-row objective [B] that gradient refinement lowers, as a function of the thoughts.

    "entropy": entropy (nats) of the decoder's next-token distribution at the last thought position,
        i.e. of the first answer token. The decoder is causal, so this is the position where the
        thoughts act; lowering it makes the model more decisive about how to begin (test-time
        entropy minimisation).
    "reread": mean negative log-likelihood of the decoder re-reading the prompt (without its first
        token) after [prompt ; thoughts]: how well the thoughts let the decoder reproduce the prompt.

    ids [B, P] right-padded prompts, prompt_lengths [B]; think from `model.think` on them.
    """
    m = thoughts.shape[1]
    B = ids.shape[0]
    think = think.with_thoughts(thoughts)
    n = prompt_lengths
    if objective == "entropy":
        seq = ids
        lengths = n + m
    elif objective == "reread":
        # Row b: prompt p_1..p_n, then p_2..p_n again → [B, 2n−1] right-padded.
        L = int((2 * n - 1).max())
        j = torch.arange(L, device=ids.device)[None, :]
        src = torch.where(j < n[:, None], j, j - n[:, None] + 1).clamp(max=ids.shape[1] - 1)
        seq = ids.gather(1, src)
        lengths = 2 * n - 1 + m
    else:
        raise UserError(f"refine objective must be one of {', '.join(REFINE_OBJECTIVES)}; got {objective!r}")
    h = model.decoder_hidden(seq, n, think, lengths)  # [B, L+m, d]
    if objective == "entropy":
        # The first answer token is predicted at the last prompt token, which reads the thoughts.
        last = (n - 1).view(B, 1, 1).expand(B, 1, h.shape[-1])
        logp = F.log_softmax(model.logits_from_hidden(h.gather(1, last)[:, 0]).float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)
    # Re-read: token s of seq (s = n+i, i = 0..n−2, i.e. p_2..p_n again) is predicted at token s−1.
    T = int((n - 1).max())
    if T == 0:
        return torch.zeros(B, device=h.device)
    i = torch.arange(T, device=h.device)[None, :]
    valid = i < (n - 1)[:, None]
    s_idx = (n[:, None] + i).clamp(max=seq.shape[1] - 1)
    tgt = seq.gather(1, s_idx)
    hpos = model.token_index(n, seq.shape[1]).gather(1, s_idx - 1)
    hs = h.gather(1, hpos[..., None].expand(B, T, h.shape[-1]))
    logp = F.log_softmax(model.logits_from_hidden(hs).float(), dim=-1)
    nll = -logp.gather(-1, tgt[..., None])[..., 0]
    return (nll * valid).sum(1) / valid.sum(1).clamp(min=1)


def refine_thoughts(
    model: HatLM,
    ids: Tensor,
    prompt_lengths: Tensor,
    think: ThinkResult,
    steps: int,
    lr: float,
    objective: str = "entropy",
) -> tuple[ThinkResult, Tensor, Tensor]:
    """Gradient refinement of the thought vectors; the weights stay frozen.

    Method: normalised gradient descent per row with backtracking. Each step moves the row's thoughts
    t (all m vectors together) by lr·‖t‖ along −∇/‖∇‖ of `refine_objective`; a step that does not
    lower the objective is rejected and that row's step size halves. So the objective never rises,
    and the step is relative to the thoughts' own scale (no unit to tune). Gradients are taken with
    `torch.autograd.grad` with respect to the thoughts only: no parameter's `.grad` is touched.

    Returns (think with refined thoughts, objective before [B], objective after [B]).
    """
    m = model.config.num_thought_slots
    with torch.inference_mode(False), torch.enable_grad():
        # Tensors made under inference mode cannot enter autograd: take normal copies.
        think = dataclasses.replace(
            think, z=think.z.clone(), z0=think.z0.clone(), prompt_lengths=think.prompt_lengths.clone()
        )
        ids, n = ids.clone(), prompt_lengths.clone()
        B = ids.shape[0]

        def evaluate(t: Tensor) -> tuple[Tensor, Tensor]:
            t = t.detach().requires_grad_(True)
            obj = refine_objective(model, ids, n, think, t, objective)
            (grad,) = torch.autograd.grad(obj.sum(), [t])  # rows are independent: sum = per-row grads
            return obj.detach(), grad

        best = think.thoughts(m).detach()
        best_obj, grad = evaluate(best)
        before = best_obj.clone()
        step = torch.full((B,), float(lr), device=best.device)
        for _ in range(steps):
            gnorm = grad.flatten(1).norm(dim=1).clamp(min=1e-30)
            tnorm = best.flatten(1).norm(dim=1)
            cand = best - (step * tnorm / gnorm)[:, None, None] * grad
            obj, g = evaluate(cand)
            ok = obj < best_obj
            best = torch.where(ok[:, None, None], cand, best)
            best_obj = torch.where(ok, obj, best_obj)
            grad = torch.where(ok[:, None, None], g, grad)
            step = torch.where(ok, step, step / 2)
        refined = think.with_thoughts(best.detach())
        refined = dataclasses.replace(refined, z=refined.z.detach(), z0=think.z0.detach())
    return refined, before, best_obj


def check_refine_options(model: Any, steps: int, lr: float, objective: str) -> None:
    """Clear errors for refinement options that cannot work with this model."""
    if steps < 0:
        raise UserError(f"refine_steps must be >= 0; got {steps}")
    if not steps:
        return
    if model.arm != "hybrid":
        raise UserError(f"refine_steps needs the hybrid arm (it refines thought vectors); this model is {model.arm!r}")
    if model.config.num_thought_slots == 0:
        raise UserError("refine_steps needs thought slots; this model has thought_slots=0")
    if lr <= 0:
        raise UserError(f"refine_lr must be > 0; got {lr}")
    if objective not in REFINE_OBJECTIVES:
        raise UserError(f"refine_objective must be one of {', '.join(REFINE_OBJECTIVES)}; got {objective!r}")
