"""The inspection pictures (`lmforge.inspect.render`): PNG heatmaps and self-contained HTML pages, from analyses
computed by hand on real tiny models (helpers/inspect_by_hand.py). The pages are opened in headless Chromium:
nothing is fetched from anywhere, the hover and picker interactions change what they should, text from the
model (tokens holding <, &, quotes, a </script>) shows as text, and a screenshot of each is kept."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_rel_close
from helpers import tiny
from helpers.browser import chromium, keep_screenshot, needs_chromium, only_local
from helpers.inspect_by_hand import (
    attention_by_hand,
    attribute_by_hand,
    head_ablation_by_hand,
    lens_by_hand,
    probes_by_hand,
    rollout_by_hand,
)
from helpers.serving import tiny_chat_llm

from lmforge.errors import ConfigError
from lmforge.inspect import render
from lmforge.inspect.html import page, script_json

# tokens as a tokenizer may give them: markup, entities, quotes, a script end, a newline, mathtext dollars
NASTY = ["<b>bold</b>", " &amp;", ' "quoted"', "</script><script>window.PWNED=1</script>", "\n", " plain", "'",
         "$x$"]


@pytest.fixture(scope="module")
def gpt2():
    return tiny.tiny_llm("gpt2")


@pytest.fixture(scope="module")
def ids(gpt2):
    return torch.tensor([[11, 502, 7, 90, 1234, 5, 42, 300]]) % gpt2.config.vocab_size


@pytest.fixture(scope="module")
def trace(gpt2, ids):
    return SimpleNamespace(tokens=[NASTY], attention=attention_by_hand(gpt2, ids))


@pytest.fixture(scope="module")
def chat_llm():
    return tiny_chat_llm()


def _embedded(html_text: str):
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', html_text, re.S)
    return json.loads(m.group(1))


def _self_contained(html_text: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html_text, re.I)
    assert "@import" not in html_text and "url(" not in html_text and "@font-face" not in html_text


def test_heatmap_png_draws_the_matrix(tmp_path):
    import matplotlib.image

    m = torch.arange(12, dtype=torch.float32).view(3, 4)
    path = render.heatmap_png(m, ["a", "<b>", "$c$"], ["w", "x", "y", "z"], "a & b", tmp_path / "h.png",
                              annotate=[(0, 0, "#1")])
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05  # not a blank canvas
    with pytest.raises(ConfigError, match="3 row and 3 column labels"):
        render.heatmap_png(m, ["a", "b", "c"], ["w", "x", "y"], "t", tmp_path / "bad.png")


def test_attention_data_keeps_the_maps_and_refuses_bad_indices(trace):
    data = render.attention_data(trace)
    assert data["tokens"] == NASTY and data["layer_labels"] == ["layer 0", "layer 1"]
    for layer in range(2):
        assert_rel_close(torch.tensor(data["attention"][layer]), trace.attention[layer][0])
    one = render.attention_data(trace, layer=-1, head=2)
    assert one["layer_labels"] == ["layer 1"] and one["head_labels"] == ["head 2"]
    assert_rel_close(torch.tensor(one["attention"][0][0]), trace.attention[1][0, 2])
    for kw, msg in (({"layer": 2}, "layer 2 is out of range: the model has 2 layers"),
                    ({"head": 4}, "head 4 is out of range: layer 0 has 4 heads")):
        with pytest.raises(ConfigError, match=msg) as e:
            render.attention_data(trace, **kw)
        assert "\n" not in str(e.value)
    mixed = SimpleNamespace(tokens=[NASTY], attention=[None, trace.attention[1]])  # e.g. a Mamba layer, then attention
    assert render.attention_data(mixed)["attention"][0] is None
    with pytest.raises(ConfigError, match="layer 0 has no attention"):
        render.attention_data(mixed, layer=0)
    with pytest.raises(ConfigError, match="no layer of this model has attention"):
        render.attention_data(SimpleNamespace(tokens=[NASTY], attention=[None, None]))


def test_script_json_cannot_end_its_script():
    text = script_json({"t": "</script><!-- & \u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"t": "</script><!-- & \u2028"}
    with pytest.raises(ValueError):
        page("nope", {}, "t")


def test_a_layer_without_heads_is_blank_not_nan(tmp_path, gpt2, ids):
    heads = head_ablation_by_hand(gpt2, ids)
    heads["scores"][1] = float("nan")  # as for a Mamba layer: no head to ablate
    path = render.save_head_ablation(heads, tmp_path)
    written = json.loads(path.with_suffix(".json").read_text())
    assert written["scores"][1] == [None] * 4 and None not in written["scores"][0]
    assert _embedded(path.read_text())["scores"] == written["scores"]  # strict JSON: no NaN in the page


def _pages(tmp_path, gpt2, ids, trace, chat_llm) -> dict:
    """Every page, written from analyses computed by hand; returns name -> (html path, the data it shows)."""
    maps = trace.attention
    paris = chat_llm.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    lens = lens_by_hand(chat_llm, "The capital of France is", k=3, target=paris)
    attribution = attribute_by_hand(chat_llm, "The capital of France is", method="integrated_gradients", steps=8)
    heads = head_ablation_by_hand(gpt2, ids)
    probes = probes_by_hand(gpt2, gpt2.config.vocab_size)
    out = tmp_path / "pages"
    return {
        "attention": (render.save_attention(trace, out), render.attention_data(trace)),
        "rollout": (render.save_rollout(rollout_by_hand(maps), NASTY, out, flow=rollout_by_hand(maps)[-1]), None),
        "lens": (render.save_lens(lens, out), lens),
        "attribution": (render.save_attribution(attribution, out), attribution),
        "heads": (render.save_head_ablation(heads, out), heads),
        "probe": (render.save_probes(probes, out), probes),
    }


@pytest.mark.slow
def test_every_page_writes_png_json_and_a_self_contained_html(tmp_path, gpt2, ids, trace, chat_llm):
    import matplotlib.image

    pages = _pages(tmp_path, gpt2, ids, trace, chat_llm)
    for name, (html_path, source) in pages.items():
        assert html_path.name == f"{name}.html"
        text = html_path.read_text()
        written = json.loads(html_path.with_suffix(".json").read_text())
        assert _embedded(text) == written  # the page shows exactly what the JSON file holds
        _self_contained(text)
        assert "window.PWNED=1</script>" not in text  # a token never closes the page's script
        assert matplotlib.image.imread(html_path.with_suffix(".png"))[..., :3].std() > 0.02
        src = render.plain(source) if source is not None else {}
        for key in ("scores", "accuracy", "control_accuracy", "top_probs", "target_rank", "attention"):
            if src.get(key) is not None:
                assert_rel_close(torch.tensor(written[key]), torch.tensor(src[key]), msg=f"{name}.{key}")
    assert "per_dim" not in json.loads(pages["attribution"][0].with_suffix(".json").read_text())
    for bad, fn in (({"scores": [1.0]}, render.save_attribution), ({"task": "t"}, render.save_probes)):
        with pytest.raises(ConfigError, match="lacks"):
            fn(bad, tmp_path / "bad")
    with pytest.raises(ConfigError, match="rollout matrix has 2 rows for 3 tokens"):
        render.save_rollout(torch.eye(2), ["a", "b", "c"], tmp_path / "bad")


def _check_attention(page, trace):
    spans = page.query_selector_all("#tokens .tok")
    assert [s.inner_text() for s in spans][3] == NASTY[3]  # shown as text, not run
    assert page.evaluate("window.PWNED") is None
    spans[3].hover()  # default view: layer 0, mean of heads
    weights = [float(s.get_attribute("data-weight")) for s in spans]
    assert_rel_close(torch.tensor(weights), trace.attention[0][0, :, 3].mean(0), rtol=1e-6)
    assert NASTY[3].replace("\n", "\\n")[:8] in page.inner_text("#detail")
    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    assert page.inner_text("#caption") == "layer 1, head 2"
    cell = page.query_selector_all("#matrix tr")[4].query_selector_all("td")[1].inner_text()
    assert float(cell) == pytest.approx(float(trace.attention[1][0, 2, 3, 1]), abs=0.006)


def _check_lens(page, lens):
    L = len(lens["top_tokens"])
    first = page.query_selector_all("#lens tr")[1].query_selector_all("td")  # the top row: the last layer
    assert first[0].inner_text() == lens["top_tokens"][L - 1][0][0].replace("\n", "\\n")
    page.select_option("#view", "rank")
    first = page.query_selector_all("#lens tr")[1].query_selector_all("td")
    assert [int(td.inner_text()) for td in first] == lens["target_rank"][L - 1].tolist()
    first[0].hover()
    assert "target rank" in page.inner_text("#detail")


def _check_attribution(page, attribution):
    spans = page.query_selector_all("#tokens .tok")
    assert len(spans) == len(attribution.tokens)
    for span, score in zip(spans, attribution.scores.tolist()):
        r, g, b = map(int, re.findall(r"\d+", span.evaluate("e => getComputedStyle(e).backgroundColor"))[:3])
        assert (r >= b) if score >= 0 else (b >= r)  # red for positive, blue for negative
    i = int(attribution.scores.abs().argmax())
    spans[i].hover()
    assert f"{attribution.scores[i].item():.5f}" in page.inner_text("#detail")
    assert "completeness delta" in page.inner_text("#meta")


@pytest.mark.slow
@needs_chromium
def test_pages_open_offline_in_chromium_and_respond(tmp_path, gpt2, ids, trace, chat_llm):
    pages = _pages(tmp_path, gpt2, ids, trace, chat_llm)
    with chromium(tmp_path) as new_page:
        for name, (html_path, source) in pages.items():
            page = new_page()
            page.goto(html_path.as_uri(), timeout=30_000)
            assert page.errors == [], f"{name}: {page.errors}"
            if name == "attention":
                _check_attention(page, trace)
            elif name == "rollout":
                assert len(page.query_selector_all("#matrix tr")) == len(NASTY) + 1
                assert len(page.query_selector_all("#flow td")) == len(NASTY)
            elif name == "lens":
                _check_lens(page, source)
            elif name == "attribution":
                _check_attribution(page, source)
            elif name == "heads":
                assert len(page.query_selector_all("#heads td")) == source["scores"].numel()
                assert len(page.query_selector_all("#top li")) == len(source["top"])
            else:
                points = page.get_attribute("#accuracy", "points").split()
                assert len(points) == len(source["layers"])
            keep_screenshot(page, tmp_path, f"inspect_{name}")
            assert page.errors == [], f"{name}: {page.errors}"
            assert only_local(page.requests) == [], f"{name} fetched {only_local(page.requests)}"
