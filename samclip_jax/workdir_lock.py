"""One run per workdir: an exclusive lock held by process 0 for the run's lifetime.

The lock is an flock on WORKDIR/.lock, released by the kernel when its process dies, so a
lock left by a killed run is taken over (with a message naming the dead process).
"""
import fcntl
import os
import socket

import jax

LOCK_FILE = ".lock"


class WorkdirBusy(OSError):
  """Another live run holds the workdir (an OSError: entry points report it in one line)."""


class WorkdirLock:
  """Context manager: raises WorkdirBusy if another live run holds the workdir."""

  def __init__(self, workdir, say=print):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.say = say
    self.fd = None

  def __enter__(self):
    if jax.process_index() != 0:  # one lock per job: process 0 speaks for all of them
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors="replace").strip() or "an unknown process"
      os.close(fd)
      raise WorkdirBusy(f"{os.path.dirname(self.path)} is in use by another run ({holder}); "
                        "wait for it to end or use another --workdir") from None
    previous = os.read(fd, 200).decode(errors="replace").strip()
    if previous:
      self.say(f"taking over the workdir lock left by a run that is gone ({previous})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    self.fd = fd
    return self

  def __exit__(self, *exc):
    if self.fd is not None:
      os.ftruncate(self.fd, 0)  # a clean exit leaves nothing to take over
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None
