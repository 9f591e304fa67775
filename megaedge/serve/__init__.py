"""``megaedge serve``: an HTTP + WebSocket server over one shared ``Transcriber`` (extra ``serve``).

* ``app.py``: the FastAPI application (OpenAI-compatible ``POST /v1/audio/transcriptions``, the realtime
  transcription WebSocket ``GET /v1/realtime``, ``/health``, ``/metrics``, the web page at ``/``) and ``serve()``,
  which runs it under uvicorn with a shutdown that finishes open utterances first.
* ``config.py``: ``ServeConfig``, every value checked against its range when made (CLI and Python alike).
* ``realtime.py``: the realtime WebSocket's connections: a reader, a worker, backpressure, admission.
* ``server.py``: the process around the app: the bundle and the socket checked first, uvicorn, signals.
* ``protocol.py``: the realtime transcription protocol over a ``Stream``: session config, event shapes, items,
  deltas. No I/O, so it is tested without a server.
* ``admission.py``: the stream slots and the request queue (429 / 1013 beyond them).
* ``metrics.py``: the Prometheus metrics, one registry per application.

See docs/serving.md.
"""
