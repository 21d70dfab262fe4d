"""The decode state of one generation call: a preallocated KV cache, prefill through the model's own
layers, and the single-token decode step through the same layers (`layers.Block.decode`).

Two kinds of step, one layer definition:

* eager (default): each step attends over the used part of the cache only, with no mask while every
  row sits at the same position (the common batch-1 case); shapes change every step.
* static (`compile=True` or "static" in `generate`): every step has the same shapes, so it can be
  captured once by `torch.compile(mode="reduce-overhead", fullgraph=True)` (CUDA graphs: one launch
  per token instead of ~20 per layer; gpt-fast's recipe). The step attends over the whole cache
  [0, max_len) with a boolean mask built on the device from a position tensor (the decoder's own mask
  predicate: causal, sliding window, per-row positions), looks RoPE up in a device table by that
  tensor, and scatters the new keys/values to it. Nothing in it reads a host value, so the host can
  queue steps ahead of the device. The static state (its cache buffers and the compiled function) is
  kept on the model per (batch, max_len rounded up, device, dtype) and reused by later calls: the
  graph is compiled once, and cache entries left over from an earlier call are masked out.
"""

from __future__ import annotations

import contextlib
import types
from collections import OrderedDict

import torch
from torch import Tensor

from hatlm.layers import DecodePosition
from hatlm.masks import to_sdpa_mask

# Fuse q/k/v (and gate/up) weights into one matrix per layer only below this many bytes of
# projection weights: the fused copies double that memory, which is fine for tiny models and not
# for Mistral 7B on a GPU (where the matrix products dominate and fusion gains little anyway).
FUSE_MAX_BYTES = 512 * 2**20
# Static caches are sized in multiples of this, so calls with nearby lengths share one compiled graph.
STATIC_LEN_QUANTUM = 128
# Static decode states kept per model (each holds a KV cache and possibly a compiled graph).
STATIC_STATES_KEPT = 2

COMPILE_MODES = (False, True, "static")


class DecodeState:
    """The preallocated KV cache of one batch, prefill, and the decode step (eager or static)."""

    def __init__(self, model, batch: int, max_len: int, *, static: bool = False) -> None:
        c = model.config
        self.model = model
        self.batch = batch
        self.max_len = max_len
        self.static = static
        self.Hkv, self.D = c.num_key_value_heads, c.head_dim
        self.window = c.sliding_window
        self.caches = model.setup_caches(batch, max_len)
        dev, dt = model.device, model.dtype
        self.device = dev
        # RoPE table from the model's own rotary module (same arithmetic per position, so the values
        # are bitwise those of a full pass). rotate_half(x)·sin = roll(x, D/2)·[−sin_lo, sin_hi].
        cos, sin = model.rope(torch.arange(max_len, device=dev)[None], dt)  # [1, 1, L, D] each
        cos, sin = cos[0, 0], sin[0, 0]
        half = self.D // 2
        self.cos = cos
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        layers = model.decoder.layers
        if static:
            # A kept state outlives this call: fused copies would go stale when the weights change
            # (and the compiler does its own fusion).
            self.fused = [None] * len(layers)
        else:
            proj_bytes = sum(
                p.numel() * p.element_size()
                for blk in layers
                for p in (*blk.self_attn.parameters(), *blk.mlp.gate_proj.parameters(), *blk.mlp.up_proj.parameters())
            )
            fuse = proj_bytes <= FUSE_MAX_BYTES
            self.fused = [blk.fused_weights() if fuse else None for blk in layers]
        self._run = self.static_step  # replaced by the compiled function (see `compiled`)
        self._compiled = False
        self._graphs = False
        self._warm = False  # the compiled function has run once (compiled without error)
        self.compile_error: str | None = None
        self._pos: Tensor | None = None  # device positions of the next static step
        self._pos_host: list[int] | None = None  # … and what they hold, to notice a jump (re-think)

    # ---------------------------------------------------------------- prefill (the model's own layers)
    def prefill(self, x: Tensor, prompt_lengths: Tensor | None, seq_lengths: Tensor, last: Tensor) -> Tensor:
        """Run the decoder over x [B, N, d] (see `HatLM.decoder_pass`), filling the cache
        → logits [B, V] at each row's entry `last[b]` (its last token)."""
        h = self.model.decoder_pass(x, prompt_lengths, seq_lengths, self.caches)
        B = x.shape[0]
        at = last.view(B, 1, 1).expand(B, 1, h.shape[-1])
        return self.model.logits_from_hidden(h.gather(1, at)[:, 0])

    # ---------------------------------------------------------------- one decode step
    def position(self, pos: list[int]) -> DecodePosition:
        """Where an eager step's tokens go: pos holds one host int per row."""
        p0 = pos[0]
        if all(p == p0 for p in pos):
            # Every row at the same position: attend over a slice of the cache, no mask needed.
            hi = p0 + 1
            lo = max(0, hi - self.window) if self.window is not None else 0
            return DecodePosition(self.cos[p0], self.sin[p0], p0, lo, hi)
        return self.device_position(torch.tensor(pos, device=self.device), max(pos) + 1)

    def device_position(self, pt: Tensor, hi: int) -> DecodePosition:
        """Where a step's tokens go, from device positions pt [B]: keys [0, hi) under the decoder's own
        mask predicate for these query positions and key lengths, writes scattered to pt."""
        B = self.batch
        fn = self.model.decoder_mask_fn(pt[:, None], pt + 1)
        mask = to_sdpa_mask(fn, B, 1, hi, self.device)  # [B, 1, 1, hi]; broadcasts over the G queries
        index = pt.view(B, 1, 1, 1).expand(B, self.Hkv, 1, self.D)
        return DecodePosition(self.cos[pt][:, None], self.sin[pt][:, None], None, 0, hi, index, mask)

    def layers(self, tokens: Tensor, at: DecodePosition) -> Tensor:
        """Tokens [B] through every decoder layer at `at` → next-token logits [B, V]."""
        model = self.model
        x = model.decoder.embed_tokens(tokens)  # [B, d]
        gates = model.thought_gate if model.thought_gate is not None else [None] * len(self.caches)
        for blk, cache, fused, gate in zip(model.decoder.layers, self.caches, self.fused, gates):
            x = blk.decode(x, at, cache, fused, gate)
        return model.logits_from_hidden(x)

    def static_step(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """The static-shape step (what gets compiled): tokens [B] at device positions pos [B] →
        logits [B, V]. Attends over the whole cache; only tensors in, no host values read."""
        return self.layers(tokens, self.device_position(pos, self.max_len))

    def step(self, tokens: Tensor, pos: list[int]) -> Tensor:
        """Feed tokens [B] at positions pos (host ints, one per row) → next-token logits [B, V]."""
        if not self.static:
            return self.layers(tokens, self.position(pos))
        if pos != self._pos_host:  # first step after a prefill: one upload, then counted on the device
            self._pos = torch.tensor(pos, device=self.device)
        if self._graphs:
            # A new iteration for CUDA-graph trees: the previous step's outputs are no longer read.
            torch.compiler.cudagraph_mark_step_begin()
        with self._sdpa_context():
            if self._compiled and not self._warm:
                logits = self._first_compiled_call(tokens)
            else:
                logits = self._run(tokens, self._pos)
        if self._graphs:
            logits = logits.clone()  # the graph's output buffer is overwritten by the next replay
        self._pos = self._pos + 1
        self._pos_host = [p + 1 for p in pos]
        return logits

    # ---------------------------------------------------------------- compilation
    def compiled(self) -> DecodeState:
        """Compile the static step (once; the first call traces and compiles it)."""
        if self._compiled:
            return self
        for cache in self.caches:
            for buf in (cache.k, cache.v, cache.xk, cache.xv):
                # The step writes these in place: fixed addresses let CUDA graphs replay the writes.
                torch._dynamo.mark_static_address(buf)
        for table in (self.cos, self.sin):  # read every step: no copy into the graph's inputs
            torch._dynamo.mark_static_address(table)
        cuda = self.device.type == "cuda"
        mode = "reduce-overhead" if cuda else "default"
        # torch.compile keeps its compiled graphs on the function's code object, at most
        # `recompile_limit` (8) per code object: every state (another model, batch or length) would be
        # one more entry, and past the limit the step silently runs uncompiled. A copy of the code
        # object per state gives each state its own entry (and one guard check per call).
        fn = DecodeState.static_step
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        self._run = torch.compile(types.MethodType(own, self), mode=mode, fullgraph=True, dynamic=False)
        self._compiled, self._graphs = True, cuda
        return self

    def _first_compiled_call(self, tokens: Tensor) -> Tensor:
        """Compile on first use; if the compiler fails (no C compiler, an unsupported op on this
        build), warn and go on with the same static step uncompiled rather than fail the generation."""
        try:
            logits = self._run(tokens, self._pos)
        except Exception as e:  # torch.compile raises many types (BackendCompilerFailed, InternalTorchDynamoError…)
            import warnings

            self.compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"torch.compile of the decode step failed, decoding uncompiled: {self.compile_error}",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
            self._run, self._compiled, self._graphs = self.static_step, False, False
            logits = self._run(tokens, self._pos)
        self._warm = True
        return logits

    def _sdpa_context(self):
        if not self._graphs:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The math kernel lets the compiler generate the (tiny) one-query attention itself (gpt-fast).
        return sdpa_kernel([SDPBackend.MATH])


class _Kept(OrderedDict):
    """The static states kept on a model: not copied with it (deepcopy, pickle) — a copy builds its own."""

    def __deepcopy__(self, memo) -> _Kept:
        return _Kept()

    def __reduce__(self):
        return (_Kept, ())


def decode_state(model, batch: int, max_len: int, compile: bool | str = False) -> DecodeState:
    """The decode state for one generation call.

    compile=False: a fresh eager state sized max_len. True: a static state with a compiled step;
    "static": the same static step run eagerly (what the compiled graph computes; for tests and
    debugging). Static states are sized max_len rounded up to STATIC_LEN_QUANTUM (at most the model's
    context) and kept on the model, so repeated calls reuse one cache and one compiled graph.
    """
    if compile is False:
        return DecodeState(model, batch, max_len)
    ctx = model.config.max_position_embeddings
    size = min(ctx, -(-max_len // STATIC_LEN_QUANTUM) * STATIC_LEN_QUANTUM)
    size = max(size, max_len)
    kept = model.__dict__.setdefault("_hatlm_static_decode", _Kept())
    key = (batch, size, str(model.device), model.dtype, compile is True)
    state = kept.pop(key, None)
    if state is None:
        while len(kept) >= STATIC_STATES_KEPT:
            kept.popitem(last=False)  # oldest first
        state = DecodeState(model, batch, size, static=True)
        if compile is True:
            state.compiled()
    state._pos_host = None  # a new call starts with a prefill
    kept[key] = state
    return state
