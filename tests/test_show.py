"""`hatlm show`: the recorded numbers agree with the model, and the page renders in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from hatlm.cli import main as cli_main
from hatlm.config import ModelConfig
from hatlm.generate import generate
from hatlm.model import HatLM
from hatlm.show import attention_probs, show, trace_thinking
from hatlm.tokenizer import ByteTokenizer

CFG = dict(
    vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, initializer_range=0.2,
    bos_token_id=256, eos_token_id=257, pad_token_id=258,
    hybrid=dict(arm="hybrid", thinker_layers=2, thought_slots=3, max_think_iters=3),
)  # fmt: skip
PROMPT = "Tom has 3 apples & Ann has <5>."


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HatLM(ModelConfig(**CFG)).eval()


def test_trace_agrees_with_model_think(model):
    tok = ByteTokenizer()
    ids = tok.encode(PROMPT, bos=True)
    trace = trace_thinking(model, tok, ids, think_iters=3)
    ref = model.think(torch.tensor([ids]), torch.tensor([len(ids)]), 3)
    assert len(trace.changes) == int(ref.iterations[0]) == 3
    assert trace.changes[-1] == pytest.approx(float(ref.final_change[0]), rel=1e-5)
    torch.testing.assert_close(trace.z[-1], ref.z[0].float(), rtol=1e-5, atol=1e-6)
    assert len(trace.attention) == 3 and len(trace.attention[0]) == 2  # iterations × thinker layers
    N = len(ids) + 3
    for att in trace.attention[0]:
        assert att.shape == (4, N, N)
        torch.testing.assert_close(att.sum(-1), torch.ones(4, N))
    assert len(trace.gate) == 3 and trace.gate[0].shape == (N,)
    # Halting: with a threshold above every change, thinking stops after one iteration.
    short = trace_thinking(model, tok, ids, think_iters=3, halting_threshold=1e9)
    assert len(short.changes) == 1 and short.threshold == 1e9
    # The model code is untouched afterwards: no instance override, no hooks left behind.
    assert "step" not in vars(model.thinker)
    assert not any(layer.self_attn._forward_pre_hooks for layer in model.thinker.layers)


def test_recomputed_attention_reproduces_the_layer_output(model):
    """softmax(qkᵀ/√d + mask) · v through o_proj equals what the attention module returned."""
    tok = ByteTokenizer()
    ids = tok.encode(PROMPT, bos=True)
    seen = []

    def hook(mod, args, out):
        x, rope, mask = args[0], args[1], args[2]
        bias = args[5] if len(args) > 5 else None  # the thinker's relevance bias on the keys
        p = attention_probs(mod, x, rope, mask, bias)  # [B, H, T, T]
        B, T, _ = x.shape
        v = mod.v_proj(x).view(B, T, mod.n_kv_heads, mod.head_dim).transpose(1, 2)
        v = v.repeat_interleave(mod.n_heads // mod.n_kv_heads, dim=1)
        mine = mod.o_proj((p @ v).transpose(1, 2).reshape(B, T, -1))
        seen.append((mine, out))

    h = model.thinker.layers[1].self_attn.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.think(torch.tensor([ids]), torch.tensor([len(ids)]), 2)
    finally:
        h.remove()
    assert len(seen) == 2
    for mine, out in seen:
        torch.testing.assert_close(mine, out, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_show_writes_page_and_rethink_matches_generate(model, tmp_path):
    tok = ByteTokenizer()
    page = show(model, tok, PROMPT, tmp_path / "out", think_iters=3, rethink_every=3, max_new_tokens=10)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"index.html", "show.json", "change.png", "reweight.png", "attention.png", "thoughts.png",
            "rethink.png"} <= names  # fmt: skip
    text = page.read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", text)  # self-contained: nothing fetched
    assert text.count("data:image/png;base64,") == 5
    import json

    data = json.loads((tmp_path / "out" / "show.json").read_text())
    rt = data["rethink"]
    ids = tok.encode(PROMPT, bos=True)
    ref = generate(model, tok, [ids], 10, rethink_every=3, think_iters=3)
    assert rt["tokens"] == ref.tokens[0]
    assert len(rt["shifts"]) == ref.stats[0]["rethinks"] == 3
    assert rt["shifts"] == pytest.approx(ref.stats[0]["thought_shifts"], rel=1e-4)
    assert len(rt["per_slot"][0]) == 3


def test_cli_show_errors(tmp_path, capsys):
    assert cli_main(["show", "tiny-bytes", "--arm", "causal", "hello", "--out", str(tmp_path / "o")]) == 2
    assert "hybrid" in capsys.readouterr().err
    assert cli_main(["show", "tiny-bytes", "   ", "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


ERROR_COLLECTOR = """<script>
(function(){var errs=[];function note(m){errs.push(String(m));var e=document.getElementById('js-errors');
if(e){e.textContent=errs.join(' | ');}}
window.addEventListener('error',function(ev){
note('error: '+(ev.message||ev.type)+' '+((ev.target&&ev.target.src)||''));},true);
window.addEventListener('unhandledrejection',function(ev){note('rejection: '+ev.reason);});
var ce=console.error;console.error=function(){note('console.error: '+Array.prototype.join.call(arguments,' '));
return ce.apply(console,arguments);};
document.addEventListener('DOMContentLoaded',function(){var d=document.createElement('div');d.id='js-errors';
d.textContent=errs.join(' | ');document.body.appendChild(d);});})();
</script>"""


@pytest.mark.slow
def test_page_renders_in_headless_chromium(model, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); .ci/run installs it so CI runs this")
    tok = ByteTokenizer()
    page = show(model, tok, PROMPT, tmp_path / "out", think_iters=3, rethink_every=3, max_new_tokens=10)
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("<head>", "<head>" + ERROR_COLLECTOR, 1))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--window-size=1280,2400", "--virtual-time-budget=10000"]  # fmt: skip
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'id="js-errors"></div>' in html, re.search(r'id="js-errors">([^<]*)<', html).group(1)
    assert re.search(r'<span id="status" data-figures="5">rendered</span>', html), html[:500]
    for el in ("meta", "change", "reweight", "attention", "thoughts", "nearest", "rethink", "fig-change",
               "fig-reweight", "fig-attention", "fig-thoughts", "fig-rethink"):  # fmt: skip
        assert f'id="{el}"' in html, el
    assert not re.search(r"CONSOLE\(\d+\)].*(Uncaught|Error)", dom.stderr)
    shot = tmp_path / "shot.png"
    res = subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert float(img[..., :3].std()) > 0.05  # not a blank page: figures and text drawn
