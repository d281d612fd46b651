"""Peak host memory of pangu.interop.hf.load_pretrained on a random Llama checkpoint of a few hundred MB.

  python -m experiments.hf_load_memory --quick

Each loader runs in a fresh process on the 8 fake CPU devices, sharded fsdp=4 x tensor=2 by the rules table,
while a thread samples /proc/self/status every 2 ms. On CPU the "device" arrays live in host memory too, so
the floor is baseline + checkpoint size; what streaming saves is the second, full host copy that reading the
whole file first costs (`safetensors.numpy.load_file`, then `jax.device_put` of each tensor split 8 ways:
the naive loader beside it, which skips even the layout conversion).

Writes <results_dir>/hf_load_memory.json: {"checkpoint_mb", "streaming": {...}, "naive": {...}} with, per
loader, the baseline and peak RSS in MB and the peak rise over baseline as a multiple of the checkpoint size.
"""

import multiprocessing
import os
import tempfile
import threading
import time

from absl import app

from experiments import common

MB = 2 ** 20


def _rss_mb() -> tuple[float, float]:
  """(anonymous, file-backed) resident MB: mmap-ed checkpoint pages count as file-backed."""
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["RssAnon"].split()[0]) / 1024, int(fields["RssFile"].split()[0]) / 1024


def _measure(loader: str, folder: str) -> dict:
  """Runs in a fresh process: baseline RSS with JAX started, then the peak while `loader` runs."""
  import jax
  import numpy as np
  from safetensors.numpy import load_file

  from jax.sharding import NamedSharding, PartitionSpec

  from pangu.interop import hf
  from pangu.parallel import cpu_mesh

  mesh = cpu_mesh(fsdp=4, tensor=2)
  jax.block_until_ready(jax.device_put(np.zeros(8), jax.devices()[0]))
  baseline = sum(_rss_mb())
  peak, done = {"total": baseline, "anon": 0.0, "file": 0.0}, threading.Event()

  def sample():
    while not done.is_set():
      anon, file = _rss_mb()
      peak.update(total=max(peak["total"], anon + file), anon=max(peak["anon"], anon), file=max(peak["file"], file))
      time.sleep(0.002)

  sampler = threading.Thread(target=sample)
  sampler.start()
  start = time.perf_counter()
  if loader == "streaming":
    _, params = hf.load_pretrained(folder, mesh=mesh)
  else:
    tensors = load_file(os.path.join(folder, hf.SINGLE_FILE))  # the whole checkpoint on the host
    split = NamedSharding(mesh, PartitionSpec(("fsdp", "tensor")))
    params = {name: jax.device_put(x, split if x.shape[0] % 8 == 0 else NamedSharding(mesh, PartitionSpec()))
              for name, x in tensors.items()}
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  done.set()
  sampler.join()
  return {"baseline_mb": baseline, "peak_mb": peak["total"], "peak_anon_mb": peak["anon"],
          "peak_file_mb": peak["file"], "after_mb": sum(_rss_mb()), "seconds": seconds}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import flax.linen as nn
  import jax
  import numpy as np

  from pangu import models
  from pangu.interop import hf

  config = models.TransformerConfig(vocab_size=16_000, d_model=768, n_layers=4 if common.QUICK.value else 8,
                                    n_heads=12, n_kv_heads=4, d_ff=2048)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02,
                        nn.unbox(models.abstract_params(config)))
  with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(config, params, folder)
    del params
    size_mb = os.path.getsize(os.path.join(folder, hf.SINGLE_FILE)) / MB
    result = {"checkpoint_mb": size_mb, "mesh": "fsdp=4 x tensor=2 (8 CPU devices)"}
    for loader in ("streaming", "naive"):
      with multiprocessing.get_context("spawn").Pool(1) as pool:
        measured = pool.apply(_measure, (loader, folder))
      measured["rise_over_checkpoint"] = (measured["peak_mb"] - measured["baseline_mb"]) / size_mb
      result[loader] = measured
  common.write_json("hf_load_memory", result)
  rows = [{"loader": k, **{m: result[k][m] for m in ("baseline_mb", "peak_mb", "rise_over_checkpoint", "seconds")}}
          for k in ("streaming", "naive")]
  common.write_table("hf_load_memory", f"checkpoint: {size_mb:.0f} MB\n" + common.format_table(
      rows, ["loader", "baseline_mb", "peak_mb", "rise_over_checkpoint", "seconds"]))


if __name__ == "__main__":
  app.run(main)
