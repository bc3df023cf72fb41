"""Prompts cut from plain text: the `tiny_shakespeare` source and local `.txt` files.

`dataset_name: tiny_shakespeare` downloads Karpathy's tiny_shakespeare text (1.1 MB, the char-rnn `input.txt`)
once, checks its size and sha256, and keeps it in `$DPO_LIGHTNING_CACHE/datasets` (default
`~/.cache/dpo_lightning/datasets`); later runs use the cached copy without any network. A mirror can be named
with `$DPO_LIGHTNING_TINY_SHAKESPEARE_URL`; its file must still match the checksum. Without network, pass a local
copy instead: `dataset_name: ./input.txt` (any UTF-8 `.txt` file is cut the same way).

How a text becomes prompts (deterministic, nothing random):

1. Line endings are normalised (`\\r\\n` and `\\r` become `\\n`) and every line is right-stripped of trailing
   whitespace. Leading indentation is kept.
2. The text is split into blocks at blank lines (a line that is empty after stripping); runs of blank lines
   count as one break. In tiny_shakespeare every block is one speech: a speaker line such as `First Citizen:`
   followed by the lines spoken.
3. A block whose first line ends with `:` starts with a speaker line. Its prompt is the speaker line plus the
   first `max_lines` lines after it (default 4), so a one-line speech gives a two-line prompt. A block that is a
   lone speaker line with nothing after it is skipped.
4. Any other block (a paragraph of ordinary text) gives its first `max_lines` lines.
5. Prompts are always whole lines, each ending with `\\n`, in the order of the text. Repeated speeches are kept;
   the train/eval split deals with duplicates.

With the defaults, tiny_shakespeare gives one prompt per speech (7,097), each at most five lines.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dpo_lightning.errors import UserError, nearest_path
from dpo_lightning.hub import cache_root, host_reachable

logger = logging.getLogger(__name__)

TINY_SHAKESPEARE = "tiny_shakespeare"  # the dataset_name users write


@dataclass(frozen=True)
class RemoteText:
    """A text file on the network, pinned by size and sha256 so that a changed or truncated file is refused."""

    name: str  # the dataset name shown in messages
    url: str
    sha256: str
    size: int  # bytes
    filename: str  # name in the cache folder; carries a checksum prefix so a new pin never reuses an old file


TINY_SHAKESPEARE_TEXT = RemoteText(
    name=TINY_SHAKESPEARE,
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    size=1115394,
    filename="tinyshakespeare-86c4e6aa.txt",
)
URL_ENV = "DPO_LIGHTNING_TINY_SHAKESPEARE_URL"  # a mirror; the checksum still has to match

_CHUNK = 1 << 16
# Everything urlopen/read can raise for a bad URL or network: HTTPError is a URLError, timeouts and refused or
# reset connections are OSErrors, truncated bodies and bad status lines are HTTPExceptions, and a malformed URL
# ("unknown url type") is a ValueError.
_NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException, ValueError)


# ----------------------------------------------------------------------------- download and cache


def fetch_text(
    remote: RemoteText,
    *,
    cache: Path | None = None,
    url: str | None = None,
    timeout: float = 10.0,
    label: str = "dataset_name",
) -> Path:
    """The path of a verified copy of `remote` in `cache` (default: cache_root()/datasets), downloaded if needed.

    Only a file whose size and sha256 match is ever left under the final name, so concurrent ranks can all call
    this: each either finds a verified copy or downloads its own and renames it into place atomically.
    """
    folder = cache if cache is not None else cache_root() / "datasets"
    target = folder / remote.filename
    if target.is_file():
        problem = _verify_file(target, remote)
        if problem is None:
            return target
        # Not deleted here: another rank may be replacing it with a good copy right now; os.replace overwrites it.
        logger.warning("%s: cached copy %s is corrupt (%s); downloading it again", remote.name, target, problem)
    source = url or os.environ.get(URL_ENV) or remote.url
    _download(remote, source, folder, target, timeout=timeout, label=label)
    return target


def _verify_file(path: Path, remote: RemoteText) -> str | None:
    """None when `path` has the expected size and sha256, else what is wrong (size first: it is free)."""
    size = path.stat().st_size
    if size != remote.size:
        return f"size {size} bytes, expected {remote.size}"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != remote.sha256:
        return f"sha256 {digest.hexdigest()}, expected {remote.sha256}"
    return None


def check_text_source(name: str, *, label: str = "dataset_name") -> None:
    """Fail fast, before models load, when a text source cannot be had: a missing .txt file, or a remote text
    that is neither cached nor reachable (said in the words its download would fail with)."""
    if name != TINY_SHAKESPEARE:
        text_source_path(name, label=label)
        return
    remote = TINY_SHAKESPEARE_TEXT
    folder = cache_root() / "datasets"
    source = os.environ.get(URL_ENV) or remote.url
    cached = (folder / remote.filename).is_file()  # verified in full when it is read
    if not cached and not host_reachable(source):
        raise _unreachable(remote, source, folder, label, "host unreachable")


def _unreachable(remote: RemoteText, source: str, folder: Path, label: str, reason: str) -> UserError:
    return UserError(
        f"{label}: could not download {remote.name} from {source} ({reason}) and no verified copy is cached in "
        f"{folder}; download it where there is network (it is cached after the first run) or pass a local .txt "
        f"file, e.g. --{label} ./input.txt"
    )


def _download(remote: RemoteText, source: str, folder: Path, target: Path, *, timeout: float, label: str) -> None:
    """Stream `source` into a private temporary file, verify it, then rename it to `target`."""
    # A unique temporary name per process and call: racing ranks never write into each other's file.
    tmp = folder / f".{remote.filename}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        out = tmp.open("xb")
    except OSError as exc:
        raise _cache_error(label, folder, exc) from exc
    logger.info("downloading %s (%.1f MB) from %s", remote.name, remote.size / 1e6, source)
    try:
        with out:
            try:
                size, sha256 = _stream(source, out, timeout=timeout, limit=remote.size)
            except _NETWORK_ERRORS as exc:
                raise _unreachable(remote, source, folder, label, _reason(exc, timeout)) from exc
        _check_download(remote, source, size, sha256, label=label)
        try:
            os.replace(tmp, target)  # atomic: readers see either no file or a whole verified one
        except OSError as exc:
            raise _cache_error(label, folder, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)  # after a failure; after success it is already gone
    logger.info("%s: verified (sha256 %s...) and cached at %s", remote.name, remote.sha256[:12], target)


def _stream(source: str, out: BinaryIO, *, timeout: float, limit: int) -> tuple[int, str | None]:
    """Copy the response body to `out`: (bytes read, sha256), or (bytes, None) once it passes `limit` bytes."""
    digest = hashlib.sha256()
    size = 0
    with urllib.request.urlopen(source, timeout=timeout) as response:  # timeout bounds connect and each read
        while chunk := response.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                return size, None  # a wrong URL may point at something huge: stop instead of filling the disk
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def _check_download(remote: RemoteText, source: str, size: int, sha256: str | None, *, label: str) -> None:
    advice = f"check that the URL (or ${URL_ENV}) points at the original file"
    if sha256 is None:
        raise UserError(
            f"{label}: the {remote.name} file at {source} is larger than the expected {remote.size} bytes "
            f"(stopped reading after {size}); refusing it; {advice}"
        )
    if sha256 != remote.sha256 or size != remote.size:
        raise UserError(
            f"{label}: the {remote.name} file downloaded from {source} has sha256 {sha256}, expected "
            f"{remote.sha256} (size {size} bytes, expected {remote.size}); refusing it; {advice}"
        )


def _cache_error(label: str, folder: Path, exc: OSError) -> UserError:
    return UserError(
        f"{label}: cannot write to the cache folder {folder} ({_reason(exc)}); "
        "set DPO_LIGHTNING_CACHE to a writable folder"
    )


def _reason(exc: BaseException, timeout: float | None = None) -> str:
    """A short one-line cause: the HTTP status, or the socket error behind a URLError."""
    if isinstance(exc, urllib.error.HTTPError):
        exc.close()  # the error carries the open response body
        return f"HTTP {exc.code} {exc.reason}"
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, TimeoutError) and timeout is not None:
        return f"no answer within {timeout:g} s"
    text = str(cause) or type(cause).__name__
    return " ".join(text.split())  # error texts may carry newlines; messages are one line


# ----------------------------------------------------------------------------- cutting prompts


def _blocks(text: str) -> Iterator[list[str]]:
    """Runs of non-blank, right-stripped lines, separated by one or more blank lines."""
    block: list[str] = []
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = raw.rstrip()
        if line:
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def _is_speaker(line: str) -> bool:
    return len(line) > 1 and line.endswith(":")


def cut_prompts(text: str, *, max_lines: int = 4) -> list[str]:
    """Prompts cut from `text` by the rule in this module's docstring, in text order."""
    if max_lines < 1:
        raise UserError(f"max_lines must be at least 1, got {max_lines}")
    prompts = []
    for block in _blocks(text):
        head = 1 if _is_speaker(block[0]) else 0
        if len(block) == head:
            continue  # a lone speaker line: nothing to continue from
        prompts.append("".join(line + "\n" for line in block[: head + max_lines]))
    return prompts


def text_prompt_rows(path: Path, *, label: str, max_lines: int = 4) -> list[dict[str, str]]:
    """Prompt rows ({"prompt": ...}) cut from a UTF-8 text file; `label` names the file in error messages."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{label} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise UserError(f"{label}: cannot read {path} ({_reason(exc)})") from exc
    rows = [{"prompt": prompt} for prompt in cut_prompts(text, max_lines=max_lines)]
    if not rows:
        raise UserError(f"{label}: no prompts found (the text has no non-empty blocks)")
    return rows


# ----------------------------------------------------------------------------- resolving dataset_name


def is_text_source(name: str) -> bool:
    """Cheap (no download, no file access): does `dataset_name` name a text source?"""
    return name == TINY_SHAKESPEARE or name.lower().endswith(".txt")


def text_source_path(name: str, *, label: str = "dataset_name") -> Path:
    """The local file behind a text source: the cached tiny_shakespeare (downloaded once) or the .txt path."""
    if name == TINY_SHAKESPEARE:
        return fetch_text(TINY_SHAKESPEARE_TEXT, label=label)
    if not is_text_source(name):
        raise ValueError(f"not a text source: {name!r}")
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"dataset file not found: {name}{nearest_path(name, folders=False)}")
    return path
