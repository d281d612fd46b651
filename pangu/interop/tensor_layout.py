"""How one of our parameter tensors is a reshape + transpose of a Hugging Face tensor, read slice by slice.

Hugging Face Linear weights are [out, in] with heads flattened into one axis; ours put the input first and split
heads. A `TensorLayout` says which HF axis splits into which of our axes and in what order they come; `read`
touches only the HF rows and columns a device shard needs. `Permuted` adds a fixed reordering along one HF axis
(openPangu Ultra MoE's interleaved RoPE pairs and MTP input halves, see pangu.interop.openpangu).
"""

import dataclasses
import math

import numpy as np

@dataclasses.dataclass(frozen=True)
class TensorLayout:
  """HF axis j splits row-major into our axes `groups[j]`; `perm` lists those split axes in our order.

  E.g. q: HF [H*Dh, D] splits into (H, Dh), (D,) = split axes 0, 1, 2; ours is [D, H, Dh], so perm (2, 0, 1).
  """

  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
    split = self._split_shape(ours)
    return tuple(math.prod(split[a] for a in group) for group in self.groups)

  def _split_shape(self, ours: tuple[int, ...]) -> list[int]:
    split = [0] * len(ours)
    for our_axis, split_axis in enumerate(self.perm):
      split[split_axis] = ours[our_axis]
    return split

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    return ours.transpose(np.argsort(self.perm)).reshape(self.hf_shape(ours.shape))

  def read(self, tensor, ours_shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Reads ours[index] from an HF tensor slice handle, touching only the HF rows/columns it needs.

    The outer axis of each HF group selects a contiguous HF range; inner axes are cut after the read.
    """
    split = self._split_shape(ours_shape)
    split_index = [slice(None)] * len(ours_shape)
    for our_axis, split_axis in enumerate(self.perm):
      split_index[split_axis] = slice(*index[our_axis].indices(ours_shape[our_axis])[:2])
    hf_index, read_shape, inner_index = [], [], []
    for group in self.groups:
      outer, inner = group[0], group[1:]
      inner_size = math.prod(split[a] for a in inner)
      start, stop = split_index[outer].start, split_index[outer].stop
      hf_index.append(slice(start * inner_size, stop * inner_size))
      read_shape += [stop - start, *(split[a] for a in inner)]
      inner_index += [slice(None), *(split_index[a] for a in inner)]
    block = np.asarray(tensor[tuple(hf_index)]).reshape(read_shape)
    return block[tuple(inner_index)].transpose(self.perm)


SAME_1D = TensorLayout(((0,),), (0,))
SAME_2D = TensorLayout(((0,), (1,)), (0, 1))
TRANSPOSED = TensorLayout(((0,), (1,)), (1, 0))
HEADS_IN = TensorLayout(((0, 1), (2,)), (2, 0, 1))  # [N*Dh, D] -> [D, N, Dh]
HEADS_BIAS = TensorLayout(((0, 1),), (0, 1))  # [N*Dh] -> [N, Dh]
HEADS_OUT = TensorLayout(((0,), (1, 2)), (1, 2, 0))  # [D, N*Dh] -> [N, Dh, D]



@dataclasses.dataclass(frozen=True)
class Permuted:
  """`base` applied after reordering the HF tensor along `axis`: ours reads HF index `order[i]` there as index i.

  The whole tensor is read to reorder it (used for small projections: openPangu's interleaved RoPE rows, the
  MTP projection's input halves).
  """

  base: TensorLayout
  order: tuple[int, ...]
  axis: int = 0

  def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
    return self.base.hf_shape(ours)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    return np.take(self.base.to_hf(ours), np.argsort(self.order), axis=self.axis)

  def read(self, tensor, ours_shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    return self.base.read(np.take(np.asarray(tensor[:]), self.order, axis=self.axis), ours_shape, index)


@dataclasses.dataclass(frozen=True)
class LeadingOne:
  """An HF tensor [1, *ours] (Pro MoE's router_scale [1, N]) read as ours."""

  def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
    return (1, *ours)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    return ours[None]

  def read(self, tensor, ours_shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    return np.asarray(tensor[:])[0][index]


Layout = TensorLayout | Permuted | LeadingOne
