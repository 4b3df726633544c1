"""TensorFlow (which clu's metric writers and TFDS load) without the lines its C++ core writes
to stderr as it loads: absl's notice that logging is not initialized, and oneDNN's note on
round-off, twice each. Once JAX is loaded, TF_CPP_MIN_LOG_LEVEL no longer reaches those lines,
and TF_ENABLE_ONEDNN_OPTS would change the numerics, so the loading's stderr is read and
every other line passed on.
"""

import contextlib
import os
import sys
import tempfile

_NOISE = ('All log messages before absl::InitializeLog() is called are written to STDERR',
          'oneDNN custom operations are on.')


def load_tensorflow() -> None:
  """Loads TensorFlow once (nothing when it is loaded or not installed: the caller's own import
  then says so)."""
  if 'tensorflow' in sys.modules:
    return
  with _stderr_without_noise(), contextlib.suppress(ImportError):
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import


@contextlib.contextmanager
def _stderr_without_noise():
  """Everything written to file descriptor 2 meanwhile, by Python or native code, is held and
  then written out less the loading notices."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      lines = held.read().decode('utf-8', 'replace').splitlines(keepends=True)
      sys.stderr.write(''.join(l for l in lines if not any(n in l for n in _NOISE)))
      sys.stderr.flush()
