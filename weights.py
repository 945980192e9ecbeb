"""
The one strict checkpoint loader (and writer) that vit.py, resampler.py, phi3.py and model.py share.

- Reads safetensors only (a single file, `model.safetensors`, or shards listed by
  `model.safetensors.index.json`); never unpickles anything a user downloaded.
- Finds Hub ids ("org/name") in the local Hugging Face cache; never downloads anything.
- Lazy: tensors are memory-mapped and read on first use, so a model built on the meta device and
  filled with `load_state_dict(assign=True)` never holds its weights twice.
- Writes the same layout back (`save_sharded`): shards of bounded size plus `model.safetensors.index.json`.
- Strict: every tensor a module expects must be taken by name with its shape checked, every tensor
  nobody takes must be explicitly skipped, and anything else is an error that names the key (and
  both shapes for a mismatch). Loaders never print-and-continue.
- Untrusted files: a malformed safetensors header, a config.json or index.json that is not JSON, and an
  index whose shard paths leave the checkpoint directory (`../x.safetensors`, absolute paths) are each a
  CheckpointError naming the file; a config's layer count must match the layers the checkpoint holds
  (`check_layers`) before any module is built.
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or does not match the model (missing, unexpected or mis-shaped
    tensors, unreadable files): the message names the file or the key."""


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "org/name", as on the Hugging Face Hub


def resolve_dir(path):
    """A local checkpoint directory or file, or a Hub id ("org/name") found in the local Hugging Face cache."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if isinstance(path, str) and HUB_ID.fullmatch(path):
        return hub_snapshot(path)
    raise CheckpointError(f"{path}: no such file or directory (expected a local checkpoint "
                          "directory with config.json and *.safetensors, or a Hub id such as org/name)")


def hub_cache():
    """The Hugging Face hub cache directory, located the way huggingface_hub locates it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id, revision="main"):
    """The cached snapshot directory of a Hub model (this project never downloads anything itself)."""
    repo = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / revision
    snap = repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision)
    if not (snap / "config.json").is_file():
        raise CheckpointError(
            f"{repo_id}: not a local directory and not in the Hugging Face cache ({repo}); download it first "
            f"with `pip install huggingface_hub && hf download {repo_id}` (then pass the same id), or pass "
            "the path of a local copy")
    return snap


def read_config(path, name="config.json"):
    """config.json of a checkpoint directory as a dict."""
    d = resolve_dir(path)
    if not d.is_dir():
        raise CheckpointError(f"{path}: a file; pass the checkpoint directory (with config.json and "
                              "*.safetensors) instead")
    f = d / name
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; a checkpoint directory needs its {name}")
    return read_json(f)


def read_json(f, error=CheckpointError):
    """A JSON object from a checkpoint's file; anything else (not JSON, not UTF-8, nested too deeply, not an
    object) is an `error` naming the file (tokenizer.py's files raise its TokenizerError)."""
    try:
        d = json.loads(Path(f).read_bytes())
    except (ValueError, RecursionError) as e:
        raise error(f"{f}: not a valid JSON file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(d, dict):
        raise error(f"{f}: expected a JSON object, found {type(d).__name__}")
    return d


class Checkpoint:
    """Every tensor of a safetensors checkpoint (file or directory, single or sharded), read lazily.

    Keys are taken by the component loaders with `take`, which checks the shape; keys the model does not
    use are named with `skip`; `finish` raises if anything was neither taken nor skipped.
    """

    def __init__(self, path, allow_outside=False):
        """`allow_outside`: follow index.json shard paths that leave the checkpoint directory (off: refused)."""
        path = resolve_dir(path)
        self.path = path
        self.where = {}  # key -> file that holds it
        for f in self._files(path, allow_outside):
            try:
                with safe_open(f, framework="pt") as h:
                    keys = list(h.keys())
            except (SafetensorError, OSError) as e:  # the header is checked whole here, before any tensor is read
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            for k in keys:
                if k in self.where:  # e.g. a stale model.safetensors beside newer shards
                    raise CheckpointError(f"{path}: tensor '{k}' is in both {self.where[k].name} and {f.name}")
                self.where[k] = f
        self.handles = {}
        self.used = set()

    @staticmethod
    def _files(path, allow_outside=False):
        if path.is_file():
            return [path]
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
            for v in weight_map.values():
                if not allow_outside and (os.path.isabs(v) or ".." in Path(v).parts):
                    raise CheckpointError(f"{index} lists shard {v[:200]!r}, outside the checkpoint directory "
                                          f"{path}: refused (a checkpoint's shards live in its own directory)")
            files = sorted({path / v for v in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index} lists shard {f.name}, which is missing from {path}")
            return files
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
            hint = (f" (found {', '.join(pickles)}: pickled weights are not loaded; convert them to safetensors "
                    "with a trusted copy of the model)") if pickles else ""
            raise CheckpointError(f"{path}: no *.safetensors files{hint}")
        return files

    def keys(self, prefix=""):
        return [k for k in self.where if k.startswith(prefix)]

    def __contains__(self, key):
        return key in self.where

    def shape(self, key):
        return tuple(self._handle(self.where[key]).get_slice(key).get_shape())

    def _handle(self, f):
        if f not in self.handles:
            self.handles[f] = safe_open(f, framework="pt")
        return self.handles[f]

    def take(self, key, shape=None):
        """The tensor stored under `key`, its shape checked against `shape` (a tuple) when given."""
        if key not in self.where:
            raise CheckpointError(f"{self.path}: missing tensor '{key}'"
                                  + (f" (expected shape {tuple(shape)})" if shape is not None else ""))
        if shape is not None and self.shape(key) != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor '{key}' has shape {self.shape(key)}, "
                                  f"the model expects {tuple(shape)}")
        self.used.add(key)
        return self._handle(self.where[key]).get_tensor(key)

    def skip(self, pattern):
        """Mark every key matching the regex `pattern` (re.match) as known and deliberately unused."""
        rx = re.compile(pattern)
        self.used.update(k for k in self.where if rx.match(k))

    def finish(self, prefix=""):
        """Raise if any key under `prefix` was neither taken nor skipped."""
        left = sorted(k for k in self.where if k.startswith(prefix) and k not in self.used)
        if left:
            shown = ", ".join(f"'{k}' {self.shape(k)}" for k in left[:8])
            more = f" and {len(left) - 8} more" if len(left) > 8 else ""
            raise CheckpointError(f"{self.path}: unexpected tensor(s) the model has no place for: {shown}{more}")


def check_layers(ckpt, prefix, n, field):
    """The config's layer count `n` (config field `field`) against the layers `{prefix}{i}.` the checkpoint
    holds, before a module is built: a config claiming 20,000 layers must not build 20,000 meta modules
    (tens of seconds, hundreds of MB) before the first missing key is noticed."""
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in ckpt.where if (m := rx.match(k))}
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or found != set(range(n)):
        have = f"layers 0-{max(found)}" if found and found == set(range(max(found) + 1)) else f"{len(found)} layers"
        raise CheckpointError(f"{ckpt.path}: config.json says {field} = {n!r}, but the checkpoint holds {have} "
                              f"under {prefix}")


def load_model(ckpt, build, convert, dtype=None, device=None, prefix="", scope=""):
    """Every loader's skeleton: build the module on the meta device (no memory, no initialisation), convert the
    checkpoint's tensors under `prefix` into its state dict (`convert(ckpt, module, prefix)`, the one converter
    signature: names and shapes checked), refuse any tensor under `scope` that nobody took ('' = every tensor
    of the checkpoint), and assign the tensors as the module's parameters."""
    with torch.device("meta"):
        module = build()
    state = convert(ckpt, module, prefix)
    ckpt.finish(scope)
    return assign(module, state, resolve_dtype(dtype), device).eval()


def take_module(ckpt, module, prefix, names=None):
    """Take `prefix + name` for every tensor of `module` whose checkpoint name equals ours.

    Returns {our name: tensor}. `names` maps our name -> checkpoint name where they differ.
    """
    names = names or {}
    return {k: ckpt.take(prefix + names.get(k, k), v.shape) for k, v in module.state_dict().items()}


def assign(module, state, dtype=None, device=None):
    """Fill a (meta-device) module from `state` without copying more than a dtype/device change needs.

    `state` must hold exactly the module's state_dict keys with equal shapes (the Checkpoint already
    checked names and shapes against the file; this guards the converter itself).
    """
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"{type(module).__name__}: converter produced missing {missing} / unexpected {extra}")
    out = {}
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{type(module).__name__}.{k}: shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")
        want = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        out[k] = t.to(device=device or "cpu", dtype=want)
    module.load_state_dict(out, strict=True, assign=True)
    return module


def resolve_dtype(dtype):
    """'float32' | 'bfloat16' | 'float16' | torch.dtype | None -> torch.dtype | None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def save_sharded(state, path, max_shard_size=5 * 2**30):
    """Write `state` ({name: tensor}) as safetensors shards of at most `max_shard_size` bytes, plus the index.

    One shard is written as `model.safetensors` with no index, as Hugging Face does. Old weight files in
    `path` are removed first, so no stale shard is ever read with the new ones.
    """
    for f in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
    shards, size = [{}], 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k], size = t, size + nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):  # own contiguous CPU copies: views (q/k/v, decoupled rows) share storage
        save_file({k: torch.empty(t.shape, dtype=t.dtype).copy_(t) for k, t in shard.items()}, path / name,
                  metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
