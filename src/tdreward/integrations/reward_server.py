"""A TD reward server for RL frameworks: OpenRLHF's remote reward model protocol, traces, health.

    POST /get_reward  {"query": [texts], "prompts": [texts] | null, "labels": any}
                      -> {"rewards": [float], "scores": [float], "extra_logs": {...}}
    POST /score       {"texts": [texts], "prompts": [texts] | null}
                      -> {"model", "trained_critic", "results": [{"td_reward", "response_start",
                          "summary", "tokens", "logp", "r", "rbar", "V", "delta"}]}
    GET  /health      -> {"status": "ok", "queued", "max_queue", "requests", "batches"}

The protocol followed is OpenRLHF's, read at commit 58ec6ffd957e617b7dbb14596a22de99d9a75617
of OpenRLHF/OpenRLHF: its trainer (`openrlhf/utils/remote_rm_utils.py`, `remote_rm_fn`, used
with `--remote_rm_url`) POSTs JSON {"query", "prompts", "labels"} to the URL and reads the
"rewards" key; its own `openrlhf/cli/serve_rm.py` answers {"rewards", "scores", "extra_logs"}
with "scores" equal to "rewards". We answer the same three keys, so either reader works.
"query" holds each sample's full text (prompt + response, chat template applied); "labels"
(reference answers for rule-based rewards) is accepted and ignored: the TD reward needs none.
OpenRLHF's client sends no Authorization header: with --api_key it needs a proxy that adds one.

A query's reward is the TD reward of its response: the mean delta over the positions that
predict the response's tokens, when the query starts with its prompt (the same rule as
`tdreward compare` and `TDRewardModel.compute_td_reward`: the response starts at the first
token where the query's tokens and the prompt's part ways, so a merge across the boundary
counts for the response). Without a prompt, or when the query does not start with it, the whole
query counts, exactly `tdreward score`'s td_reward. A response of no token gets 0.0 (as
`TDRewardFunction`'s default `empty_reward`) rather than an error that would stop a training
step.

One worker thread owns the model: a request is a job on a bounded queue (503 when full); the
worker takes the first job, gathers more for up to --max_wait_ms or until --batch_size texts,
tokenises them (the fast tokenizer is not safe to share between threads) and scores them all in
one `TDRewardModel.score` call. The standard library's ThreadingHTTPServer serves: no web
framework is needed for three endpoints, and a body too large is refused from its
Content-Length before a byte of it is read.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tdreward.errors import TDRewardError, first_line
from tdreward.integrations.reward_server_config import RewardServerConfig
from tdreward.reward_model import TDRewardModel, TextScore

log = logging.getLogger("tdreward")

EMPTY_REWARD = 0.0  # the reward of a query whose response adds no token
DRAIN_BYTES = 1 << 20  # of a body over the limit, read this much before closing (see _discard)


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One request's texts, waiting for the worker. `prompts[i]` None: the whole text counts."""

    texts: list[str]
    prompts: list[str | None]
    traces: bool  # /score: keep the per-token traces
    done: threading.Event = field(default_factory=threading.Event)
    results: list[dict] = field(default_factory=list)
    error: str | None = None


# --------------------------------------------------------------------------- the reward
def response_start(model: TDRewardModel, text: str, prompt: str | None) -> tuple[list[int], int]:
    """The text's token ids and the index, in its trace, of the first position that predicts a
    response token: 0 (the whole text) unless the text starts with a non-empty `prompt`."""
    full = model.encode([text])[0]
    if not prompt or not text.startswith(prompt):
        return full, 0
    ctx = model.encode([prompt])[0]
    k = 0
    while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
        k += 1
    # Trace position t predicts token t + 1, so position k - 1 predicts token k, the first
    # one the prompt alone does not give.
    return full, max(k - 1, 0)


def part_reward(score: TextScore | None, start: int) -> tuple[float, int]:
    """(TD reward, number of tokens) of the trace from `start` on."""
    if score is None or start >= len(score.delta):
        return EMPTY_REWARD, 0
    if start == 0:  # the whole text: exactly `tdreward score`'s summary
        return float(score.summary["td_reward"]), len(score.delta)
    part = score.delta[start:]
    return sum(part) / len(part), len(part)  # as `tdreward compare` averages a response


def score_jobs(model: TDRewardModel, jobs: Sequence[Job], batch_size: int,
               max_length: int | None = None, stride: int | None = None) -> None:
    """Score every job's texts in one `TDRewardModel.score` call and fill in their results."""
    rows: list[list[int]] = []
    where: list[tuple[int, int, int]] = []  # (job, text, start) per row
    for j, job in enumerate(jobs):
        for i, (text, prompt) in enumerate(zip(job.texts, job.prompts)):
            ids, start = response_start(model, text, prompt)
            if len(ids) >= 2:  # the prefix token and at least one token of text
                rows.append(ids)
                where.append((j, i, start))
    scores = model.score(rows, batch_size=batch_size, max_length=max_length,
                         stride=stride) if rows else []
    found: dict[tuple[int, int], tuple[TextScore, int]] = {
        (j, i): (s, start) for (j, i, start), s in zip(where, scores)}
    for j, job in enumerate(jobs):
        job.results = []
        for i in range(len(job.texts)):
            s, start = found.get((j, i), (None, 0))
            reward, n = part_reward(s, start)
            out: dict[str, Any] = {"td_reward": reward, "n_tokens": n}
            if job.traces:
                out["response_start"] = start
                out["summary"] = s.summary if s else {}
                for key in ("tokens", "logp", "r", "rbar", "V", "delta"):
                    out[key] = getattr(s, key) if s else []
            elif s is not None:
                out["mean_r"] = (sum(s.r[start:]) / n) if n else 0.0
            job.results.append(out)


# --------------------------------------------------------------------------- requests
def _text_list(body: dict, key: str, *, allow_empty_text: bool) -> list[str]:
    value = body.get(key)
    if value is None:
        raise RequestError(400, f'"{key}" is missing: give a list of strings')
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise RequestError(400, f'"{key}" must be a list of strings')
    if not value:
        raise RequestError(400, f'"{key}" is an empty list: give at least one text')
    if not allow_empty_text:
        empty = [i for i, t in enumerate(value) if not t.strip()]
        if empty:
            raise RequestError(400, f'"{key}"[{empty[0]}] is empty: nothing to score')
    return value


def parse_job(raw: bytes, path: str, max_texts: int) -> Job:
    """The job a request body asks for, or a RequestError saying what is wrong with it."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body is not JSON: {first_line(e)}") from e
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    # An RL rollout may hold an empty response: it gets EMPTY_REWARD, not a refused step.
    key = "query" if path == "/get_reward" else "texts"
    texts = _text_list(body, key, allow_empty_text=path == "/get_reward")
    if len(texts) > max_texts:
        raise RequestError(413, f'{len(texts)} texts in "{key}": the server takes at most '
                           f"{max_texts} per request")
    prompts = body.get("prompts")
    if prompts is None:
        prompts = [None] * len(texts)
    elif (not isinstance(prompts, list) or len(prompts) != len(texts)
          or not all(p is None or isinstance(p, str) for p in prompts)):
        raise RequestError(400, f'"prompts" must be null or a list of {len(texts)} strings '
                           f'(one per text of "{key}")')
    return Job(texts=texts, prompts=prompts, traces=path == "/score")


# --------------------------------------------------------------------------- the server
class RewardServer:
    """The HTTP server and its scoring worker. `start()` runs both in background threads (a
    library or a test); `serve_forever()` serves in the calling thread (the command)."""

    def __init__(self, model: TDRewardModel, cfg: RewardServerConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=cfg.max_queue)
        server_cls = _IPv6Server if ":" in cfg.host else _Server
        try:
            self.httpd = server_cls((cfg.host.strip("[]"), cfg.port), _Handler)
        except OSError as e:  # the port is taken, the address is not ours, ...
            raise TDRewardError(f"cannot listen on {cfg.host}:{cfg.port}: "
                                f"{e.strerror or e}") from e
        self.httpd.app = self
        self._worker = threading.Thread(target=self._work, name="tdreward-scorer", daemon=True)
        self._threads: list[threading.Thread] = []
        # Counters for /health: requests per batch shows whether gathering pays.
        self.requests_scored = 0
        self.batches_scored = 0

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> RewardServer:
        self._worker.start()
        t = threading.Thread(target=self.httpd.serve_forever, name="tdreward-http", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def serve_forever(self) -> None:
        self._worker.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        """Stop accepting requests, let the worker finish what it holds, free the port."""
        if self._threads:
            self.httpd.shutdown()
        self.httpd.server_close()
        if self._worker.is_alive():
            self.jobs.put(None)  # blocks while the queue is full: the worker drains it
            self._worker.join()

    def submit(self, job: Job) -> bool:
        """Queue `job` for the worker; False when the queue is full."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return False
        return True

    def _work(self) -> None:
        wait = self.cfg.max_wait_ms / 1000
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch, n, stop = [job], len(job.texts), False
            deadline = time.monotonic() + wait
            # Gather concurrent requests: one forward pass over several small requests costs
            # little more than over one.
            while n < self.cfg.batch_size and (left := deadline - time.monotonic()) > 0:
                try:
                    more = self.jobs.get(timeout=left)
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
                n += len(more.texts)
            self._score(batch)
            if stop:
                return

    def _score(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        try:
            score_jobs(self.model, batch, self.cfg.batch_size, self.cfg.max_length,
                       self.cfg.stride)
        except Exception as e:  # noqa: BLE001 (any failure is reported to every waiting client)
            log.error("scoring failed: %s", first_line(e))
            for job in batch:
                job.error = f"scoring failed: {first_line(e)}"
        finally:
            self.requests_scored += len(batch)
            self.batches_scored += 1
            for job in batch:
                job.done.set()
        log.info("scored %d request(s), %d text(s) in %.2f s", len(batch),
                 sum(len(j.texts) for j in batch), time.perf_counter() - start)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a client that never finishes its request does not block exit
    app: RewardServer


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "tdreward-reward-server"
    # Seconds a socket read may wait: a client that declares a body and never sends it does
    # not hold a thread forever.
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away: nobody to tell
            self.close_connection = True

    def _refuse(self, e: RequestError, headers: dict[str, str] | None = None) -> None:
        self._send(e.status, {"error": {"code": e.status, "message": str(e)}}, headers)

    def _authorised(self) -> bool:
        key = self.server.app.cfg.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken does not tell how much of the key was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  key.encode())

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        app = self.server.app
        if self.path.split("?")[0] != "/health":
            self._refuse(RequestError(404, f"no such endpoint: GET {self.path}"))
            return
        # Open without the key, and saying nothing about the model: a liveness probe.
        self._send(200, {"status": "ok", "queued": app.jobs.qsize(),
                         "max_queue": app.cfg.max_queue, "requests": app.requests_scored,
                         "batches": app.batches_scored})

    def do_POST(self) -> None:  # noqa: N802
        app = self.server.app
        path = self.path.split("?")[0]
        try:
            if path not in ("/get_reward", "/score"):
                raise RequestError(404, f"no such endpoint: POST {self.path}")
            if not self._authorised():
                self.close_connection = True  # the body is not read
                self._refuse(RequestError(401, "missing or wrong API key: send "
                                          "`Authorization: Bearer KEY`"),
                             {"WWW-Authenticate": "Bearer"})
                return
            job = parse_job(self._read_body(), path, app.cfg.max_texts)
        except RequestError as e:
            self._refuse(e)
            return
        if not app.submit(job):
            self._refuse(RequestError(503, f"the server is busy ({app.cfg.max_queue} requests "
                                      "queued): retry later"), {"Retry-After": "1"})
            return
        job.done.wait()
        if job.error is not None:
            self._refuse(RequestError(500, job.error))
        elif path == "/score":
            self._send(200, {"model": app.model.base_model,
                             "trained_critic": app.model.trained, "results": job.results})
        else:
            rewards = [r["td_reward"] for r in job.results]
            self._send(200, {"rewards": rewards, "scores": rewards, "extra_logs": {
                "td_response_tokens": [r["n_tokens"] for r in job.results],
                "td_mean_r": [r.get("mean_r", 0.0) for r in job.results]}})

    def _read_body(self) -> bytes:
        limit = self.server.app.cfg.max_request_bytes
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length header")
        size = int(length) if length.strip().isdigit() else -1
        if size < 0:
            self.close_connection = True
            raise RequestError(400, f"invalid Content-Length header: {length!r}")
        if size > limit:
            self.close_connection = True
            self._discard(size)
            raise RequestError(413, f"request body of {size} bytes exceeds the server's limit "
                               f"of {limit} bytes (--max_request_bytes)")
        try:
            body = self.rfile.read(size)
        except OSError as e:  # the socket timed out (see `timeout`) or the client went away
            self.close_connection = True
            raise RequestError(408, f"the body did not arrive: {first_line(e)}") from e
        if len(body) < size:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(body)} of {size} bytes")
        return body

    def _discard(self, size: int) -> None:
        """Read and drop up to DRAIN_BYTES of a refused body. Closing a socket with unread
        data sends a reset, which can destroy the 413 before the client reads it; a body far
        over the limit is still never read whole."""
        left = min(size, DRAIN_BYTES)
        try:
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
        except OSError:  # the client gave up sending: the answer may still reach it
            pass
