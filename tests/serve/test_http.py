"""POST /v1/audio/transcriptions through the official openai client, limits, API key, /health and /metrics."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.serve.conftest import Running, health, metric

openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")


def client(running, key: str = "unused"):
    return openai.OpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_returns_the_transcriber_text_in_every_format(server, serve_transcriber, clips):
    api = client(server)
    for item in clips[:4]:
        expected = serve_transcriber.transcribe(item["path"])
        with open(item["path"], "rb") as f:
            plain = api.audio.transcriptions.create(model="whisper-1", file=f)
        assert plain.text == expected.text
        with open(item["path"], "rb") as f:
            text = api.audio.transcriptions.create(model="whisper-1", file=f, response_format="text")
        assert text == expected.text
        with open(item["path"], "rb") as f:
            verbose = api.audio.transcriptions.create(model="megaedge-test", file=f, response_format="verbose_json",
                                                      temperature=0)
        doc = verbose.model_dump()
        assert doc["text"] == expected.text and doc["model"] == "megaedge-test"
        assert doc["language"] == (expected.language or "").lower()
        assert doc["route"] == expected.route == "merged"
        assert doc["mean_logprob"] == expected.mean_logprob and doc["min_logprob"] == expected.min_logprob
        assert len(doc["segments"]) == len(expected.segments) == 1
        seg, ref = doc["segments"][0], expected.segments[0]
        assert (seg["id"], seg["start"], seg["end"], seg["text"]) == (0, ref.start, ref.end, ref.text)
        assert seg["tokens"] == ref.token_ids
        assert (seg["route"], seg["degraded_prob"], seg["mean_logprob"], seg["min_logprob"]) == (
            ref.route, ref.degraded_prob, ref.mean_logprob, ref.min_logprob)


def test_language_and_prompt_reach_the_transcriber(server, serve_transcriber, clips):
    item = clips[1]
    expected = serve_transcriber.transcribe(item["path"], language="English", context="valves and pumps")
    with open(item["path"], "rb") as f:
        out = client(server).audio.transcriptions.create(model="m", file=f, language="en",
                                                         prompt="valves and pumps")
    assert out.text == expected.text


def test_a_flac_of_unknown_length_is_transcribed_and_its_length_checked(server, strict, serve_transcriber, clips,
                                                                        tmp_path):
    """A FLAC from a streaming encoder has no length in its header: it was refused ('array is too big'), and its
    duration read as 2**63 frames; now its text is the whole FLAC's, and --max-audio-seconds counts what it holds
    as it is read."""
    import soundfile as sf

    from tests.conftest import forget_flac_length

    item = clips[2]
    whole = tmp_path / "whole.flac"
    sf.write(str(whole), item["pcm"], 16000)
    streamed = tmp_path / "streamed.flac"
    streamed.write_bytes(whole.read_bytes())
    forget_flac_length(streamed)
    with open(streamed, "rb") as f:
        out = client(server).audio.transcriptions.create(model="m", file=f, response_format="verbose_json")
    assert out.text == serve_transcriber.transcribe(str(whole)).text and out.text
    assert out.duration == pytest.approx(len(item["pcm"]) / 16000, abs=1e-3)
    # 10 minutes of silence compress to a few kB: decoded whole, such a bomb of unknown length could fill the
    # memory; it is refused as soon as it holds more than --max-audio-seconds
    bomb = tmp_path / "bomb.flac"
    sf.write(str(bomb), np.zeros(16000 * 600, np.int16), 16000)
    assert bomb.stat().st_size < 100_000
    with open(forget_flac_length(bomb), "rb") as f, pytest.raises(openai.BadRequestError) as err:
        client(strict, "sesame").audio.transcriptions.create(model="m", file=f)
    assert err.value.body["code"] == "audio_too_long"
    assert "of unknown length, it holds more than 4 s of audio" in err.value.body["message"]
    assert "--max-audio-seconds" in err.value.body["message"]


@pytest.mark.parametrize("streamed", [False, True])
def test_an_upload_that_would_decode_to_too_many_samples_is_refused(strict, tmp_path, streamed):
    """Seconds alone did not bound a decode: 3 s of 8-channel 48 kHz silence is a few kB of FLAC and 1.15 M
    samples (at 655 kHz x 8, the reviewer's bomb, gigabytes). Known length: refused before a slot is taken; of
    unknown length: in its slot, as soon as it holds more than --max-audio-seconds of 48 kHz stereo."""
    import soundfile as sf

    from tests.conftest import forget_flac_length

    bomb = tmp_path / "bomb.flac"
    sf.write(str(bomb), np.zeros((48000 * 3, 8), np.int16), 48000)
    assert bomb.stat().st_size < 50_000
    if streamed:
        forget_flac_length(bomb)
    with open(bomb, "rb") as f, pytest.raises(openai.BadRequestError) as err:
        client(strict, "sesame").audio.transcriptions.create(model="m", file=f)
    message = err.value.body["message"]
    assert err.value.body["code"] == "audio_too_long" and "(48000 Hz x 8 channels)" in message
    assert ("of unknown length, it holds more than the 384000 samples" if streamed
            else "holds 1152000 samples") in message and "downmix or resample it" in message
    strict.wait_for(lambda: strict.state.admission.active == 0, "the slot released")


def test_a_bundle_fault_is_a_500_that_names_no_server_path(server, serve_transcriber, clips, monkeypatch):
    """A BundleError while transcribing (a forged tokenizer) is the server's fault: 500 without the bundle's
    path (it was a 400 invalid_audio naming it)."""
    from megaedge.errors import BundleError

    def transcribe(*args, **kwargs):
        raise BundleError("/srv/secret/bundle/tokenizer.json: token id 9 is past the decoder's vocabulary")

    monkeypatch.setattr(serve_transcriber, "transcribe", transcribe)
    with open(clips[0]["path"], "rb") as f, pytest.raises(openai.InternalServerError) as err:
        client(server).audio.transcriptions.create(model="m", file=f)
    assert err.value.status_code == 500 and err.value.body["code"] == "server_error"
    assert "/srv/secret" not in err.value.body["message"]


def test_bad_requests_get_400_with_one_line(server, clips, tmp_path):
    api = client(server)
    path = clips[0]["path"]
    cases = [
        ({"temperature": 0.7}, "temperature"),
        ({"response_format": "tsv"}, "response_format"),
        ({"language": "klingon"}, "language"),
    ]
    for extra, param in cases:
        with open(path, "rb") as f, pytest.raises(openai.BadRequestError) as err:
            api.audio.transcriptions.create(model="m", file=f, **extra)
        assert err.value.body["param"] == param
        assert "\n" not in err.value.body["message"]
    garbage = tmp_path / "notes.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    with open(garbage, "rb") as f, pytest.raises(openai.BadRequestError) as err:
        api.audio.transcriptions.create(model="m", file=f)
    assert err.value.body["code"] == "invalid_audio" and "notes.wav" in err.value.body["message"]
    import httpx

    missing = httpx.post(server.url + "/v1/audio/transcriptions", data={"model": "m"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_file"
    with open(path, "rb") as f:
        audio = f.read()
    for name in (b"x.\x00wav", b"x.w\x00", b"..", b"x.w/av", b"clip.WAV"):  # the name is only a hint: never a 500
        body = (b"--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--B\r\nContent-Disposition: "
                b"form-data; name=\"file\"; filename=\"" + name + b"\"\r\n\r\n" + audio + b"\r\n--B--\r\n")
        answer = httpx.post(server.url + "/v1/audio/transcriptions", content=body, timeout=60,
                            headers={"content-type": "multipart/form-data; boundary=B"})
        assert answer.status_code == 200, (name, answer.text)


def test_stream_true_sends_a_delta_per_segment_then_the_text(server, serve_transcriber, clips, tmp_path):
    """stream=true through the openai client: a transcript.text.delta per decoded segment of a 65 s file (three
    30 s segments), adding up to transcript.text.done's text, which is offline transcription's; counted once, as 200.
    Bad values of stream, or stream with verbose_json, are one-line 400s."""
    import soundfile as sf

    from megaedge.runtime import audio as audio_io

    gap = np.zeros(16000 * 4, np.float32)
    parts = [audio_io.load(item["path"]) for item in clips[:6]]
    audio = np.concatenate([x for p in parts for x in (p, gap)])
    audio = np.concatenate([audio, np.zeros(16000 * 65 - audio.size, np.float32)])[: 16000 * 65]
    path = tmp_path / "long.wav"
    sf.write(str(path), audio, 16000, subtype="FLOAT")
    expected = serve_transcriber.transcribe(str(path))
    assert len(expected.segments) == 3 and sum(bool(s.text) for s in expected.segments) >= 2
    before = metric(server, "megaedge_requests_total", 'kind="transcription",status="200"', missing=0)
    api = client(server)
    with open(path, "rb") as f:
        events = list(api.audio.transcriptions.create(model="m", file=f, stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["transcript.text.delta"] * sum(bool(s.text) for s in expected.segments) + ["transcript.text.done"]
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == expected.text
    assert events[-1].usage.seconds == 65.0
    assert metric(server, "megaedge_requests_total", 'kind="transcription",status="200"') == before + 1
    with open(path, "rb") as f:
        text_events = list(api.audio.transcriptions.create(model="m", file=f, stream=True, response_format="text"))
    assert text_events[-1].text == expected.text
    for extra, param in (({"response_format": "verbose_json"}, "response_format"),):
        with open(clips[0]["path"], "rb") as f, pytest.raises(openai.BadRequestError) as err:
            api.audio.transcriptions.create(model="m", file=f, stream=True, **extra)
        assert err.value.body["param"] == param and "\n" not in err.value.body["message"]
    import httpx

    with open(clips[0]["path"], "rb") as f:
        bad = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": f},
                         data={"model": "m", "stream": "maybe"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"


def test_a_request_over_the_fixed_kv_buffer_names_what_to_shorten(server, serve_transcriber, clips, monkeypatch):
    """A --target cuda bundle's decoder refuses a request whose prompt, audio and text overflow its fixed KV
    buffer (runtime/fixed_kv.py): the answer is context_length_exceeded, naming the prompt when the client sent one
    and the file otherwise, and the server keeps serving."""
    from megaedge.errors import ContextLengthError

    def full(*args, **kwargs):
        raise ContextLengthError("decoder: 2000 cached + 100 new positions exceed this bundle's fixed KV buffer of "
                                 "2048 (decoder.max_kv_length); shorten the segments or the context, or re-export "
                                 "with a larger --max-kv-length")

    api = client(server)
    with monkeypatch.context() as patch:
        patch.setattr(serve_transcriber, "transcribe", full)
        for extra, param in (({"prompt": "a long context"}, "prompt"), ({}, "file")):
            with open(clips[0]["path"], "rb") as f, pytest.raises(openai.BadRequestError) as err:
                api.audio.transcriptions.create(model="m", file=f, **extra)
            body = err.value.body
            assert (body["code"], body["param"]) == ("context_length_exceeded", param), body
            assert "--max-kv-length" in body["message"] and "\n" not in body["message"]
    with open(clips[0]["path"], "rb") as f:
        assert api.audio.transcriptions.create(model="m", file=f).text == serve_transcriber.transcribe(
            clips[0]["path"]).text


@pytest.fixture(scope="module")
def strict(fixture_bundles, serve_transcriber):
    """A server with an API key and small limits."""
    from megaedge.serve.app import ServeConfig

    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"]), api_key="sesame", max_streams=2,
                                  max_request_mb=0.25, max_audio_seconds=4.0, idle_timeout=1.5), serve_transcriber)
    yield running
    running.stop()


def test_api_key_is_enforced(strict, clips):
    import httpx

    path = clips[1]["path"]  # 3.1 s
    with open(path, "rb") as f, pytest.raises(openai.AuthenticationError) as err:
        client(strict, "wrong").audio.transcriptions.create(model="m", file=f)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with open(path, "rb") as f:
        assert client(strict, "sesame").audio.transcriptions.create(model="m", file=f).text
    assert httpx.get(strict.url + "/health", timeout=30).status_code == 200  # probes need no key
    assert httpx.get(strict.url + "/v1/models", timeout=30).status_code == 401
    models = httpx.get(strict.url + "/v1/models", headers={"Authorization": "Bearer sesame"}, timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["megaedge"]


def test_unauthorized_without_the_key_is_401_even_for_plain_http(strict, clips):
    import httpx

    with open(clips[1]["path"], "rb") as f:
        reply = httpx.post(strict.url + "/v1/audio/transcriptions", files={"file": f}, timeout=30)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_request_size_and_audio_duration_limits(strict, clips, tmp_path):
    import soundfile as sf

    api = client(strict, "sesame")
    big = tmp_path / "big.wav"
    sf.write(str(big), np.zeros(16000 * 10, np.float32), 16000, subtype="PCM_16")  # 320 KB > 0.25 MiB
    with open(big, "rb") as f, pytest.raises(openai.APIStatusError) as err:
        api.audio.transcriptions.create(model="m", file=f)
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    long = tmp_path / "long.flac"
    sf.write(str(long), np.zeros(16000 * 6, np.float32), 16000)  # small file, 6 s > 4 s
    with open(long, "rb") as f, pytest.raises(openai.BadRequestError) as err:
        api.audio.transcriptions.create(model="m", file=f)
    assert err.value.body["code"] == "audio_too_long" and "--max-audio-seconds" in err.value.body["message"]
    assert strict.state.admission.active == 0  # refused before taking a slot


def test_chunked_upload_over_the_limit_is_413(strict):
    import httpx

    def body():
        yield (b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(40):
            yield b"\0" * 10_000  # no Content-Length: counted while it streams in

    reply = httpx.post(strict.url + "/v1/audio/transcriptions", content=body(), timeout=30,
                       headers={"Authorization": "Bearer sesame", "content-type": "multipart/form-data; boundary=x"})
    assert reply.status_code == 413


def test_every_transcription_outcome_is_counted_by_status(strict):
    """megaedge_requests_total counted 200 and 429 only: an error ratio from it read 0 % (a new user's probe)."""
    import httpx

    def count(status: str) -> float:
        try:
            return metric(strict, "megaedge_requests_total", f'kind="transcription",status="{status}"')
        except AssertionError:
            return 0.0

    before = {status: count(status) for status in ("400", "401", "413")}
    url, key = strict.url + "/v1/audio/transcriptions", {"Authorization": "Bearer sesame"}
    assert httpx.post(url, content=b"not a form", headers=key, timeout=30).status_code == 400
    assert httpx.post(url, files={"file": ("a.wav", b"x")}, timeout=30).status_code == 401
    big = {**key, "content-type": "multipart/form-data; boundary=x"}
    assert httpx.post(url, content=b"\0" * 400_000, headers=big, timeout=30).status_code == 413  # Content-Length
    assert {status: count(status) - before[status] for status in before} == {"400": 1, "401": 1, "413": 1}


def test_health_and_metrics(server, clips):
    doc = health(server)
    assert doc["status"] == "ok" and doc["mode"] == "merged" and doc["precision"] == "fp32"
    assert (doc["max_streams"], doc["max_queue"], doc["active_streams"]) == (8, 8, 0)
    import httpx

    before = metric(server, "megaedge_requests_total", 'kind="transcription",status="200"') \
        if "megaedge_requests_total{" in httpx.get(server.url + "/metrics").text else 0.0
    with open(clips[2]["path"], "rb") as f:
        client(server).audio.transcriptions.create(model="m", file=f)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for name in ("megaedge_model_loaded 1.0", 'megaedge_active_streams{kind="realtime"} 0.0',
                 'megaedge_active_streams{kind="transcription"} 0.0', "megaedge_queued_requests 0.0",
                 "megaedge_request_seconds_bucket", "megaedge_stream_event_seconds",
                 'megaedge_decoded_tokens_total{kind="transcription"}', "megaedge_decode_seconds_total",
                 "megaedge_errors_total"):
        assert name in text, name
    assert metric(server, "megaedge_requests_total", 'kind="transcription",status="200"') == before + 1
    assert metric(server, "megaedge_decoded_tokens_total", 'kind="transcription"') > 0


def test_health_is_503_until_the_bundle_is_loaded(fixture_bundles, serve_transcriber, monkeypatch):
    import threading

    import httpx

    from megaedge.runtime.transcriber import Transcriber
    from megaedge.serve.app import ServeConfig

    release = threading.Event()

    def slow_load(path, **kwargs):
        release.wait(60)
        return serve_transcriber

    monkeypatch.setattr(Transcriber, "from_bundle", staticmethod(slow_load))
    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"])))
    try:
        reply = httpx.get(running.url + "/health", timeout=30)
        assert reply.status_code == 503 and reply.json()["status"] == "loading"
        busy = httpx.post(running.url + "/v1/audio/transcriptions", files={"file": ("a.wav", b"x")}, timeout=30)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "not_ready"
        release.set()
        running.wait_for(lambda: httpx.get(running.url + "/health", timeout=30).status_code == 200, "loaded")
    finally:
        release.set()
        running.stop()


def test_cli_errors_are_one_line(tmp_path, fixture_bundles):
    import onnxruntime

    bundle = str(fixture_bundles["merged"])
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # one line, before uvicorn starts
        cuda = run_cli("serve", bundle, "--providers", "cuda", "--port", "0")
        lines = cuda.stderr.strip().splitlines()
        assert cuda.returncode == 1 and len(lines) == 1 and lines[0].startswith(
            "megaedge serve: error: execution provider 'cuda' is not available in this onnxruntime"), cuda.stderr
    native = run_cli("serve", bundle, "--decode", "native", "--port", "0")  # an FP32 bundle has no native weights
    assert native.returncode == 1 and len(native.stderr.strip().splitlines()) == 1, native.stderr
    proc = run_cli("serve", str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "not a bundle" in proc.stderr
    blocked = run_cli("serve", str(tmp_path), python_prelude="import sys\nsys.modules['fastapi'] = None\n")
    assert blocked.returncode == 1 and "pip install 'megaedge[serve]'" in blocked.stderr
    bad = run_cli("serve", str(tmp_path), "--max-streams", "0")
    assert bad.returncode == 1 and "max-streams" in bad.stderr
    assert "megaedge serve" not in io.StringIO(proc.stdout).getvalue()


def test_batched_decode_steps_show_in_metrics(fixture_bundles, clips, tmp_path_factory):
    """A bundle whose decoder batches (native INT8): concurrent transcription requests' decode steps are counted
    by their batch size in megaedge_decode_batch_size (every step once: the sizes sum to the steps)."""
    from concurrent.futures import ThreadPoolExecutor

    from megaedge.runtime.batching import StepBatcher
    from megaedge.runtime.transcriber import Transcriber
    from megaedge.serve.app import ServeConfig
    from tests.conftest import int8_bundle_from

    bundle = int8_bundle_from(fixture_bundles["merged"], tmp_path_factory.mktemp("serve_int8"))
    tr = Transcriber.from_bundle(bundle, vad="off")
    assert isinstance(tr.batcher, StepBatcher)
    tr.batcher.gather_seconds = 0.05  # the fixture's steps take ~1 ms: wait longer for the peers
    running = Running(ServeConfig(bundle=str(bundle), max_streams=4, max_queue=4), tr)
    try:
        def post(item):
            with open(item["path"], "rb") as f:
                return client(running).audio.transcriptions.create(model="m", file=f).text

        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(post, clips[:4]))
        assert all(isinstance(t, str) for t in texts)
        count = metric(running, "megaedge_decode_batch_size_count")
        total = metric(running, "megaedge_decode_batch_size_sum")
        assert count == sum(tr.batcher.batches.values()) > 0
        assert total == sum(size * calls for size, calls in tr.batcher.batches.items())
        assert metric(running, "megaedge_decode_batch_size_bucket", 'le="16.0"') == count
    finally:
        running.stop()


def test_unknown_paths_and_methods_answer_in_openais_error_body(strict, caplog):
    import httpx

    with caplog.at_level("INFO", logger="megaedge.serve.requests"):  # what -v shows
        missing = httpx.get(strict.url + "/v1/nope", timeout=30)
    assert any("404 not_found: GET /v1/nope" in r.getMessage() for r in caplog.records)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found" and "/v1/nope" in missing.json()["error"]["message"]
    wrong = httpx.get(strict.url + "/v1/audio/transcriptions", timeout=30)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert "allow" in wrong.headers


def test_a_client_that_leaves_mid_decode_frees_its_slot(server, tmp_path, monkeypatch):
    """A client gone while its 10-minute upload decodes (a timeout, Ctrl-C) stops the decode: answered 499 in the
    log and metrics, and the slot is free long before the audio's 20 segments would have been decoded. The upload
    was never stored under a name in the temporary directory (a server killed mid-decode would leave it there)."""
    import socket
    import tempfile

    import soundfile as sf

    from tests.conftest import speechlike

    path = tmp_path / "long.wav"
    sf.write(str(path), np.tile(speechlike(30, seed=3), 20), 16000, subtype="PCM_16")
    boundary = "megaedgeboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"long.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    before = metric(server, "megaedge_requests_total", 'kind="transcription",status="499"', missing=0)
    tokens = metric(server, "megaedge_decoded_tokens_total", 'kind="transcription"')
    spool = tmp_path / "tmpdir"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        server.wait_for(lambda: server.state.decoding == 1, "the upload decoding")
        assert list(spool.iterdir()) == []
    server.wait_for(lambda: server.state.decoding == 0, "the decode stopped")
    assert metric(server, "megaedge_requests_total", 'kind="transcription",status="499"') == before + 1
    assert metric(server, "megaedge_errors_total", 'code="client_closed_request"') >= 1
    assert metric(server, "megaedge_decoded_tokens_total", 'kind="transcription"') == tokens  # no result counted
    assert health(server)["active_streams"] == 0


def test_a_queued_request_whose_client_left_leaves_the_queue(fixture_bundles, serve_transcriber, clips):
    """With every slot held, a queued upload whose client gave up (a timeout) kept its place until a slot freed,
    and live requests got 429 meanwhile. Now it leaves at once (counted as 499); a 429 says when to retry."""
    import socket

    import httpx

    from megaedge.serve.app import ServeConfig

    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"]), max_streams=1, max_queue=1),
                      serve_transcriber)
    try:
        assert running.state.admission.try_acquire()  # the only slot, held as a live stream would
        audio = open(clips[0]["path"], "rb").read()
        body = (b"--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--B\r\nContent-Disposition: "
                b"form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n" + audio + b"\r\n--B--\r\n")
        head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                "Content-Type: multipart/form-data; boundary=B\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", running.port)) as sock:
            sock.sendall(head + body)
            running.wait_for(lambda: running.state.admission.queued == 1, "the upload queued")
            with open(clips[0]["path"], "rb") as f:
                busy = httpx.post(running.url + "/v1/audio/transcriptions", files={"file": f}, data={"model": "m"},
                                  timeout=60)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        running.wait_for(lambda: running.state.admission.queued == 0, "the upload left the queue")
        assert metric(running, "megaedge_requests_total", 'kind="transcription",status="499"') == 1
        assert running.state.admission.active == 1  # the held slot was never handed to the gone request
    finally:
        running.state.admission.release()
        running.stop()


def _sample(state, key: str) -> float:
    """A sample of the server's metrics after it stopped (0 if its series was never made)."""
    for line in state.metrics.render()[0].decode().splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def test_streams_cut_or_left_are_counted_once_and_end_in_an_error_event(fixture_bundles, serve_transcriber, clips):
    """A stream=true request still open when --shutdown-timeout runs out ends with a server_shutting_down error
    event (it was a cut connection and a CancelledError traceback, counted 499), its decode cancelled; one whose
    client leaves is counted 499 once, with its error code once."""
    import json as _json
    import threading

    import httpx

    from megaedge.errors import Cancelled
    from megaedge.runtime.transcriber import SegmentResult
    from megaedge.serve.app import ServeConfig

    class Slow:
        def __getattr__(self, name):
            return getattr(serve_transcriber, name)

        def transcribe(self, *args, cancel=None, on_segment=None, **kwargs):
            on_segment(SegmentResult(0.0, 1.0, "first words", [], "merged", None))
            cancel.wait(30)  # a decode that outlasts the shutdown timeout, until cancelled
            raise Cancelled("cancelled after 1 tokens")

    def run(leave: bool):
        running = Running(ServeConfig(bundle=str(fixture_bundles["merged"]), shutdown_timeout=0.5), Slow())
        state, events = running.state, []

        def post():
            with open(clips[0]["path"], "rb") as f, httpx.stream(
                    "POST", running.url + "/v1/audio/transcriptions", files={"file": f},
                    data={"model": "m", "stream": "true"}, timeout=60) as answer:
                for line in answer.iter_lines():
                    if line.startswith("data: "):
                        events.append(_json.loads(line[6:]))
                        if leave:
                            return  # the client leaves after the first delta

        client = threading.Thread(target=post)
        client.start()
        running.wait_for(lambda: events, "the first delta")
        if leave:
            client.join(60)
            running.wait_for(lambda: state.decoding == 0, "the decode stopped")
        running.stop()
        client.join(60)
        running.wait_for(lambda: state.decoding == 0, "the decode was cancelled")
        return state, events

    state, events = run(leave=False)
    assert events[0] == {"type": "transcript.text.delta", "delta": "first words"}
    assert events[1]["error"]["code"] == "server_shutting_down", events
    assert _sample(state, 'megaedge_requests_total{kind="transcription",status="503"}') == 1
    assert _sample(state, 'megaedge_requests_total{kind="transcription",status="499"}') == 0
    state, events = run(leave=True)
    assert events == [{"type": "transcript.text.delta", "delta": "first words"}]
    assert _sample(state, 'megaedge_requests_total{kind="transcription",status="499"}') == 1
    assert _sample(state, 'megaedge_errors_total{code="client_closed_request"}') == 1


