"""The chat page served at `/`: one self-contained HTML file (inline CSS and JavaScript, nothing fetched from
elsewhere) that talks to the server's own `/v1/chat/completions` with streaming, keeps the conversation,
shows tokens/s, sets temperature and max tokens, and stops a reply on request."""

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
</style></head>
<body>
<header><b>lmforge</b><span id="model">__MODEL__</span>
 <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
 <label>max tokens <input id="max_tokens" type="number" min="1" step="1" value="256"></label>
 <label __KEYSTYLE__>API key <input id="api_key" type="password" style="width:120px"></label>
 <button id="clear" type="button">New chat</button>
 <span id="stats"></span></header>
<div id="log"></div>
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
  const headers = {"Content-Type": "application/json"};
  if ($("api_key").value) headers["Authorization"] = "Bearer " + $("api_key").value;
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
    out.dataset.state = "done"; controller = null; busy(false);
  }
};
</script></body></html>
"""


def chat_page(model: str, needs_key: bool = False) -> str:
    """The page's HTML for a server serving `model` (with an API key field when the server needs one)."""
    model_js = json.dumps(model).replace("<", "\\u003c")  # never a "</script>" inside the script
    return (_PAGE.replace("__MODEL_JSON__", model_js).replace("__MODEL__", html.escape(model))
            .replace("__KEYSTYLE__", "" if needs_key else 'style="display:none"'))
