"""API augmentation against a real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions
protocol, with deterministic replies: the `openai` client talks to it through `base_url`, no mock in
its place. Paraphrase end to end, the reply cache (a rerun sends nothing), 401 / 404 / 429 (with
Retry-After) / 500 / timeouts / an unreachable endpoint / replies that are not chat completions,
resume after a failure half-way, concurrency and rate limiting, back-translation, synthetic pairs,
.env reading, and the key kept out of messages and files."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from summarizer import augment, data
from summarizer.augment import client
from summarizer.augment.text import split_turn
from summarizer.config import AugmentationConfig
from summarizer.errors import UserError
from tests.conftest import SAMPLE_KO
from tests.unit.test_data import cfg as data_cfg

KEY = "sk-test-unit-0123456789"


def reverse_words(dialogue: str) -> str:
    """The server's 'paraphrase': each utterance's words in reverse order (tags and tokens kept)."""
    out = []
    for line in dialogue.split("\n"):
        tag, text = split_turn(line)
        out.append(tag + " ".join(reversed(text.split())))
    return "\n".join(out)


def rotate_words(text: str) -> str:
    out = []
    for line in text.split("\n"):
        tag, words = split_turn(line)[0], split_turn(line)[1].split()
        out.append(tag + " ".join(words[1:] + words[:1]))
    return "\n".join(out)


def reply_for(system: str, user: str) -> str:
    """Deterministic replies, picked by a marker in the system prompt (tests set the prompts)."""
    if "TO_PIVOT" in system:
        return "[pivot] " + user
    if "FROM_PIVOT" in system:
        return rotate_words(user.removeprefix("[pivot] "))
    if "ECHO" in system:
        return user
    if "SYNTHETIC" in system:
        topic = re.search(r"TOPIC: (.*)", user).group(1)
        example, example_summary = user.split("EXAMPLE DIALOGUE:\n", 1)[1].split(
            "\n\nEXAMPLE SUMMARY: "
        )
        lines = [
            f"#Person{1 + i % 2}#: {topic}에 관해서 {i + 1}번째로 드리는 새로운 말씀입니다."
            for i in range(len(example.split("\n")))
        ]
        summary = f"#Person1#와 #Person2#는 {topic}에 대해 이야기를 나눕니다."
        while len(summary) < 0.8 * len(example_summary):  # about the example's length
            summary += f" #Person{1 + len(summary) % 2}#는 {topic}에 관해 더 말합니다."
        return "DIALOGUE:\n" + "\n".join(lines) + f"\nSUMMARY: {summary}"
    return reverse_words(user)  # paraphrase (any other prompt)


class ChatServer:
    """OpenAI-compatible `POST /v1/chat/completions` on 127.0.0.1 (a free port), in a thread.

    `script`: behaviours for the next requests, in order (401, 429, 500, 'slow', 'garbage': a 200
    that is not JSON, 'no_choices': a 200 without choices); then `default` (any of these, or
    'ok'); after `fail_after` good replies, every request gets 500. A 429 carries
    `Retry-After: <retry_after>`.
    """

    def __init__(self):
        self.requests: list[dict] = []  # {"auth": header, "body": parsed JSON}
        self.script: list = []
        self.default = "ok"
        self.fail_after: int | None = None
        self.delay = 0.0  # seconds before every reply
        self.slow_seconds = 1.0
        self.retry_after = "0"
        self.times: list[float] = []  # when each request arrived (monotonic)
        self.answered = 0
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def texts(self) -> list[str]:
        return [r["body"]["messages"][1]["content"] for r in self.requests]

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        auth = h.headers.get("Authorization", "")
        with self.lock:
            self.requests.append({"auth": auth, "body": body})
            self.times.append(time.monotonic())
            action = self.script.pop(0) if self.script else self.default
            if self.fail_after is not None and self.answered >= self.fail_after:
                action = 500
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            time.sleep(self.delay)
            if h.path != "/v1/chat/completions":
                return self.send(h, 404, {"error": {"message": "not found"}})
            if action == 401:  # like real APIs, echo part of the key: the client must mask it
                return self.send(h, 401, {"error": {"message": f"Incorrect API key: {auth}"}})
            if action == 429:
                retry = {"Retry-After": self.retry_after}
                return self.send(h, 429, {"error": {"message": "rate limit"}}, retry)
            if action == 500:
                return self.send(h, 500, {"error": {"message": "server error"}})
            if action == "garbage":
                return self.send_raw(h, 200, b"<html>not an API</html>", "text/html")
            if action == "no_choices":
                return self.send(h, 200, {"id": "chatcmpl-test", "object": "chat.completion"})
            if action == "slow":
                time.sleep(self.slow_seconds)
            messages = body["messages"]
            content = reply_for(messages[0]["content"], messages[1]["content"])
            with self.lock:
                self.answered += 1
            self.send(
                h,
                200,
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                },
            )
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass
        finally:
            with self.lock:
                self.inflight -= 1

    @classmethod
    def send(cls, h, status: int, payload: dict, headers: dict | None = None) -> None:
        raw = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        cls.send_raw(h, status, raw, "application/json", headers)

    @staticmethod
    def send_raw(h, status: int, raw: bytes, kind: str, headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", kind)
        h.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(raw)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    """The key in the environment; no proxy between the client and 127.0.0.1; no stray .env."""
    for name in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("UPSTAGE_API_KEY", KEY)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def rows():
    return data.load(data_cfg(SAMPLE_KO))


def aug(server: ChatServer, tmp_path: Path, **methods):
    """An augmentation config with the given methods on, pointed at the server, tiny retry waits."""
    cfg = OmegaConf.structured(AugmentationConfig)
    cfg.api.base_url = server.url
    cfg.api.retry_wait = 0.01
    cfg.api.max_wait = 0.05
    cfg.api.timeout = 5.0
    cfg.api.requests_per_minute = 0
    cfg.cache_dir = str(tmp_path / "augment")
    for name, settings in methods.items():
        cfg[name] = OmegaConf.merge(cfg[name], {"enabled": True, **settings})
    return cfg


PARA = {"prompt": {"ko": "PARAPHRASE: 같은 뜻으로 바꿔 쓰세요."}}


def run(cfg, rows, tmp_path, out=True):
    return augment.apply(
        cfg, rows, language="ko", cache_dir=str(tmp_path), out_dir=tmp_path if out else None
    )


def test_paraphrase_end_to_end(server, rows, tmp_path):
    train = rows[:6]
    result, stats = run(aug(server, tmp_path, paraphrase=PARA), train, tmp_path)

    assert len(server.requests) == 6
    first = server.requests[0]
    assert first["auth"] == f"Bearer {KEY}"
    assert first["body"]["model"] == "solar-pro"
    assert first["body"]["messages"][0] == {"role": "system", "content": PARA["prompt"]["ko"]}
    assert sorted(server.texts()) == sorted(ex.dialogue for ex in train)

    assert result[:6] == train
    generated = result[6:]
    assert [g.source for g in generated] == ["paraphrase.0"] * 6
    for g, ex in zip(generated, train):
        assert g.id == ex.id and g.summary == ex.summary and g.topic == ex.topic
        assert g.dialogue == reverse_words(ex.dialogue) != ex.dialogue
    assert stats["aug_rows_before"] == 6 and stats["aug_rows_generated"] == 6
    assert stats["aug_rows_kept"] == 6 and stats["aug_rows_after"] == 12
    assert stats["aug_api_requests"] == 6 and stats["aug_set_reused"] == 0
    sample = (tmp_path / augment.SAMPLE_FILE).read_text("utf-8")
    assert sample.startswith("method,kept,reason,id,") and "paraphrase" in sample


def test_rerun_and_other_configs_make_zero_requests(server, rows, tmp_path, monkeypatch):
    train = rows[:6]
    first, _ = run(aug(server, tmp_path, paraphrase=PARA), train, tmp_path)
    assert len(server.requests) == 6

    # Same config: the materialised set is reused — no key needed, no request.
    monkeypatch.delenv("UPSTAGE_API_KEY")
    again, stats = run(aug(server, tmp_path, paraphrase=PARA), train, tmp_path)
    assert again == first and stats["aug_set_reused"] == 1 and stats["aug_api_requests"] == 0

    # Another set (speaker swap added; speed settings changed): the replies come from the cache.
    cfg = aug(server, tmp_path, paraphrase=PARA, speaker_swap={})
    cfg.api.concurrency = 1
    combined, stats = run(cfg, train, tmp_path)
    assert stats["aug_set_reused"] == 0 and stats["aug_api_requests"] == 0
    assert stats["aug_replies_cached"] == 6 and stats["aug_kept_speaker_swap"] == 6
    assert [r for r in combined if r.source == "paraphrase.0"] == first[6:]
    assert len(server.requests) == 6  # still the first run's six


def test_the_cache_is_keyed_by_model_prompt_and_text(server, rows, tmp_path):
    train = rows[:2]
    run(aug(server, tmp_path, paraphrase=PARA), train, tmp_path)
    cfg = aug(server, tmp_path, paraphrase={"prompt": {"ko": "PARAPHRASE 2"}})
    run(cfg, train, tmp_path)  # another prompt: new requests
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.model = "solar-mini"
    run(cfg, train, tmp_path)  # another model: new requests
    run(aug(server, tmp_path, paraphrase=PARA), rows[:3], tmp_path)  # one new text
    assert len(server.requests) == 2 + 2 + 2 + 1
    assert server.requests[-1]["body"]["messages"][1]["content"] == rows[2].dialogue


def test_401_is_one_clear_line_without_the_key(server, rows, tmp_path):
    server.default = 401
    for rate in (0, 6000, 0, 6000):  # 4 requests in flight: whichever fails first, the same error
        cfg = aug(server, tmp_path, paraphrase=PARA)
        cfg.api.requests_per_minute = rate
        before = len(server.requests)
        with pytest.raises(UserError) as e:
            run(cfg, rows[:6], tmp_path)
        message = str(e.value)
        assert "rejected the API key (HTTP 401" in message and "UPSTAGE_API_KEY" in message
        assert KEY not in message and "Bearer ***" in message  # the server echoed it; masked
        assert "0 of 6 replies are cached" in message and "\n" not in message
        assert len(server.requests) - before <= 4  # no retries: at most those already in flight


def test_429_is_retried_then_succeeds(server, rows, tmp_path):
    server.script = [429, 429]
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.concurrency = 1
    _, stats = run(cfg, rows[:2], tmp_path)
    assert len(server.requests) == 4  # 429, 429, then one good reply per row
    assert stats["aug_api_requests"] == 2 and stats["aug_rows_kept"] == 2


def test_500_is_retried_then_a_clear_error(server, rows, tmp_path):
    server.default = 500
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.concurrency = 1
    cfg.api.max_retries = 2
    with pytest.raises(UserError) as e:
        run(cfg, rows[:1], tmp_path)
    message = str(e.value)
    assert len(server.requests) == 3
    assert "failed 3 time(s), last: HTTP 500" in message and KEY not in message
    assert "0 of 1 replies are cached" in message and "\n" not in message


def test_timeout_is_retried_then_succeeds_or_fails_clearly(server, rows, tmp_path):
    server.slow_seconds = 1.0
    server.script = ["slow"]
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.concurrency = 1
    cfg.api.timeout = 0.3
    _, stats = run(cfg, rows[:1], tmp_path)
    assert len(server.requests) == 2 and stats["aug_rows_kept"] == 1

    server.default = "slow"
    cfg.api.max_retries = 1
    with pytest.raises(UserError, match=r"failed 2 time\(s\), last: .*timed out"):
        run(cfg, rows[1:2], tmp_path)


def test_resume_after_a_failure_half_way(server, rows, tmp_path):
    train = rows[:8]
    server.fail_after = 3  # three good replies, then the server breaks
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.concurrency = 1
    cfg.api.max_retries = 1
    with pytest.raises(UserError, match="3 of 8 replies are cached .* the next run resumes"):
        run(cfg, train, tmp_path)
    assert len(server.requests) == 3 + 2  # the fourth was tried twice, nothing after it

    server.fail_after = None
    before = len(server.requests)
    result, stats = run(cfg, train, tmp_path)
    assert len(server.requests) - before == 5  # only the missing ones
    assert sorted(server.texts()[before:]) == sorted(ex.dialogue for ex in train[3:])
    assert stats["aug_replies_cached"] == 3 and stats["aug_api_requests"] == 5
    assert [r.dialogue for r in result[8:]] == [reverse_words(ex.dialogue) for ex in train]


def test_missing_key_is_a_clear_error_and_dotenv_works(server, rows, tmp_path, monkeypatch):
    monkeypatch.delenv("UPSTAGE_API_KEY")
    with pytest.raises(UserError, match="no API key: set UPSTAGE_API_KEY in the environment"):
        run(aug(server, tmp_path, paraphrase=PARA), rows[:1], tmp_path)
    assert server.requests == []

    (tmp_path / ".env").write_text("# keys\nexport UPSTAGE_API_KEY='sk-from-dotenv'\n")
    run(aug(server, tmp_path, paraphrase=PARA), rows[:1], tmp_path)
    assert server.requests[0]["auth"] == "Bearer sk-from-dotenv"


def test_key_env_null_sends_no_key(server, rows, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-not-for-this-endpoint")  # never picked up
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.key_env = None
    run(cfg, rows[:1], tmp_path)
    assert server.requests[0]["auth"] == ""


def test_concurrency_and_rate_limit(server, rows, tmp_path):
    server.delay = 0.2
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.concurrency = 4
    start = time.monotonic()
    run(cfg, rows[:8], tmp_path)
    assert 2 <= server.max_inflight <= 4
    assert time.monotonic() - start < 8 * 0.2  # faster than one at a time

    server.delay = 0.0
    cfg = aug(server, tmp_path, paraphrase={"prompt": {"ko": "PARAPHRASE B"}})
    cfg.api.requests_per_minute = 300  # one start every 0.2 s
    start = time.monotonic()
    run(cfg, rows[:4], tmp_path)
    assert time.monotonic() - start >= 0.55


def test_back_translation_both_legs_cached(server, rows, tmp_path):
    train = rows[:4]
    legs = {"to_pivot": {"ko": "TO_PIVOT"}, "from_pivot": {"ko": "FROM_PIVOT"}}
    result, stats = run(aug(server, tmp_path, back_translation=legs), train, tmp_path)
    assert len(server.requests) == 16  # dialogue + summary, there and back
    assert sum(r.startswith("[pivot] ") for r in server.texts()) == 8
    generated = result[4:]
    assert stats["aug_rows_kept"] == 4
    for g, ex in zip(generated, train):
        assert g.source == "back_translation"
        assert g.dialogue == rotate_words(ex.dialogue) and g.summary == rotate_words(ex.summary)
    run(aug(server, tmp_path, back_translation={**legs, "summary": False}), train, tmp_path)
    assert len(server.requests) == 16  # every leg already cached


def test_synthetic_pairs_from_topics(server, rows, tmp_path):
    train = rows[:10]
    cfg = aug(server, tmp_path, synthetic={"prompt": {"ko": "SYNTHETIC"}, "max_rows": 3})
    result, stats = run(cfg, train, tmp_path)
    assert len(server.requests) == 3 and stats["aug_rows_generated"] == 3
    topics = {ex.topic for ex in train}
    for request in server.requests:
        user = request["body"]["messages"][1]["content"]
        assert re.search(r"TOPIC: (.*)", user).group(1) in topics
    synthetic = result[10:]
    assert stats["aug_rows_kept"] == len(synthetic) == 3
    for row in synthetic:
        assert row.source == "synthetic.0" and row.topic in topics
        assert row.dialogue.startswith("#Person1#: ") and "#Person2#" in row.summary
        assert row.topic in row.dialogue


def test_echoed_and_broken_replies_are_filtered(server, rows, tmp_path):
    result, stats = run(
        aug(server, tmp_path, paraphrase={"prompt": {"ko": "ECHO"}}), rows[:3], tmp_path
    )
    assert stats["aug_rows_kept"] == 0  # a copy (or a copy up to spacing) of its source
    assert stats.get("aug_dropped_duplicate", 0) + stats.get("aug_dropped_near_duplicate", 0) == 3
    assert len(result) == 3

    cfg = aug(server, tmp_path, synthetic={"prompt": {"ko": "ECHO"}, "max_rows": 2})
    _, stats = run(cfg, rows[:3], tmp_path)  # no DIALOGUE:/SUMMARY: layout in the reply
    assert stats["aug_rows_kept"] == 0 and stats["aug_dropped_empty"] == 2


def test_only_training_text_reaches_the_api(server, rows, tmp_path):
    train, validation = data.split(rows, 0.2, 42)
    run(aug(server, tmp_path, paraphrase=PARA), train[:20], tmp_path)
    sent = set(server.texts())
    assert sent == {ex.dialogue for ex in train[:20]}
    assert not sent & {ex.dialogue for ex in validation}


def test_the_key_is_in_no_file_and_no_figure(server, rows, tmp_path):
    _, stats = run(aug(server, tmp_path, paraphrase=PARA), rows[:3], tmp_path)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text("utf-8", errors="replace"), path
    assert KEY not in json.dumps(stats)


def test_mask_and_dotenv_parsing(tmp_path, monkeypatch):
    assert client.mask(f"bad key {KEY} (Authorization: Bearer {KEY})", KEY) == (
        "bad key *** (Authorization: Bearer ***)"
    )
    assert client.mask("Bearer other-token", None) == "Bearer ***"
    # .env in the launch folder (the fixture's chdir): export, quotes, comments, a bad line, and
    # a value taken literally (no ${...} expansion); the environment wins over it.
    (tmp_path / ".env").write_text(
        'A=1\n# c\nexport B="two words"\nC=x # note\n\nbad line\nD=sk-${NOT_EXPANDED}\n'
    )
    api = AugmentationConfig().api
    monkeypatch.delenv("UPSTAGE_API_KEY")
    for name, value in {"A": "1", "B": "two words", "C": "x", "D": "sk-${NOT_EXPANDED}"}.items():
        api.key_env = name
        assert client.api_key(api) == value
    monkeypatch.setenv("A", "from-env")
    api.key_env = "A"
    assert client.api_key(api) == "from-env"
    api.key_env = "MISSING"
    with pytest.raises(UserError, match="no API key: set MISSING"):
        client.api_key(api)
    (tmp_path / ".env").unlink()
    api.key_env = "B"
    with pytest.raises(UserError, match="no API key: set B"):
        client.api_key(api)


def test_the_openai_client_is_used_with_its_own_retries_off(server, rows, tmp_path, monkeypatch):
    """The requests come from the openai package, and a 500 is tried once with max_retries=0:
    the library's retry loop never adds requests of its own."""
    import openai

    calls = []
    real = openai.OpenAI

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(openai, "OpenAI", spy)
    server.default = 500
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.max_retries = 0
    cfg.api.concurrency = 1
    with pytest.raises(UserError, match=r"failed 1 time\(s\), last: HTTP 500"):
        run(cfg, rows[:1], tmp_path)
    assert len(server.requests) == 1
    (kwargs,) = calls
    assert kwargs["max_retries"] == 0 and kwargs["base_url"] == server.url


def test_retry_after_is_honoured_and_an_exhausted_rate_limit_is_named(server, rows, tmp_path):
    server.retry_after = "0.4"
    server.script = [429]
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.concurrency = 1
    cfg.api.max_wait = 5.0  # the cap on a Retry-After; the usual backoff stays at 0.01 s
    run(cfg, rows[:1], tmp_path)
    assert len(server.requests) == 2 and server.times[1] - server.times[0] >= 0.35

    server.retry_after = "0"
    server.default = 429
    cfg.api.max_retries = 2
    with pytest.raises(UserError) as e:
        run(cfg, rows[1:2], tmp_path)
    message = str(e.value)
    assert "failed 3 time(s), last: HTTP 429" in message and "rate limit" in message
    assert "augmentation.api.requests_per_minute" in message and "\n" not in message


def test_an_unreachable_endpoint_is_one_clear_line(server, rows, tmp_path):
    cfg = aug(server, tmp_path, paraphrase=PARA)
    server.close()  # nothing listens on that port any more
    cfg.api.max_retries = 1
    with pytest.raises(UserError) as e:
        run(cfg, rows[:1], tmp_path)
    message = str(e.value)
    assert f"{server.url}/chat/completions failed 2 time(s), last: ConnectError" in message
    assert "cannot be reached: check augmentation.api.base_url" in message
    assert "0 of 1 replies are cached" in message and "\n" not in message and KEY not in message


@pytest.mark.parametrize("reply", ["garbage", "no_choices"])
def test_a_reply_that_is_not_a_chat_completion_is_retried_then_named(server, rows, tmp_path, reply):
    server.script = [reply]
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.concurrency = 1
    _, stats = run(cfg, rows[:1], tmp_path)
    assert len(server.requests) == 2 and stats["aug_rows_kept"] == 1

    server.default = reply
    cfg.api.max_retries = 1
    with pytest.raises(UserError) as e:
        run(cfg, rows[1:2], tmp_path)
    message = str(e.value)
    assert "failed 2 time(s), last: unreadable reply" in message
    assert "not a chat-completions reply" in message and "\n" not in message


def test_a_client_error_fails_at_once_naming_base_url_and_model(server, rows, tmp_path):
    cfg = aug(server, tmp_path, paraphrase=PARA)
    cfg.api.base_url = server.url + "/wrong"  # the server answers 404
    with pytest.raises(UserError) as e:
        run(cfg, rows[:2], tmp_path)
    message = str(e.value)
    assert "answered HTTP 404" in message and "augmentation.api.model=solar-pro" in message
    assert len(server.requests) <= cfg.api.concurrency  # no retries


def test_parallel_trials_make_the_set_once(server, rows, tmp_path):
    """Two sweep trials starting together with the same augmentation: one asks, the other waits
    and reuses (a lock file between processes; separate opens conflict between threads too)."""
    server.delay = 0.05
    results = []

    def trial():
        results.append(run(aug(server, tmp_path, paraphrase=PARA), rows[:6], tmp_path, out=False))

    threads = [threading.Thread(target=trial) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(server.requests) == 6
    (a, sa), (b, sb) = results
    assert a == b and sorted([sa["aug_set_reused"], sb["aug_set_reused"]]) == [0, 1]
