"""Started by helpers.cli once per test process: imports the command line's modules once, then
forks one child per command.

Each child is a process of its own, with its own working directory, environment, standard
streams and exit status, that runs `python -m monoformer_jax ARGS` from the modules already
imported instead of importing them again (seconds per command on two cores, and the suite runs
about a hundred commands). Protocol, one JSON line per request on stdin: {args, cwd, env,
stdout, stderr} (the last two are files the child writes); the answer is the child's pid on one
line, then its wait status on the next. A child ends as the interpreter would (non-daemon threads
joined, atexit functions run, streams flushed) but without tearing down the modules one by one,
which takes two seconds once TensorFlow is loaded and has nothing to show.
"""

import atexit
import importlib
import json
import os
import runpy
import sys
import threading

import monoformer_jax

# What every command imports, and what train imports when it opens its writers (TensorFlow).
PRELOADED = ('monoformer_jax.main', 'clu.metric_writers')


def _child(request: dict) -> None:
  """Becomes `python -m monoformer_jax ARGS` and ends with its exit status."""
  os.chdir(request['cwd'])
  os.environ.clear()
  os.environ.update(request['env'])
  for fd, path in ((1, request['stdout']), (2, request['stderr'])):
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, fd)
    os.close(out)
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  sys.argv = [os.path.join(os.path.dirname(monoformer_jax.__file__), '__main__.py'),
              *request['args']]
  try:
    runpy.run_module('monoformer_jax', run_name='__main__', alter_sys=True)
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) or e.code is None else 1
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
  except BaseException:  # pylint: disable=broad-except
    sys.excepthook(*sys.exc_info())
    code = 1
  threading._shutdown()  # pylint: disable=protected-access
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code or 0)


def serve() -> None:
  for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
      _child(request)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)


if __name__ == '__main__':
  for name in PRELOADED:
    importlib.import_module(name)
  serve()
