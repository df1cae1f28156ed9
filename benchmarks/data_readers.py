"""Reading speed and peak memory of the natural data readers.

Generates, in a temporary directory, a FEMNIST-like set (3,400 writers of
28x28 images, 10..90 examples each: about 170,000; fedjax's has 3,400
writers, 671,585 examples) in fedjax's SQLite, TFF's HDF5, LEAF's JSON (a
tenth of the writers: LEAF's text is ~15 KB an image) and parquet (PNG
images), and a Shakespeare-like one (700 roles, 1..45 snippets of 10..500
characters) in each format; then reads each in a fresh process and prints
one line per reader: examples (Shakespeare: characters) per second, train
and test together, and the process's peak resident memory above its start
(VmHWM, reset at the start; else ru_maxrss).

  python benchmarks/data_readers.py [--writers 3400] [--roles 700]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np

# The tests' writers of fedjax's SQLite and TFF's HDF5 files.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent /
                       "tests"))
from natural_files import write_hdf5, write_sqlite  # noqa: E402


def _png(pixels):
  from PIL import Image
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def femnist(writers, rng):
  """{split: {writer: {pixels, label}}}: paper 1, ink 0, as EMNIST's."""
  out = {}
  for split, low, high in (("train", 10, 90), ("test", 1, 10)):
    out[split] = {}
    for w in range(writers):
      n = int(rng.integers(low, high))
      pixels = (rng.random((n, 28, 28)) > 0.2).astype(np.float32)
      out[split][f"f{w:04d}_{w % 100:02d}"] = {
          "pixels": pixels, "label": rng.integers(0, 62, n).astype(np.int32)}
  return out


def shakespeare(roles, rng):
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz ,.;!?'ÆéTHE"))
  out = {}
  for split in ("train", "test"):
    out[split] = {}
    for r in range(roles):
      snippets = ["".join(rng.choice(letters, int(rng.integers(10, 500))))
                  for _ in range(int(rng.integers(1, 46)))]
      array = np.empty(len(snippets), dtype=object)
      array[:] = [s.encode() for s in snippets]
      out[split][f"PLAY_{r}_ROLE"] = {"snippets": array}
  return out


def write_leaf(root, data, kind, limit):
  for split, clients in data.items():
    (root / split).mkdir(parents=True)
    doc = {"users": [], "num_samples": [], "user_data": {}}
    for c, f in list(clients.items())[:limit]:
      if kind == "femnist":
        x = (f["pixels"].reshape(len(f["label"]), -1) * 0.996).tolist()
        y = f["label"].tolist()
      else:
        text = " ".join(s.decode() for s in f["snippets"])
        x = [text[i:i + 80] for i in range(len(text) - 80)]
        y = [text[i + 80] for i in range(len(text) - 80)]
      doc["users"].append(c)
      doc["num_samples"].append(len(y))
      doc["user_data"][c] = {"x": x, "y": y}
    (root / split / f"all_data_{split}.json").write_text(json.dumps(doc))


def write_parquet(path, clients, kind):
  import pyarrow as pa
  import pyarrow.parquet as pq
  if kind == "femnist":
    rows = [(c, _png((255 * f["pixels"][i]).astype(np.uint8)), int(y))
            for c, f in clients.items() for i, y in enumerate(f["label"])]
    table = pa.table({"writer_id": [r[0] for r in rows],
                      "image": [{"bytes": r[1], "path": None} for r in rows],
                      "character": [r[2] for r in rows]})
  else:
    rows = []
    for c, f in clients.items():
      text = " ".join(s.decode() for s in f["snippets"])
      rows += [(c, text[i:i + 80], text[i + 80])
               for i in range(len(text) - 80)]
    table = pa.table({"character_id": [r[0] for r in rows],
                      "x": [r[1] for r in rows], "y": [r[2] for r in rows]})
  pq.write_table(table, path)


def _peak_mib():
  """This process's peak resident memory (VmHWM), MiB."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read(kind, path, fmt, queue):
  from fedjax_tl.data.natural import load_natural_transfer, read_client_texts
  try:  # A spawned child inherits its parent's peak; start it afresh.
    pathlib.Path("/proc/self/clear_refs").write_text("5")
  except OSError:
    pass
  base = _peak_mib()
  start = time.perf_counter()
  if kind == "femnist":
    data = load_natural_transfer(kind, path, data_format=fmt)
    examples = int(data.clients.count.sum()) + len(data.target_test)
  else:
    _, texts = read_client_texts(kind, path, data_format=fmt)
    # Characters: LEAF and parquet join windows back into one text a role.
    examples = sum(len(s) for t in texts["text"] for s in t)
  seconds = time.perf_counter() - start
  peak = _peak_mib()
  queue.put((examples, seconds, peak - base, peak))


def measure(kind, path, fmt, note):
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  process = ctx.Process(target=_read, args=(kind, str(path), fmt, queue))
  process.start()
  examples, seconds, grown, peak = queue.get()
  process.join()
  unit = "examples" if kind == "femnist" else "characters"
  print(f"{kind:<12}{fmt:<8}{examples:>10,} {unit} in {seconds:6.2f}s = "
        f"{examples / seconds:>10,.0f} {unit}/s, peak memory +{grown:,.0f} "
        f"MiB (RSS {peak:,.0f} MiB){note}", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--writers", type=int, default=3400)
  parser.add_argument("--roles", type=int, default=700)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    for kind, data in (("femnist", femnist(args.writers, rng)),
                       ("shakespeare", shakespeare(args.roles, rng))):
      stem = {"femnist": "federated_emnist", "shakespeare": "shakespeare"}[
          kind]
      for split, clients in data.items():
        write_sqlite(root / f"{stem}_{split}.sqlite", clients)
        write_hdf5(root / f"{stem}_{split}.h5", clients)
      write_parquet(root / f"{kind}_train.parquet", data["train"], kind)
      limit = len(data["train"]) // 10 if kind == "femnist" else None
      write_leaf(root / f"leaf_{kind}", data, kind, limit)
      measure(kind, root / f"{stem}_train.sqlite", "sqlite", "")
      measure(kind, root / f"{stem}_train.h5", "hdf5", "")
      measure(kind, root / f"leaf_{kind}", "leaf",
              f" ({limit} writers)" if limit else "")
      measure(kind, root / f"{kind}_train.parquet", "parquet",
              " (windows; per-client split)" if kind == "shakespeare" else
              " (PNG; per-client split)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
