"""Thinking: the thinker module, its iteration with halting, and gradient refinement of thoughts.

    repeat t = 1..T:  u  = Thinker(z)                (K bidirectional Mistral layers, shared weights)
                      r  = re-weighting from cos-similarities of all positions
                      a  = sigmoid(gate(u))          (per position)
                      z ← z + a ⊙ r ⊙ (u − z)        until ‖Δz‖/‖z‖ < ε or T = T_max

`HatLM.think` (model.py) lays out [prompt ; thought slots], runs the optional encoder layers and calls
`Thinker.iterate`. `refine_thoughts` nudges the thought vectors after thinking by gradient steps on an
objective computed through the model's decoder; it is used by generation and evaluation alike. This
module depends only on the layers: it receives the model as an argument and never imports model.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatlm.config import ModelConfig
from hatlm.errors import UserError
from hatlm.layers import Block

if TYPE_CHECKING:  # only for annotations: thinking never imports the model at run time
    from hatlm.model import HatLM

REFINE_OBJECTIVES = ("entropy", "reread")


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

    def thoughts(self, m: int) -> Tensor:
        """[B, m, d] the thought vectors of each row."""
        idx = thought_index(self.prompt_lengths, m)
        return self.z.gather(1, idx[..., None].expand(-1, -1, self.z.shape[-1]))

    def with_thoughts(self, thoughts: Tensor) -> ThinkResult:
        """A copy whose thought positions hold `thoughts` [B, m, d] (differentiable in them)."""
        B, m, d = thoughts.shape
        idx = thought_index(self.prompt_lengths, m)[..., None].expand(B, m, d)
        return dataclasses.replace(self, z=self.z.scatter(1, idx, thoughts))


class Thinker(nn.Module):
    """K bidirectional Mistral layers iterated with shared weights, plus re-weighting and gate."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hybrid
        self.layers = nn.ModuleList(Block(config) for _ in range(h.thinker_layers))
        # a = sigmoid(gate(u)): one interpolation weight per position.
        self.gate = nn.Linear(config.hidden_size, 1, bias=True)
        # Learned temperature of the cosine-similarity re-weighting (its sign is learned too).
        self.reweight_temperature = nn.Parameter(torch.tensor(float(h.reweight_temperature)))
        self.use_reweight = h.reweight
        self.gradient_checkpointing = False

    def relevance(self, z: Tensor, valid: Tensor) -> Tensor:
        """r ∈ (0, 2) per position from the cosine similarity of every pair of valid positions.

        A position's relevance is its mean similarity to all *other* positions, past and future,
        compared with the row's average: positions that agree with the current context (the focus)
        get r > 1, outliers r < 1 (or the reverse if the learned temperature turns negative).
        """
        zn = F.normalize(z.float(), dim=-1)
        sim = zn @ zn.transpose(1, 2)  # [B, N, N]
        n = z.shape[1]
        pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=z.device)
        pair = pair.to(sim.dtype)
        c = (sim * pair).sum(-1) / pair.sum(-1).clamp(min=1.0)  # [B, N]
        vf = valid.to(sim.dtype)
        c_mean = (c * vf).sum(-1, keepdim=True) / vf.sum(-1, keepdim=True).clamp(min=1.0)
        r = 2.0 * torch.sigmoid(self.reweight_temperature * (c - c_mean))
        return r.to(z.dtype)[..., None]

    def step(self, z: Tensor, rope, mask, valid: Tensor) -> Tensor:
        """One thinking iteration z [B, N, d] → z' [B, N, d]."""
        u = z
        for layer in self.layers:
            u = layer(u, rope, mask)
        a = torch.sigmoid(self.gate(u))  # [B, N, 1]
        if self.use_reweight:
            a = a * self.relevance(z, valid)
        return z + a * (u - z)

    def iterate(
        self, z: Tensor, rope, mask, valid: Tensor, max_iters: int, halting_threshold: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Up to `max_iters` steps; a row halts once its relative change falls under the threshold
        (0 = never). → (z, iterations [B], final relative change [B])."""
        B = z.shape[0]
        vmask = valid[..., None].to(z.dtype)
        iterations = torch.zeros(B, dtype=torch.long, device=z.device)
        final_change = torch.zeros(B, dtype=torch.float32, device=z.device)
        halted = torch.zeros(B, dtype=torch.bool, device=z.device)
        for _ in range(max_iters):
            if self.gradient_checkpointing and self.training:
                z_new = torch.utils.checkpoint.checkpoint(self.step, z, rope, mask, valid, use_reentrant=False)
            else:
                z_new = self.step(z, rope, mask, valid)
            with torch.no_grad():
                num = ((z_new - z) * vmask).float().pow(2).sum((1, 2)).sqrt()
                den = (z * vmask).float().pow(2).sum((1, 2)).sqrt().clamp(min=1e-12)
                change = num / den
            active = ~halted
            # Halted rows keep their vectors: each row's result is independent of the batch.
            z = torch.where(active[:, None, None], z_new, z)
            iterations = iterations + active.long()
            final_change = torch.where(active, change, final_change)
            if halting_threshold > 0:
                halted = halted | (active & (change < halting_threshold))
                if bool(halted.all()):
                    break
        return z, iterations, final_change


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
