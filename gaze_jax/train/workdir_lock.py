"""One training run per workdir: ``WorkdirLock``.

Two runs on one workdir would both write checkpoints (the kept steps would be the last
writer's) and interleave their ``metrics.jsonl``. The first process of a run (process 0) takes
``<workdir>/run.lock`` before it writes anything, and a second run is refused, naming the run
that holds it.

* Local (or NFS) folder: an exclusive ``fcntl.flock`` on the open file. The kernel drops it
  when the holding process ends in any way (a SIGKILL too), so a crashed run never blocks the
  next. The file (left in place) records the holder: host, pid, start time.
* ``gs://`` (no locks in object storage): the object holds the holder and a heartbeat counter
  that a background thread advances every ``heartbeat_s``; a run that ends, by an error or
  SIGTERM too, deletes it. A lock found in place is watched for ``3 * heartbeat_s``: if its
  heartbeat advances, its run is alive and this one is refused; if not, its run was killed (a
  preempted VM cannot release it) and the lock is taken over with a warning. The holder's own
  host skips the wait when the holder's pid is gone. No clocks are compared across hosts.
  Taking it is a write-read-back: two runs starting in the same second could both pass, which a
  restart of the same command is unlikely to do.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from etils import epath

from gaze_jax import paths

LOCK_NAME = "run.lock"
log = logging.getLogger("gaze_jax.train")


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir's lock (the message names it and the lock file)."""


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": uuid.uuid4().hex,
          "heartbeat": 0}


def _holder_is_gone(info: dict) -> bool:
  """Whether the holder ran on this host and its process no longer exists."""
  if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
    return False
  try:
    os.kill(info["pid"], 0)
  except ProcessLookupError:
    return True
  except PermissionError:          # alive, another user's
    return False
  return False


def _describe(info: dict) -> str:
  return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
          f"{info.get('started', '?')}")


class WorkdirLock:
  """The lock of ``workdir`` (local or ``gs://``); a context manager. ``acquire`` raises
  ``WorkdirBusy`` when another run holds it."""

  def __init__(self, workdir, *, heartbeat_s: float = 15.0):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_NAME
    self.heartbeat_s = heartbeat_s
    self._file = None                    # local: the open, flock-ed file
    self._info: Optional[dict] = None    # gs://: what we wrote
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def _busy(self, info: dict, how: str) -> WorkdirBusy:
    return WorkdirBusy(f"--workdir={self.workdir} is in use by another training run ({how}; "
                       f"{_describe(info)}; lock {self.path}). Wait for it to end, or give this "
                       "run another --workdir.")

  def acquire(self) -> None:
    self.workdir.mkdir(parents=True, exist_ok=True)
    if paths.is_local(self.path):
      self._acquire_local()
    else:
      self._acquire_object()

  def _acquire_local(self):
    import fcntl   # POSIX only: the module imports where there is none (gs:// locks need none)

    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      text = f.read()
      f.close()
      raise self._busy(_parse(text), "it holds the lock") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_holder()))
    f.flush()
    self._file = f

  def _acquire_object(self):
    if self.path.exists():
      info = _parse(self.path.read_text())
      if not _holder_is_gone(info):
        wait = 3 * self.heartbeat_s
        log.info("%s: held by %s; watching its heartbeat for %.0f s", self.path,
                 _describe(info), wait)
        deadline = time.monotonic() + wait
        while info and time.monotonic() < deadline:
          time.sleep(min(self.heartbeat_s / 2, max(deadline - time.monotonic(), 0.0)))
          if not self.path.exists():
            info = {}                      # released meanwhile
          elif (now := _parse(self.path.read_text())).get("heartbeat") != info.get(
              "heartbeat") or now.get("token") != info.get("token"):
            raise self._busy(now, "its heartbeat is advancing")
      if info:
        log.warning("%s: taking over the lock of a run that stopped without releasing it "
                    "(%s)", self.path, _describe(info))
    mine = _holder()
    paths.write_atomic(self.path, json.dumps(mine))
    time.sleep(0.5)                       # a run that wrote at the same time shows now
    got = _parse(self.path.read_text())
    if got.get("token") != mine["token"]:
      raise self._busy(got, "it took the lock as this run did")
    self._info = mine
    self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
    self._thread.start()

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        self._info["heartbeat"] += 1
        paths.write_atomic(self.path, json.dumps(self._info))
      except Exception as e:  # a transient storage error: the next beat retries
        log.warning("%s: heartbeat not written (%s)", self.path, e)

  def release(self) -> None:
    if self._file is not None:
      self._file.close()                  # closing drops the flock
      self._file = None
    if self._info is not None:
      self._stop.set()
      self._thread.join()
      try:
        if _parse(self.path.read_text()).get("token") == self._info["token"]:
          self.path.unlink()
      except FileNotFoundError:
        pass
      self._info = None


def _parse(text: str) -> dict:
  try:
    info = json.loads(text)
  except ValueError:                      # empty, or written by a run killed mid-write
    return {}
  return info if isinstance(info, dict) else {}
