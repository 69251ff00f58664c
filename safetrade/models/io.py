"""Checkpoints in and out: HF safetensors directories and GGUF files -> params; params -> HF directory.

One table (`weight_specs`) names every weight three ways: our params path, the HF tensor name and the GGUF
tensor name, so both loaders and the exporter share a single mapping.

Loading streams one weight kind at a time: the L per-layer tensors of, say, `q_proj` are read (safetensors is
memory-mapped; GGUF is dequantised tensor by tensor), stacked on the host, placed on their target sharding with
`jax.make_array_from_callback` (each device copies only its own slice), and the host stack is dropped before the
next kind. Peak host memory is therefore one weight kind, never a second full copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from safetrade import hub, parallel
from safetrade.errors import MissingPathError, SafetradeError
from safetrade.models import llama
from safetrade.models.llama import LlamaConfig, Params

log = logging.getLogger(__name__)


class CheckpointError(SafetradeError):
    """A checkpoint is missing a tensor, has one of the wrong shape, or uses an unsupported encoding."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    path: tuple[str, ...]  # key path in our params tree
    hf: str  # HF tensor name; "{i}" is the layer index for stacked weights
    gguf: str  # GGUF tensor name; "{i}" likewise
    stacked: bool  # one tensor per layer, stacked on a leading [L] axis in params
    transpose: bool  # HF/GGUF store [out, in]; our kernels are [in, out]
    rope_permuted: str | None = None  # "q"/"k": llama.cpp permuted this tensor's rows for its RoPE layout


def weight_specs(cfg: LlamaConfig) -> list[WeightSpec]:
    specs = [WeightSpec(("embed", "embedding"), "model.embed_tokens.weight", "token_embd.weight", False, False)]
    for name in ("q", "k", "v", "o"):
        gguf_name = "output" if name == "o" else name
        specs.append(WeightSpec(("blocks", "attn", f"{name}_proj", "kernel"), f"model.layers.{{i}}.self_attn.{name}_proj.weight",
                                f"blk.{{i}}.attn_{gguf_name}.weight", True, True,
                                name if name in ("q", "k") else None))
        if cfg.attention_bias and name != "o":
            specs.append(WeightSpec(("blocks", "attn", f"{name}_proj", "bias"), f"model.layers.{{i}}.self_attn.{name}_proj.bias",
                                    f"blk.{{i}}.attn_{gguf_name}.bias", True, False,
                                    name if name in ("q", "k") else None))
    for name in ("gate", "up", "down"):
        specs.append(WeightSpec(("blocks", "mlp", f"{name}_proj", "kernel"), f"model.layers.{{i}}.mlp.{name}_proj.weight",
                                f"blk.{{i}}.ffn_{name}.weight", True, True))
    specs += [
        WeightSpec(("blocks", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight",
                   "blk.{i}.attn_norm.weight", True, False),
        WeightSpec(("blocks", "mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight",
                   "blk.{i}.ffn_norm.weight", True, False),
        WeightSpec(("final_norm", "scale"), "model.norm.weight", "output_norm.weight", False, False),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec(("lm_head", "kernel"), "lm_head.weight", "output.weight", False, True))
    return specs


def tree_get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def tree_set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------------------------------------------
# Readers: name -> numpy array in the HF layout ([out, in] for matrices)


class SafetensorsReader:
    """Tensors of an HF directory: model.safetensors, or shards listed in model.safetensors.index.json."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / "model.safetensors").exists():
            files, weight_map = ["model.safetensors"], None
        else:
            found = sorted(p.name for p in directory.iterdir())
            raise MissingPathError(
                f"{directory}: no model.safetensors or model.safetensors.index.json (found: {', '.join(found)}); "
                "only safetensors checkpoints are read (never pickles)"
            )
        self.where = str(directory)
        self._handles = {}
        self._location = {}
        for name in files:
            path = directory / name
            if not path.exists():
                raise MissingPathError(f"{index}: lists shard {name}, which does not exist in {directory}")
            handle = safe_open(str(path), framework="numpy")
            self._handles[name] = handle
            for key in handle.keys():
                self._location[key] = name

    def names(self) -> set[str]:
        return set(self._location)

    def get(self, name: str) -> np.ndarray:
        if name not in self._location:
            raise CheckpointError(f"{self.where}: tensor {name!r} is missing")
        return self._handles[self._location[name]].get_tensor(name)


class GGUFTensorReader:
    """Tensors of a GGUF file, dequantised to float32 on demand, Q/K rows restored to the HF layout."""

    def __init__(self, path: Path, reader, cfg: LlamaConfig | None = None):
        self.where = str(path)
        self._tensors = {t.name: t for t in reader.tensors}
        self.cfg = cfg

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str, undo_rope_permutation: str | None = None) -> np.ndarray:
        import gguf

        tensor = self._tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"{self.where}: tensor {name!r} is missing")
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise CheckpointError(
                f"{self.where}: tensor {name!r} uses GGML type {tensor.tensor_type.name}, which cannot be "
                f"dequantised ({err}); supported: {', '.join(supported_gguf_types())}"
            ) from None
        array = np.asarray(array, dtype=np.float32)
        if undo_rope_permutation and self.cfg is not None and self.cfg.family == "llama":
            heads = self.cfg.num_heads if undo_rope_permutation == "q" else self.cfg.num_kv_heads
            array = unpermute_rope_rows(array, heads)
        return array


def supported_gguf_types() -> list[str]:
    import gguf

    supported = []
    for qtype in gguf.GGMLQuantizationType:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros(type_size, np.uint8), qtype)
        except NotImplementedError:
            continue
        except Exception:  # a real decoder that dislikes zero bytes is still a decoder
            pass
        supported.append(qtype.name)
    return supported


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of q/k rows (its RoPE pairs adjacent rows; HF pairs the halves).

    llama.cpp's `LlamaModel.permute` reshapes rows to (head, 2, half) and swaps the last two; the inverse is
    (head, half, 2) -> swap. Rows are axis 0 of the [out, in] matrix (or of a bias vector).
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def place(host: np.ndarray, sharding) -> jax.Array:
    """A host array onto `sharding` (each device copies only its slice), or onto the default device."""
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _assemble(cfg: LlamaConfig, spec: WeightSpec, fetch: Callable[[str, WeightSpec], np.ndarray],
              expected_shape: tuple[int, ...], dtype, where: str) -> np.ndarray:
    """Read one weight kind (all layers for a stacked one) into a host array in our layout and dtype."""
    layer_shape = expected_shape[1:] if spec.stacked else expected_shape
    out = np.empty(expected_shape, dtype=dtype)
    for i in range(cfg.num_layers) if spec.stacked else [None]:
        array = fetch(i, spec)
        if spec.transpose:
            array = array.T
        if array.shape != layer_shape:
            name = _source_name(spec, i, where)
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(array.shape)[::-1] if spec.transpose else array.shape}"
                f", but the config implies {layer_shape[::-1] if spec.transpose else layer_shape}"
                " (check hidden_size / num_heads / num_key_value_heads / intermediate_size / vocab_size)"
            )
        if spec.stacked:
            out[i] = array
        else:
            out[...] = array
    return out


def _source_name(spec: WeightSpec, i, where: str) -> str:
    template = spec.gguf if where.endswith(".gguf") else spec.hf
    return template.format(i=i) if i is not None else template


def _load(cfg: LlamaConfig, fetch, where: str, mesh: Mesh | None) -> Params:
    abstract = llama.abstract_params(cfg)
    shardings = None
    if mesh is not None:
        shardings = parallel.param_shardings(llama.logical_axes(cfg), abstract, mesh)
    params: dict[str, Any] = {}
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    for spec in weight_specs(cfg):
        target = tree_get(abstract, spec.path)
        host = _assemble(cfg, spec, fetch, tuple(target.shape), dtype, where)
        tree_set(params, spec.path, place(host, None if shardings is None else tree_get(shardings, spec.path)))
        del host
    return params


# Backends where dtype="auto" computes in bfloat16 (their matmul units are built for it; the float32 master weights
# keep the optimizer exact). Everywhere else, the CPU above all, it is float32: bf16 matmuls are emulated there,
# slower than float32, and the golden and parity tests are float32.
BF16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def resolve_dtypes(dtype: str = "auto", param_dtype: str = "float32", backend: str | None = None) -> tuple[str, str]:
    """(compute dtype, param dtype) with "auto" resolved for `backend` (default: jax.default_backend()).

    Compute "auto": bfloat16 on gpu/tpu, float32 on cpu. Params "auto": float32 on every backend (masters). Any other
    value is returned as given (LlamaConfig validates it). Every loader resolves through here, so the train, evaluate,
    safedelta, sqsd and generate commands pick the same dtypes on the same machine.
    """
    if "auto" in (dtype, param_dtype):
        backend = backend or jax.default_backend()
    if dtype == "auto":
        dtype = "bfloat16" if backend in BF16_BACKENDS else "float32"
    if param_dtype == "auto":
        param_dtype = "float32"
    return dtype, param_dtype


def _resolved_overrides(config_overrides: dict) -> dict:
    """The loaders' config overrides with dtype / param_dtype "auto" resolved (resolve_dtypes)."""
    if "auto" not in (config_overrides.get("dtype"), config_overrides.get("param_dtype")):
        return config_overrides
    dtype, param_dtype = resolve_dtypes(config_overrides.get("dtype", "float32"),
                                        config_overrides.get("param_dtype", "float32"))
    return {**config_overrides, "dtype": dtype, "param_dtype": param_dtype}


def load_hf(directory: str | os.PathLike, *, mesh: Mesh | None = None, **config_overrides) -> tuple[LlamaConfig, Params]:
    """Load an HF safetensors directory (single file or sharded index) onto `mesh` (or the default device).

    `config_overrides` replace LlamaConfig fields; dtype / param_dtype may be "auto" (resolve_dtypes). Without
    them the config's float32 defaults hold.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise MissingPathError(f"{config_path} not found; an HF model directory needs config.json + safetensors")
    config_overrides = _resolved_overrides(config_overrides)
    cfg = llama.config_from_hf(json.loads(config_path.read_text()), where=str(config_path), **config_overrides)
    reader = SafetensorsReader(directory)
    expected = {spec.hf.format(i=i) for spec in weight_specs(cfg) for i in range(cfg.num_layers)}
    ignored = sorted(n for n in reader.names() - expected if not n.endswith("rotary_emb.inv_freq"))
    if ignored:
        raise CheckpointError(
            f"{directory}: tensors not used by a {cfg.family} model: {', '.join(ignored[:5])}"
            f"{' …' if len(ignored) > 5 else ''} (is config.json right, e.g. tie_word_embeddings?)"
        )

    def fetch(i, spec):
        return reader.get(spec.hf.format(i=i))

    return cfg, _load(cfg, fetch, str(directory), mesh)


def load_gguf(path: str | os.PathLike, *, mesh: Mesh | None = None, undo_rope_permutation: bool = True,
              **config_overrides) -> tuple[LlamaConfig, Params]:
    """Load a GGUF file (any quantisation `gguf` can dequantise) as float32-or-`param_dtype` params.

    `undo_rope_permutation=False` exists only to demonstrate, in a test, that skipping it breaks the model.
    dtype / param_dtype overrides may be "auto" (resolve_dtypes), as in load_hf.
    """
    from safetrade.models.gguf_meta import read_gguf  # imports gguf, absent where only HF safetensors are used

    config_overrides = _resolved_overrides(config_overrides)
    path = Path(path)
    reader, meta = read_gguf(path)
    tensors = GGUFTensorReader(path, reader)
    cfg = llama.config_from_gguf(meta, str(path), tied="output.weight" not in tensors.names(), **config_overrides)
    tensors.cfg = cfg

    def fetch(i, spec):
        name = spec.gguf.format(i=i)
        return tensors.get(name, spec.rope_permuted if undo_rope_permutation else None)

    return cfg, _load(cfg, fetch, str(path), mesh)


def load_model(source: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str = "auto",
               param_dtype: str = "float32", **config_overrides) -> tuple[LlamaConfig, Params]:
    """A model name, GGUF file or HF directory -> (config, params).

    The compute dtype defaults to "auto" (resolve_dtypes: bfloat16 on gpu/tpu, float32 on cpu), with float32
    params: the one default every command that loads a model by name shares.
    """
    config_overrides = {**config_overrides, "dtype": dtype, "param_dtype": param_dtype}
    path = hub.resolve_model(str(source))
    if path.is_dir():
        return load_hf(path, mesh=mesh, **config_overrides)
    if path.suffix == ".gguf":
        return load_gguf(path, mesh=mesh, **config_overrides)
    raise SafetradeError(f"{path}: not a .gguf file or an HF directory with config.json + safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Export


def _hf_tensors(cfg: LlamaConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in HF layout) for every weight, gathered to the host one weight kind at a time."""
    for spec in weight_specs(cfg):
        host = np.asarray(jax.device_get(gather_to_host(tree_get(params, spec.path))))
        for i in range(cfg.num_layers) if spec.stacked else [None]:
            array = host[i] if spec.stacked else host
            yield spec.hf.format(i=i), np.ascontiguousarray(array.T if spec.transpose else array)


def gather_to_host(x: jax.Array) -> jax.Array:
    """The whole array on every process (an all-gather when it spans several hosts; else unchanged)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return x


def save_hf(directory: str | os.PathLike, cfg: LlamaConfig, params: Params, tokenizer=None,
            max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write config.json + safetensors (sharded with an index above `max_shard_bytes`) + tokenizer files.

    The result loads with transformers' AutoModelForCausalLM and with `load_hf`. On several hosts every process
    takes part in the gathers, and process 0 writes.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    writer = jax.process_index() == 0
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(llama.config_to_hf(cfg), indent=2) + "\n")
    # Plan the shards from shapes alone, then stream: each shard is written as soon as it is full, so the host
    # never holds more than one shard plus one weight kind.
    itemsize = np.dtype(jax.numpy.dtype(cfg.param_dtype)).itemsize
    plan: list[list[str]] = [[]]
    size = total = 0
    for spec in weight_specs(cfg):
        shape = tree_get(params, spec.path).shape
        nbytes = int(np.prod(shape[1:] if spec.stacked else shape)) * itemsize
        for i in range(cfg.num_layers) if spec.stacked else [None]:
            if size and size + nbytes > max_shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append(spec.hf.format(i=i))
            size += nbytes
            total += nbytes
    files = (["model.safetensors"] if len(plan) == 1
             else [f"model-{k:05d}-of-{len(plan):05d}.safetensors" for k in range(1, len(plan) + 1)])
    shard_of = {name: k for k, names in enumerate(plan) for name in names}
    current: dict[str, np.ndarray] = {}
    for name, array in _hf_tensors(cfg, params):
        current[name] = array
        k = shard_of[name]
        if len(current) == len(plan[k]):
            if writer:
                save_file(current, str(directory / files[k]), metadata={"format": "pt"})  # transformers wants "pt"
            current = {}
    if writer and len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: files[shard_of[n]] for n in shard_of}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if not writer:
        return directory
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
