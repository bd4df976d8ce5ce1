// The web page's script against a fake DOM and fetch (run by tests/test_router_protocol.py with node): a message
// with an attached image goes out as image_url + text parts, and the next turn keeps that history.
const fs = require("fs");
const js = fs.readFileSync(process.argv[2], "utf8");
const els = {};
function el(id){ if (!els[id]) els[id] = {id, value: "", files: [], disabled: false, innerHTML: "", textContent: "", children: [], style: {},
  appendChild(c){ this.children.push(c); return c; }, addEventListener(){}, focus(){}, requestSubmit(){}, scrollTop: 0}; return els[id]; }
global.document = { getElementById: el, createElement: tag => ({tag, style: {}, children: [], appendChild(c){ this.children.push(c); return c; }}) };
global.localStorage = { getItem(){ return ""; }, setItem(){} };
global.performance = { now: () => Date.now() };
global.AbortController = class { constructor(){ this.signal = {}; } abort(){} };
global.FileReader = class { readAsDataURL(f){ this.result = "data:image/png;base64,AAAA"; setTimeout(() => this.onload(), 0); } };
global.TextDecoder = class { decode(v){ return v; } };
let sent = null;
global.fetch = async (url, opts) => {
  if (url.endsWith("/v1/models")) return { ok: true, json: async () => ({data: [{id: "m"}]}) };
  sent = JSON.parse(opts.body);
  const chunks = ['data: {"choices":[{"delta":{"content":"A cat."}}]}\n\n', 'data: {"choices":[],"usage":{"completion_tokens":2}}\n\n', "data: [DONE]\n\n"];
  let i = 0;
  return { ok: true, body: { getReader: () => ({ read: async () => i < chunks.length ? {value: chunks[i++], done: false} : {done: true} }) } };
};
eval(js);
(async () => {
  el("in").value = "What is this?"; el("img").files = [{name: "cat.png"}];
  await el("f").onsubmit({preventDefault(){}});
  const content = sent.messages[sent.messages.length - 1].content;
  if (!Array.isArray(content) || content[0].type !== "image_url" || content[0].image_url.url !== "data:image/png;base64,AAAA" ||
      content[1].text !== "What is this?") { console.log("FAIL", JSON.stringify(sent)); process.exit(1); }
  el("in").value = "And now?"; el("img").files = [];
  await el("f").onsubmit({preventDefault(){}});
  const msgs = sent.messages;
  if (msgs.length !== 3 || msgs[2].content !== "And now?" || !Array.isArray(msgs[0].content) || msgs[1].content !== "A cat.") {
    console.log("FAIL turn 2", JSON.stringify(msgs)); process.exit(1); }
  console.log("ok");
})();
