"""llama.cpp: an exported rim model (``rim export``) converted to GGUF by llama.cpp's own converter.

    rim export RUN OUT --gguf f16        # OUT/model-f16.gguf beside the Hugging Face files
    # then, in llama.cpp (or anything built on it), the prompt is question + K blocks, decoded greedily

The converter is ``convert_hf_to_gguf.py`` with its ``conversion/`` package and ``gguf-py``, from the llama.cpp
source that ``llama-cpp-python`` vendors (it is not in the installed wheel). It is found in ``RIM_LLAMA_CPP_DIR``
(a llama.cpp checkout) or else unpacked once from the source distribution of the installed ``llama-cpp-python``
version (``pip download``; pip's cache answers where that same sdist was built) into ``~/.cache/rim``. So the
GGUF is written by the converter of the llama.cpp that will read it.

The memory tokens (``<b> <m> </b>``, ``<pause>``, ...) are added tokens of the exported tokenizer; the converter
keeps them as the GGUF vocabulary's added (user-defined or control) tokens at the same ids, which ``convert``
checks after writing. Models with rim's tiny word-level tokenizer cannot be converted: llama.cpp has no such
tokenizer type.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from rim.config import ConfigError
from rim.integrations.exported import read_meta

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # what the converter needs of the llama.cpp tree


def cache_root() -> Path:
    """Where unpacked converters are kept: ``$XDG_CACHE_HOME/rim`` or ``~/.cache/rim``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rim"


def converter_source() -> Path:
    """The llama.cpp source folder with ``convert_hf_to_gguf.py``: ``RIM_LLAMA_CPP_DIR``, or the one vendored by the
    installed ``llama-cpp-python`` (unpacked from its sdist on first use)."""
    given = os.environ.get("RIM_LLAMA_CPP_DIR")
    if given:
        if not (Path(given) / "convert_hf_to_gguf.py").is_file():
            raise ConfigError(f"RIM_LLAMA_CPP_DIR={given}: no convert_hf_to_gguf.py there (want a llama.cpp checkout)")
        return Path(given)
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("llama-cpp-python is not installed: pip install -e '.[llamacpp]' (builds llama.cpp from "
                          "source), or set RIM_LLAMA_CPP_DIR to a llama.cpp checkout") from None
    target = cache_root() / f"llama.cpp-{version}"
    if not (target / ".complete").is_file():
        unpack_sdist(version, target)
    return target


def unpack_sdist(version: str, target: Path) -> None:
    """Fetch the ``llama-cpp-python==version`` sdist with pip and unpack the converter's parts into ``target``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               f"llama-cpp-python=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode or not sdists:
            raise ConfigError(f"could not fetch the llama-cpp-python {version} source to find llama.cpp's converter "
                              f"({done.stderr.strip()[-400:]}); set RIM_LLAMA_CPP_DIR to a llama.cpp checkout")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/", 3)  # llama_cpp_python-V / vendor / llama.cpp / path
                if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and parts[3].startswith(PARTS):
                    member.name = parts[3]
                    tar.extract(member, target, filter="data")
    if not (target / "convert_hf_to_gguf.py").is_file():
        raise ConfigError(f"llama-cpp-python {version}'s source has no vendor/llama.cpp/convert_hf_to_gguf.py")
    (target / ".complete").write_text(version + "\n", encoding="utf-8")


def convert(export_dir: str | Path, outtype: str = "f32", outfile: str | Path | None = None,
            source: str | Path | None = None) -> Path:
    """Write ``export_dir/model-<outtype>.gguf`` (or ``outfile``) with llama.cpp's converter, and check that the
    method's tokens are in its vocabulary at their exported ids. ``source``: a llama.cpp tree (default:
    ``converter_source()``)."""
    export_dir = Path(export_dir)
    meta = read_meta(export_dir)
    if outtype not in OUTTYPES:
        raise ConfigError(f"--gguf must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    out = Path(outfile) if outfile is not None else export_dir / f"model-{outtype}.gguf"
    src = Path(source) if source is not None else converter_source()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src / "gguf-py"),
                                                                     os.environ.get("PYTHONPATH")])))
    # the converter imports its `conversion` package from beside itself, and gguf-py must win over any other gguf
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(export_dir), "--outfile", str(out),
           "--outtype", outtype]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise ConfigError(f"llama.cpp's converter failed on {export_dir}:\n{done.stderr.strip()[-2000:]}")
    check_tokens(out, export_dir, meta)
    return out


def check_tokens(gguf_path: Path, export_dir: Path, meta: dict) -> None:
    """The GGUF's vocabulary holds the exported suffix's tokens at the same ids, as added tokens (not normal
    pieces that a tokenizer could split or merge)."""
    from gguf import GGUFReader, TokenType
    from transformers import AutoTokenizer

    reader = GGUFReader(gguf_path)
    tokens, types = (reader.fields[f"tokenizer.ggml.{key}"] for key in ("tokens", "token_type"))
    tok = AutoTokenizer.from_pretrained(export_dir)
    for token_id in sorted(set(meta["prompt_suffix_ids"])):
        name = tok.convert_ids_to_tokens(token_id)
        text = bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8")
        kind = int(types.parts[types.data[token_id]][0])
        if text != name or kind not in (TokenType.USER_DEFINED, TokenType.CONTROL):
            raise ConfigError(f"{gguf_path}: token {token_id} is {text!r} of type {TokenType(kind).name}, not the "
                              f"added token {name!r}")
