"""Split a file into numbered parts under a size limit, and join them back, checked by SHA-256.

    python tools/te_gpu/parts.py split FILE OUTDIR --max-mib 59 [--folders]
    python tools/te_gpu/parts.py join PARTS_DIR [PARTS_DIR ...] --output FILE [--name NAME]

``split`` writes ``NAME.partNNN`` files and ``NAME.manifest.json`` (size and SHA-256 of the file and of each part);
with ``--folders`` each part goes to its own folder ``OUTDIR/partNNN/`` (with a copy of the manifest), one folder per
device command (``run``'s ``carry``). ``join`` finds the parts and the manifest (of ``NAME`` where several files' parts lie together) under the folders, checks every
part and the result, and writes the file atomically; a missing or corrupt part is an error naming it.
Used by tools/te_gpu/te_gpu.sh on both machines (python3 only, no third-party package).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def split(file: Path, outdir: Path, max_bytes: int, folders: bool = False) -> list[Path]:
    """Write the parts of ``file`` (each at most ``max_bytes``) and its manifest under ``outdir``; returns the parts."""
    if max_bytes < 1:
        raise ValueError(f"max part size must be positive, got {max_bytes}")
    outdir.mkdir(parents=True, exist_ok=True)
    parts, entries = [], []
    with open(file, "rb") as src:
        index = 0
        while block := src.read(max_bytes):
            where = outdir / f"part{index:03d}" if folders else outdir
            where.mkdir(parents=True, exist_ok=True)
            part = where / f"{file.name}.part{index:03d}"
            part.write_bytes(block)
            parts.append(part)
            entries.append({"name": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
            index += 1
    manifest = {"file": file.name, "bytes": file.stat().st_size, "sha256": _sha256(file), "parts": entries}
    for where in {part.parent for part in parts} | {outdir}:
        (where / f"{file.name}.manifest.json").write_text(json.dumps(manifest, indent=1))
    return parts


def join(folders: list[Path], output: Path, name: str | None = None) -> Path:
    """Reassemble the file (``name``, or the one file) whose manifest lies under ``folders`` into ``output``."""
    manifests = sorted({p for folder in folders for p in folder.rglob(f"{name or '*'}.manifest.json")})
    if not manifests:
        raise FileNotFoundError(f"no {name or '*'}.manifest.json under {[str(f) for f in folders]}")
    if len({p.name for p in manifests}) > 1:
        raise ValueError(f"parts of several files under {[str(f) for f in folders]}: name one with --name")
    manifest = json.loads(manifests[0].read_text())
    found = {p.name: p for folder in folders for p in folder.rglob(f"{manifest['file']}.part*")}
    tmp = output.with_name(output.name + ".tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as dst:
        for entry in manifest["parts"]:
            part = found.get(entry["name"])
            if part is None:
                raise FileNotFoundError(f"part {entry['name']} of {manifest['file']} is missing (not sent yet?)")
            if part.stat().st_size != entry["bytes"] or _sha256(part) != entry["sha256"]:
                raise ValueError(f"part {part} is corrupt: size or SHA-256 differs from {manifests[0]}")
            dst.write(part.read_bytes())
    if _sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise ValueError(f"{manifest['file']}: the joined file's SHA-256 differs from the manifest's")
    os.replace(tmp, output)
    return output


def main(argv: list[str] | None = None) -> int:
    """``split`` or ``join`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("file", type=Path)
    s.add_argument("outdir", type=Path)
    s.add_argument("--max-mib", type=float, required=True)
    s.add_argument("--folders", action="store_true", help="one folder per part (one device command each)")
    j = sub.add_parser("join")
    j.add_argument("folders", type=Path, nargs="+")
    j.add_argument("--output", type=Path, required=True)
    j.add_argument("--name", help="the file to join where several files' parts lie together")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            for part in split(args.file, args.outdir, int(args.max_mib * 2**20), args.folders):
                print(part)
        else:
            print(join(args.folders, args.output, args.name))
    except (OSError, ValueError) as err:
        print(f"parts.py {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
