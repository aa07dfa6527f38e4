"""A fault hook for the tests' child processes (tests/test_signals.py): with this folder on PYTHONPATH and
LONGTUNE_TEST_FAULT set to JSON {"file": PART, "after": BYTES, "fault": KIND}, files opened for writing through
open() or pathlib whose path contains PART fail once BYTES have been written to them in all:

- "ENOSPC": as a full disk does. The write that crosses the mark writes what fits and then fails with ENOSPC
  (an unbuffered file returns the short count, as write(2) does, and its next write fails); every later write
  to such a file fails.
- "SIGINT": the process sends itself SIGINT in the middle of that write (Ctrl-C while the file is written).

Nothing else changes; without the variable this module does nothing."""

import builtins
import errno
import io
import json
import os

_SPEC = json.loads(os.environ.get("LONGTUNE_TEST_FAULT") or "null")

if _SPEC:
    _open = builtins.open
    _state = {"written": 0, "fired": False}

    class _Faulty:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            left = _SPEC["after"] - _state["written"]
            if _SPEC["fault"] == "SIGINT":
                if not _state["fired"] and len(data) >= left:
                    _state["fired"] = True
                    import signal

                    os.kill(os.getpid(), signal.SIGINT)
                _state["written"] += len(data)
                return self._f.write(data)
            if _state["fired"] or len(data) > left:
                _state["fired"] = True
                head = max(left, 0)
                _state["written"] += head
                n = self._f.write(data[:head]) if head else 0
                if head and isinstance(self._f, io.FileIO):
                    return n  # a short write; the next one fails
                self._flush_quietly()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            _state["written"] += len(data)
            return self._f.write(data)

        def _flush_quietly(self):
            try:
                self._f.flush()
            except OSError:
                pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.__exit__(*exc)

        def __iter__(self):
            return iter(self._f)

        def __getattr__(self, name):
            return getattr(self._f, name)

    def _faulty_open(file, mode="r", *args, **kwargs):
        f = _open(file, mode, *args, **kwargs)
        name = "" if isinstance(file, int) else os.fsdecode(os.fspath(file))  # (a bytes path, as tensorboard gives)
        if any(m in mode for m in "wax+") and _SPEC["file"] in name:
            return _Faulty(f)
        return f

    builtins.open = _faulty_open
    io.open = _faulty_open
