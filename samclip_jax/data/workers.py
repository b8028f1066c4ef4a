"""Worker processes that end with their parent (a killed job must not leave them running)."""
import os
import threading
import time

_watched_pid = None


def exit_with_parent():
  """Starts (once per process) a daemon thread that exits this process when its parent is gone.

  Used as a process-pool initializer (prepare) and from the first record a grain worker
  reads (KeyedSource): a killed job's workers otherwise keep running, blocked on a queue or
  spinning, until someone finds and kills them.
  """
  global _watched_pid
  if _watched_pid == os.getpid():
    return
  _watched_pid = os.getpid()
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
