"""The web chat page in a real browser: Debian's headless chromium, driven by selenium through chromedriver (both
installed by `make browser`, which `make test` runs), against the router app served by uvicorn on a free loopback
port in this process. Two models behind it: the tiny random LLaVA of tests/test_llava.py on the real engine (a
conversation, the history it keeps, an attached image), and a scripted fake engine whose answers are known (Markdown
and HTML in an answer, a long answer to stop, an answer with reasoning and a tool call)."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
uvicorn = pytest.importorskip("uvicorn")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from cluster.deployments.replica import Connection, LocalWorkerClient, ReplicaCore  # noqa: E402
from cluster.engine.async_engine import AsyncEngine  # noqa: E402
from cluster.messages import ToolCall  # noqa: E402
from cluster.serving.app import create_app  # noqa: E402
from cluster.serving.backends import LocalBackend  # noqa: E402
from cluster.serving.server import OpenAIServer  # noqa: E402
from cluster.workers.host import RankZeroHost  # noqa: E402
from test_llava import _image, llava  # noqa: E402,F401  (the tiny LLaVA fixture)
from test_router_protocol import FakeEngine, Out  # noqa: E402

MARKDOWN = ("Here is code:\n```python\nprint('<b>hi</b>')\n```\nand **bold** and `x = 1`.\n"
            "<img src=x onerror=\"window.__xss=1\"> <script>window.__xss=2</script>")
STORY = "once " * 300  # 300 steps of 30 ms: long enough to stop in the middle
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@dataclass
class RichOut(Out):
    """An output with what a thinking, tool-calling model's parsers give (LLMEngine's RequestOutput has both)."""

    reasoning: str = ""
    tool_calls: list | None = None


class ScriptedEngine(FakeEngine):
    """Answers MARKDOWN, or STORY when asked for a story, a word per step; asked about the weather, it reasons in
    two pieces, then calls get_weather."""

    model_name = "scripted"
    session_len = 4096

    def prepare_prompt(self, prompt):
        self.prompts = getattr(self, "prompts", []) + [prompt]
        said = str(prompt[-1]["content"])
        kind = 1 if "story" in said else 2 if "weather" in said else 0
        flat = [{**m, "content": m.get("content") or ""} for m in prompt]
        return [kind] + self.tokenizer.prompt_ids(flat)

    def submit(self, ids, gen, rid, loop, sink):
        self.gens = getattr(self, "gens", []) + [gen]
        return super().submit(ids, gen, rid, loop, sink)

    def _weather(self, rid, ids, n: int) -> RichOut:
        if n < 2:
            return RichOut(rid, "", [n + 1], None, None, len(ids), n + 1, reasoning=["Thinking about ", "the weather."][n])
        call = ToolCall(0, "get_weather", '{"city": "Paris"}', "call_w1")
        return RichOut(rid, "", [n + 1], None, "tool_calls", len(ids), n + 1, tool_calls=[call])

    def loop(self):
        while not self.stop:
            time.sleep(self.step_s)
            with self.lock:
                items = list(self.reqs.items())
            for rid, r in items:
                ids, gen, sink, n = r
                if ids[0] == 2:
                    r[3] = n + 1
                    out = self._weather(rid, ids, n)
                    if out.finish_reason:
                        with self.lock:
                            self.reqs.pop(rid, None)
                    sink.put(out)
                    continue
                pieces = re.findall(r"\S+\s*|\s+", STORY if ids[0] else MARKDOWN)
                done = n + 1 >= min(len(pieces), gen.max_new_tokens)
                r[3] = n + 1
                if done:
                    with self.lock:
                        self.reqs.pop(rid, None)
                sink.put(Out(rid, pieces[n], [n + 1], None, "stop" if done else None, len(ids), n + 1))


class Server:
    """The router app over one ReplicaCore + RankZeroHost per engine, on uvicorn in a thread with its own loop."""

    def __init__(self, engines: dict):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.engines, self.uv = f"http://127.0.0.1:{self.port}/", engines, None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.uv and self.uv.started):
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    async def _main(self) -> None:
        backends = []
        for name, engine in self.engines.items():
            host = RankZeroHost(engine, asyncio.get_running_loop())
            core = ReplicaCore(lambda h=host: _connected(h), restart=False, poll_timeout=0.2)
            await core.start()
            backends.append(LocalBackend(core, name))
        self.uv = uvicorn.Server(uvicorn.Config(create_app(OpenAIServer(backends)), host="127.0.0.1", port=self.port,
                                                log_level="warning", lifespan="off"))
        await self.uv.serve()

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=10)


async def _connected(host: RankZeroHost) -> Connection:
    return Connection(LocalWorkerClient(host), host.info(), lambda: None)


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        msg = "chromium and chromedriver are not installed (`make browser` apt-get installs them)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI's setup installs them: their absence is a broken setup, not a skip
        pytest.skip(msg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        opts.add_argument(a)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=opts)


@pytest.fixture(scope="module")
def page(llava):  # noqa: F811
    path, _, engine = llava
    prompts: list = []
    real = AsyncEngine(engine)
    prepare = real.prepare_prompt
    real.prepare_prompt = lambda p: (prompts.append(p), prepare(p))[1]
    scripted = ScriptedEngine(step_s=0.03)
    srv = Server({"llava": real, "scripted": scripted})
    browser = _browser()
    browser.get(srv.url)
    browser.prompts, browser.scripted = prompts, scripted
    try:
        yield browser
    finally:
        browser.quit()
        srv.stop()
        real.shutdown()
        scripted.shutdown()


def _send(b, model: str, text: str, wait: bool = True) -> None:
    WebDriverWait(b, 20).until(lambda d: model in [o.text for o in Select(d.find_element(By.ID, "model")).options])
    Select(b.find_element(By.ID, "model")).select_by_visible_text(model)
    n = len(b.find_elements(By.CSS_SELECTOR, ".assistant"))
    box = b.find_element(By.ID, "in")
    box.send_keys(text)
    b.find_element(By.ID, "send").click()
    WebDriverWait(b, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == n + 1)
    if wait:
        WebDriverWait(b, 30).until(lambda d: d.find_element(By.ID, "send").is_enabled())


def _answers(b) -> list:
    return b.find_elements(By.CSS_SELECTOR, ".assistant")


def _max_tokens(b, n: int) -> None:
    box = b.find_element(By.ID, "maxtok")
    box.clear()
    box.send_keys(str(n))


def test_conversation_keeps_its_history(page):
    _max_tokens(page, 12)  # the tiny model's session is 512 tokens
    _send(page, "llava", "Hello there")
    _send(page, "llava", "And what next?")
    first, second = (a.find_element(By.CSS_SELECTOR, "div").text for a in _answers(page)[-2:])
    assert first and second
    assert all(" tokens, " in a.find_element(By.CSS_SELECTOR, ".stats").text for a in _answers(page)[-2:])
    assert page.prompts[-1] == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "And what next?"}]
    assert [m.text for m in page.find_elements(By.CSS_SELECTOR, ".user")][-2:] == ["Hello there", "And what next?"]


def test_an_image_goes_to_the_llava_model(page, tmp_path):
    f = tmp_path / "cat.png"
    _image(3).save(f)
    label = page.find_element(By.CSS_SELECTOR, "label.attach")
    assert label.find_elements(By.TAG_NAME, "svg") and label.text == "Image"
    assert page.execute_script("const e = arguments[0]; return e.scrollWidth <= e.clientWidth", label)
    assert not page.find_element(By.ID, "imgname").is_displayed()
    page.find_element(By.ID, "img").send_keys(str(f))
    assert page.find_element(By.ID, "imgfile").text == "cat.png" and page.find_element(By.ID, "imgname").is_displayed()
    _send(page, "llava", "What is in the picture?")
    said = page.find_elements(By.CSS_SELECTOR, ".user")[-1]
    assert said.find_element(By.TAG_NAME, "img").get_attribute("alt") == "cat.png"
    assert said.text == "What is in the picture?"
    assert not page.find_elements(By.CSS_SELECTOR, ".error")
    assert _answers(page)[-1].find_element(By.CSS_SELECTOR, ".stats")
    sent = page.prompts[-1][-1]["content"]
    assert sent[0]["type"] == "image_url" and sent[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert not page.find_element(By.ID, "imgname").is_displayed()  # the attachment went with that message
    page.save_screenshot(os.environ.get("WEBUI_SCREENSHOT") or str(tmp_path / "webui.png"))


def test_markdown_is_rendered_and_html_stays_text(page):
    page.find_element(By.ID, "clear").click()  # a new chat: the scripted model reads no image parts
    _max_tokens(page, 500)
    _send(page, "scripted", "Show me some code")
    answer = _answers(page)[-1]
    assert answer.find_element(By.CSS_SELECTOR, "pre code").text == "print('<b>hi</b>')"
    assert answer.find_element(By.CSS_SELECTOR, "strong").text == "bold"
    assert answer.find_element(By.CSS_SELECTOR, "span > code").text == "x = 1"
    assert '<img src=x onerror="window.__xss=1">' in answer.text and "<script>" in answer.text
    assert not answer.find_elements(By.CSS_SELECTOR, "img, script, b")
    assert page.execute_script("return window.__xss") is None


def test_stop_mid_answer_is_marked_and_aborts(page):
    _send(page, "scripted", "Tell me a story", wait=False)
    WebDriverWait(page, 20).until(lambda d: len(_answers(d)[-1].text) > 20)
    page.find_element(By.ID, "stop").click()
    WebDriverWait(page, 10).until(lambda d: d.find_element(By.ID, "send").is_enabled())
    answer = _answers(page)[-1]
    assert "stopped" in answer.get_attribute("class").split() and answer.find_element(By.CSS_SELECTOR, ".tag").text == "stopped"
    assert len(answer.text) < len(STORY) / 2
    deadline = time.monotonic() + 5
    while page.scripted.reqs and time.monotonic() < deadline:  # the server aborted the request
        time.sleep(0.05)
    assert not page.scripted.reqs and page.scripted.aborted
    if os.environ.get("WEBUI_SCREENSHOT"):
        page.save_screenshot(os.environ["WEBUI_SCREENSHOT"].replace(".png", "-stopped.png"))


def test_reasoning_and_tool_calls_are_shown_and_kept(page):
    import json

    page.find_element(By.ID, "clear").click()
    page.find_element(By.ID, "tools").send_keys(json.dumps(TOOLS))
    _send(page, "scripted", "What is the weather in Paris?")
    answer = _answers(page)[-1]
    think = answer.find_element(By.CSS_SELECTOR, "details.think")
    assert think.is_displayed() and think.find_element(By.CSS_SELECTOR, "summary").text == "reasoning"
    assert "Thinking about the weather." in think.text
    (call,) = answer.find_elements(By.CSS_SELECTOR, ".call")
    assert call.find_element(By.CSS_SELECTOR, ".fn").text == "get_weather"
    assert json.loads(call.find_element(By.CSS_SELECTOR, "pre").text) == {"city": "Paris"}
    assert page.scripted.gens[-1].tools == TOOLS and not page.find_elements(By.CSS_SELECTOR, ".error")
    page.find_element(By.ID, "tools").clear()
    _send(page, "scripted", "Thanks")
    kept = page.scripted.prompts[-1][-2]
    assert kept["role"] == "assistant" and kept["tool_calls"][0]["id"] == "call_w1"
    assert kept["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    plain = _answers(page)[-1]
    assert not plain.find_element(By.CSS_SELECTOR, "details.think").is_displayed()
    assert not plain.find_elements(By.CSS_SELECTOR, ".call") and page.scripted.gens[-1].tools is None
    if os.environ.get("WEBUI_SCREENSHOT"):
        page.save_screenshot(os.environ["WEBUI_SCREENSHOT"].replace(".png", "-tools.png"))
