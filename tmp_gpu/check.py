"""GPU check (helper E): compiled decode == eager on CUDA (fp32 tiny), and an eager-step kernel profile."""
import sys, time, torch
sys.path.insert(0, "tests")
from conftest import make_config
from hatlm.model import HatLM
from hatlm.generate import generate

import os; dev = torch.device(os.environ.get("DEV", "cuda"))
print(torch.__version__, dev, flush=True)
torch.manual_seed(0)
model = HatLM(make_config(arm="hybrid", sliding_window=5)).to(dev).eval()
with torch.no_grad():
    model.prompt_refine.weight.normal_(0.0, 0.2); model.thinker.gate.weight.normal_(0.0, 0.2)
    for g in model.thought_gate: g.normal_(0.0, 1.0)
P = [[1, 5, 6, 7, 8, 9], [1, 9, 10], [1, 40, 41, 42, 43, 44, 45, 46, 47]]
for kw in (dict(), dict(rethink_every=4)):
    a = generate(model, None, P, 12, ignore_eos=True, output_logits=True, **kw)
    t = time.time()
    b = generate(model, None, P, 12, ignore_eos=True, output_logits=True, compile=True, **kw)
    t1 = time.time() - t
    t = time.time()
    c = generate(model, None, P, 12, ignore_eos=True, output_logits=True, compile=True, **kw)
    t2 = time.time() - t
    st = list(model.__dict__["_hatlm_static_decode"].values())
    d = max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))
    d2 = max(float((x - y).abs().max()) for x, y in zip(a.logits, c.logits))
    print(f"CHECK {kw}: tokens equal {a.tokens == b.tokens == c.tokens}, max|dlogit| {d:.2e} / {d2:.2e}, "
          f"first call {t1:.1f}s second {t2:.2f}s, states {len(st)}, errors {[s.compile_error for s in st]}",
          flush=True)

# Eager decode step: kernels and host time per step, causal vs hybrid (Mistral-7B layer shapes, 4 layers, bf16).
from hatlm.config import ModelConfig
from hatlm.decoding import DecodeState
from torch.profiler import profile, ProfilerActivity
torch.set_default_dtype(torch.bfloat16)
with torch.device(dev):
    cm = HatLM(ModelConfig.from_name("mistral-7b", arm="causal", thinker_layers=0, thought_slots=0, num_hidden_layers=4)).eval()
    hm = HatLM(ModelConfig.from_name("mistral-7b", arm="hybrid", thinker_layers=1, thought_slots=16, num_hidden_layers=4)).eval()
torch.set_default_dtype(torch.float32)
for name, m in (("causal", cm), ("hybrid", hm)):
    with torch.inference_mode():
        stt = DecodeState(m, 1, 300)
        n = 128; ids = torch.randint(3, 1000, (1, n), device=dev)
        mm = m.config.num_thought_slots
        if name == "causal":
            lg = stt.prefill(m.decoder.embed_tokens(ids), None, torch.tensor([n], device=dev), torch.tensor([n - 1], device=dev))
        else:
            x = m.decoder_inputs(ids, torch.tensor([n], device=dev), None)
            lg = stt.prefill(x, torch.tensor([n], device=dev), torch.tensor([n + mm], device=dev), torch.tensor([n - 1], device=dev))
        tok = lg.max(-1).indices
        for i in range(5):
            lg = stt.step(tok, [n + i])
        (torch.cuda.synchronize() if dev.type == "cuda" else None)
        steps = 20
        t = time.perf_counter()
        for i in range(steps):
            lg = stt.step(tok, [n + 5 + i])
        (torch.cuda.synchronize() if dev.type == "cuda" else None)
        dt = (time.perf_counter() - t) / steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            lg = stt.step(tok, [n + 30]); (torch.cuda.synchronize() if dev.type == "cuda" else None)
        kern = [e for e in prof.events() if e.device_type.name == "CUDA"]
        print(f"PROFILE {name}: {len(m.decoder.layers)} layers, {1e3*dt:.2f} ms/step, {len(kern)} kernels/step", flush=True)
        print(prof.key_averages().table(sort_by="count", row_limit=25), flush=True)
