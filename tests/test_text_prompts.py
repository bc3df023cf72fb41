"""Text prompt sources: tiny_shakespeare download + cache (against a local HTTP server), and the prompt-cutting rule.

Offline: every download goes to 127.0.0.1, and every text is one the tests write themselves (a play of
speeches in tiny_shakespeare's layout stands in for it, pinned by its own checksum).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dpo_lightning.data import text_prompts
from dpo_lightning.data.text_prompts import (
    TINY_SHAKESPEARE,
    TINY_SHAKESPEARE_TEXT,
    URL_ENV,
    RemoteText,
    cut_prompts,
    fetch_text,
    is_text_source,
    text_prompt_rows,
    text_source_path,
)
from dpo_lightning.errors import UserError
from dpo_lightning.hub import cache_root

SPEECHES = (
    "First Gardener:\n"
    "The roses will not wait for us, my friend;\n"
    "Their petals fall whatever we intend.\n"
    "\n"
    "Second Gardener:\n"
    "Then let them fall.\n"
    "\n"
    "First Gardener:\n"
    "You speak as one who never planted seed,\n"
    "Nor watched the frost undo a summer's deed,\n"
    "Nor knelt at dawn to pull the stubborn weed,\n"
    "Nor counted rain as misers count their gold,\n"
    "Nor mourned a bloom before the year grew old.\n"
)
PAYLOAD = SPEECHES.encode()


def _remote(payload: bytes, url: str, **changes) -> RemoteText:
    fields = dict(
        name="test_speeches",
        url=url,
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        filename="speeches-test.txt",
    )
    return RemoteText(**(fields | changes))


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        body = self.server.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


class _Server(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, bytes] = {"/speeches.txt": PAYLOAD}
        self.requests: list[str] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # A proxy setting would send 127.0.0.1 through the proxy; the cache must never be the user's real one.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", URL_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DPO_LIGHTNING_CACHE", str(tmp_path / "user-cache"))


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ----------------------------------------------------------------------------- constants and cache root


def test_canonical_constants():
    assert TINY_SHAKESPEARE == "tiny_shakespeare"
    assert TINY_SHAKESPEARE_TEXT.name == "tiny_shakespeare"
    assert TINY_SHAKESPEARE_TEXT.url == (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    )
    assert TINY_SHAKESPEARE_TEXT.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert TINY_SHAKESPEARE_TEXT.size == 1115394
    assert TINY_SHAKESPEARE_TEXT.filename == "tinyshakespeare-86c4e6aa.txt"
    assert URL_ENV == "DPO_LIGHTNING_TINY_SHAKESPEARE_URL"


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_LIGHTNING_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("DPO_LIGHTNING_CACHE")
    assert cache_root() == Path.home() / ".cache" / "dpo_lightning"


# ----------------------------------------------------------------------------- fetch_text


def test_first_fetch_downloads_second_uses_cache(server, cache, caplog):
    remote = _remote(PAYLOAD, server.url("/speeches.txt"))
    with caplog.at_level(logging.INFO, logger=text_prompts.__name__):
        path = fetch_text(remote, cache=cache)
    assert path == cache / remote.filename
    assert path.read_bytes() == PAYLOAD
    assert server.requests == ["/speeches.txt"]
    assert any("downloading test_speeches" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in cache.iterdir()) == [remote.filename]  # no temporary file left behind

    # The second call neither asks the server nor needs the URL to work.
    again = fetch_text(remote, cache=cache, url=f"http://127.0.0.1:{_closed_port()}/x.txt")
    assert again == path
    assert server.requests == ["/speeches.txt"]


def test_default_cache_folder_is_under_cache_root(server):
    path = fetch_text(_remote(PAYLOAD, server.url("/speeches.txt")))
    assert path == cache_root() / "datasets" / "speeches-test.txt"
    assert path.read_bytes() == PAYLOAD


def test_wrong_sha256_is_refused_and_nothing_is_kept(server, cache):
    remote = _remote(PAYLOAD, server.url("/speeches.txt"), sha256="0" * 64)
    with pytest.raises(UserError) as err:
        fetch_text(remote, cache=cache)
    text = _one_line(err)
    assert "sha256" in text and "refusing" in text
    assert remote.name in text and remote.url in text
    assert hashlib.sha256(PAYLOAD).hexdigest() in text
    assert list(cache.iterdir()) == []


def test_size_larger_than_served_is_refused(server, cache):
    remote = _remote(PAYLOAD, server.url("/speeches.txt"), size=len(PAYLOAD) + 1)
    with pytest.raises(UserError) as err:
        fetch_text(remote, cache=cache)
    text = _one_line(err)
    assert f"size {len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}" in text
    assert list(cache.iterdir()) == []


def test_size_smaller_than_served_stops_reading_and_is_refused(server, cache):
    remote = _remote(PAYLOAD, server.url("/speeches.txt"), size=10)
    with pytest.raises(UserError) as err:
        fetch_text(remote, cache=cache)
    text = _one_line(err)
    assert "larger than the expected 10 bytes" in text and "refusing" in text
    assert list(cache.iterdir()) == []


def test_corrupt_cached_file_is_downloaded_again(server, cache, caplog):
    remote = _remote(PAYLOAD, server.url("/speeches.txt"))
    cache.mkdir()
    (cache / remote.filename).write_bytes(PAYLOAD[:-1] + b"?")  # same size, different content
    with caplog.at_level(logging.WARNING, logger=text_prompts.__name__):
        path = fetch_text(remote, cache=cache)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == ["/speeches.txt"]
    assert any("corrupt" in r.getMessage() for r in caplog.records)


def test_truncated_cached_file_is_downloaded_again(server, cache):
    remote = _remote(PAYLOAD, server.url("/speeches.txt"))
    cache.mkdir()
    (cache / remote.filename).write_bytes(PAYLOAD[:20])
    assert fetch_text(remote, cache=cache).read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_http_404_is_one_line_user_error(server, cache):
    url = server.url("/missing.txt")
    with pytest.raises(UserError) as err:
        fetch_text(_remote(PAYLOAD, url), cache=cache)
    text = _one_line(err)
    assert "HTTP 404" in text and url in text and "test_speeches" in text
    assert "--dataset_name ./input.txt" in text
    assert list(cache.iterdir()) == []


def test_unreachable_url_fails_fast(cache):
    url = f"http://127.0.0.1:{_closed_port()}/x.txt"
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        fetch_text(_remote(PAYLOAD, url), cache=cache)
    assert time.monotonic() - start < 10
    text = _one_line(err)
    assert f"could not download test_speeches from {url}" in text
    assert f"no verified copy is cached in {cache}" in text
    assert list(cache.iterdir()) == []


def test_silent_server_is_cut_off_by_the_timeout(cache):
    # Accepts connections (the kernel completes the handshake) but never answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.txt"
        start = time.monotonic()
        with pytest.raises(UserError) as err:
            fetch_text(_remote(PAYLOAD, url), cache=cache, timeout=0.5)
        assert time.monotonic() - start < 5
    assert "no answer within 0.5 s" in _one_line(err)
    assert list(cache.iterdir()) == []


def test_malformed_url_is_user_error(cache):
    with pytest.raises(UserError) as err:
        fetch_text(_remote(PAYLOAD, "not-a-url"), cache=cache)
    assert "could not download" in _one_line(err)


def test_url_env_overrides_and_argument_overrides_env(server, cache, monkeypatch):
    server.routes["/mirror.txt"] = PAYLOAD
    remote = _remote(PAYLOAD, f"http://127.0.0.1:{_closed_port()}/dead.txt")
    monkeypatch.setenv(URL_ENV, server.url("/mirror.txt"))
    assert fetch_text(remote, cache=cache).read_bytes() == PAYLOAD
    assert server.requests == ["/mirror.txt"]

    (cache / remote.filename).unlink()
    fetch_text(remote, cache=cache, url=server.url("/speeches.txt"))
    assert server.requests == ["/mirror.txt", "/speeches.txt"]


def test_mirror_must_still_match_the_checksum(server, cache, monkeypatch):
    server.routes["/other.txt"] = b"not the same text\n"
    monkeypatch.setenv(URL_ENV, server.url("/other.txt"))
    with pytest.raises(UserError) as err:
        fetch_text(_remote(PAYLOAD, server.url("/speeches.txt")), cache=cache)
    assert "sha256" in _one_line(err)
    assert URL_ENV in str(err.value)


def test_unwritable_cache_folder_is_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(UserError) as err:
        fetch_text(_remote(PAYLOAD, "http://127.0.0.1:1/x.txt"), cache=blocker / "cache")
    assert "cannot write to the cache folder" in _one_line(err)


# ----------------------------------------------------------------------------- a play in tiny_shakespeare's layout


def _play(speeches: int = 60) -> str:
    """Speeches in tiny_shakespeare's layout (a speaker's line ending in ":", one to six lines of verse, a blank
    line between speeches), from a fixed vocabulary: the same text on every call."""
    speakers = ("First Citizen", "MENENIUS", "Second Citizen", "CORIOLANUS")
    words = "the rose and frost of summer fall upon a garden where we kneel at dawn to count the rain".split()
    blocks = []
    for i in range(speeches):
        lines = [
            " ".join(words[(i * 7 + j * 3 + k) % len(words)] for k in range(6)).capitalize() + "."
            for j in range(1 + i % 6)
        ]
        blocks.append(f"{speakers[i % len(speakers)]}:\n" + "\n".join(lines) + "\n")
    return "\n".join(blocks)


def test_a_play_is_cut_into_speaker_blocks_of_at_most_four_lines():
    prompts = cut_prompts(_play())
    assert len(prompts) >= 60
    for prompt in prompts:
        lines = prompt.split("\n")
        assert prompt.endswith("\n") and lines[-1] == ""
        assert lines[0].endswith(":")  # every block starts with its speaker
        assert 2 <= len(lines) - 1 <= 1 + 4
    assert prompts[0].startswith("First Citizen:\n")


def test_text_source_path_fetches_tiny_shakespeare_into_the_cache(server, monkeypatch):
    # The real pin is swapped for the small text so that this runs without the real file.
    monkeypatch.setattr(text_prompts, "TINY_SHAKESPEARE_TEXT", _remote(PAYLOAD, "http://127.0.0.1:1/x.txt"))
    monkeypatch.setenv(URL_ENV, server.url("/speeches.txt"))
    path = text_source_path("tiny_shakespeare")
    assert path == cache_root() / "datasets" / "speeches-test.txt"
    assert text_prompt_rows(path, label="tiny_shakespeare")[1] == {"prompt": "Second Gardener:\nThen let them fall.\n"}


# ----------------------------------------------------------------------------- cut_prompts


def test_speaker_blocks_keep_the_speaker_and_max_lines():
    prompts = cut_prompts(SPEECHES)
    assert prompts == [
        "First Gardener:\nThe roses will not wait for us, my friend;\nTheir petals fall whatever we intend.\n",
        "Second Gardener:\nThen let them fall.\n",  # a one-line speech: speaker + its line
        "First Gardener:\n"
        "You speak as one who never planted seed,\n"
        "Nor watched the frost undo a summer's deed,\n"
        "Nor knelt at dawn to pull the stubborn weed,\n"
        "Nor counted rain as misers count their gold,\n",  # 1 + 4 lines; the fifth speech line is cut
    ]


def test_max_lines():
    assert cut_prompts(SPEECHES, max_lines=1)[2] == "First Gardener:\nYou speak as one who never planted seed,\n"
    assert cut_prompts(SPEECHES, max_lines=50)[2].count("\n") == 6
    with pytest.raises(UserError):
        cut_prompts(SPEECHES, max_lines=0)


def test_blank_line_runs_and_whitespace_only_lines_are_one_break():
    text = "\n\n\nA:\none\n\n \t\n\n\nB:\ntwo\n\n\n"
    assert cut_prompts(text) == ["A:\none\n", "B:\ntwo\n"]


def test_windows_and_old_mac_line_endings():
    text = "A:\r\none  \r\ntwo\r\n\r\nB:\rthree\r\rC:\r\nfour"
    assert cut_prompts(text) == ["A:\none\ntwo\n", "B:\nthree\n", "C:\nfour\n"]
    assert cut_prompts(SPEECHES.replace("\n", "\r\n")) == cut_prompts(SPEECHES)


def test_lone_speaker_is_skipped():
    assert cut_prompts("Chorus:\n\nA:\nhello\n\nExit:\n") == ["A:\nhello\n"]
    assert cut_prompts("Chorus:\n\n\nExit:") == []


def test_non_speaker_paragraphs_take_max_lines():
    text = "Once upon a time\nthere was a garden.\n\n  1\n  2\n  3\n  4\n  5\n\nOne line, no colon\n"
    assert cut_prompts(text, max_lines=4) == [
        "Once upon a time\nthere was a garden.\n",
        "  1\n  2\n  3\n  4\n",  # leading indentation is kept
        "One line, no colon\n",
    ]


def test_only_the_first_line_decides_speaker_and_trailing_colon_lines_are_kept():
    text = "He said:\nthus\n\nFirst line\nsecond line ends:\nthird\n"
    assert cut_prompts(text, max_lines=1) == ["He said:\nthus\n", "First line\n"]


def test_every_prompt_ends_with_newline_and_has_no_trailing_spaces():
    text = "A:   \nline with spaces   \t\n\nno final newline"
    prompts = cut_prompts(text)
    assert prompts == ["A:\nline with spaces\n", "no final newline\n"]
    assert all(p.endswith("\n") and not p.endswith(" \n") for p in prompts)


def test_duplicates_are_kept_in_text_order():
    assert cut_prompts("A:\nhi\n\nB:\nyo\n\nA:\nhi\n") == ["A:\nhi\n", "B:\nyo\n", "A:\nhi\n"]


def test_empty_text_gives_no_prompts():
    assert cut_prompts("") == []
    assert cut_prompts("\n \n\r\n") == []


# ----------------------------------------------------------------------------- rows and dataset_name


def test_text_prompt_rows(tmp_path):
    path = tmp_path / "speeches.txt"
    path.write_bytes(b"\xef\xbb\xbf" + PAYLOAD.replace(b"\n", b"\r\n"))  # a BOM and Windows line endings
    rows = text_prompt_rows(path, label="speeches.txt", max_lines=1)
    assert rows[0] == {"prompt": "First Gardener:\nThe roses will not wait for us, my friend;\n"}
    assert [r["prompt"] for r in rows] == cut_prompts(SPEECHES, max_lines=1)


def test_text_prompt_rows_rejects_non_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("A:\nCaf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(UserError) as err:
        text_prompt_rows(path, label="./latin1.txt")
    text = _one_line(err)
    assert text.startswith("./latin1.txt is not UTF-8 text") and "save it as UTF-8" in text
    assert "0xe9" in text


def test_text_prompt_rows_rejects_text_without_prompts(tmp_path):
    for content in ("", "\n\n  \n", "Chorus:\n\nExit:\n"):
        path = tmp_path / "empty.txt"
        path.write_text(content)
        with pytest.raises(UserError) as err:
            text_prompt_rows(path, label="./empty.txt")
        assert _one_line(err) == "./empty.txt: no prompts found (the text has no non-empty blocks)"


def test_is_text_source():
    assert is_text_source("tiny_shakespeare")
    assert is_text_source("./input.txt") and is_text_source("/data/INPUT.TXT") and is_text_source("notes.Txt")
    assert not is_text_source("builtin:tiny_pairs") and not is_text_source("./pairs.jsonl")
    assert not is_text_source("Anthropic/hh-rlhf") and not is_text_source("karpathy/tiny_shakespeare")


def test_text_source_path_for_local_files(tmp_path, monkeypatch):
    path = tmp_path / "input.txt"
    path.write_text(SPEECHES)
    assert text_source_path(str(path)) == path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert text_source_path("~/input.txt") == path
    with pytest.raises(UserError) as err:
        text_source_path("./no-such-file.txt")
    assert _one_line(err) == "dataset file not found: ./no-such-file.txt"


# ----------------------------------------------------------------------------- through the entrypoint

ROOT = Path(__file__).resolve().parents[1]


def _entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "entrypoint.py"), "--config", "experiments/online-tiny.yaml", *args]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_tiny_shakespeare_offline_without_cache_fails_in_seconds(tmp_path):
    env = {"DPO_LIGHTNING_CACHE": str(tmp_path / "cache"), URL_ENV: f"http://127.0.0.1:{_closed_port()}/input.txt"}
    started = time.monotonic()
    done = _entrypoint("--dataset_name", "tiny_shakespeare", "--output_dir", str(tmp_path / "out"), env=env)
    assert time.monotonic() - started < 60  # the process start and imports included
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tiny_shakespeare" in errors[0] and "--dataset_name ./input.txt" in errors[0]
    assert not (tmp_path / "out").exists()


def test_online_run_on_tiny_shakespeare_downloaded_through_a_local_server(server, tmp_path, monkeypatch, capsys):
    """The default prompt set end to end, with a play the test writes standing in for the real file (pinned by
    its own checksum): fetched once, verified, cut into prompts, and one online step with validation on them."""
    from dpo_lightning.determined.bridge import run

    play = _play().encode()
    server.routes["/input.txt"] = play
    remote = _remote(play, "http://127.0.0.1:1/input.txt", name=TINY_SHAKESPEARE, filename="play-test.txt")
    monkeypatch.setattr(text_prompts, "TINY_SHAKESPEARE_TEXT", remote)
    monkeypatch.setenv(URL_ENV, server.url("/input.txt"))
    overrides = {"dataset_name": "tiny_shakespeare", "max_prompt_length": "24", "output_dir": str(tmp_path / "out")}
    assert run(ROOT / "experiments/online-tiny.yaml", overrides, fast_dev_run=True) == 0
    printed = capsys.readouterr().out
    assert "[training step 1]" in printed and "objective/scores" in printed
    cached = cache_root() / "datasets" / "play-test.txt"
    assert cached.read_bytes() == play and server.requests == ["/input.txt"]
