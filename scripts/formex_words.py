"""Reference text of FORMEX files for `tests/text_coverage.rs`, computed with lxml, independently of actors/src/formex.rs.

For each input file (plain `.xml` or `.xml.zst`), writes the file's text content — every text node of the XML, in
document order — to OUTDIR/<n>.txt (n = 0-based position of the path in the input list), with:
* a space at the start and end of every element that is not inline markup (so `<P>a</P><P>b</P>` gives two words,
  `<HT>a</HT>b` one), see INLINE;
* the metadata blocks of EXCLUDED left out (the only text that is not training text by design);
* the characters that the markup stands for written out: `QUOT.START`/`QUOT.END` write the character whose hex code
  is their `CODE`, `DIVISOR` writes the fraction bar `/` before the divisor, `SUM` writes `Σ`.
Processing instructions and comments contribute nothing, but the text after them (their tail) does.
The test splits this text into words exactly as it splits the parser's output.

Usage: python scripts/formex_words.py OUTDIR < paths (one per line)
Prints one JSON line: {"files": n, "bytes": total uncompressed}.
"""

import json
import os
import sys
from multiprocessing import Pool

import zstandard
from lxml import etree

# Roots whose whole content is package metadata: the `.doc` manifest and the OJ issue manifest (`.toc`).
MANIFEST_ROOTS = {"DOC", "PUBLICATION"}

# Metadata blocks: not text of the act by design, never training text. Each with the reason.
EXCLUDED = {
    # Bibliographic record of an act/annex/corrigendum: document reference, dates, language, number, page numbers,
    # the list of image files (INCLUSIONS). Codes, not prose.
    "BIB.INSTANCE",
    # Bibliographic record of a manifest / OJ issue (only inside MANIFEST_ROOTS in the corpus).
    "BIB.DOC",
    "BIB.OJ",
    # Consolidated texts: the family of the act (BIB.DATA of the base act, GR.MOD.ACT/MOD.ACT of every amending act,
    # GR.CORRIG of corrigenda), i.e. a list of bibliographic records.
    "FAM.COMP",
    # Consolidated texts: production data and the consolidation record (attributes only).
    "INFO.PROD",
    "INFO.CONSLEG",
    # Case law: bibliographic records (case number, CELEX, ECLI, author court, pages).
    "BIB.JUDGMENT",
    "BIB.ORDER",
    "BIB.CONCLUSION",
    "BIB.OPINION",
    "BIB.RULING",
    "BIB.DECISION.ECR",
    "BIB.CASE",
    "BIB.ECR",
    # Case law: the running page head (a repeat of the title and case number printed on every page).
    "CURR.TITLE",
}

# Inline markup: its boundaries do not separate words (`<HT TYPE="SUP">st</HT>`, `m<IND>2</IND>`). Every other
# element separates words. Formatting (HT, FT, IE: an intentionally empty cell), dates, references and links inside
# running text, quotation marks, anonymised names, and formula markup (its parts are glued as the printed formula is).
# Not LV (language version): it holds a whole name in one language, and two versions can be adjacent
# (`<LV LG="FI">… teollisuusministeriö</LV><LV LG="SV">Handels- …</LV>`); nor INCL.ELEMENT (an image, maybe inline).
INLINE = {
    "HT",
    "FT",
    "IE",
    "DATE",
    "QUOT.START",
    "QUOT.END",
    "REF.DOC",
    "REF.DOC.OJ",
    "REF.DOC.ECR",
    "REF.DOC.SE",
    "REF.NP.ECR",
    "NO.CASE",
    "NAME.CASE",
    "NO.ECLI",
    "LINK",
    "ANONYMOUS",
    "FORMULA",
    "EXPR",
    "IND",
    "EXPONENT",
    "FRACTION",
    "DIVIDEND",
    "DIVISOR",
    "SUM",
    "PRODUCT",
    "INTEGRAL",
    "OVER",
    "UNDER",
    "OVERLINE",
    "BAR",
    "ROOT",
    "DEGREE",
    "VECTOR",
    "FUNCTION",
    "FMT.VALUE",
}


def render(elem, out):
    """Appends the text of `elem` (not its tail) to `out`."""
    tag = elem.tag
    if tag in EXCLUDED:
        return
    sep = tag not in INLINE
    if sep:
        out.append(" ")
    if tag in ("QUOT.START", "QUOT.END"):
        code = elem.get("CODE")
        if code:
            out.append(chr(int(code, 16)))
    elif tag == "DIVISOR":
        out.append("/")
    elif tag == "SUM":
        out.append("\u03a3")
    if elem.text:
        out.append(elem.text)
    for child in elem:
        if isinstance(child.tag, str):
            render(child, out)
        if child.tail:
            out.append(child.tail)
    if sep:
        out.append(" ")


def reference_text(data):
    root = etree.fromstring(data, parser=etree.XMLParser(resolve_entities=False, huge_tree=True))
    out = []
    # A wrapper root (COMBINED.FMX, LEXP.COMBINED) may hold manifests next to the documents.
    if root.tag in MANIFEST_ROOTS:
        return ""
    out.append(" ")
    if root.text:
        out.append(root.text)
    for child in root:
        if isinstance(child.tag, str) and child.tag not in MANIFEST_ROOTS:
            render(child, out)
        if child.tail:
            out.append(child.tail)
    return "".join(out)


def one(job):
    i, path, outdir = job
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    text = reference_text(data)
    with open(os.path.join(outdir, f"{i}.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    return len(data)


def main(outdir):
    paths = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    jobs = [(i, p, outdir) for i, p in enumerate(paths)]
    # Largest first, so the pool does not end on one big file.
    jobs.sort(key=lambda j: -os.path.getsize(j[1]))
    with Pool(min(os.cpu_count() or 1, 4)) as pool:
        sizes = pool.map(one, jobs, chunksize=1)
    print(json.dumps({"files": len(paths), "bytes": sum(sizes)}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
