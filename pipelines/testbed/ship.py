"""Pack a trained testbed pipeline folder into a few small files, and unpack it again.

The device machine hands back at most 8 files of at most 16 MiB each from ``$OUT`` (64 MiB in
all), while a pipeline folder holds ~15 files and a ~28 MB transformer. ``pack`` writes one tar
of the folder split into parts of ``part_mib`` MiB (``<name>.tar.00``, ``.01``, ...) plus nothing
else; the part names carry no extra metadata, the tar holds ``<name>/...`` and ``unpack`` checks
the sha256 recorded inside the tar's ``<name>/SHA256SUMS``.

    python -m mixdit.pipelines.testbed.ship pack pipelines/testbed/weights/mixdit-shapes-video $OUT
    python -m mixdit.pipelines.testbed.ship unpack DIR_WITH_PARTS mixdit-shapes-video pipelines/testbed/weights/
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from pathlib import Path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pack(folder, dest, name: str | None = None, part_mib: float = 15.0) -> list[Path]:
    """Tar ``folder`` as ``<name>/`` into ``dest/<name>.tar.NN`` parts of at most ``part_mib`` MiB."""
    folder, dest = Path(folder), Path(dest)
    name = name or folder.name
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    sums = "".join(f"{_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in files:
            tar.add(p, arcname=f"{name}/{p.relative_to(folder).as_posix()}")
        info = tarfile.TarInfo(f"{name}/SHA256SUMS")
        data = sums.encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    size = int(part_mib * 1024 * 1024)
    for old in dest.glob(f"{name}.tar.[0-9][0-9]"):
        old.unlink()
    parts = []
    for i in range(0, max(len(blob), 1), size):
        part = dest / f"{name}.tar.{i // size:02d}"
        part.write_bytes(blob[i:i + size])
        parts.append(part)
    return parts


def unpack(parts_dir, name: str, dest) -> Path:
    """Join ``parts_dir/<name>.tar.NN`` and extract into ``dest/<name>``; checks every sha256."""
    parts = sorted(Path(parts_dir).glob(f"{name}.tar.[0-9][0-9]"))
    if not parts:
        raise FileNotFoundError(f"no {name}.tar.NN parts in {parts_dir}")
    blob = b"".join(p.read_bytes() for p in parts)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        members = tar.getmembers()
        for m in members:
            if not m.name.startswith(f"{name}/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                raise ValueError(f"unexpected member {m.name!r} in the {name} archive")
        tar.extractall(dest, members=members)
    root = dest / name
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        if _sha256(root / rel) != digest:
            raise ValueError(f"{root / rel}: checksum mismatch")
    return root


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 3 and argv[0] == "pack":
        for p in pack(argv[1], argv[2]):
            print(p)
        return 0
    if len(argv) == 4 and argv[0] == "unpack":
        print(unpack(argv[1], argv[2], argv[3]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
