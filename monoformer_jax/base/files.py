"""Every file the project reads or writes, on a local disk or in a bucket (gs://BUCKET/...).

Paths are strings; `etils.epath` does the I/O (its fsspec backend, gcsfs, for buckets: the
same client in tests against an emulator as on a pod, and one that reports each object's
CRC32C). Object stores have no rename and no append, so an output that must appear whole is
written in one request (an object is replaced whole or not at all); on a local disk it is
written under a temporary name and renamed into place. A bucket has no directories, only
prefixes of object names: making one checks that the bucket exists.
"""

import base64
import concurrent.futures
import contextlib
import functools
import glob as glob_lib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import fsspec
from etils import epath
from etils.epath import backend as epath_backend

from monoformer_jax.base.errors import UserError


os.environ.setdefault('EPATH_USE_TF', 'false')  # gcsfs for gs://, as Orbax's own writes
for _protocol in ('gs', 'gcs'):  # another process's writes must show in the next listing
  fsspec.config.conf.setdefault(_protocol, {}).setdefault('use_listings_cache', False)


def is_remote(path: str) -> bool:
  return '://' in str(path)


def absolute(path: str) -> str:
  """A local path made absolute; a bucket path without doubled or trailing slashes (object
  names keep them, so gs://b/run/ and gs://b/run would be two workdirs)."""
  if not is_remote(path):
    return os.path.abspath(path)
  scheme, rest = str(path).split('://', 1)
  return f'{scheme}://' + '/'.join(part for part in rest.split('/') if part)


def bucket_of(path: str) -> str:
  return str(path).split('://', 1)[1].split('/', 1)[0]


@functools.cache
def _gcs() -> fsspec.AbstractFileSystem:
  return epath_backend.fsspec_backend.fs('gs://')


@functools.cache
def _storage_client():
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  return storage.Client()


def bucket_exists(bucket: str) -> bool:
  """False only when the store says the bucket does not exist (credentials that may use its
  objects but not read its metadata still find it)."""
  from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
  try:
    return _storage_client().bucket(bucket).exists(timeout=10)
  except exceptions.Forbidden:
    return True


def failure(error: BaseException, path: str) -> str:
  """What went wrong with a remote path, in words."""
  text = (str(error).splitlines() or [''])[0]
  if isinstance(error, FileNotFoundError):
    bucket = bucket_of(path)
    try:
      found = bucket_exists(bucket)
    except Exception:  # pylint: disable=broad-except
      found = True
    return f'bucket gs://{bucket} does not exist' if not found else f'{path} does not exist'
  if ('Forbidden' in text or '403' in text or isinstance(error, PermissionError)):
    return f'no permission for {path} (check the credentials and the bucket\'s IAM roles)'
  if '401' in text or 'credentials' in text.lower() or 'Anonymous caller' in text:
    return (f'no credentials for {path} (gcloud auth application-default login, or a service '
            'account)')
  return f'{path}: {type(error).__name__}: {text[:200]}'


@contextlib.contextmanager
def remote_errors(path: str) -> Iterator[None]:
  """Any failure on a bucket path (the store's, the client's, the credentials') as one
  UserError sentence; local ones stay as they are (the CLI names an OSError's file)."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not is_remote(path):
      raise
    raise UserError(failure(e, path) + '.') from e


def exists(path: str) -> bool:
  with remote_errors(path):
    return epath.Path(path).exists()


def isfile(path: str) -> bool:
  with remote_errors(path):
    return epath.Path(path).is_file()


def isdir(path: str) -> bool:
  with remote_errors(path):
    return epath.Path(path).is_dir()


def read_bytes(path: str) -> bytes:
  with remote_errors(path):
    return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  try:
    return read_bytes(path).decode('utf-8')
  except UnicodeDecodeError as e:
    raise UserError(f'{path} is not UTF-8 text (byte {e.start} is not).') from None


def read_json(path: str) -> Any:
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).') from None


def listdir(path: str) -> list[str]:
  with remote_errors(path):
    return sorted(p.name for p in epath.Path(path).iterdir())


def glob(pattern: str) -> list[str]:
  if not is_remote(pattern):
    return sorted(glob_lib.glob(pattern))
  with remote_errors(pattern):
    return sorted('gs://' + p for p in _gcs().glob(pattern))


def files_under(directory: str) -> list[str]:
  """The paths of every file below a directory, relative to it (a bucket lists them in one
  request)."""
  if not is_remote(directory):
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names)
  with remote_errors(directory):
    prefix = directory.split('://', 1)[1].rstrip('/') + '/'
    return sorted(p[len(prefix):] for p in _gcs().find(prefix))


def _crc32c(path: str) -> str:
  try:  # a dependency of gcsfs, imported here so that a bare accelerator image imports the package
    import google_crc32c  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError('checkpoint checksums need the google-crc32c package; install '
                    'requirements.txt.') from e
  crc = google_crc32c.Checksum()
  with open(path, 'rb') as f:  # local: what the store computes for an object, done here
    while block := f.read(1 << 24):
      crc.update(block)
  return base64.b64encode(crc.digest()).decode()


def checksums(directory: str) -> dict[str, str]:
  """The CRC32C (base64, as GCS gives it) of every file below a directory, by relative path: a
  bucket's are read from the objects' metadata in one listing, a local disk's are computed."""
  if is_remote(directory):
    prefix = directory.split('://', 1)[1].rstrip('/') + '/'
    with remote_errors(directory):
      found = _gcs().find(prefix, detail=True)
    return {name[len(prefix):]: info['crc32c'] for name, info in sorted(found.items())}
  names = files_under(directory)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    return dict(zip(names, pool.map(lambda n: _crc32c(os.path.join(directory, n)), names)))


def makedirs(path: str) -> None:
  """A local directory and its parents; for a bucket path, a check that the bucket exists."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)  # local: the branch for local paths
    return
  with remote_errors(path):
    if not bucket_exists(bucket_of(path)):
      raise FileNotFoundError(path)


def remove(path: str) -> None:
  with remote_errors(path):
    epath.Path(path).unlink(missing_ok=True)


def rmtree(path: str) -> None:
  if is_remote(path):
    with remote_errors(path):
      if epath.Path(path).exists():
        epath.Path(path).rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def _check_parent(path: str) -> None:
  directory = os.path.dirname(absolute(path))
  if is_remote(path):
    makedirs(directory)
  elif not os.path.isdir(directory):
    raise UserError(f'output directory {directory} does not exist.')


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """Yields a local path to write (with any library); it becomes `path` when the block
  finishes: renamed into place, or uploaded as one object."""
  _check_parent(path)
  if is_remote(path):
    with tempfile.TemporaryDirectory() as scratch:
      tmp = os.path.join(scratch, os.path.basename(path))
      yield tmp
      copy(tmp, path)
    return
  tmp = path + '.tmp'
  try:
    yield tmp
  except BaseException:
    if os.path.exists(tmp):  # local: the temporary file beside a local output
      os.remove(tmp)
    raise
  os.replace(tmp, path)  # local: a bucket's path returned above


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  if is_remote(path):
    _check_parent(path)
    with remote_errors(path):
      _gcs().pipe_file(path, data)  # one request: an interrupted upload leaves no object
    return
  with atomic_file(path) as tmp, open(tmp, 'wb') as f:  # local by nature: the scratch file
    f.write(data)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically."""
  write_bytes(path, text.encode('utf-8'))


def copy(src: str, dst: str) -> None:
  """Copies one file; a remote destination is one object, which appears only once complete
  (an upload finishes with its last chunk, a copy within the store is the store's)."""
  with remote_errors(src), remote_errors(dst):
    if is_remote(src) and is_remote(dst):
      _gcs().copy(src, dst)
    elif is_remote(dst):
      _gcs().put_file(src, dst)
    elif is_remote(src):
      _gcs().get_file(src, dst)
    else:
      shutil.copyfile(src, dst)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local file with `path`'s content, for libraries that take only a local file name."""
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory() as scratch:
    local = os.path.join(scratch, os.path.basename(path))
    copy(path, local)
    yield local


@contextlib.contextmanager
def atomic_directory(dst: str, last: str) -> Iterator[str]:
  """Yields a local scratch directory that becomes `dst` (which must not exist) if the block
  finishes. Locally it is renamed into place; to a bucket its files are uploaded with `last`
  (the file readers open first) uploaded last, so a directory without it is unfinished."""
  if exists(dst):
    raise UserError(f'destination {dst} already exists; remove it or choose another.')
  if not is_remote(dst) and not os.path.isdir(os.path.dirname(os.path.abspath(dst))):
    raise UserError(f'the parent directory of {dst} does not exist.')
  if is_remote(dst):
    makedirs(dst)
    with tempfile.TemporaryDirectory() as scratch:
      yield scratch
      names = files_under(scratch)
      if last not in names:  # readers would never count it finished
        raise UserError(f'{dst}: nothing was written as {last}, the file that marks it finished; '
                        'nothing was uploaded.')
      for name in sorted(names, key=lambda n: n == last):
        copy(os.path.join(scratch, name), f'{dst}/{name}')
    return
  tmp = os.path.abspath(dst) + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)  # local: a bucket's directory returned above
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  os.rename(tmp, dst)
