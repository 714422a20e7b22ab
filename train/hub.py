"""Whether the Hugging Face hub may be asked: the offline switches and a quick reachability probe.

Offline hub and `datasets` calls retry for minutes before they fail, so every job checks these first and fails
fast with an error that names the config key to change (a local path instead of a hub id).
"""

import os
import socket
import urllib.parse

_TRUE = ("1", "on", "yes", "true")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set to 1 / on / yes / true."""
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe of the hub; skipped (assumed reachable) when an HTTP(S) proxy is configured."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False
