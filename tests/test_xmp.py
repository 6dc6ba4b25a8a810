"""`siglip classify --write-xmp`: sidecars read back by a real XMP reader (exiftool), merged
into what was there byte for byte, replaced on a second run, and refused when they are not XMP."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from siglip_cli.cli.app import app
from siglip_cli.xmp import Keywords, NotXmp, merge, sidecar_path

from .conftest import random_image

EXIFTOOL = shutil.which("exiftool")
needs_exiftool = pytest.mark.skipif(EXIFTOOL is None, reason="exiftool is not installed (Debian: libimage-exiftool-perl; CI installs it)")
LABELS = "2 cats,a dog,an airplane"

THEIRS = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
   xmp:Rating="4"
   darktable:xmp_version="5">
   <!-- someone's comment, kept as it is -->
   <darktable:history>
    <rdf:Seq>
     <rdf:li darktable:operation="exposure" darktable:enabled="1" darktable:params="0000803f"/>
    </rdf:Seq>
   </darktable:history>
   <dc:subject>
    <rdf:Bag>
     <rdf:li>holiday</rdf:li>
     <rdf:li>a dog</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>places|Z&#xFC;rich</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <dc:title><rdf:Alt><rdf:li xml:lang="x-default">Evening &amp; rain</rdf:li></rdf:Alt></dc:title>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def without_keywords(text: str) -> str:
    """The sidecar minus the parts we own (dc:subject, lr:hierarchicalSubject, siglip:*), with
    blank lines dropped: what must be identical before and after a merge."""
    for tag in ("dc:subject", "lr:hierarchicalSubject", r"siglip:\w+"):
        text = re.sub(rf"[ \t]*<({tag})[\s>][\s\S]*?</\1>\n?", "", text)
    return text


def exif(path: Path, *tags: str) -> dict:
    out = subprocess.run([EXIFTOOL, "-j", "-struct", *tags, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


def listed(value) -> list:
    return value if isinstance(value, list) else [value]


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        random_image(400 + i, (40, 36)).save(folder / f"p{i}.jpg", quality=90)
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if not p.name.endswith(".xmp")}


def passing(record: dict, threshold: float) -> list[str]:
    return [l["label"] for l in record["labels"] if l["score"] >= threshold]


# ----------------------------------------------------------------------------- merge, by itself
def test_a_new_sidecar_holds_the_keywords_hierarchy_and_provenance():
    data = merge(None, Keywords(["cat", "a dog"], "auto", "google/siglip", {"cat": 0.91, "a dog": 0.5}))
    assert b"<rdf:li>auto|cat</rdf:li>" in data and b"<siglip:modelId>google/siglip</siglip:modelId>" in data
    assert merge(data, Keywords(["cat", "a dog"], "auto", "google/siglip", {"cat": 0.91, "a dog": 0.5})) == data  # stable


def test_merge_keeps_every_other_byte():
    merged = merge(THEIRS.encode(), Keywords(["2 cats", "a dog"], "siglip", "m", {"2 cats": 0.9, "a dog": 0.4})).decode()
    assert without_keywords(merged) == without_keywords(THEIRS)
    assert "<!-- someone's comment, kept as it is -->" in merged and "places|Zürich" in merged


@pytest.mark.parametrize("text, why", [
    ("this is not xml", "not XML"),
    ("<a><b></a>", "not XML"),
    ("<x:xmpmeta xmlns:x='adobe:ns:meta/'/>", "no rdf:RDF"),
    ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
     '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
     '<rdf:Description>&lol2;</rdf:Description></rdf:RDF></x:xmpmeta>', "DTD"),
    ('<!DOCTYPE x SYSTEM "file:///etc/passwd"><x/>', "DTD"),
])
def test_what_is_not_xmp_is_refused(text, why):
    with pytest.raises(NotXmp, match=why):
        merge(text.encode(), Keywords(["cat"]))


def test_a_self_closing_description_and_one_without_keywords():
    small = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
             '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="2" xmp:Label="a &gt; b"/>'
             '</rdf:RDF></x:xmpmeta>')
    merged = merge(small.encode(), Keywords(["cat"])).decode()
    assert merged.startswith(small[:small.index("/>")]) and 'xmp:Label="a &gt; b">' in merged
    assert "<rdf:li>cat</rdf:li>" in merged and merged.endswith("</rdf:Description></rdf:RDF></x:xmpmeta>")
    merge(merged.encode(), Keywords(["dog"]))  # and it parses again


def test_sidecar_names():
    assert sidecar_path("a/photo.jpg") == Path("a/photo.jpg.xmp")
    assert sidecar_path("a/photo.jpg", stem=True) == Path("a/photo.xmp")


# ----------------------------------------------------------------------------- the command, read back by exiftool
@needs_exiftool
def test_new_sidecars_read_back_by_exiftool(run, photos):
    before = digests(photos)
    mtimes = {p.name: p.stat().st_mtime_ns for p in photos.iterdir()}
    every = json.loads(run("classify", photos, "-l", LABELS, "--json").stdout)
    threshold = sorted(l["score"] for r in every for l in r["labels"])[4]  # some labels pass, some not
    result = run("classify", photos, "-l", LABELS, "--threshold", threshold, "--write-xmp", "--json")
    assert result.exit_code == 0, result.stderr
    for record in json.loads(result.stdout):
        sidecar = Path(record["path"] + ".xmp")
        assert record["actions"] == [{"action": "xmp", "destination": str(sidecar), "method": "new"}]
        tags = exif(sidecar, "-XMP:Subject", "-XMP:HierarchicalSubject", "-XMP-siglip:all")
        keywords = passing(record, threshold)
        assert listed(tags.get("Subject", [])) == keywords
        assert listed(tags.get("HierarchicalSubject", [])) == [f"siglip|{k}" for k in keywords]
        assert len(listed(tags.get("Scores", []))) == len(keywords)
        assert tags["ModelId"].startswith(str(os.environ["SIGLIP_MODEL"]))
    assert {len(passing(r, threshold)) for r in json.loads(result.stdout)} != {0}
    assert digests(photos) == before  # the images are never modified
    assert {p.name: p.stat().st_mtime_ns for p in photos.iterdir() if not p.name.endswith(".xmp")} == mtimes


@needs_exiftool
def test_merge_keeps_their_keywords_rating_and_history_and_a_rerun_replaces_ours(run, photos):
    image = photos / "p0.jpg"
    sidecar = photos / "p0.jpg.xmp"
    sidecar.write_text(THEIRS)
    sidecar.chmod(0o640)
    first = run("classify", image, "-l", LABELS, "--top-k", "2", "--write-xmp", "--json", "--xmp-prefix", "auto")
    assert first.exit_code == 0, first.stderr
    ours = [l["label"] for l in json.loads(first.stdout)[0]["labels"]]
    tags = exif(sidecar, "-XMP:all")
    assert listed(tags["Subject"]) == ["holiday", "a dog"] + [k for k in ours if k != "a dog"]
    assert listed(tags["HierarchicalSubject"]) == ["places|Zürich"] + [f"auto|{k}" for k in ours]
    assert tags["Rating"] == 4 and tags["Title"] == "Evening & rain"
    assert tags["History"][0]["Operation"] == "exposure"
    assert without_keywords(sidecar.read_text()) == without_keywords(THEIRS)
    assert sidecar.stat().st_mode & 0o777 == 0o640

    # a second run with other labels: ours replaced, theirs (even "a dog", which was theirs first) kept
    second = run("classify", image, "-l", "a bird,a tree", "--top-k", "1", "--write-xmp", "--json")
    assert second.exit_code == 0, second.stderr
    [new] = [l["label"] for l in json.loads(second.stdout)[0]["labels"]]
    tags = exif(sidecar, "-XMP:all")
    assert listed(tags["Subject"]) == ["holiday", "a dog", new]
    assert listed(tags["HierarchicalSubject"]) == ["places|Zürich", f"siglip|{new}"]  # the old prefix's are gone
    assert without_keywords(sidecar.read_text()) == without_keywords(THEIRS)


@needs_exiftool
def test_a_sidecar_written_by_exiftool_is_merged(run, photos):
    image = photos / "p1.jpg"
    made = subprocess.run([EXIFTOOL, "-q", "-o", str(image) + ".xmp", "-XMP-dc:Subject=mine", "-XMP-xmp:Rating=3", str(image)],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    result = run("classify", image, "-l", LABELS, "--top-k", "1", "--write-xmp", "--json")
    assert result.exit_code == 0, result.stderr
    [best] = [l["label"] for l in json.loads(result.stdout)[0]["labels"]]
    tags = exif(Path(str(image) + ".xmp"), "-XMP:all")
    assert listed(tags["Subject"]) == ["mine", best] and tags["Rating"] == 3


@needs_exiftool
def test_stem_naming(run, photos):
    result = run("classify", photos / "p2.jpg", "-l", LABELS, "--top-k", "1", "--write-xmp", "--xmp-stem")
    assert result.exit_code == 0, result.stderr
    assert (photos / "p2.xmp").exists() and not (photos / "p2.jpg.xmp").exists()
    assert len(listed(exif(photos / "p2.xmp", "-XMP:Subject")["Subject"])) == 1


# ----------------------------------------------------------------------------- bad sidecars
@pytest.mark.parametrize("kind", ["not xml", "dtd", "huge", "symlink", "fifo", "folder"])
def test_a_bad_sidecar_is_one_line_left_untouched_and_the_others_are_written(run, photos, tmp_path, kind):
    sidecar = photos / "p1.jpg.xmp"
    target = tmp_path / "target.txt"
    target.write_text("precious\n")
    if kind == "not xml":
        sidecar.write_bytes(b"\x89PNG not xml at all")
    elif kind == "dtd":
        sidecar.write_text('<!DOCTYPE x [<!ENTITY a "aaaa">]><x:xmpmeta xmlns:x="adobe:ns:meta/">&a;</x:xmpmeta>')
    elif kind == "huge":
        with open(sidecar, "wb") as fh:
            fh.truncate(17 << 20)
    elif kind == "symlink":
        sidecar.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(sidecar)
    else:
        sidecar.mkdir()
    before = sidecar.read_bytes() if kind in ("not xml", "dtd") else None
    result = run("classify", photos, "-l", LABELS, "--top-k", "1", "--write-xmp")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "p1.jpg.xmp" in errors[0] and "Traceback" not in result.stderr
    assert (photos / "p0.jpg.xmp").exists() and (photos / "p2.jpg.xmp").exists()
    assert target.read_text() == "precious\n"
    if before is not None:
        assert sidecar.read_bytes() == before
    if kind == "symlink":
        assert sidecar.is_symlink()


def test_a_read_only_image_folder_is_one_line_per_image(run, tmp_path):
    from .test_actions import read_only_folder

    def fill(folder):
        for i in range(2):
            random_image(500 + i, (32, 32)).save(folder / f"r{i}.jpg")

    with read_only_folder(tmp_path / "ro", fill) as folder:
        before = digests(folder)
        result = run("classify", folder, "-l", LABELS, "--top-k", "1", "--write-xmp")
        assert result.exit_code == 1
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(errors) == 2 and all("read-only" in line and ".jpg.xmp" in line for line in errors), result.stderr
        assert not list(folder.glob("*.xmp")) and digests(folder) == before


@pytest.mark.parametrize("args, message", [
    (["--write-xmp"], "--write-xmp needs --threshold"),
    (["--write-xmp", "--top-k", "1", "--sort-into", "X", "--action", "move"], "cannot go with --action move"),
    (["--xmp-prefix", "tags"], "go with --write-xmp"),
    (["--write-xmp", "--top-k", "1", "--xmp-prefix", "a|b"], "no '|'"),
])
def test_option_mistakes(run, photos, tmp_path, args, message):
    args = [str(tmp_path / "X") if a == "X" else a for a in args]
    result = run("classify", photos, "-l", LABELS, *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not list(photos.glob("*.xmp"))


DIGIKAM = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:digiKam="http://www.digikam.org/ns/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
   xmp:Rating="5">
   <digiKam:TagsList>
    <rdf:Seq>
     <rdf:li>People/Anna</rdf:li>
    </rdf:Seq>
   </digiKam:TagsList>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


@needs_exiftool
def test_digikam_tags_list_gets_ours_too_when_it_is_there(tmp_path):
    """digiKam and Immich read digiKam:TagsList first (and then ignore lr:hierarchicalSubject)."""
    sidecar = tmp_path / "a.jpg.xmp"
    sidecar.write_bytes(merge(DIGIKAM.encode(), Keywords(["cat"], "auto")))
    tags = exif(sidecar, "-XMP:all")
    assert listed(tags["TagsList"]) == ["People/Anna", "auto/cat"]
    assert listed(tags["Subject"]) == ["cat"] and tags["Rating"] == 5
    sidecar.write_bytes(merge(sidecar.read_bytes(), Keywords(["dog"], "auto")))
    assert listed(exif(sidecar, "-XMP:all")["TagsList"]) == ["People/Anna", "auto/dog"]
    # a new sidecar does not start a TagsList of its own
    assert b"TagsList" not in merge(None, Keywords(["cat"]))


@needs_exiftool
def test_an_rdf_without_a_description_gets_one(tmp_path):
    sidecar = tmp_path / "a.jpg.xmp"
    sidecar.write_bytes(merge(b'<x:xmpmeta xmlns:x="adobe:ns:meta/">\n <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
                              b' </rdf:RDF>\n</x:xmpmeta>\n', Keywords(["cat"])))
    assert listed(exif(sidecar, "-XMP:all")["Subject"]) == ["cat"]
