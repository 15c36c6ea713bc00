"""The sample model's corpus: the King James Bible, from Debian's ``bible-kjv-text`` package.

The KJV translation dates from 1611 and its copyright has expired (Debian's
``/usr/share/doc/bible-kjv-text/copyright``: "The copyright for the King James Version text of the
Bible is expired since the translation was done in 1611 under King James the first of Great
Britain."). The data file is packed for the Bible Retrieval System, so the ``bible`` program of
the ``bible-kjv`` package (GPL-2+) prints it; that program is only run here, never redistributed.

``python samples/corpus.py`` downloads both packages under a private apt configuration (its own
sources list naming this machine's Debian mirror, its own lists and cache directories in a
temporary folder, so the system's apt state is untouched and root is not needed), prints the
whole text and writes the cleaned text to ``samples/data/kjv.txt`` (git-ignored). A machine with
no network takes a copy of that file (``train_sample.py --corpus PATH``).

Cleaned form: for every chapter a heading line ``<Book> <chapter>`` (as the ``bible`` program
prints it, e.g. ``Song of Solomon 2``), then one verse per line, unwrapped and without its verse
number; a blank line between chapters. ASCII, ``\\n`` line ends, ending with one ``\\n``.

Held-out split: whole books (:data:`HELDOUT_BOOKS`, about 5.7 % of the bytes, a mix of
narrative, wisdom, prophecy, gospel and epistle). Training never sees them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE / "data" / "kjv.txt"

PACKAGES = ("bible-kjv-text", "bible-kjv")
# Debian bookworm's 4.38; another version may print a different text, so it must be asked for
PINNED_DEBS = {
    "bible-kjv-text_4.38_all.deb": "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
    "bible-kjv_4.38_amd64.deb": "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d",
}
# sha256 of the cleaned text made from the pinned packages
PINNED_CORPUS_SHA256 = "07c470deb9cc4b58701c05d9981d4803228519f2635cee3740cf0c076a8d9b05"
WHOLE_BIBLE = "Gen1:1-Rev22:21"

HELDOUT_BOOKS = ("Ruth", "Ecclesiastes", "Daniel", "Joel", "John", "Philippians", "James")

_HEADING = re.compile(r"(?P<book>(?:[123] )?[A-Z][A-Za-z ]*?) (?P<chapter>\d+)")
_VERSE = re.compile(r" +(?P<number>\d+) (?P<text>.*)")


class CorpusError(RuntimeError):
    """The corpus cannot be fetched, printed or parsed; the message says which step and why."""


# ---------------------------------------------------------------- download (private apt config)


@dataclass(frozen=True)
class Mirror:
    uri: str
    suite: str
    signed_by: str | None = None


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur = {}
            continue
        if line.lstrip().startswith("#") or line[0].isspace() or ":" not in line:
            continue
        key, value = line.split(":", 1)
        cur[key.strip().lower()] = value.strip()
    if cur:
        stanzas.append(cur)
    return stanzas


def find_debian_mirror(apt_dir: Path = Path("/etc/apt")) -> Mirror:
    """The first Debian ``main`` archive this machine's apt sources name (not security, not updates)."""
    candidates: list[Mirror] = []
    files = sorted((apt_dir / "sources.list.d").glob("*.sources")) if (apt_dir / "sources.list.d").is_dir() else []
    for f in files:
        for st in _deb822_stanzas(f.read_text(errors="replace")):
            if "deb" not in st.get("types", "").split() or "main" not in st.get("components", "").split():
                continue
            for uri in st.get("uris", "").split():
                for suite in st.get("suites", "").split():
                    candidates.append(Mirror(uri, suite, st.get("signed-by")))
    one_line = [apt_dir / "sources.list"]
    if (apt_dir / "sources.list.d").is_dir():
        one_line += sorted((apt_dir / "sources.list.d").glob("*.list"))
    for f in one_line:
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            m = re.match(
                r"deb\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)\s+(?P<comps>.+)", line.strip()
            )
            if m and "main" in m["comps"].split():
                signed = re.search(r"signed-by=(\S+)", m["opts"] or "")
                candidates.append(Mirror(m["uri"], m["suite"], signed[1] if signed else None))
    for c in candidates:
        if "/debian" in c.uri and "security" not in c.uri and "-" not in c.suite:
            return c
    raise CorpusError(
        f"no Debian archive with component 'main' found in {apt_dir}/sources.list(.d); pass --mirror URI --suite SUITE"
    )


def download_debs(dest: Path, mirror: Mirror, verify: bool = True) -> list[Path]:
    """``apt-get download`` the two packages into ``dest`` with apt state kept in a temporary folder."""
    if shutil.which("apt-get") is None:
        raise CorpusError("apt-get not found: prepare the corpus on a Debian machine and pass --corpus PATH")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kjv-apt-") as tmp:
        t = Path(tmp)
        for d in ("lists/partial", "cache/archives/partial", "parts", "prefs"):
            (t / d).mkdir(parents=True)
        opts = f"[signed-by={mirror.signed_by}] " if mirror.signed_by else ""
        (t / "sources.list").write_text(f"deb {opts}{mirror.uri} {mirror.suite} main\n")
        apt = [
            "apt-get",
            "-q",
            "-o", f"Dir::Etc::SourceList={t / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={t / 'parts'}",
            "-o", f"Dir::Etc::PreferencesParts={t / 'prefs'}",
            "-o", f"Dir::State::Lists={t / 'lists'}",
            "-o", f"Dir::Cache={t / 'cache'}",
            "-o", "Debug::NoLocking=1",
        ]  # fmt: skip
        if os.geteuid() == 0:  # apt drops to _apt for downloads, which cannot write our folders
            apt += ["-o", "APT::Sandbox::User=root"]
        for cmd, cwd in ((apt + ["update"], t), (apt + ["download", *PACKAGES], dest)):
            r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise CorpusError(f"{' '.join(cmd[:1] + cmd[-2:])} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    debs = sorted(dest.glob("*.deb"))
    for name, sha in PINNED_DEBS.items():
        p = dest / name
        if not p.is_file():
            got = ", ".join(d.name for d in debs) or "nothing"
            msg = f"expected {name} from {mirror.uri} {mirror.suite}, got {got}"
            if verify:
                raise CorpusError(msg + " (another version may print another text; --no-verify accepts it)")
            print(f"warning: {msg}", file=sys.stderr)
            continue
        got = hashlib.sha256(p.read_bytes()).hexdigest()
        if got != sha and verify:
            raise CorpusError(f"{p}: sha256 {got}, expected {sha}")
    return debs


def print_bible(debs: list[Path], work: Path) -> str:
    """Unpack the packages and print the whole KJV with their ``bible`` program."""
    root = work / "root"
    for d in debs:
        r = subprocess.run(["dpkg-deb", "-x", str(d), str(root)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise CorpusError(f"dpkg-deb -x {d.name} failed: {r.stderr.strip()}")
    program, lib = root / "usr/bin/bible", root / "usr/lib"
    if not program.is_file() or not (lib / "bible.data").is_file():
        raise CorpusError(f"{program} or {lib / 'bible.data'} missing after unpacking {[d.name for d in debs]}")
    # -l with a wide line keeps most verses on one line; clean() joins any that still wrap
    r = subprocess.run([str(program), "-l4000", "-p", str(lib), WHOLE_BIBLE], capture_output=True, check=False)
    if r.returncode != 0 or not r.stdout:
        raise CorpusError(f"bible {WHOLE_BIBLE} failed ({r.returncode}): {r.stderr.decode(errors='replace').strip()}")
    return r.stdout.decode("ascii")


# ---------------------------------------------------------------- cleaning and splitting


def clean(raw: str) -> str:
    """The ``bible`` program's output -> the cleaned form described in the module docstring."""
    chapters: list[list[str]] = []
    for n, line in enumerate(raw.splitlines(), 1):
        line = line.rstrip()
        if not line:
            continue
        if not line[0].isspace() and _HEADING.fullmatch(line):
            chapters.append([line])
        elif (m := _VERSE.fullmatch(line)) is not None:
            if not chapters:
                raise CorpusError(f"line {n}: verse before any chapter heading: {line[:60]!r}")
            chapters[-1].append(" ".join(m["text"].split()))
        else:  # a wrapped verse's continuation
            if not chapters or len(chapters[-1]) < 2:
                raise CorpusError(f"line {n}: text outside a verse: {line[:60]!r}")
            chapters[-1][-1] += " " + " ".join(line.split())
    if not chapters:
        raise CorpusError("no chapters found in the printed text")
    return "\n\n".join("\n".join(c) for c in chapters) + "\n"


def chapters_of(text: str) -> list[tuple[str, int, str]]:
    """``(book, chapter, block)`` of every chapter of a cleaned text, in order."""
    out = []
    for block in text.strip("\n").split("\n\n"):
        head = block.split("\n", 1)[0]
        m = _HEADING.fullmatch(head)
        if m is None:
            raise CorpusError(f"not a chapter heading: {head[:60]!r} (is this a cleaned corpus?)")
        out.append((m["book"], int(m["chapter"]), block))
    return out


def split(text: str, heldout_books: tuple[str, ...] = HELDOUT_BOOKS) -> tuple[str, str]:
    """``(train, heldout)``: the chapters of the held-out books go to ``heldout``, the rest to ``train``.

    Each part keeps the cleaned form (chapters joined by blank lines, in canonical order).
    """
    chapters = chapters_of(text)
    books = {b for b, _, _ in chapters}
    missing = [b for b in heldout_books if b not in books]
    if missing:
        raise CorpusError(f"held-out books not in the corpus: {missing}")
    train = [blk for b, _, blk in chapters if b not in heldout_books]
    held = [blk for b, _, blk in chapters if b in heldout_books]
    return "\n\n".join(train) + "\n", "\n\n".join(held) + "\n"


def heldout_excerpt(
    text: str, books: tuple[str, ...] = ("Ruth", "Ecclesiastes", "John", "James"), size: int = 1200
) -> str:
    """The opening verses (whole lines, at most ``size`` bytes) of the first chapter of each of ``books``.

    Every book must be held out: the tests measure bits per byte on this excerpt.
    """
    if set(books) - set(HELDOUT_BOOKS):
        raise CorpusError(f"not held-out books: {sorted(set(books) - set(HELDOUT_BOOKS))}")
    firsts = {b: blk for b, c, blk in chapters_of(text) if c == 1}
    parts = []
    for b in books:
        blk = firsts[b] + "\n"
        parts.append(blk[: blk.rfind("\n", 0, size)])
    return "\n\n".join(parts) + "\n"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- entry points


def prepare(
    out: Path = DEFAULT_CORPUS, mirror: Mirror | None = None, verify: bool = True, keep_debs: bool = False
) -> Path:
    """Download, print and clean the KJV into ``out`` (atomically); returns ``out``."""
    mirror = mirror or find_debian_mirror()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kjv-") as tmp:
        debdir = out.parent / "debs" if keep_debs else Path(tmp) / "debs"
        debs = download_debs(debdir, mirror, verify=verify)
        text = clean(print_bible(debs, Path(tmp)))
    if verify and PINNED_CORPUS_SHA256 and sha256_text(text) != PINNED_CORPUS_SHA256:
        raise CorpusError(f"cleaned text sha256 {sha256_text(text)}, expected {PINNED_CORPUS_SHA256}")
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(text, encoding="ascii")
    os.replace(tmp_out, out)
    return out


def load(path: Path | str | None = None, prepare_if_missing: bool = True) -> str:
    """The cleaned corpus at ``path`` (default ``samples/data/kjv.txt``, prepared when absent)."""
    path = Path(path) if path is not None else DEFAULT_CORPUS
    if not path.is_file():
        if not (prepare_if_missing and path.resolve() == DEFAULT_CORPUS):
            raise CorpusError(f"{path}: corpus file not found (make it with: python samples/corpus.py --out {path})")
        print(f"{path} not found: downloading the KJV from Debian's packages", file=sys.stderr)
        try:
            prepare(path)
        except CorpusError as e:
            raise CorpusError(
                f"{e}\n(no network here? make {path} on a machine with one, with `python samples/corpus.py`, "
                "and bring it, or pass --corpus PATH)"
            ) from e
    text = path.read_text(encoding="utf-8")
    chapters_of(text[: text.find("\n\n") + 1] if "\n\n" in text else text)  # fails early on a foreign file
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_CORPUS, help="cleaned text to write (default %(default)s)")
    ap.add_argument("--mirror", help="Debian archive URI (default: the one this machine's apt sources name)")
    ap.add_argument("--suite", help="Debian suite (default: the mirror's, e.g. bookworm)")
    ap.add_argument("--no-verify", action="store_true", help="accept packages and text other than the pinned ones")
    ap.add_argument("--keep-debs", action="store_true", help="keep the .deb files beside the output")
    ap.add_argument(
        "--heldout-excerpt", type=Path, help="also write a few KB of held-out text here (the tests' excerpt)"
    )
    args = ap.parse_args(argv)
    try:
        mirror = None
        if args.mirror or args.suite:
            found = find_debian_mirror() if not (args.mirror and args.suite) else None
            mirror = Mirror(
                args.mirror or found.uri, args.suite or found.suite, None if args.mirror else found.signed_by
            )
        path = prepare(args.out, mirror, verify=not args.no_verify, keep_debs=args.keep_debs)
        text = path.read_text()
        train, held = split(text)
        print(f"{path}: {len(text)} bytes, {len(chapters_of(text))} chapters, sha256 {sha256_text(text)}")
        print(
            f"train {len(train)} bytes, held out {len(held)} bytes ({100 * len(held) / len(text):.1f} %: {', '.join(HELDOUT_BOOKS)})"
        )
        if args.heldout_excerpt:
            excerpt = heldout_excerpt(text)
            args.heldout_excerpt.write_text(excerpt)
            print(f"{args.heldout_excerpt}: {len(excerpt)} bytes of held-out text")
    except CorpusError as e:
        print(f"corpus: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
