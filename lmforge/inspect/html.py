"""Self-contained HTML pages for the inspection analyses: one file each, inline CSS and JavaScript, the data
embedded as JSON, nothing fetched from anywhere (no CDN, no web font, no outside image), so that a page opens
offline from disk.

Text from the model (tokens can hold `<`, `&`, quotes) never reaches the page as markup: the JSON is escaped
for a `<script>` element and the script puts every string into the DOM with `textContent`.
"""

from __future__ import annotations

import html
import json

KINDS = ("attention", "attribution", "lens", "heads", "probe")

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 16px} header h1{font-size:1.1em;margin:0}
header p{margin:4px 0 0;font-size:.85em;color:#bcd} main{padding:12px 16px;max-width:1200px}
.controls{margin:8px 0;display:flex;gap:14px;align-items:center;flex-wrap:wrap}
#tokens{line-height:2.1;background:#fff;border:1px solid #dde;padding:8px;border-radius:6px}
.tok{padding:2px 3px;margin:0 1px;border-radius:3px;white-space:pre;cursor:default;border:1px solid #eee}
.tok.sel{outline:2px solid #111}
table.grid{border-collapse:collapse;font-size:12px;background:#fff}
table.grid td,table.grid th{border:1px solid #e3e5ea;padding:2px 4px;text-align:center;white-space:pre}
table.grid th{background:#eef0f4;font-weight:600}
#detail{min-height:1.4em;margin:8px 0;font-size:.9em;color:#333}
.legend{display:flex;align-items:center;gap:6px;font-size:.8em}
.legend .bar{width:180px;height:12px;border:1px solid #ccd}
.muted{color:#778;font-size:.85em}
"""

# Shared helpers: colour scales (white to red for positive, to blue for negative) and safe element building.
_JS_COMMON = r"""
const DATA = JSON.parse(document.getElementById("data").textContent);
const $ = id => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text); return e;
}
function diverging(v) {  // v in [-1, 1]
  v = Math.max(-1, Math.min(1, v || 0)); const a = Math.abs(v);
  const c = v >= 0 ? [214, 39, 40] : [31, 119, 180];
  const mix = i => Math.round(255 + (c[i] - 255) * a);
  return "rgb(" + mix(0) + "," + mix(1) + "," + mix(2) + ")";
}
function sequential(v) {  // v in [0, 1]
  v = Math.max(0, Math.min(1, v || 0));
  return "rgb(" + Math.round(255 - 200 * v) + "," + Math.round(255 - 150 * v) + "," + Math.round(255 - 60 * v) + ")";
}
function fmt(x, d) { return (x === null || x === undefined) ? "-" : Number(x).toFixed(d === undefined ? 3 : d); }
function show(tok) { return tok.replace(/\n/g, "\\n").replace(/\t/g, "\\t"); }
function option(sel, value, label) { const o = el("option", null, label); o.value = value; sel.appendChild(o); }
"""

_JS = {
    "attention": r"""
const T = DATA.tokens.length;
let sel = null;
DATA.layer_labels.forEach((l, i) => { if (DATA.attention[i]) option($("layer"), i, l); });
function matrix() {
  const m = DATA.attention[+$("layer").value], h = $("head").value;
  if (h !== "mean") return m[+h];
  return m[0].map((row, i) => row.map((_, j) => m.reduce((s, hm) => s + hm[i][j], 0) / m.length));
}
function heads() {
  const n = DATA.attention[+$("layer").value].length, keep = $("head").value;
  $("head").innerHTML = "";
  if (n > 1) option($("head"), "mean", "mean of heads");
  for (let h = 0; h < n; h++) option($("head"), h, DATA.head_labels ? DATA.head_labels[h] : "head " + h);
  if ([...$("head").options].some(o => o.value === keep)) $("head").value = keep;
}
function draw() {
  const m = matrix(), tb = $("matrix"); tb.innerHTML = "";
  const hr = el("tr"); hr.appendChild(el("th", null, "from \\ to"));
  m[0].forEach((_, j) => hr.appendChild(el("th", null, j < T ? show(DATA.tokens[j]) : j)));
  tb.appendChild(hr);
  m.forEach((row, i) => {
    const tr = el("tr"); tr.appendChild(el("th", null, show(DATA.tokens[i])));
    const top = Math.max(...row) || 1;
    row.forEach(v => {
      const td = el("td", null, fmt(v, 2)); td.style.background = sequential(v / top); tr.appendChild(td);
    });
    if (i === sel) tr.className = "sel";
    tb.appendChild(tr);
  });
  $("caption").textContent = $("layer").selectedOptions[0].textContent + ", " +
    $("head").selectedOptions[0].textContent;
  paint();
}
function paint() {
  const spans = document.querySelectorAll("#tokens .tok");
  if (sel === null) {
    spans.forEach(s => { s.style.background = "#fff"; });
    $("detail").textContent = "hover a token to see where it attends"; return;
  }
  const row = matrix()[sel], top = Math.max(...row) || 1;
  spans.forEach((s, j) => { s.style.background = j < row.length ? sequential(row[j] / top) : "#fff";
                            s.classList.toggle("sel", j === sel); s.dataset.weight = j < row.length ? row[j] : 0; });
  const best = row.map((v, j) => [v, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  $("detail").textContent = "from \"" + show(DATA.tokens[sel]) + "\" (" + sel + "): " +
    best.map(([v, j]) => "\"" + show(DATA.tokens[j]) + "\" " + fmt(v, 3)).join(", ");
}
DATA.tokens.forEach((t, i) => {
  const s = el("span", "tok", show(t)); s.dataset.i = i;
  s.addEventListener("mouseenter", () => { sel = i; paint(); }); $("tokens").appendChild(s);
});
if (DATA.flow) {
  const top = Math.max(...DATA.flow.map(Math.abs)) || 1;
  DATA.flow.forEach(v => {
    const td = el("td", null, fmt(v, 3)); td.style.background = sequential(Math.abs(v) / top);
    $("flow").appendChild(td);
  });
} else { $("flowbox").style.display = "none"; }
$("layer").onchange = () => { heads(); draw(); };
$("head").onchange = draw;
heads(); draw();
""",
    "attribution": r"""
const peak = Math.max(...DATA.scores.map(Math.abs)) || 1;
$("lo").textContent = fmt(-peak); $("hi").textContent = fmt(peak);
const hasDelta = DATA.delta !== null && DATA.delta !== undefined;
$("meta").textContent = "target " + JSON.stringify(DATA.target) + " (id " + DATA.target_id + "), method " +
  DATA.method + (DATA.steps ? ", " + DATA.steps + " steps" : "") +
  (DATA.baseline ? ", baseline " + DATA.baseline : "") +
  (hasDelta ? ", completeness delta " + Number(DATA.delta).toExponential(2) : "");
const total = DATA.scores.reduce((a, b) => a + Math.abs(b), 0) || 1;
DATA.tokens.forEach((t, i) => {
  const s = el("span", "tok", show(t)); s.dataset.i = i; s.dataset.score = DATA.scores[i];
  s.style.background = diverging(DATA.scores[i] / peak); s.title = fmt(DATA.scores[i], 4);
  s.addEventListener("mouseenter", () => {
    document.querySelectorAll("#tokens .tok").forEach(x => x.classList.toggle("sel", x === s));
    $("detail").textContent = "\"" + show(t) + "\" (" + i + "): attribution " + fmt(DATA.scores[i], 5) +
      " (" + fmt(100 * DATA.scores[i] / total, 1) + "% of the total |attribution|)";
  });
  $("tokens").appendChild(s);
});
DATA.scores.map((v, i) => [v, i]).sort((a, b) => Math.abs(b[0]) - Math.abs(a[0])).slice(0, 10).forEach(([v, i]) => {
  const tr = el("tr"); tr.appendChild(el("td", null, i)); tr.appendChild(el("td", null, show(DATA.tokens[i])));
  const td = el("td", null, fmt(v, 5)); td.style.background = diverging(v / peak); tr.appendChild(td);
  $("ranking").appendChild(tr);
});
""",
    "lens": r"""
const L = DATA.top_tokens.length, T = DATA.tokens.length;
const hasTarget = DATA.target_rank !== null && DATA.target_rank !== undefined;
option($("view"), "top", "top token (shade: its probability)");
const targetName = DATA.target === null || DATA.target === undefined ? "id " + DATA.target_id
  : JSON.stringify(DATA.target);
if (hasTarget) option($("view"), "rank", "rank of the target " + targetName);
function label(l) { return l === 0 ? "embeddings" : "layer " + l; }
function draw() {
  const tb = $("lens"), view = $("view").value; tb.innerHTML = "";
  const hr = el("tr"); hr.appendChild(el("th", null, "after \\ input"));
  DATA.tokens.forEach(t => hr.appendChild(el("th", null, show(t)))); tb.appendChild(hr);
  for (let l = L - 1; l >= 0; l--) {
    const tr = el("tr"); tr.appendChild(el("th", null, label(l)));
    for (let p = 0; p < T; p++) {
      let td;
      if (view === "rank") {
        const r = DATA.target_rank[l][p]; td = el("td", null, r);
        td.style.background = sequential(1 - Math.log1p(r) / Math.log1p(1000));
      } else {
        td = el("td", null, show(DATA.top_tokens[l][p][0])); td.style.background = sequential(DATA.top_probs[l][p][0]);
      }
      td.dataset.layer = l; td.dataset.pos = p;
      td.addEventListener("mouseenter", () => {
        $("detail").textContent = label(l) + ", after \"" + show(DATA.tokens[p]) + "\": " + DATA.top_tokens[l][p]
          .map((t, k) => "\"" + show(t) + "\" " + fmt(DATA.top_probs[l][p][k], 3)).join(", ") +
          (hasTarget ? "; target rank " + DATA.target_rank[l][p] : "");
      });
      tr.appendChild(td);
    }
    tb.appendChild(tr);
  }
}
$("view").onchange = draw; draw();
""",
    "heads": r"""
const S = DATA.scores, peak = Math.max(...S.flat().map(Math.abs)) || 1;
$("meta").textContent = "metric " + DATA.metric + ", baseline " + fmt(DATA.baseline, 4) + "; cell: ablated - baseline";
$("lo").textContent = fmt(-peak); $("hi").textContent = fmt(peak);
const hr = el("tr"); hr.appendChild(el("th", null, "layer \\ head"));
S[0].forEach((_, h) => hr.appendChild(el("th", null, h))); $("heads").appendChild(hr);
S.forEach((row, l) => {
  const tr = el("tr"); tr.appendChild(el("th", null, l));
  row.forEach((v, h) => {
    const td = el("td", null, fmt(v, 3)); td.style.background = diverging(v / peak);
    td.dataset.layer = l; td.dataset.head = h;
    td.addEventListener("mouseenter", () => {
      $("detail").textContent = "layer " + l + " head " + h + ": " + DATA.metric + " change " + fmt(v, 5);
    });
    tr.appendChild(td);
  });
  $("heads").appendChild(tr);
});
DATA.top.forEach(([l, h, v]) => $("top").appendChild(el("li", null, "layer " + l + ", head " + h + ": " + fmt(v, 5))));
""",
    "probe": r"""
$("meta").textContent = "task " + DATA.task + ", " + DATA.n_train + " training / " + DATA.n_test +
  " held-out examples, majority class " + fmt(DATA.majority, 3);
const W = 640, H = 300, P = 40, n = DATA.layers.length, NS = "http://www.w3.org/2000/svg";
const svg = document.createElementNS(NS, "svg");
svg.setAttribute("width", W); svg.setAttribute("height", H); svg.style.background = "#fff";
const x = i => P + (n > 1 ? i * (W - 2 * P) / (n - 1) : (W - 2 * P) / 2), y = v => H - P - v * (H - 2 * P);
function line(vals, colour, id, dash) {
  const p = document.createElementNS(NS, "polyline"); p.setAttribute("id", id); p.setAttribute("fill", "none");
  p.setAttribute("stroke", colour); p.setAttribute("stroke-width", 2);
  if (dash) p.setAttribute("stroke-dasharray", "6 4");
  p.setAttribute("points", vals.map((v, i) => x(i) + "," + y(v)).join(" ")); svg.appendChild(p);
}
function text(s, tx, ty) {
  const t = document.createElementNS(NS, "text");
  t.setAttribute("x", tx); t.setAttribute("y", ty); t.setAttribute("font-size", 11);
  t.textContent = s; svg.appendChild(t);
}
[0, 0.25, 0.5, 0.75, 1].forEach(v => text(v.toFixed(2), 4, y(v) + 4));
DATA.layers.forEach((l, i) => text(l, x(i) - 3, H - P + 16));
line(DATA.layers.map(() => DATA.majority), "#999", "majority", true);
line(DATA.control_accuracy, "#1f77b4", "control", true);
line(DATA.accuracy, "#d62728", "accuracy");
$("chart").appendChild(svg);
DATA.layers.forEach((l, i) => {
  const tr = el("tr");
  [l, fmt(DATA.accuracy[i]), fmt(DATA.control_accuracy[i]), fmt(DATA.selectivity[i])]
    .forEach(v => tr.appendChild(el("td", null, v)));
  $("rows").appendChild(tr);
});
""",
}

_BODY = {
    "attention": """<div class="controls"><label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label><b id="caption"></b></div>
<div id="tokens"></div><div id="detail"></div>
<div id="flowbox"><p class="muted">attention flow into each token (max-flow through the layers' attention graph)</p>
<table class="grid"><tr id="flow"></tr></table></div>
<p class="muted">rows: the attending token (query), columns: the token attended to; row shade relative to its
maximum</p>
<table class="grid" id="matrix"></table>""",
    "attribution": """<p id="meta"></p><div class="legend"><span id="lo"></span>
<span class="bar" style="background:linear-gradient(90deg,rgb(31,119,180),#fff,rgb(214,39,40))"></span>
<span id="hi"></span><span class="muted">blue: pushes the target down, red: pushes it up</span></div>
<div id="tokens"></div><div id="detail">hover a token for its attribution</div>
<h3>largest attributions</h3><table class="grid"><thead><tr><th>position</th><th>token</th><th>attribution</th>
</tr></thead><tbody id="ranking"></tbody></table>""",
    "lens": """<div class="controls"><label>show <select id="view"></select></label></div>
<div id="detail">hover a cell for the top tokens</div>
<p class="muted">each cell: what the residual stream after that layer predicts next, read through the model's own
final norm and head</p><table class="grid" id="lens"></table>""",
    "heads": """<p id="meta"></p><div class="legend"><span id="lo"></span>
<span class="bar" style="background:linear-gradient(90deg,rgb(31,119,180),#fff,rgb(214,39,40))"></span>
<span id="hi"></span></div><div id="detail"></div><table class="grid" id="heads"></table>
<h3>heads that matter most</h3><ol id="top"></ol>""",
    "probe": """<p id="meta"></p><div id="chart"></div>
<p class="muted">red: held-out accuracy of the probe; blue dashed: the control task (random labels); grey: majority
class</p><table class="grid"><thead><tr><th>layer</th><th>accuracy</th><th>control</th><th>selectivity</th></tr>
</thead><tbody id="rows"></tbody></table>""",
}


def script_json(data) -> str:
    """`data` as JSON that is safe inside a `<script>` element: no `</script>`, no `<!--`, no line separators."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def page(kind: str, data: dict, title: str, subtitle: str = "") -> str:
    """One self-contained HTML page showing `data` (the plain dict of an analysis of `kind`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown page kind {kind!r}; one of {', '.join(KINDS)}")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style></head>\n<body>\n"
            f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>\n"
            f"<main>\n{_BODY[kind]}\n</main>\n"
            f'<script id="data" type="application/json">{script_json(data)}</script>\n'
            f"<script>{_JS_COMMON}{_JS[kind]}</script>\n</body></html>\n")
