"""Read the model weights out of a `torch.distributed.checkpoint` folder (a ddp/fsdp run's checkpoint).

Such a folder holds `.metadata` and one `__R_0.distcp` shard per rank, with tensors saved by name under
"model." (weights) and "optim." (optimizer state). Reading needs no process group: every shard is read
and the tensors come back whole, so `lmforge.load` and `lmforge convert` take the folder as a model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lmforge.errors import FormatError

PREFIX = "model."


def is_dcp_folder(folder: str | Path) -> bool:
    """True when `folder` holds a distributed checkpoint (`.metadata`)."""
    return (Path(folder) / ".metadata").is_file()


def read_model_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The whole (unsharded) weights, keyed as the model names them, on the CPU."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    try:
        meta = reader.read_metadata()
    except Exception as e:  # a truncated or foreign .metadata
        raise FormatError(f"{folder}: cannot read the distributed checkpoint's .metadata ({e})") from e
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
           if k.startswith(PREFIX) and isinstance(m, TensorStorageMetadata)}
    if not out:
        raise FormatError(f"{folder}: the distributed checkpoint holds no model weights")
    try:
        with warnings.catch_warnings():  # "no process group: loading in one process" is the intent here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=reader, no_dist=True)
    except Exception as e:  # a shard missing or cut short
        raise FormatError(f"{folder}: cannot read the distributed checkpoint's shards ({e}); it is not whole") from e
    return {k[len(PREFIX):]: v for k, v in out.items()}
