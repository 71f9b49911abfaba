"""Opening a checkpoint, wherever it is, as one set of named tensors.

A source is a directory (with or without `model.safetensors.index.json`, or DeepSeek's
model-parallel `model{r}-mp{N}.safetensors`), a single `.safetensors` file, a torch state
dict (`.pt`/`.pth`/`.bin`), or a hub repo id (`org/name`, from the local cache or downloaded).
Opening reads headers and config.json only; tensor bytes are read on demand through mmap, so
one tensor costs its own size and never the file's.
"""

from __future__ import annotations

import copy
import mmap
import os
import re
import stat
from fnmatch import fnmatch
from itertools import repeat
from operator import contains
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from remap.errors import RemapError
from remap.heap import paused_gc
from remap.dtypes import DTYPES, safetensors_dtype
from remap.io.headers import DuplicateKey, TensorInfo, loads_unique, read_header
from remap.io.hub import download
from remap.io.textfiles import read_json

if TYPE_CHECKING:  # numpy is imported where tensors are read: opening a checkpoint reads headers only
    import numpy as np

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Files a converted checkpoint needs besides weights and config.json, copied as they are.
EXTRA_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
)
HUB_PATTERNS = ["*.safetensors", INDEX_NAME, CONFIG_NAME, "README.md", *EXTRA_FILE_PATTERNS]  # the card: its metadata
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_MODEL_PARALLEL = re.compile(r"model(\d+)-mp(\d+)\.safetensors")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class Checkpoint:
    """Named tensors of one source.

    `files` maps each file (relative to `root`) to its tensors in file order; `tensors` is their
    union. `ranks` > 1 marks DeepSeek model-parallel files, whose tensor names repeat across
    ranks: those are read per file here; remap.io.assembled reads them as whole tensors, placed
    as the layout that cut them says (remap.api.open_source does). `revision` is the resolved commit of a
    hub source. `extra_files` are tokenizer and generation files to copy to an output.
    """

    def __init__(
        self,
        source: str,
        root: Path,
        files: dict[str, dict[str, TensorInfo]],
        *,
        config: dict[str, Any] | None = None,
        extra_files: tuple[Path, ...] = (),
        revision: str | None = None,
        ranks: int = 1,
        torch_tensors: dict[str, Any] | None = None,
    ):
        self.source = source
        self.root = root
        self.files = files
        self.config = config
        self.extra_files = extra_files
        self.revision = revision
        self.ranks = ranks
        self._tensors: dict[str, TensorInfo] = {}
        for tensors in files.values():  # in C; a name in several files (model-parallel ranks) keeps the last
            self._tensors.update(tensors)
        self._torch_tensors = torch_tensors or {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self.files)} files, {len(self._tensors)} tensor names)"

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        if self.ranks > 1:
            raise RemapError(
                f"model-parallel checkpoint with {self.ranks} ranks: the same name is in several files",
                file=str(self.root),
                expected="per-rank access through Checkpoint.files, or remap.api.open_source for whole tensors",
            )
        return self._tensors

    def read(self, tensor: str | TensorInfo) -> np.ndarray:
        """The tensor as a read-only numpy array (bf16 and fp8 as ml_dtypes), sharing memory with
        the mapped file. It stays valid after close(): the mapping lives as long as the array."""
        import numpy as np

        info = self._info(tensor)
        dtype = DTYPES[info.dtype].numpy
        if dtype is None:
            raise RemapError(
                f"numpy has no packed {info.dtype} dtype", tensor=info.name, expected="read_bytes() for this tensor"
            )
        if info.start is None:
            return _torch_to_numpy(self._torch_tensors[info.name], dtype)
        if info.numel == 0:
            return np.empty(info.shape, dtype)
        return np.frombuffer(self._map(info.file), dtype, info.numel, info.start).reshape(info.shape)

    def load(self, tensor: str | TensorInfo) -> np.ndarray:
        """A private, writable copy of the tensor. Unlike read(), its memory goes away with the
        array: a conversion that loads one tensor at a time keeps its resident memory at one
        tensor, where pages of a whole-file mapping would pile up. A copy-on-write mapping of the
        tensor's own pages, so reading it neither copies the page cache nor zeroes fresh memory
        (with pread both were a third of quantizing's CPU); a page is copied only if written."""
        import numpy as np

        from remap.io.pages import private_pages  # (here: planning needs no ctypes)

        info = self._info(tensor)
        if info.start is None or info.numel == 0:
            return np.array(self.read(info))
        begin = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        with open(info.file, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size < info.end:  # (a mapping past the end would fault, not fail)
                raise RemapError("file ended inside the tensor", file=str(info.file), tensor=info.name)
            pages = private_pages(f.fileno(), begin, info.end - begin)
        return np.frombuffer(pages, DTYPES[info.dtype].numpy, info.numel, info.start - begin).reshape(info.shape)

    def read_bytes(self, tensor: str | TensorInfo) -> memoryview:
        """The tensor's raw little-endian bytes, for tensors that move without being decoded."""
        import numpy as np

        info = self._info(tensor)
        if info.start is None:
            array = _torch_to_numpy(self._torch_tensors[info.name], DTYPES[info.dtype].numpy)
            return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        return memoryview(self._map(info.file))[info.start : info.end]

    def with_config(self, config: dict[str, Any]) -> Checkpoint:
        """The same tensors (and open files) under another config.json: the one a layout inferred
        from the shapes, or the given one with --set overrides."""
        other = copy.copy(self)
        other.config = config
        return other

    def close(self) -> None:
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:
                pass  # arrays from read() still use it; it is unmapped when the last one goes
        self._maps.clear()
        self._torch_tensors.clear()
        self._closed = True

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _info(self, tensor: str | TensorInfo) -> TensorInfo:
        if self._closed:
            raise ValueError("checkpoint is closed")
        if isinstance(tensor, TensorInfo):
            return tensor
        try:
            return self.tensors[tensor]
        except KeyError:
            raise RemapError("no such tensor in the checkpoint", file=self.source, tensor=tensor) from None

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]


@paused_gc  # headers of a whole model pile up ~1M acyclic objects: collections cost ~40% of an open
def open_checkpoint(
    src: str | os.PathLike, *, revision: str | None = None, allow_pickle: bool = False
) -> Checkpoint:
    """Open `src` (directory, .safetensors file, torch state dict, or hub repo id).

    `revision` (branch, tag or commit) applies to hub ids only. `allow_pickle` lets a torch file
    hold arbitrary Python objects, which runs their pickle code: only for files you trust.
    """
    src = os.fspath(src)
    path = Path(src).expanduser()
    if path.exists():
        if revision is not None:
            raise RemapError("a revision applies only to hub repo ids", file=src, expected="no revision for a path")
        if path.is_dir():
            return _open_directory(src, path)
        if path.suffix == ".safetensors":
            tensors, _ = read_header(path)
            return _checkpoint(src, path.parent, {path.name: tensors})
        if path.suffix in TORCH_SUFFIXES:
            return _open_torch(src, path, allow_pickle)
        raise RemapError(
            "unsupported file type", file=src, expected="a directory, .safetensors, " + ", ".join(TORCH_SUFFIXES)
        )
    if _REPO_ID.fullmatch(src):
        root, commit = download(src, revision, HUB_PATTERNS)
        return _open_directory(src, root, revision=commit)
    raise RemapError("no such file or directory", file=src, expected="a local path or a hub repo id 'org/name'")


def _checkpoint(src: str, root: Path, files: dict[str, dict[str, TensorInfo]], **details: Any) -> Checkpoint:
    """A Checkpoint with the config.json and extra files found beside its weights."""
    return Checkpoint(
        src,
        root,
        files,
        config=_read_json_object(root / CONFIG_NAME) if (root / CONFIG_NAME).exists() else None,
        extra_files=tuple(
            sorted(p for p in root.iterdir() if any(fnmatch(p.name, x) for x in EXTRA_FILE_PATTERNS) and p.is_file())
        ),
        **details,
    )


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        config = read_json(path, "index" if path.name == INDEX_NAME else "config", loads=loads_unique)
    except DuplicateKey as e:
        raise RemapError(f"names '{e}' twice", file=str(path), expected="each key once") from None
    if not isinstance(config, dict):
        raise RemapError(f"is a JSON {type(config).__name__}", file=str(path), expected="a JSON object")
    return config


def _open_directory(src: str, root: Path, *, revision: str | None = None) -> Checkpoint:
    if (root / INDEX_NAME).exists():
        return _checkpoint(src, root, _files_from_index(root), revision=revision)
    names = sorted(p.name for p in root.glob("*.safetensors"))
    if not names:
        raise RemapError(f"no *.safetensors files and no {INDEX_NAME}", file=str(root), expected="a checkpoint directory")
    files = {name: read_header(root / name)[0] for name in names}
    ranks = _model_parallel_ranks(names, root)
    if ranks == 1:
        _reject_repeated_names(files, root)
    return _checkpoint(src, root, files, revision=revision, ranks=ranks)


def _model_parallel_ranks(names: list[str], root: Path) -> int:
    """N for a complete set of DeepSeek `model{r}-mp{N}.safetensors` files, else 1."""
    matches = [_MODEL_PARALLEL.fullmatch(name) for name in names]
    if not all(matches):
        return 1
    worlds = {int(m.group(2)) for m in matches}
    ranks = max(worlds)
    if len(worlds) != 1 or sorted(int(m.group(1)) for m in matches) != list(range(ranks)):
        raise RemapError(
            "model-parallel files do not form one complete set: " + ", ".join(names),
            file=str(root),
            expected="model0-mpN.safetensors ... model{N-1}-mpN.safetensors",
        )
    return ranks


def _reject_repeated_names(files: dict[str, dict[str, TensorInfo]], root: Path) -> None:
    seen: dict[str, str] = {}
    for file, tensors in files.items():
        for name in tensors:
            if name in seen:
                raise RemapError(
                    f"stored in both {seen[name]} and {file}",
                    file=str(root),
                    tensor=name,
                    expected="each tensor in one file",
                )
            seen[name] = file


def _files_from_index(root: Path) -> dict[str, dict[str, TensorInfo]]:
    index_path = root / INDEX_NAME
    weight_map = _read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(map(isinstance, weight_map.values(), repeat(str))):
        raise RemapError("weight_map is missing or not a map of names to files", file=str(index_path),
                         expected='"weight_map": {"tensor name": "file name", ...}')

    # order: files by their first appearance in the index, tensors by offset within each file
    try:  # (no tensor named for an error: the pass that words it, below, names the first one)
        files = {file: read_header(_index_entry_path(root, file, "", index_path))[0]
                 for file in dict.fromkeys(weight_map.values())}
    except RemapError:
        files = None
    if files is None or not _stored_once_as_listed(weight_map, files):
        # A problem: found again tensor by tensor in index order, as the first one met is reported
        files = _files_checked_one_by_one(root, weight_map, index_path)
    return files


def _files_checked_one_by_one(root: Path, weight_map: dict[str, str], index_path: Path) -> dict[str, dict[str, TensorInfo]]:
    """What _files_from_index finds, raising for the first problem: a listed tensor (in the index's
    order), then a stored one (in file order). Loops in Python over every name (a tenth of
    DeepSeek-V3's open), so run only where a problem is known."""
    files: dict[str, dict[str, TensorInfo]] = {}
    for name, file in weight_map.items():
        if file not in files:
            files[file] = read_header(_index_entry_path(root, file, name, index_path))[0]
        if name not in files[file]:
            raise RemapError(f"the index puts it in {file}, which does not hold it", file=str(index_path), tensor=name,
                             expected="each tensor in the file the index names")
    for file, tensors in files.items():
        for name in tensors:
            listed_in = weight_map.get(name)
            if listed_in != file:
                listed = f"the index puts it in {listed_in}" if listed_in else "the index does not list it"
                raise RemapError(f"stored in {file} but {listed}", file=str(index_path), tensor=name,
                                 expected="each tensor in one file")
    return files


def _stored_once_as_listed(weight_map: dict[str, str], files: dict[str, dict[str, TensorInfo]]) -> bool:
    """Whether every stored tensor is in one file only, the one the index puts it in (`files` has
    each file the index names): each listed name is in its file, and the files hold no more
    tensors than the index lists. Lookups in C, 92k for DeepSeek-V3."""
    listed_held = map(contains, map(files.__getitem__, weight_map.values()), weight_map.keys())
    return sum(map(len, files.values())) == len(weight_map) and all(listed_held)


def _index_entry_path(root: Path, file: str, tensor: str, index_path: Path) -> Path:
    # Checked on the text, not by resolving: hub snapshots are symlinks into the blob store.
    relative = PurePosixPath(file)
    if relative.is_absolute() or ".." in relative.parts or "\\" in file or not relative.parts:
        raise RemapError(
            f"file name {file!r} points outside the checkpoint directory",
            file=str(index_path),
            tensor=tensor,
            expected="a file name relative to the checkpoint directory",
        )
    path = root / relative
    if not path.is_file():
        raise RemapError(f"the index names {file}, which does not exist", file=str(index_path), tensor=tensor,
                         expected="every file the index names, beside it")
    return path


def _open_torch(src: str, path: Path, allow_pickle: bool) -> Checkpoint:
    import pickle  # (here: only a torch source needs them)
    import zipfile

    import torch

    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block is_zipfile's open forever
        raise RemapError("is not a regular file (a directory, FIFO or device)", file=src,
                         expected="a state dict saved by torch.save")
    if not zipfile.is_zipfile(path):
        raise RemapError(
            "not a torch.save zip archive (corrupt, or the legacy pre-1.6 format)",
            file=src,
            expected="a state dict saved by torch.save",
        )
    try:
        # mmap: tensor bytes stay on disk until read
        state = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except pickle.UnpicklingError as e:
        raise RemapError(
            "holds Python objects besides tensors; loading them would run their pickle code",
            file=src,
            expected="a plain state dict (--allow-pickle only for a file you trust)",
        ) from e
    except RuntimeError as e:
        raise RemapError(f"torch cannot load it: {str(e).splitlines()[0]}", file=src) from e

    if not isinstance(state, dict):
        raise RemapError(f"holds a {type(state).__name__}", file=src, expected="a state dict: names mapped to tensors")
    infos: dict[str, TensorInfo] = {}
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise RemapError(
                f"holds a {type(tensor).__name__} under the key {name!r}",
                file=src,
                expected="a state dict: names mapped to tensors (save model.state_dict())",
            )
        dtype = safetensors_dtype(str(tensor.dtype))
        if dtype is None:
            raise RemapError(f"dtype {tensor.dtype} has no safetensors equivalent", file=src, tensor=name)
        infos[name] = TensorInfo(name, dtype, tuple(tensor.shape), path)
    tensors = {name: tensor.detach() for name, tensor in state.items()}
    return _checkpoint(src, path.parent, {path.name: infos}, torch_tensors=tensors)


def _torch_to_numpy(tensor: Any, dtype: np.dtype) -> np.ndarray:
    """A numpy view of a torch tensor, also for dtypes torch cannot hand to numpy (bf16, fp8):
    reinterpret as a same-width integer, then as the ml_dtypes type."""
    import torch

    same_width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.view(same_width).numpy().view(dtype)
