"""A minimal web chat: one static HTML+JS page that talks to the OpenAI API (streamed chat completions).

The router serves it at `/` of the API itself. `cluster webui URL` serves it from a tiny stdlib HTTP server that
also forwards `/v1/*` to URL (streaming), so the page and the API share an origin and no CORS is needed.
"""
from __future__ import annotations

import http.client
import http.server
import json
import socketserver
import sys
from urllib.parse import urlsplit

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>cluster chat</title>
<style>
 body{font-family:system-ui,sans-serif;margin:0;display:flex;flex-direction:column;height:100vh;background:#f6f7f9}
 header{padding:8px 12px;background:#1f2937;color:#fff;display:flex;gap:8px;align-items:center;flex-wrap:wrap}
 header input,header select{padding:4px}
 #log{flex:1;overflow:auto;padding:12px}
 .msg{max-width:800px;margin:8px auto;padding:8px 12px;border-radius:8px;white-space:pre-wrap;line-height:1.4}
 .user{background:#dbeafe}.assistant{background:#fff;border:1px solid #e5e7eb}.error{background:#fee2e2}
 .msg pre{background:#0f172a;color:#e2e8f0;padding:8px 10px;border-radius:6px;overflow:auto;white-space:pre;margin:6px 0}
 .msg code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:90%}
 .msg :not(pre)>code{background:#eef2f7;padding:1px 4px;border-radius:4px}
 .assistant.stopped{border-style:dashed;border-color:#d97706}
 .tag{display:inline-block;font-size:12px;color:#92400e;background:#fef3c7;border-radius:4px;padding:0 6px;margin-top:4px}
 form{display:flex;gap:8px;padding:12px;max-width:800px;width:100%;margin:0 auto;box-sizing:border-box;align-items:stretch}
 textarea{flex:1;padding:8px;font:inherit;resize:vertical;min-height:44px}
 button{padding:8px 14px}
 .vh{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
 .attach{display:inline-flex;align-items:center;gap:6px;padding:0 12px;border:1px solid #9ca3af;border-radius:4px;
   background:#fff;cursor:pointer;white-space:nowrap;font-size:14px}
 #img:focus-visible+.attach{outline:2px solid #2563eb}
 #imgname{display:inline-flex;align-items:center;gap:4px;font-size:12px;max-width:11em;white-space:nowrap}
 #imgname[hidden]{display:none}
 .user img{max-height:8em;display:block;margin-bottom:4px;border-radius:4px}
 #imgname span{overflow:hidden;text-overflow:ellipsis}
 #imgclear{padding:0 6px}
 .stats{font-size:12px;color:#6b7280}
 .think{color:#4b5563;font-size:90%;border-left:3px solid #cbd5e1;padding-left:8px;margin-bottom:6px}
 .think summary{cursor:pointer;font-size:12px;color:#6b7280}
 .think p{margin:2px 0 0}
 .think[hidden],.calls:empty{display:none}
 .call{border-left:3px solid #7c3aed;background:#f5f3ff;padding:4px 8px;margin-top:6px;border-radius:4px}
 .call .fn{font-family:ui-monospace,monospace;font-weight:600}
 .call .fn::before{content:"tool call ";font-family:system-ui,sans-serif;font-weight:400;font-size:12px;color:#6b7280}
 .call pre{margin:4px 0 0;background:#ede9fe;color:#1e1b4b}
</style></head><body>
<header><b>cluster</b>
 <label>model <select id="model"></select></label>
 <label>temperature <input id="temp" type="number" step="0.1" min="0" max="2" value="0.7" style="width:4em"></label>
 <label>max tokens <input id="maxtok" type="number" min="1" value="512" style="width:5em"></label>
 <label>API key <input id="key" type="password" placeholder="(none)" style="width:10em"></label>
 <label>system <input id="system" placeholder="system prompt" style="width:14em"></label>
 <label title="OpenAI tools, a JSON list: the answer's tool calls are shown, not run">tools <input id="tools"
  placeholder='[{"type": "function", ...}]' style="width:12em"></label>
 <button id="clear" type="button">new chat</button>
</header>
<div id="log"></div>
<form id="f"><textarea id="in" placeholder="Say something (Enter sends, Shift+Enter for a new line)"></textarea>
<input id="img" class="vh" type="file" accept="image/*"><label for="img" class="attach"
 title="attach an image (vision-language models)"><svg width="18" height="18" viewBox="0 0 24 24" fill="none"
 stroke="currentColor" stroke-width="2" stroke-linejoin="round" aria-hidden="true"><path d="M4 7h3l2-3h6l2 3h3a1 1 0 0 1
 1 1v11a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V8a1 1 0 0 1 1-1z"/><circle cx="12" cy="13" r="4"/></svg>Image</label>
<span id="imgname" hidden><span id="imgfile"></span><button id="imgclear" type="button" title="remove the image">&times;</button></span>
<button id="send">Send</button><button id="stop" type="button" disabled>Stop</button></form>
<script>
const API = "__API_BASE__";
const $ = id => document.getElementById(id);
let history = [], ctrl = null;
$("key").value = localStorage.getItem("cluster_key") || "";
$("key").onchange = () => { localStorage.setItem("cluster_key", $("key").value); loadModels(); };
function headers(){ const h = {"Content-Type":"application/json"}; if ($("key").value) h["Authorization"] = "Bearer " + $("key").value; return h; }
function node(tag, cls, text){ const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
function add(cls, text){ const d = node("div", "msg " + cls, text); $("log").appendChild(d); $("log").scrollTop = 1e9; return d; }
function readImage(file){ return new Promise((ok, fail) => { const r = new FileReader(); r.onload = () => ok(r.result); r.onerror = () => fail(new Error("cannot read " + file.name)); r.readAsDataURL(file); }); }
// Markdown, safely: the model's text only ever goes into textContent, so no HTML of it is ever parsed.
function inline(parent, text){  // `code` and **bold**
  const re = /`([^`\n]+)`|\*\*([^*\n]+)\*\*/g; let last = 0, m;
  while ((m = re.exec(text)) !== null){
    if (m.index > last) parent.appendChild(node("span", "", text.slice(last, m.index)));
    parent.appendChild(m[1] !== undefined ? node("code", "", m[1]) : node("strong", "", m[2]));
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.appendChild(node("span", "", text.slice(last)));
}
function render(box, text){  // fenced code blocks (an unclosed one, while streaming, runs to the end) and inline marks
  box.textContent = ""; let prose = [], code = null;
  const flush = () => { if (prose.length){ const p = node("span"); inline(p, prose.join("\n")); box.appendChild(p); prose = []; } };
  const block = () => { const pre = node("pre"); pre.appendChild(node("code", "", code.join("\n"))); box.appendChild(pre); code = null; };
  for (const line of text.split("\n")){
    if (/^\s*```/.test(line)){ if (code === null){ flush(); code = []; } else block(); continue; }
    (code === null ? prose : code).push(line);
  }
  if (code !== null) block(); flush();
}
// An answer's reasoning (reasoning_content) and tool calls, shown apart from its text; textContent only.
function showThink(box, inner, text){ box.hidden = !text; inner.textContent = text; }
function showCalls(box, calls){
  box.textContent = "";
  for (const c of calls){
    const d = node("div", "call"); d.appendChild(node("span", "fn", c.function.name));
    let args = c.function.arguments;
    try { args = JSON.stringify(JSON.parse(args), null, 2); } catch(_){}  // still arriving, or not JSON: as it is
    const pre = node("pre"); pre.appendChild(node("code", "", args)); d.appendChild(pre); box.appendChild(d);
  }
}
function mergeCalls(calls, deltas){  // OpenAI's streamed tool_calls: entries by index, arguments in pieces
  for (const t of deltas){
    let c = calls.find(x => x.index === t.index);
    if (!c){ c = {index: t.index, id: "", type: "function", function: {name: "", arguments: ""}}; calls.push(c); }
    if (t.id) c.id = t.id;
    const f = t.function || {}; if (f.name) c.function.name += f.name; if (f.arguments) c.function.arguments += f.arguments;
  }
}
function readTools(){
  const v = $("tools").value.trim(); if (!v) return null;
  let t; try { t = JSON.parse(v); } catch(e){ throw new Error("tools: not valid JSON (" + e.message + ")"); }
  if (!Array.isArray(t)) throw new Error("tools: give a JSON list of tools");
  return t;
}
function showImage(){ const f = $("img").files[0]; $("imgname").hidden = !f; $("imgfile").textContent = $("imgfile").title = f ? f.name : ""; }
async function loadModels(){
  try { const r = await fetch(API + "/v1/models", {headers: headers()}); const j = await r.json();
        if (!r.ok) throw new Error(j.error ? j.error.message : r.status);
        $("model").innerHTML = ""; for (const m of j.data) $("model").appendChild(node("option", "", m.id));
  } catch(e){ add("error", "cannot list models: " + e.message); }
}
$("clear").onclick = () => { history = []; $("log").innerHTML = ""; };
$("stop").onclick = () => { if (ctrl) ctrl.abort(); };
$("img").onchange = showImage;
$("imgclear").onclick = () => { $("img").value = ""; showImage(); };
$("in").addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey){ e.preventDefault(); $("f").requestSubmit(); } });
$("f").onsubmit = async e => {
  e.preventDefault(); const text = $("in").value.trim(); if (!text || ctrl) return;
  let tools; try { tools = readTools(); } catch(err){ add("error", err.message); return; }
  const file = $("img").files[0]; let content = text, url = null;
  if (file){  // an image goes inline as a data: URL, before the text (as LLaVA was trained)
    try { url = await readImage(file); } catch(err){ add("error", err.message); return; }
    content = [{type: "image_url", image_url: {url}}, {type: "text", text}];
    $("img").value = ""; showImage();
  }
  const said = add("user", ""); if (url){ const im = node("img"); im.src = url; im.alt = file.name; said.appendChild(im); }
  said.appendChild(node("span", "", text)); $("in").value = ""; history.push({role:"user", content});
  const out = add("assistant", ""), think = node("details", "think"), body = node("div"), callBox = node("div", "calls");
  const thinkText = node("p");
  think.open = true; think.appendChild(node("summary", "", "reasoning")); think.appendChild(thinkText);
  think.hidden = true; out.appendChild(think); out.appendChild(body); out.appendChild(callBox);
  const msgs = ($("system").value ? [{role:"system", content:$("system").value}] : []).concat(history);
  ctrl = new AbortController(); $("stop").disabled = false; $("send").disabled = true;
  const t0 = performance.now(); let t1 = null, answer = "", reasoning = "", calls = [], usage = null, stopped = false;
  const req = {model: $("model").value, messages: msgs, stream: true, stream_options: {include_usage: true},
               temperature: parseFloat($("temp").value), max_tokens: parseInt($("maxtok").value)};
  if (tools) req.tools = tools;
  try {
    const r = await fetch(API + "/v1/chat/completions", {method:"POST", headers: headers(), signal: ctrl.signal,
      body: JSON.stringify(req)});
    if (!r.ok){ const j = await r.json().catch(() => ({})); throw new Error(j.error ? j.error.message : ("HTTP " + r.status)); }
    const reader = r.body.getReader(), dec = new TextDecoder(); let buf = "";
    for (;;){
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true}); let i;
      while ((i = buf.indexOf("\n\n")) >= 0){
        const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
        if (!line.startsWith("data:")) continue; const data = line.slice(5).trim(); if (data === "[DONE]") continue;
        const j = JSON.parse(data); if (j.error) throw new Error(j.error.message);
        if (j.usage) usage = j.usage;
        for (const c of j.choices || []){
          const d = c.delta || {};
          if ((d.content || d.reasoning_content || d.tool_calls) && t1 === null) t1 = performance.now();
          if (d.reasoning_content){ reasoning += d.reasoning_content; showThink(think, thinkText, reasoning); }
          if (d.content){ answer += d.content; render(body, answer); }
          if (d.tool_calls){ mergeCalls(calls, d.tool_calls); showCalls(callBox, calls); }
          $("log").scrollTop = 1e9;
        }
      }
    }
  } catch(err){ if (err.name === "AbortError") stopped = true; else add("error", err.message); }
  if (calls.length) history.push({role:"assistant", content: answer || null,
                                  tool_calls: calls.map(c => ({id: c.id, type: "function", function: c.function}))});
  else if (answer) history.push({role:"assistant", content: answer});
  else history.pop();  // no answer to keep: drop the question too, so user and assistant turns still alternate
  if (stopped){ out.className += " stopped"; out.appendChild(node("div", "tag", "stopped")); }
  if (usage){ const secs = (performance.now() - t0) / 1000; out.appendChild(node("div", "stats", `${usage.completion_tokens} tokens, ${secs.toFixed(2)} s` + (t1 ? `, first token after ${((t1 - t0)/1000).toFixed(2)} s` : ""))); }
  ctrl = null; $("stop").disabled = true; $("send").disabled = false; $("in").focus();
};
loadModels();
</script></body></html>
"""


def page(api_base: str = "") -> str:
    return _PAGE.replace("__API_BASE__", json.dumps(api_base)[1:-1])


class _Handler(http.server.BaseHTTPRequestHandler):
    upstream: str = ""  # scheme://host:port of the API
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self._send(200, page("").encode(), "text/html; charset=utf-8")
        elif self.path.startswith("/v1/"):
            self._proxy()
        else:
            self._send(404, b'{"error":{"message":"not found","type":"not_found_error","param":null,"code":null}}',
                       "application/json")

    def do_POST(self):
        if self.path.startswith("/v1/"):
            self._proxy()
        else:
            self._send(404, b"{}", "application/json")

    def _proxy(self) -> None:
        u = urlsplit(self.upstream)
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type", "accept")}
        try:
            conn = conn_cls(u.hostname, u.port, timeout=600)
            conn.request(self.command, (u.path.rstrip("/") + self.path), body=body, headers=headers)
            resp = conn.getresponse()
        except OSError as e:
            msg = json.dumps({"error": {"message": f"API at {self.upstream} unreachable: {e}", "type": "server_error",
                                        "param": None, "code": None}}).encode()
            self._send(502, msg, "application/json")
            return
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("content-type", "retry-after", "cache-control"):
                self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1024)
                if not chunk:
                    break
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser left (Stop): closing upstream aborts the request there
        finally:
            conn.close()


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(api_url: str, host: str = "127.0.0.1", port: int = 7860) -> http.server.HTTPServer:
    handler = type("Handler", (_Handler,), {"upstream": api_url.rstrip("/")})
    return _Server((host, port), handler)


def serve_webui(api_url: str, host: str = "127.0.0.1", port: int = 7860) -> None:
    srv = make_server(api_url, host, port)
    print(f"web chat on http://{host}:{srv.server_address[1]}/ (API: {api_url}); Ctrl-C to stop", file=sys.stderr)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
