"""The chat-API client for the methods that ask a chat model: any OpenAI-compatible
chat-completions endpoint (`augmentation.api.base_url`), through the official `openai` package.

The library does HTTP, JSON, connection pooling, timeouts and the typed errors. Around it:
- `requests_per_minute`: request starts, first tries and retries alike, evenly spaced;
- `concurrency`: that many threads share one client;
- `max_retries`, `retry_wait`, `max_wait`: our retry loop (the library's is switched off) on 429,
  408, 5xx, timeouts, connection errors and unreadable replies; Retry-After (seconds) wins;
- errors: one line that names the problem and the setting to change; a rejected key, a
  client error, exhausted retries (rate limit, timeouts, unreachable endpoint, server errors, bad
  replies). The first failure stops the requests not started yet.

The key is read when a request is due, from the environment or `.env` in the launch folder, is
sent only in the Authorization header, and is masked in every message and log line.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from dotenv import dotenv_values

from summarizer.errors import UserError

log = logging.getLogger(__name__)
# httpx2 (under openai) logs every request at INFO; our progress lines count them instead.
logging.getLogger("httpx2").setLevel(logging.WARNING)

# Why the last try failed -> what to change, for the error after the last retry.
HINTS = {
    "rate_limit": "the endpoint's rate limit: lower augmentation.api.requests_per_minute or "
    ".concurrency, or raise .max_retries",
    "timeout": "raise augmentation.api.timeout or .max_retries",
    "connection": "the endpoint cannot be reached: check augmentation.api.base_url and the network",
    "server": "raise augmentation.api.max_retries, or retry later",
    "reply": "not a chat-completions reply: check augmentation.api.base_url and .model",
}


class _Stopped(Exception):
    """Another request failed: this one gives up without retrying."""


def request_all(api, items: list, save: Callable, counters: Counter, what: str) -> None:
    """Send (key, (prompt, text, copy)) requests, `api.concurrency` at a time, rate limited;
    each reply is saved as soon as it arrives. The first failure stops the rest (UserError)."""
    import openai  # about a second to import: only in runs that send requests

    key = api_key(api)
    url = api.base_url.rstrip("/") + "/chat/completions"
    wait_turn = rate_limiter(api.requests_per_minute)
    stop = threading.Event()
    lock = threading.Lock()
    log.info(
        "augmentation %s: %d requests to %s (model %s, %d at a time)",
        what,
        len(items),
        url,
        api.model,
        api.concurrency,
    )
    # The library insists on a key; without one (key_env: null) the header is omitted per request.
    client = openai.OpenAI(
        base_url=api.base_url, api_key=key or "none", max_retries=0, timeout=api.timeout
    )

    def one(item) -> None:
        cache_key, (prompt, text, _copy) = item
        try:
            reply = chat(client, api, key, prompt, text, wait_turn, stop)
        except UserError:
            stop.set()  # queued requests do not start
            raise
        save(cache_key, reply)
        with lock:
            counters["api_requests"] += 1

    done, step, start = 0, max(1, len(items) // 10), time.monotonic()
    with client, ThreadPoolExecutor(max_workers=api.concurrency) as pool:
        futures = [pool.submit(one, item) for item in items]
        try:
            for future in as_completed(futures):
                try:
                    future.result()
                except _Stopped:
                    continue  # the failure that stopped it comes through its own future
                done += 1
                if done % step == 0 or done == len(items):
                    log.info(
                        "augmentation %s: %d/%d replies (%.0f s)",
                        what,
                        done,
                        len(items),
                        time.monotonic() - start,
                    )
        except BaseException:
            stop.set()  # requests in flight finish (and are cached); queued ones never start
            for future in futures:
                future.cancel()
            raise


def chat(client, api, key: str | None, prompt: str, text: str, wait_turn, stop) -> str:
    """One chat completion, with our retries: 429, 408, 5xx, timeouts, connection errors and
    unreadable replies back off exponentially (a Retry-After header wins); 401/403 and other 4xx
    fail at once."""
    import openai

    # Ours, not openai's max_retries: its retries skip our rate limit and sleep through a stop.
    url = api.base_url.rstrip("/") + "/chat/completions"
    headers = {} if key else {"Authorization": openai.Omit()}
    messages = [{"role": "system", "content": prompt}, {"role": "user", "content": text}]
    attempts = api.max_retries + 1
    last, why = "", "server"
    for attempt in range(attempts):
        if stop.is_set():
            raise _Stopped
        wait_turn()
        backoff = min(api.max_wait, api.retry_wait * 2**attempt)
        try:
            reply = client.chat.completions.create(
                model=api.model,
                messages=messages,
                temperature=api.temperature,
                max_tokens=api.max_tokens,
                extra_headers=headers,
            )
            content = reply.choices[0].message.content
            return content if isinstance(content, str) else ""
        except openai.APIStatusError as e:
            detail = _error_detail(e)
            if e.status_code in (401, 403):
                raise UserError(
                    mask(
                        f"augmentation.api: {url} rejected the API key (HTTP {e.status_code}"
                        f"{detail}); check {api.key_env} (environment or .env in {Path.cwd()})",
                        key,
                    )
                ) from None
            if e.status_code not in (408, 429) and e.status_code < 500:
                raise UserError(
                    mask(
                        f"augmentation.api: {url} answered HTTP {e.status_code}{detail}; check "
                        f"augmentation.api.base_url and augmentation.api.model={api.model}",
                        key,
                    )
                ) from None
            last, why = f"HTTP {e.status_code}{detail}", "server"
            if e.status_code == 429:
                why = "rate_limit"
            backoff = _retry_after(e.response.headers, backoff, api.max_wait)
        except openai.APIConnectionError as e:  # APITimeoutError included
            cause = e.__cause__ or e
            last = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
            why = "timeout" if isinstance(e, openai.APITimeoutError) else "connection"
        except (openai.APIError, ValueError, AttributeError, IndexError, TypeError) as e:
            last, why = f"unreadable reply ({type(e).__name__}: {str(e)[:100]})", "reply"
        if attempt + 1 < attempts:
            log.warning(
                "augmentation api: %s; retry %d/%d in %.1f s",
                mask(last, key),
                attempt + 1,
                api.max_retries,
                backoff,
            )
            if stop.wait(backoff):
                raise _Stopped
    raise UserError(
        mask(
            f"augmentation.api: {url} failed {attempts} time(s), last: {last} ({HINTS[why]})",
            key,
        )
    )


def _error_detail(e) -> str:
    """': <the reply body, on one line, shortened>', or '' without one."""
    try:
        body = e.response.text
    except Exception:
        return ""
    body = " ".join(body.split())[:200]
    return f": {body}" if body else ""


def _retry_after(headers, default: float, cap: float) -> float:
    try:
        return min(cap, max(0.0, float(headers.get("Retry-After", ""))))
    except (TypeError, ValueError):
        return default


def rate_limiter(per_minute: float) -> Callable[[], None]:
    """A function that blocks until the next request may start (evenly spaced starts)."""
    # openai has no client-side rate limit; it only reacts to 429s.
    interval = 60.0 / per_minute if per_minute > 0 else 0.0
    lock = threading.Lock()
    state = {"next": time.monotonic()}

    def wait_turn() -> None:
        if not interval:
            return
        with lock:
            now = time.monotonic()
            start = max(now, state["next"])
            state["next"] = start + interval
        time.sleep(max(0.0, start - now))

    return wait_turn


def api_key(api) -> str | None:
    """The key named by `api.key_env`, from the environment, else from `.env` in the launch folder.
    Read when a request is due, so a run served from the cache needs no key."""
    if not api.key_env:
        return None
    key = os.environ.get(api.key_env) or dotenv_values(
        Path.cwd() / ".env",
        interpolate=False,  # a key is taken literally, `$` and all
    ).get(api.key_env)
    if not key:
        raise UserError(
            f"augmentation.api: no API key: set {api.key_env} in the environment or in "
            f"{Path.cwd() / '.env'} (augmentation.api.key_env names the variable; null sends none)"
        )
    return key.strip()


def mask(text: str, key: str | None) -> str:
    """The text without the key (and without any bearer token an endpoint echoes back)."""
    if key:
        text = text.replace(key, "***")
    return re.sub(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+", r"\1***", text)
