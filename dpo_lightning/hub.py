"""Is the Hugging Face Hub usable right now? Asked before any download, so that a machine without network
fails in seconds with one clear line instead of after the Hub client's retries (about 25 s per file)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")
_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_env() -> bool:
    """The user asked for offline mode."""
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the Hub endpoint (HF_ENDPOINT), seconds at worst."""
    return host_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """A TCP connect to the host of `url`, seconds at worst."""
    if any(os.environ.get(v) for v in _PROXIES):
        return True  # a proxy may reach what a direct connection cannot; let the download decide
    endpoint = urlparse(url)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def cache_root() -> Path:
    """The user cache for downloads and built artefacts: $DPO_LIGHTNING_CACHE, else ~/.cache/dpo_lightning."""
    env = os.environ.get("DPO_LIGHTNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpo_lightning"
