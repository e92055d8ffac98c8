"""Read whole tensors, or single experts, from a Megatron ``torch_dist`` checkpoint by name.

Megatron stores each parameter under its *sharded key* with its global shape. The key is the
global parameter name, with two renames in Megatron-Core 0.19.2 (``tests/unit/
test_checkpoint_megatron.py`` checks them against a built model's ``sharded_state_dict``):

* routed experts: ``SequentialMLP.sharded_state_dict`` stacks
  ``...mlp.experts.local_experts.{e}.<param>`` of every expert into one
  ``...mlp.experts.experts.<param>`` tensor ``[E, ...]`` (expert ``e`` at index ``e``);
* MTP: ``MultiTokenPredictionLayer.sharded_state_dict`` saves ``mtp.layers.{k}.mtp_model_layer.``
  as ``mtp.layers.{k}.transformer_layer.`` (the name of older GPT MTP checkpoints).

Gated
``linear_fc1`` is stored globally as ``cat([gate; up])`` whatever the TP size (Megatron's swiglu
sharded factory), so its global tensor is exactly the HF concatenation.

Why not ``dist_checkpointing.load``: in a one-process world its conversion to a torch
``ShardedTensor`` places every fragment it was not asked for on "the next rank", which is itself
(``sharded_tensor_to_torch_sharded_tensor``, 0.19.2), so asking for one expert of a stacked
tensor fails and only whole ``[E, ...]`` stacks (12.9 GB per GLM-5 layer) could be read. We plan
the read with torch DCP itself instead: it computes which saved chunks overlap the requested
region (DCP's resharding, whatever TP / PP / EP the checkpoint was saved at) and copies only
those bytes into our buffer. No process group is needed.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from checkpoint_tools.megatron_dir import check_torch_dist

_MTP_INNER = re.compile(r"^(mtp\.layers\.\d+\.)mtp_model_layer\.")
_LOCAL_EXPERT = re.compile(r"^(?P<head>.*\.mlp\.experts\.)local_experts\.(?P<e>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class ShardedLocation:
    """Where a global Megatron parameter lives: a sharded key and leading stack indices."""

    key: str
    index: tuple[int, ...] = ()


def sharded_location(megatron_name: str) -> ShardedLocation:
    """The sharded key (and expert index) Megatron saves a global parameter name under."""
    name = _MTP_INNER.sub(r"\g<1>transformer_layer.", megatron_name)
    match = _LOCAL_EXPERT.match(name)
    if match is None:
        return ShardedLocation(name)
    return ShardedLocation(match["head"] + "experts." + match["rest"], (int(match["e"]),))


class TorchDistCheckpoint:
    """Read access to a ``torch_dist`` checkpoint directory (DCP metadata read once)."""

    def __init__(self, path: str | Path) -> None:
        self.path = check_torch_dist(path)
        self._reader = _CachedMetadataReader(str(self.path))
        self._tensors = {
            key: md
            for key, md in self._reader.read_metadata().state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    @property
    def keys(self) -> list[str]:
        """Every tensor key stored (model and, for trainer checkpoints, optimizer state)."""
        return list(self._tensors)

    def shape(self, loc: ShardedLocation) -> tuple[int, ...] | None:
        """Shape of the tensor at ``loc`` (stack indices removed); None if absent or out of range."""
        md = self._tensors.get(loc.key)
        if md is None or len(md.size) < len(loc.index):
            return None
        if any(not 0 <= i < n for i, n in zip(loc.index, md.size)):
            return None
        return tuple(md.size[len(loc.index) :])

    def dtype(self, loc: ShardedLocation) -> torch.dtype:
        return self._tensors[loc.key].properties.dtype

    def read(self, locations: Sequence[ShardedLocation]) -> list[torch.Tensor]:
        """Load the tensors at ``locations`` (stored dtype) in one DCP pass."""
        buffers: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
        out = []
        for loc in locations:
            shape = self.shape(loc)
            if shape is None:
                raise KeyError(f"{loc} is not in {self.path}")
            buf = torch.empty((1,) * len(loc.index) + shape, dtype=self.dtype(loc))
            offsets = loc.index + (0,) * len(shape)
            buffers.setdefault(loc.key, []).append((offsets, buf))
            out.append(buf.reshape(shape))
        with warnings.catch_warnings():
            # "torch.distributed is ... uninitialized, assuming ... a single process": intended.
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({}, storage_reader=self._reader, planner=_RegionPlanner(buffers), no_dist=True)
        return out


class _CachedMetadataReader(FileSystemReader):
    """Parses ``.metadata`` once; DCP asks for it again on every ``load``."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._metadata = None

    def read_metadata(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _RegionPlanner(DefaultLoadPlanner):
    """Reads rectangular regions of stored tensors into caller-owned buffers."""

    def __init__(self, regions: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]) -> None:
        super().__init__()
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, wanted in self.regions.items():
            stored = self.metadata.state_dict_metadata[key]
            for offsets, buf in wanted:
                chunk = ChunkStorageMetadata(torch.Size(offsets), buf.size())
                items += create_read_items_for_chunk_list(key, stored, [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        # dest_index.offset names the requested region; dest_offsets are relative to it.
        index = read_item.dest_index
        buf = next(b for o, b in self.regions[index.fqn] if torch.Size(o) == index.offset)
        return buf[
            tuple(slice(o, o + n) for o, n in zip(read_item.dest_offsets, read_item.lengths))
        ]

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        del read_item, tensor  # the data already sits in our buffer
