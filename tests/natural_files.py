"""Natural data files written here in each project's own format (fedjax's
SQLite of msgpack + zlib blobs, TFF's HDF5), for the reader tests and
benchmarks/data_readers.py; independent of the readers under test."""

import sqlite3
import zlib

import h5py
import msgpack
import numpy as np


def _ext(obj):
  """fedjax's msgpack extension types: 1 numeric ndarray, 4 bytes ndarray."""
  if obj.dtype == object:
    return msgpack.ExtType(4, msgpack.packb((list(obj.shape), list(obj)),
                                            use_bin_type=True))
  return msgpack.ExtType(1, msgpack.packb(
      (list(obj.shape), obj.dtype.name, obj.tobytes("C")), use_bin_type=True))


def write_sqlite(path, clients):
  """clients: {id: {feature: array}} as fedjax's SQLiteFederatedDataBuilder."""
  db = sqlite3.connect(path)
  db.execute("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY "
             "KEY, data BLOB NOT NULL, num_examples INTEGER NOT NULL);")
  for client_id, examples in clients.items():
    blob = zlib.compress(msgpack.packb(examples, default=_ext,
                                       strict_types=True))
    n = len(next(iter(examples.values())))
    db.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
               (client_id.encode(), blob, n))
  db.commit()
  db.close()


def write_hdf5(path, clients):
  with h5py.File(path, "w") as f:
    for client_id, examples in clients.items():
      for name, array in examples.items():
        f.create_dataset(f"examples/{client_id}/{name}", data=array)


def write_roles(path, roles):
  """Shakespeare as fedjax's pair of SQLite files under `path`: each role's
  snippets, the last one its test text (as TFF splits roles)."""
  for split, cut in (("train", slice(None, -1)), ("test", slice(-1, None))):
    clients = {}
    for role, snippets in roles.items():
      held = np.empty(len(snippets[cut]), dtype=object)
      held[:] = [s.encode("utf-8") for s in snippets[cut]]
      clients[role] = {"snippets": held}
    write_sqlite(path / f"shakespeare_{split}.sqlite", clients)
