"""XMP sidecars: keywords that photo managers read, merged into what a sidecar already holds.

We write the labels that pass as keywords where darktable, digiKam, Lightroom, Immich and
exiftool look for them: `dc:subject` (flat keywords) and `lr:hierarchicalSubject` (`siglip|cat`
under a prefix), plus what produced them in our own namespace (`siglip:modelId`, the scores, and
the keywords we added, so that a later run replaces exactly ours).

An existing sidecar is edited, not rewritten: it is parsed (to find things, and to refuse what
is not XMP), and only the byte ranges of `dc:subject`, `lr:hierarchicalSubject` and our own
elements are replaced; every other byte (ratings, darktable's history, someone's comments,
the indentation) stays as it was. Parsing is safe: Python's expat with any DOCTYPE refused, so
no entity can be declared, let alone expanded (no billion laughs, no external files); a sidecar
over 16 MiB is refused before it is read. The new file replaces the old atomically, with the
old one's permissions, through a journal (`actions.SidecarJournal`) that keeps the old bytes
first, so `siglip classify --undo` can put every sidecar back; the image itself is never
opened for writing.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from xml.parsers import expat
from xml.sax.saxutils import escape

from .core.errors import InputError

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
DIGIKAM = "http://www.digikam.org/ns/1.0/"
LR = "http://ns.adobe.com/lightroom/1.0/"
X = "adobe:ns:meta/"
OURS = "https://github.com/siglip-cli/siglip-cli/xmp/1.0/"
MAX_SIDECAR_BYTES = 16 << 20
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def sidecar_path(image: str | os.PathLike, stem: bool = False) -> Path:
    """photo.jpg -> photo.jpg.xmp (darktable, digiKam, Immich), or photo.xmp with `stem`
    (Lightroom, Capture One, Bridge, and digiKam's "compatible" setting)."""
    image = Path(image)
    return image.with_suffix(".xmp") if stem else image.with_name(image.name + ".xmp")


@dataclass
class Keywords:
    """What one image gets: flat keywords, the prefix for hierarchical ones, and provenance."""

    labels: list[str]
    prefix: str = "siglip"
    model: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    def hierarchical(self) -> list[str]:
        return [f"{self.prefix}|{label}" if self.prefix else label for label in self.labels]


# ============================================================================ reading what is there
@dataclass
class _Element:
    uri: str
    name: str
    start: int  # byte offset of "<"
    end: int = -1  # byte offset just after the element's last ">"
    open_end: int = -1  # just after the start tag's ">"
    self_closing: bool = False
    values: list[str] = field(default_factory=list)  # rdf:li texts inside
    depth: int = 0
    scope: dict = field(default_factory=dict)  # prefix -> namespace, in force inside the element
    parent_scope: dict = field(default_factory=dict)  # ... and around it (where a replacement goes)


class NotXmp(ValueError):
    pass


def _tag_end(data: bytes, start: int) -> int:
    """Just past the ">" that ends the tag starting at `start` (quotes respected)."""
    quote = None
    for i in range(start, len(data)):
        c = data[i]
        if quote is not None:
            if c == quote:
                quote = None
        elif c in (0x22, 0x27):
            quote = c
        elif c == 0x3E:
            return i + 1
    raise NotXmp("a tag never ends")


@dataclass(frozen=True)
class _Managed:
    """A keyword list we keep: where it lives, and the element of ours that records what we added."""

    uri: str
    name: str
    prefix: str
    kind: str  # Bag or Seq
    record: str  # siglip:<record> lists the values we added here
    create: bool  # written when missing (else only merged into where the file already has it)


MANAGED = (
    _Managed(DC, "subject", "dc", "Bag", "keywords", True),
    _Managed(LR, "hierarchicalSubject", "lr", "Bag", "hierarchicalKeywords", True),
    # digiKam and Immich read digiKam:TagsList first and ignore the others when it is there
    _Managed(DIGIKAM, "TagsList", "digiKam", "Seq", "digiKamTags", False),
)


@dataclass
class _Found:
    descriptions: list[_Element] = field(default_factory=list)
    rdf_end: int = -1  # where the rdf:RDF end tag starts
    lists: dict[str, _Element] = field(default_factory=dict)  # managed record name -> its element
    ours: list[_Element] = field(default_factory=list)  # our elements, each with its li values
    recorded: dict[str, list[str]] = field(default_factory=dict)  # record name -> values we added before


def _parse(data: bytes) -> _Found:
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.buffer_text = True
    found = _Found()
    stack: list[_Element] = []
    text: list[str] = []
    pending: dict[str, str] = {}

    def declare(prefix, uri):
        pending[prefix or ""] = uri

    def refuse_dtd(*args):
        raise NotXmp("it declares a DTD (XMP never does; refused so that no entity can expand)")

    def start(name, attrs):
        uri, _, local = name.rpartition(" ")
        element = _Element(uri, local, parser.CurrentByteIndex, depth=len(stack))
        element.parent_scope = stack[-1].scope if stack else {}
        element.scope = {**element.parent_scope, **pending}
        pending.clear()
        element.open_end = _tag_end(data, element.start)
        element.self_closing = data[element.open_end - 2:element.open_end] == b"/>"
        stack.append(element)
        text.clear()
        if (uri, local) == (RDF, "Description") and any(p.uri == RDF and p.name == "RDF" for p in stack[:-1]):
            found.descriptions.append(element)

    def end(name):
        element = stack.pop()
        if element.self_closing:
            element.end = element.open_end
        else:
            element.end = _tag_end(data, parser.CurrentByteIndex)
        if (element.uri, element.name) == (RDF, "li"):
            value = "".join(text).strip()
            for outer in stack:
                outer.values.append(value)
        elif (element.uri, element.name) == (RDF, "RDF"):
            found.rdf_end = parser.CurrentByteIndex
        parent = stack[-1] if stack else None
        if parent is not None and (parent.uri, parent.name) == (RDF, "Description"):
            for managed in MANAGED:
                if (element.uri, element.name) == (managed.uri, managed.name) and managed.record not in found.lists:
                    found.lists[managed.record] = element
            if element.uri == OURS:
                found.ours.append(element)
                found.recorded.setdefault(element.name, []).extend(element.values)
        text.clear()

    parser.StartNamespaceDeclHandler = declare
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_dtd
    parser.ExternalEntityRefHandler = refuse_dtd
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise NotXmp(f"not XML ({expat.errors.messages.get(exc.code, exc)} at line {exc.lineno})") from None
    if found.rdf_end < 0:
        raise NotXmp("not XMP (no rdf:RDF element)")
    return found


# ============================================================================ writing
def _clean(text: str) -> str:
    return escape(_XML_INVALID.sub("", text))


def _bag(qname: str, values: Sequence[str], indent: str, declare: str, kind: str = "Bag") -> str:
    inner = "".join(f"{indent}  <rdf:li>{_clean(v)}</rdf:li>\n" for v in values)
    return f"<{qname}{declare}>\n{indent} <rdf:{kind}>\n{inner}{indent} </rdf:{kind}>\n{indent}</{qname}>"


_PREFIXES = {"rdf": RDF, "dc": DC, "lr": LR, "digiKam": DIGIKAM, "siglip": OURS}
_RDF_NS = f' xmlns:rdf="{RDF}"'


def _declare(scope: dict, *prefixes: str) -> str:
    """xmlns attributes for the prefixes not already bound to our namespaces where we write."""
    return "".join(f' xmlns:{p}="{_PREFIXES[p]}"' for p in prefixes if scope.get(p) != _PREFIXES[p])


def _list_xml(managed: _Managed, values: Sequence[str], indent: str, scope: dict) -> str:
    return _bag(f"{managed.prefix}:{managed.name}", values, indent, _declare(scope, managed.prefix, "rdf"), managed.kind)


def _ours_xml(keywords: Keywords, added: dict[str, list[str]], indent: str, scope: dict) -> str:
    scores = [f"{label}: {score:.4f}" for label, score in keywords.scores.items()]
    bags = _declare(scope, "siglip", "rdf")
    parts = [f"<siglip:modelId{_declare(scope, 'siglip')}>{_clean(keywords.model)}</siglip:modelId>"]
    for managed in MANAGED:
        if added.get(managed.record):  # an empty bag reads back as whitespace in some readers: left out
            parts.append(_bag(f"siglip:{managed.record}", added[managed.record], indent, bags))
    if scores:
        parts.append(_bag("siglip:scores", scores, indent, bags, kind="Seq"))
    return f"\n{indent}".join(parts)


def _line_start(data: bytes, position: int) -> int:
    """The start of `position`'s line when only spaces or tabs come before it on that line."""
    i = position
    while i > 0 and data[i - 1] in (0x20, 0x09):
        i -= 1
    return i if i == 0 or data[i - 1] == 0x0A else position


def _indent_of(data: bytes, position: int) -> str:
    start = _line_start(data, position)
    return data[start:position].decode("ascii", "replace") if start != position else ""


def _removal(data: bytes, element: _Element) -> tuple[int, int, bytes]:
    """Remove an element together with the whitespace line it stood on."""
    start = _line_start(data, element.start)
    end = element.end
    if start != element.start and data[end:end + 1] == b"\n":
        end += 1
    return start, end, b""


NEW_SIDECAR = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="siglip-cli">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:siglip="https://github.com/siglip-cli/siglip-cli/xmp/1.0/">
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def merge(data: bytes | None, keywords: Keywords) -> bytes:
    """The sidecar `data` (None: there is none) with our keywords in, our earlier ones out, and
    every other byte as it was. Raises NotXmp for what is not an XMP sidecar."""
    if data is None:
        data = NEW_SIDECAR.encode("utf-8")
    found = _parse(data)
    wanted = {"keywords": keywords.labels, "hierarchicalKeywords": keywords.hierarchical(),
              "digiKamTags": [f"{keywords.prefix}/{label}" if keywords.prefix else label for label in keywords.labels]}
    final: dict[str, list[str]] = {}
    added: dict[str, list[str]] = {}
    for managed in MANAGED:
        element = found.lists.get(managed.record)
        if element is None and not managed.create:
            continue
        # Ours from before go; values the file had before we ever wrote are never ours to remove.
        previous = set(found.recorded.get(managed.record, []))
        theirs = [v for v in (element.values if element else []) if v not in previous]
        added[managed.record] = [v for v in dict.fromkeys(wanted[managed.record]) if v not in theirs]
        final[managed.record] = theirs + added[managed.record]

    edits: list[tuple[int, int, bytes]] = []
    target = found.descriptions[0] if found.descriptions else None
    scope = target.scope if target is not None else {}
    indent = (_indent_of(data, target.start) if target is not None else _indent_of(data, found.rdf_end) + " ") + " "
    missing = [m for m in MANAGED if m.record in final and m.record not in found.lists and final[m.record]]
    parts = [_list_xml(m, final[m.record], indent, scope) for m in missing]
    parts.append(_ours_xml(keywords, added, indent, scope))
    block = f"\n{indent}".join(parts)
    for managed in MANAGED:
        element = found.lists.get(managed.record)
        if element is None:
            continue
        if final[managed.record]:
            edits.append((element.start, element.end,
                          _list_xml(managed, final[managed.record], _indent_of(data, element.start), element.parent_scope).encode("utf-8")))
        else:
            edits.append(_removal(data, element))
    for element in found.ours:
        edits.append(_removal(data, element))
    if target is None:  # an rdf:RDF without a Description: add one
        outer = indent[:-1]
        edits.append(_insert_lines(data, found.rdf_end,
                                   f'{outer}<rdf:Description rdf:about=""{_RDF_NS}>\n{indent}{block}\n{outer}</rdf:Description>', outer))
    elif target.self_closing:
        qname = data[target.start + 1:target.open_end].split()[0].rstrip(b"/>").decode("utf-8")
        edits.append((target.open_end - 2, target.open_end,
                      f">\n{indent}{block}\n{_indent_of(data, target.start)}</{qname}>".encode("utf-8")))
    else:
        edits.append(_insert_lines(data, data.rindex(b"</", target.start, target.end), f"{indent}{block}", indent))
    return _apply(data, edits)


def _insert_lines(data: bytes, close: int, lines: str, indent: str) -> tuple[int, int, bytes]:
    """`lines` (already indented) just before the end tag at `close`, on lines of their own."""
    where = _line_start(data, close)
    if where != close:  # the end tag stands on its own line: ours go on lines before it
        return where, where, f"{lines}\n".encode("utf-8")
    return close, close, f"\n{lines}\n".encode("utf-8")


def _apply(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    out = data
    for start, end, replacement in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        out = out[:start] + replacement + out[end:]
    return out


# ============================================================================ files
def read_sidecar(path: Path) -> tuple[bytes | None, int | None]:
    """(content, permission bits) of an existing sidecar, or (None, None). A symbolic link, a
    FIFO, a folder or a file over 16 MiB is refused with InputError."""
    from .safefiles import NotRegularFile, open_regular

    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISREG(info.st_mode) and info.st_size > MAX_SIDECAR_BYTES:
        raise InputError(f"{path}: {info.st_size} bytes is too big for an XMP sidecar (over 16 MiB); left as it is")
    try:
        with open_regular(path, follow_symlinks=False) as fh:
            data = fh.read(MAX_SIDECAR_BYTES + 1)
    except NotRegularFile as exc:
        raise InputError(f"{path}: {exc.strerror}; left as it is") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_SIDECAR_BYTES:
        raise InputError(f"{path}: too big for an XMP sidecar (over 16 MiB); left as it is")
    return data, stat.S_IMODE(info.st_mode)


def write_keywords(image: str | os.PathLike, keywords: Keywords, journal, stem: bool = False) -> tuple[Path, str]:
    """Merge `keywords` into the image's sidecar (created when missing) through `journal` (an
    actions.SidecarJournal, which records the step and keeps the old bytes before the atomic
    write); returns (sidecar path, "merged", "new" or "unchanged"). The image is only read about,
    never opened. Raises InputError for a sidecar that cannot be merged or written (left as it
    is); OutputError from the journal stops the run."""
    path = sidecar_path(image, stem)
    data, mode = read_sidecar(path)
    try:
        merged = merge(data, keywords)
    except NotXmp as exc:
        raise InputError(f"{path}: {exc}; left as it is") from None
    if merged == data:
        return path, "unchanged"
    outcome = journal.replace(path, data, mode, merged)
    if not outcome.done:
        raise InputError(outcome.skipped)
    return path, outcome.method
