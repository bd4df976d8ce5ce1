// The web page's script against a fake DOM and fetch (run by tests/test_router_protocol.py with node): a message
// with an attached image goes out as image_url + text parts, the next turn keeps that history, an answer's Markdown
// becomes elements whose text is set as text only (no model output is ever parsed as HTML), and Stop marks the
// answer as stopped, an answer's reasoning_content and tool calls (arguments streamed in pieces) are shown apart
// and the calls stay in the history, and a tools field that is not a JSON list is refused before sending.
// tests/test_webui_browser.py checks the same in a real browser.
const fs = require("fs");
const js = fs.readFileSync(process.argv[2], "utf8");
function fail(msg, obj){ console.log("FAIL", msg, JSON.stringify(obj)); process.exit(1); }
function elem(props){
  const e = {style: {}, children: [], className: "", _text: "", ...props,
    appendChild(c){ this.children.push(c); return c; }, addEventListener(){}, focus(){}, requestSubmit(){}, scrollTop: 0,
    get textContent(){ return this._text + this.children.map(c => c.textContent).join(""); },
    set textContent(v){ this._text = String(v); this.children = []; },
    get innerHTML(){ return ""; },
    set innerHTML(v){ if (v !== "") fail("innerHTML set to", v); this.children = []; }};
  return e;
}
const els = {};
function el(id){ if (!els[id]) els[id] = elem({id, value: "", files: [], disabled: false, hidden: false}); return els[id]; }
global.document = { getElementById: el, createElement: tag => elem({tag}) };
global.localStorage = { getItem(){ return ""; }, setItem(){} };
global.performance = { now: () => Date.now() };
let aborted = null;
global.AbortController = class { constructor(){ this.signal = {}; } abort(){ if (aborted) aborted(); } };
global.FileReader = class { readAsDataURL(f){ this.result = "data:image/png;base64,AAAA"; setTimeout(() => this.onload(), 0); } };
global.TextDecoder = class { decode(v){ return v; } };
let sent = null, answer = ["A cat."], hang = false, deltas = null, fetches = 0;
global.fetch = async (url, opts) => {
  if (url.endsWith("/v1/models")) return { ok: true, json: async () => ({data: [{id: "m"}]}) };
  sent = JSON.parse(opts.body); fetches++;
  const chunks = (deltas || answer.map(a => ({content: a}))).map(d => `data: ${JSON.stringify({choices: [{delta: d}]})}\n\n`)
    .concat(hang ? [] : ['data: {"choices":[],"usage":{"completion_tokens":2}}\n\n', "data: [DONE]\n\n"]);
  let i = 0;
  const read = async () => {
    if (i < chunks.length) return {value: chunks[i++], done: false};
    if (!hang) return {done: true};
    return new Promise((_, no) => { aborted = () => { const e = new Error("aborted"); e.name = "AbortError"; no(e); }; });
  };
  return { ok: true, body: { getReader: () => ({ read }) } };
};
const last = () => el("log").children[el("log").children.length - 1];
const tags = (e, out = []) => { out.push(e.tag); e.children.forEach(c => tags(c, out)); return out; };
const find = (e, cls, out = []) => { if (e.className.split(" ").includes(cls)) out.push(e); e.children.forEach(c => find(c, cls, out)); return out; };
eval(js);
(async () => {
  el("in").value = "What is this?"; el("img").files = [{name: "cat.png"}];
  await el("f").onsubmit({preventDefault(){}});
  const content = sent.messages[sent.messages.length - 1].content;
  if (!Array.isArray(content) || content[0].type !== "image_url" || content[0].image_url.url !== "data:image/png;base64,AAAA" ||
      content[1].text !== "What is this?") fail("turn 1", sent);
  el("in").value = "And now?"; el("img").files = [];
  answer = ["Use `ls`:\n```sh\nls <img src=x onerror=alert(1)>\n", "```\n**done**"];
  await el("f").onsubmit({preventDefault(){}});
  const msgs = sent.messages;
  if (msgs.length !== 3 || msgs[2].content !== "And now?" || !Array.isArray(msgs[0].content) || msgs[1].content !== "A cat.")
    fail("turn 2", msgs);
  const t = tags(last());
  if (!t.includes("pre") || !t.includes("strong") || t.filter(x => x === "code").length !== 2) fail("markdown", t);
  if (!last().textContent.includes("ls <img src=x onerror=alert(1)>")) fail("code text", last().textContent);
  el("in").value = "Go on"; answer = ["Once upon"]; hang = true;
  const turn = el("f").onsubmit({preventDefault(){}});
  await new Promise(r => setTimeout(r, 10));
  el("stop").onclick(); await turn;
  if (!last().className.includes("stopped") || !last().textContent.includes("stopped") || el("send").disabled)
    fail("stop", {cls: last().className, text: last().textContent});
  el("in").value = "Next"; hang = false; answer = ["Fine."];
  await el("f").onsubmit({preventDefault(){}});
  if (sent.messages.length !== 7 || sent.messages[5].content !== "Once upon") fail("history after stop", sent.messages);
  const tools = [{type: "function", function: {name: "get_weather", parameters: {type: "object"}}}];
  el("tools").value = JSON.stringify(tools); el("in").value = "Weather in Paris?";
  deltas = [{reasoning_content: "Need the "}, {reasoning_content: "weather."},
            {tool_calls: [{index: 0, id: "call_1", type: "function", function: {name: "get_weather", arguments: '{"city": '}}]},
            {tool_calls: [{index: 0, function: {arguments: '"Paris"}'}}]}];
  await el("f").onsubmit({preventDefault(){}});
  if (JSON.stringify(sent.tools) !== JSON.stringify(tools)) fail("tools sent", sent.tools);
  const [think] = find(last(), "think"), calls = find(last(), "call");
  if (!think || think.hidden || !think.textContent.includes("Need the weather.")) fail("reasoning", think);
  if (calls.length !== 1 || !calls[0].textContent.startsWith("get_weather") ||
      !calls[0].textContent.includes('{\n  "city": "Paris"\n}')) fail("tool call", calls.map(c => c.textContent));
  el("tools").value = "[not json"; el("in").value = "Again"; const before = fetches;
  await el("f").onsubmit({preventDefault(){}});
  if (fetches !== before || !last().className.includes("error") || !last().textContent.startsWith("tools: not valid JSON"))
    fail("bad tools", last().textContent);
  el("tools").value = ""; deltas = null; answer = ["Sunny."];
  await el("f").onsubmit({preventDefault(){}});
  const kept = sent.messages[sent.messages.length - 2];
  if (sent.tools || kept.content !== null || kept.tool_calls[0].function.arguments !== '{"city": "Paris"}' ||
      kept.tool_calls[0].id !== "call_1" || sent.messages[sent.messages.length - 1].content !== "Again")
    fail("history keeps the calls", sent.messages);
  const [plain] = find(last(), "think");
  if (!plain.hidden || find(last(), "call").length) fail("no reasoning, no calls", last().textContent);
  console.log("ok");
})();
