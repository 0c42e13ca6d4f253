"""Weight transport to a machine that takes at most 64 MiB of files per call: a file split into parts with a
sha256 manifest, each part sent in its own call, then reassembled and checked there before anything trains.

    python -m rim.campaign.transport split FILE OUT_DIR [--parts 2]   # here: OUT_DIR/part1/, OUT_DIR/part2/, ...
    python -m rim.campaign.transport stash PART_DIR STASH_DIR         # there, call 1: keep part 1 outside the checkout
    python -m rim.campaign.transport assemble OUT_FILE DIR [DIR ...]  # there, call 2: parts from the stash and the
                                                                      # checkout, checked against the manifest

Every part folder holds ``manifest.json`` (file name, size, sha256 of the whole file and of every part), so any
one folder says what the whole must be. A part that is missing, truncated or corrupted is a ``TransportError``
that names it; the reassembled file is written under a temporary name and moved into place only once its
checksum matches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

MANIFEST = "manifest.json"
CHUNK = 1 << 20  # bytes read at a time while hashing and copying


class TransportError(RuntimeError):
    """A part is missing or does not match the manifest; the message names it and what to do."""


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def split_file(src: str | os.PathLike, out_dir: str | os.PathLike, parts: int = 2) -> dict:
    """Split ``src`` into ``parts`` nearly equal pieces: ``out_dir/part<i>/<name>.part<i>`` plus the manifest in
    every part folder. Returns the manifest."""
    src, out_dir = Path(src), Path(out_dir)
    if parts < 1:
        raise ValueError(f"parts must be >= 1, not {parts}")
    size = src.stat().st_size
    step = -(-size // parts)  # ceil: the last part takes the remainder
    entries = []
    with open(src, "rb") as f:
        for i in range(1, parts + 1):
            folder = out_dir / f"part{i}"
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            path = folder / f"{src.name}.part{i}"
            path.write_bytes(f.read(step))
            entries.append({"name": path.name, "folder": folder.name, "size": path.stat().st_size,
                            "sha256": sha256(path)})
    manifest = {"file": src.name, "size": size, "sha256": sha256(src), "parts": entries}
    for entry in entries:
        (out_dir / entry["folder"] / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a part folder; a TransportError when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TransportError(f"{path}: no readable manifest ({err}); stage the parts again "
                             "(bench/gpu_stage.sh)") from None


def check_part(path: Path, entry: dict) -> None:
    """A part's size and sha256 against its manifest entry."""
    if path.stat().st_size != entry["size"]:
        raise TransportError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['size']} (truncated "
                             "in transfer?); send this part again")
    if sha256(path) != entry["sha256"]:
        raise TransportError(f"{path}: sha256 does not match the manifest (corrupted); send this part again")


def stash(part_dir: str | os.PathLike, stash_dir: str | os.PathLike) -> list[Path]:
    """Copy a part folder's parts (checked) and manifest into ``stash_dir``, outside the checkout, where they
    survive until the next call on the same warm machine. Returns the stashed parts."""
    part_dir, stash_dir = Path(part_dir), Path(stash_dir)
    manifest = read_manifest(part_dir)
    stash_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for entry in manifest["parts"]:
        path = part_dir / entry["name"]
        if path.is_file():
            check_part(path, entry)
            shutil.copyfile(path, stash_dir / entry["name"])
            copied.append(stash_dir / entry["name"])
    if not copied:
        raise TransportError(f"{part_dir}: holds no part named in its manifest")
    shutil.copyfile(part_dir / MANIFEST, stash_dir / MANIFEST)
    return copied


def find_part(entry: dict, dirs: list[Path]) -> Path:
    """The first folder of ``dirs`` that holds the part (the stash first, then the checkout's part folders)."""
    for folder in dirs:
        if (folder / entry["name"]).is_file():
            return folder / entry["name"]
    raise TransportError(f"part {entry['name']} is in none of {[str(d) for d in dirs]}: the call that carries it "
                         "did not run on this machine (a fresh machine forgets the stash); run that call again")


def assemble(out_file: str | os.PathLike, dirs: list[str | os.PathLike]) -> Path:
    """Reassemble the parts found in ``dirs`` into ``out_file``; every part and the whole are checked against the
    manifest (read from the first folder that has one). An existing ``out_file`` with the right checksum is kept."""
    out_file, folders = Path(out_file), [Path(d) for d in dirs]
    manifest = next((read_manifest(d) for d in folders if (d / MANIFEST).is_file()), None)
    if manifest is None:
        raise TransportError(f"no {MANIFEST} in any of {[str(d) for d in folders]}")
    if out_file.is_file() and out_file.stat().st_size == manifest["size"] and sha256(out_file) == manifest["sha256"]:
        return out_file
    parts = [find_part(entry, folders) for entry in manifest["parts"]]
    for path, entry in zip(parts, manifest["parts"]):
        check_part(path, entry)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    with open(tmp, "wb") as out:
        for path in parts:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, CHUNK)
    if sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise TransportError(f"{out_file}: the reassembled file's sha256 does not match the manifest; stage again")
    os.replace(tmp, out_file)
    return out_file


def main(argv: list[str] | None = None) -> int:
    """``split`` / ``stash`` / ``assemble`` (see the module docstring); a TransportError exits with status 2."""
    parser = argparse.ArgumentParser(prog="python -m rim.campaign.transport", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("split", help="split FILE into OUT_DIR/part<i>/ with a manifest")
    p.add_argument("file")
    p.add_argument("out_dir")
    p.add_argument("--parts", type=int, default=2)
    p = sub.add_parser("stash", help="copy a part folder's checked parts outside the checkout")
    p.add_argument("part_dir")
    p.add_argument("stash_dir")
    p = sub.add_parser("assemble", help="reassemble OUT_FILE from the parts in DIRs and check it")
    p.add_argument("out_file")
    p.add_argument("dirs", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.verb == "split":
            manifest = split_file(args.file, args.out_dir, args.parts)
            print(json.dumps(manifest, indent=2))
        elif args.verb == "stash":
            print("stashed:", *stash(args.part_dir, args.stash_dir))
        else:
            print("assembled and verified:", assemble(args.out_file, args.dirs))
    except TransportError as err:
        print(f"transport: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
