"""The chat page served at `/`: one self-contained HTML file (inline CSS and JavaScript, nothing fetched from
elsewhere) that talks to the server's own `/v1/chat/completions` with streaming, keeps the conversation,
shows tokens/s, sets temperature and max tokens, and stops a reply on request. Its Attribution tab asks the
server's `/v1/inspect` which tokens of the conversation drove each token of the last reply, and colours them."""

from __future__ import annotations

import html
import json

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmforge chat</title>
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:10px 16px;display:flex;gap:16px;align-items:center;flex-wrap:wrap}
 header b{font-size:1.1em} header label{font-size:.9em} header input{width:70px}
 #log{max-width:820px;margin:16px auto;padding:0 12px 140px}
 .msg{margin:10px 0;padding:10px 14px;border-radius:10px;white-space:pre-wrap;line-height:1.4}
 .user{background:#dbe7ff;margin-left:80px} .assistant{background:#fff;margin-right:80px;border:1px solid #dde}
 .err{background:#ffe1e1}
 footer{position:fixed;bottom:0;left:0;right:0;background:#fff;border-top:1px solid #ccd;padding:10px}
 footer form{max-width:820px;margin:auto;display:flex;gap:8px}
 textarea{flex:1;height:52px;font:inherit;padding:6px}
 button{padding:0 18px;font:inherit} #stats{font-size:.85em;color:#9ab}
 .tab{background:#34405a;color:#fff;border:0;padding:4px 12px;border-radius:4px} .tab.on{background:#5b7bd5}
 #attr{max-width:980px;margin:16px auto;padding:0 12px;line-height:2}
 .tok{padding:2px 3px;margin:0 1px;border-radius:3px;white-space:pre;border:1px solid #e4e6ea}
 .rtok{cursor:pointer} .tok.sel{outline:2px solid #111} .hint{font-size:.85em;color:#778;margin:4px 0}
 .bar{display:inline-block;width:160px;height:11px;vertical-align:middle;border:1px solid #ccd;
  background:linear-gradient(90deg,rgb(31,119,180),#fff,rgb(214,39,40))}
</style></head>
<body>
<header><b>lmforge</b><span id="model">__MODEL__</span>
 <button id="tab-chat" class="tab on" type="button">Chat</button>
 <button id="tab-attr" class="tab" type="button">Attribution</button>
 <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
 <label>max tokens <input id="max_tokens" type="number" min="1" step="1" value="256"></label>
 <label __KEYSTYLE__>API key <input id="api_key" type="password" style="width:120px"></label>
 <button id="clear" type="button">New chat</button>
 <span id="stats"></span></header>
<div id="log"></div>
<section id="attr" hidden>
 <label>method <select id="attr-method"><option value="integrated_gradients">integrated gradients</option>
 <option value="gradient_x_input">gradient &times; input</option><option value="saliency">saliency</option></select>
 </label> <label>steps <input id="attr-steps" type="number" min="1" max="1000" value="16" style="width:60px">
 </label> <button id="attr-run" type="button">Explain</button>
 <p id="attr-status" data-state="idle">Chat first: this tab explains the last reply.</p>
 <p class="hint">the last reply, token by token: click one to explain it</p><div id="attr-reply"></div>
 <p id="attr-meta"></p>
 <p class="hint"><span id="attr-lo"></span> <span class="bar"></span> <span id="attr-hi"></span>
 blue: pushed the token down, red: pushed it up (the conversation as the model read it)</p>
 <div id="attr-tokens"></div><p id="attr-detail" class="hint"></p>
</section>
<footer><form id="form"><textarea id="input" placeholder="Message (Enter sends, Shift+Enter for a new line)">
</textarea><button id="send" type="submit">Send</button><button id="stop" type="button" disabled>Stop</button>
</form></footer>
<script>
const MODEL = __MODEL_JSON__;
const $ = id => document.getElementById(id);
let history = [], controller = null;
$("input").value = "";
function add(role, text) {
  const d = document.createElement("div"); d.className = "msg " + role; d.textContent = text;
  $("log").appendChild(d); window.scrollTo(0, document.body.scrollHeight); return d;
}
function hdrs() {
  const h = {"Content-Type": "application/json"};
  if ($("api_key").value) h["Authorization"] = "Bearer " + $("api_key").value;
  return h;
}
function busy(on) { $("send").disabled = on; $("stop").disabled = !on; }
$("clear").onclick = () => {
  if (controller) controller.abort();
  history = []; $("log").innerHTML = ""; $("stats").textContent = "";
};
$("stop").onclick = () => { if (controller) controller.abort(); };
$("input").addEventListener("keydown", e => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("form").onsubmit = async e => {
  e.preventDefault();
  const text = $("input").value.trim(); if (!text || controller) return;
  $("input").value = ""; add("user", text); history.push({role: "user", content: text});
  const out = add("assistant", ""); out.dataset.state = "streaming";
  const body = {model: MODEL, messages: history, stream: true, stream_options: {include_usage: true},
                temperature: parseFloat($("temperature").value), max_tokens: parseInt($("max_tokens").value)};
  const headers = hdrs();
  controller = new AbortController(); busy(true);
  let reply = "", tokens = 0, chunks = 0, t0 = performance.now(), tFirst = null, buf = "";
  try {
    const r = await fetch("/v1/chat/completions",
                          {method: "POST", headers, body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      throw new Error((j.error && j.error.message) || r.statusText);
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    for (;;) {
      const {done, value} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.error) throw new Error(ev.error.message);
        if (ev.usage) tokens = ev.usage.completion_tokens;
        const c = ev.choices && ev.choices[0];
        if (c && c.delta && c.delta.content) {
          if (tFirst === null) tFirst = performance.now();
          chunks++;
          reply += c.delta.content; out.textContent = reply;
          window.scrollTo(0, document.body.scrollHeight);
        }
      }
      const secs = (performance.now() - (tFirst || t0)) / 1000;
      const approx = tokens || chunks;
      if (tFirst !== null && secs > 0) $("stats").textContent = (approx / secs).toFixed(1) + " tokens/s";
    }
  } catch (err) {
    if (err.name !== "AbortError") {
      out.className = "msg assistant err"; out.textContent = reply + "\n[" + err.message + "]";
    }
  } finally {
    const secs = (performance.now() - (tFirst || t0)) / 1000;
    if (tokens && secs > 0)
      $("stats").textContent = (tokens / secs).toFixed(1) + " tokens/s \u00b7 " + tokens + " tokens";
    if (reply) history.push({role: "assistant", content: reply});
    attrFor = null;
    out.dataset.state = "done"; controller = null; busy(false);
  }
};
__ATTR_JS__</script></body></html>
"""


_ATTR_JS = r"""
// ---- the Attribution tab: which tokens of the conversation drove a token of the last reply --------
let attrFor = null, attrIndex = 0;
const show = t => t.replace(/\n/g, "\\n");
function diverging(v) {
  v = Math.max(-1, Math.min(1, v || 0)); const a = Math.abs(v), c = v >= 0 ? [214, 39, 40] : [31, 119, 180];
  return "rgb(" + c.map(x => Math.round(255 + (x - 255) * a)).join(",") + ")";
}
function span(cls, text) {
  const s = document.createElement("span"); s.className = cls; s.textContent = text; return s;
}
function attrStatus(state, text) { $("attr-status").dataset.state = state; $("attr-status").textContent = text; }
function lastExchange() {
  const n = history.length;
  if (n < 2 || history[n - 1].role !== "assistant") return null;
  return {messages: history.slice(0, n - 1), reply: history[n - 1].content};
}
function tab(which) {
  const attr = which === "attr";
  $("log").hidden = attr; document.querySelector("footer").hidden = attr; $("attr").hidden = !attr;
  $("tab-chat").classList.toggle("on", !attr); $("tab-attr").classList.toggle("on", attr);
  if (!attr) return;
  const ex = lastExchange();
  if (!ex) attrStatus("idle", "Chat first: this tab explains the last reply.");
  else if (attrFor !== ex.reply) { attrIndex = 0; explain(); }
}
async function explain() {
  const ex = lastExchange(); if (!ex || controller) return;
  attrFor = ex.reply; attrStatus("loading", "computing the attribution\u2026");
  const body = {model: MODEL, analysis: "attribute", messages: ex.messages, reply: ex.reply, target_index: attrIndex,
                attribution: $("attr-method").value, steps: parseInt($("attr-steps").value) || 16};
  try {
    const r = await fetch("/v1/inspect", {method: "POST", headers: hdrs(), body: JSON.stringify(body)});
    const j = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((j.error && j.error.message) || r.statusText);
    drawAttribution(j);
    attrStatus("done", "explained reply token " + (j.target_index + 1) + " of " + j.reply_tokens.length);
  } catch (err) { attrStatus("error", "[" + err.message + "]"); }
}
function drawAttribution(j) {
  $("attr-reply").innerHTML = ""; $("attr-tokens").innerHTML = "";
  j.reply_tokens.forEach((t, i) => {
    const s = span("tok rtok" + (i === j.target_index ? " sel" : ""), show(t)); s.dataset.i = i;
    s.onclick = () => { attrIndex = i; explain(); }; $("attr-reply").appendChild(s);
  });
  const top = Math.max(...j.scores.map(Math.abs)) || 1;
  $("attr-lo").textContent = (-top).toPrecision(3); $("attr-hi").textContent = top.toPrecision(3);
  j.tokens.forEach((t, i) => {
    const s = span("tok", show(t)); s.dataset.score = j.scores[i]; s.style.background = diverging(j.scores[i] / top);
    s.onmouseenter = () => { $("attr-detail").textContent = "\"" + show(t) + "\": " + j.scores[i].toPrecision(4); };
    $("attr-tokens").appendChild(s);
  });
  $("attr-meta").textContent = "reply token \"" + show(j.reply_tokens[j.target_index]) + "\" explained by " + j.method +
    (j.delta !== null && j.delta !== undefined ? " (completeness delta " + Number(j.delta).toExponential(2) + ")" : "");
}
$("tab-chat").onclick = () => tab("chat");
$("tab-attr").onclick = () => tab("attr");
$("attr-run").onclick = explain;
"""


def chat_page(model: str, needs_key: bool = False) -> str:
    """The page's HTML for a server serving `model` (with an API key field when the server needs one)."""
    model_js = json.dumps(model).replace("<", "\\u003c")  # never a "</script>" inside the script
    return (_PAGE.replace("__MODEL_JSON__", model_js).replace("__MODEL__", html.escape(model))
            .replace("__KEYSTYLE__", "" if needs_key else 'style="display:none"').replace("__ATTR_JS__", _ATTR_JS))
