"""The web page in headless Chromium: a fake microphone plays a held-out clip; the page must show its transcript.

Chromium is driven over the DevTools protocol (a few JSON messages over a WebSocket). Skips when /usr/bin/chromium
is absent (apt-get install chromium; .ci/run installs it where it can)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.serve.conftest import Running

CHROMIUM = Path(os.environ.get("MEGAEDGE_CHROMIUM", "/usr/bin/chromium"))


# transcriptOf on made-up finals: an unsure token, tokens that do not spell the text, a character split across
# tokens (the span takes the lower log-probability), and markup in a transcript (it must stay text)
_CASES = """JSON.stringify([
  {transcript: "ab", logprobs: [{logprob: -0.1, bytes: [97]}, {logprob: -0.9, bytes: [98]}]},
  {transcript: "xyz", logprobs: [{logprob: -0.1, bytes: [97]}]},
  {transcript: "\u4e2d ok", logprobs: [{logprob: -1.0, bytes: [228, 184]}, {logprob: -0.1, bytes: [173]},
                                      {logprob: -0.2, bytes: [32, 111, 107]}]},
  {transcript: "<img src=x onerror=alert(1)>", logprobs: []},
].map((event) => { const el = transcriptOf(event);
  return {text: el.textContent, html: el.innerHTML.includes("<img"),
          spans: [...el.children].map((s) => [s.textContent, Number(s.dataset.logprob), s.className])}; }))"""


def _evaluate(ws, expression: str):
    ws.send(json.dumps({"id": 2, "method": "Runtime.evaluate", "params": {"expression": expression,
                                                                          "returnByValue": True}}))
    while True:
        reply = json.loads(ws.recv(timeout=30))
        if reply.get("id") == 2:
            return json.loads(reply["result"]["result"]["value"])


def _page_state(ws) -> dict:
    expression = ("JSON.stringify({finals: [...document.querySelectorAll('#finals li.final')]"
                  ".map(li => li.firstChild.textContent), log: document.getElementById('log').textContent, "
                  "tokens: [...document.querySelectorAll('#finals li.final span[data-logprob]')]"
                  ".map(s => [s.textContent, Number(s.dataset.logprob), s.className]), "
                  "status: document.getElementById('status').textContent})")
    ws.send(json.dumps({"id": 1, "method": "Runtime.evaluate",
                        "params": {"expression": expression, "returnByValue": True}}))
    while True:
        reply = json.loads(ws.recv(timeout=30))
        if reply.get("id") == 1:
            value = reply["result"]["result"].get("value")  # none while the page is still loading
            return json.loads(value) if value else {"finals": [], "log": "", "status": "loading"}


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not found: apt-get install chromium")
def test_web_page_shows_the_transcript_of_the_microphone(fixture_bundles, serve_transcriber, tmp_path):
    import httpx
    import soundfile as sf
    from websockets.sync.client import connect

    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime import output
    from megaedge.runtime.evaluate import read_set
    from megaedge.serve.app import ServeConfig

    item = next(i for i in read_set(fixture.heldout_manifest()) if i["id"] == "clean-002")
    samples = audio_io.load(item["path"])
    offline = serve_transcriber.transcribe(samples)
    expected = offline.text
    clip = tmp_path / "mic.wav"
    # 0.5 s of silence before (the page connects while the fake device starts), 3 s after (the endpoint).
    sf.write(str(clip), np.concatenate([np.zeros(8000), samples, np.zeros(48000)]).astype(np.float32), 16000,
             subtype="PCM_16")
    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"])), serve_transcriber)
    profile = tmp_path / "profile"
    browser = subprocess.Popen(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={clip}%noloop",
         "--autoplay-policy=no-user-gesture-required", "--disable-background-networking", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path)})  # its singleton socket's directory, left behind otherwise
    try:
        port_file = profile / "DevToolsActivePort"
        running.wait_for(lambda: port_file.exists() and port_file.read_text().strip(), "chromium's DevTools port")
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            ws.send(json.dumps({"id": 0, "method": "Page.navigate",
                                "params": {"url": running.url + "/?autostart=1&rate=16000"}}))
            deadline = time.monotonic() + 120
            state = {}
            while time.monotonic() < deadline:
                state = _page_state(ws)
                if state["finals"] or state["log"]:
                    break
                time.sleep(0.25)
            unsure, unspelled, split, markup = _evaluate(ws, _CASES)
        assert state.get("log") == "", state
        assert state["finals"][0] == expected, state
        # each token of the final in a span with its log-probability, those under even odds marked
        tokens = state["tokens"]
        assert len(tokens) == len(output.token_logprobs(serve_transcriber, offline.segments[0])) > 1
        assert "".join(text for text, _, _ in tokens) == expected
        assert all((kind == "unsure") == (logprob < math.log(0.5)) for _, logprob, kind in tokens)
        assert all(logprob <= 0 for _, logprob, _ in tokens)
        assert unsure["spans"] == [["a", -0.1, ""], ["b", -0.9, "unsure"]]
        assert unspelled == {"text": "xyz", "html": False, "spans": []}  # plain text
        assert split["spans"] == [["\u4e2d", -1.0, "unsure"], [" ok", -0.2, ""]]
        assert markup == {"text": "<img src=x onerror=alert(1)>", "html": False, "spans": []}
    finally:
        browser.terminate()
        try:
            browser.wait(30)
        except subprocess.TimeoutExpired:
            browser.kill()
        running.stop()
