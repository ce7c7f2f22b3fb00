//! Every real FORMEX file of `shared/corpus` parses, with asserted metadata for the development set.
//!
//! Expectations: root/language/CELEX/type from `shared/corpus/formex/SOURCES.md`; article counts are `ARTICLE`
//! elements outside `QUOT.S` (for these files the same as the act's own articles: in `ENACTING.TERMS`, not in an
//! annex), counted independently with lxml (see the generator note at the table). `celex = "-"`
//! means "not derivable from the files, asserted None" (corrigenda: the `R(nn)` number is in no file; OJ issue
//! manifests). The corpus is required: the test fails if it is missing.

use std::path::PathBuf;

use lexflow_actors::reader::{expand_inputs, read_file, read_files_with_manifests};
use lexflow_actors::types::{DocType, Document};

fn corpus() -> PathBuf {
    lexflow_tests::real_corpus()
}

/// (file, main root, lang, celex or "-", doc_type, articles, documents in the file).
/// Generated from SOURCES.md + lxml: `len([a for a in root.iter('ARTICLE') if no QUOT.S ancestor])`.
const EXPECTED: &[(&str, &str, &str, &str, &str, usize, usize)] = &[
    (
        "L_2016119EN.01000101.xml",
        "ACT",
        "en",
        "32016R0679",
        "regulation",
        99,
        1,
    ),
    (
        "L_2016119DE.01000101.xml",
        "ACT",
        "de",
        "32016R0679",
        "regulation",
        99,
        1,
    ),
    (
        "L_2016119ES.01000101.xml",
        "ACT",
        "es",
        "32016R0679",
        "regulation",
        99,
        1,
    ),
    (
        "L_2016119IT.01000101.xml",
        "ACT",
        "it",
        "32016R0679",
        "regulation",
        99,
        1,
    ),
    (
        "L_2016119PL.01000101.xml",
        "ACT",
        "pl",
        "32016R0679",
        "regulation",
        99,
        1,
    ),
    (
        "L_2016119BG.01000101.xml",
        "ACT",
        "bg",
        "32016R0679",
        "regulation",
        99,
        1,
    ),
    (
        "L_2016119PT.01000101.xml",
        "ACT",
        "pt",
        "32016R0679",
        "regulation",
        99,
        1,
    ),
    (
        "L_2016119EN.01000101.doc.xml",
        "DOC",
        "en",
        "32016R0679",
        "manifest",
        0,
        1,
    ),
    (
        "L_2018127EN.01000201.xml",
        "CORR",
        "en",
        "-",
        "corrigendum",
        0,
        1,
    ),
    (
        "L_2018127NL.01000201.xml",
        "CORR",
        "nl",
        "-",
        "corrigendum",
        0,
        1,
    ),
    (
        "L_2018127HR.01000201.xml",
        "CORR",
        "hr",
        "-",
        "corrigendum",
        0,
        1,
    ),
    (
        "L_2018127SV.01000201.xml",
        "CORR",
        "sv",
        "-",
        "corrigendum",
        0,
        1,
    ),
    (
        "L_2018127EN.01000201.doc.xml",
        "DOC",
        "en",
        "-",
        "manifest",
        0,
        1,
    ),
    (
        "gdpr-consolidated-es.xml",
        "CONS.ACT",
        "es",
        "32016R0679",
        "regulation",
        99,
        1,
    ),
    (
        "CL1962R0141EN0020010.0001.xml",
        "CONS.ACT",
        "en",
        "31962R0141",
        "regulation",
        4,
        1,
    ),
    (
        "CL1962R0141EN0020010.0001.doc.xml",
        "DOC",
        "en",
        "31962R0141",
        "manifest",
        0,
        1,
    ),
    (
        "CL1967L0227FR0030010.0001.xml",
        "CONS.ACT",
        "fr",
        "31967L0227",
        "directive",
        6,
        1,
    ),
    (
        "CL1995L0046EN0020010.0001.xml",
        "CONS.ACT",
        "en",
        "31995L0046",
        "directive",
        1,
        1,
    ),
    (
        "CL2009D1008EN0050010.0001.xml",
        "CONS.ACT",
        "en",
        "32009D1008",
        "decision",
        3,
        1,
    ),
    (
        "CL2009D1008EN0050010.0001.doc.xml",
        "DOC",
        "en",
        "32009D1008",
        "manifest",
        0,
        1,
    ),
    (
        "CL2016R0679FR0000020.0001.xml",
        "CONS.ACT",
        "fr",
        "32016R0679",
        "regulation",
        99,
        1,
    ),
    (
        "CL2019L1937EN0060010.0001.xml",
        "CONS.ACT",
        "en",
        "32019L1937",
        "directive",
        29,
        1,
    ),
    (
        "CL2024R1689FR0010010.0001.xml",
        "CONS.ACT",
        "fr",
        "32024R1689",
        "regulation",
        119,
        1,
    ),
    (
        "CL2024R1689FR0010010.0001.doc.xml",
        "DOC",
        "fr",
        "32024R1689",
        "manifest",
        0,
        1,
    ),
    (
        "CL2013R0575EN0210010.0001.xml",
        "CONS.ACT",
        "en",
        "32013R0575",
        "regulation",
        786,
        1,
    ),
    (
        "CL2024L1405FR0000010.0001.xml",
        "CONS.ACT",
        "fr",
        "32024L1405",
        "directive",
        4,
        1,
    ),
    (
        "CL1968R1017FR0030010.0001.xml",
        "CONS.ACT",
        "fr",
        "31968R1017",
        "regulation",
        31,
        1,
    ),
    (
        "62013TO0488.cs.fmx.xml",
        "ORDER",
        "cs",
        "62013TO0488",
        "order",
        0,
        1,
    ),
    (
        "62018CJ0311.en.fmx.xml",
        "JUDGMENT",
        "en",
        "62018CJ0311",
        "judgment",
        0,
        1,
    ),
    (
        "62018CJ0311.lv.fmx.xml",
        "JUDGMENT",
        "lv",
        "62018CJ0311",
        "judgment",
        0,
        1,
    ),
    (
        "62022CJ0128.en.fmx.xml",
        "JUDGMENT",
        "en",
        "62022CJ0128",
        "judgment",
        0,
        1,
    ),
    (
        "62023CO0786.en.fmx.xml",
        "ORDER",
        "en",
        "62023CO0786",
        "order",
        0,
        1,
    ),
    (
        "L_202400903EN.000101.fmx.xml",
        "ACT",
        "en",
        "32024R0903",
        "regulation",
        23,
        1,
    ),
    (
        "L_202400903EN.002601.fmx.xml",
        "ANNEX",
        "en",
        "32024R0903",
        "annex",
        0,
        1,
    ),
    (
        "L_202400903EN.doc.fmx.xml",
        "DOC",
        "en",
        "32024R0903",
        "manifest",
        0,
        1,
    ),
    (
        "L_202400903EN.toc.fmx.xml",
        "PUBLICATION",
        "en",
        "-",
        "manifest",
        0,
        1,
    ),
    (
        "tulit__e115172d-3ab3-4b14-b0a4-dfdcc9871793.0006.04__DOC_1.xml",
        "DOC",
        "en",
        "32008R1137",
        "manifest",
        0,
        1,
    ),
    (
        "tulit__e115172d-3ab3-4b14-b0a4-dfdcc9871793.0006.04__DOC_2.xml",
        "ACT",
        "en",
        "32008R1137",
        "regulation",
        3,
        1,
    ),
    (
        "tulit__e115172d-3ab3-4b14-b0a4-dfdcc9871793.0006.04__DOC_3.xml",
        "ANNEX",
        "en",
        "32008R1137",
        "annex",
        0,
        1,
    ),
    (
        "tulit__e115172d-3ab3-4b14-b0a4-dfdcc9871793.0006.04__DOC_4.xml",
        "ANNEX",
        "en",
        "32008R1137",
        "annex",
        0,
        1,
    ),
    (
        "L_2017154EN.01000101.xml",
        "ACT",
        "en",
        "32017R1001",
        "regulation",
        212,
        1,
    ),
    (
        "L_2017154EN.01000101.doc.xml",
        "DOC",
        "en",
        "32017R1001",
        "manifest",
        0,
        1,
    ),
    (
        "L_2017154EN.01008901.xml",
        "ANNEX",
        "en",
        "32017R1001",
        "annex",
        0,
        1,
    ),
    (
        "L_2017154EN.01009301.xml",
        "ANNEX",
        "en",
        "32017R1001",
        "annex",
        0,
        1,
    ),
    (
        "L_2017154EN.01009401.xml",
        "ANNEX",
        "en",
        "32017R1001",
        "annex",
        0,
        1,
    ),
    (
        "CL2011L0083EN0020010.0001.xml",
        "CONS.ACT",
        "en",
        "32011L0083",
        "directive",
        36,
        1,
    ),
    (
        "CL2011L0083EN0020010.0001.doc.xml",
        "DOC",
        "en",
        "32011L0083",
        "manifest",
        0,
        1,
    ),
    (
        "L_202401689EN.000101.fmx.xml",
        "ACT",
        "en",
        "32024R1689",
        "regulation",
        113,
        1,
    ),
    (
        "L_202401689EN.012401.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.012601.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.012701.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.013001.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.013201.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.013301.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.013401.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.013601.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.013801.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.013901.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.014101.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.014301.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.014401.fmx.xml",
        "ANNEX",
        "en",
        "32024R1689",
        "annex",
        0,
        1,
    ),
    (
        "L_202401689EN.doc.fmx.xml",
        "DOC",
        "en",
        "32024R1689",
        "manifest",
        0,
        1,
    ),
    (
        "L_202401689EN.toc.fmx.xml",
        "PUBLICATION",
        "en",
        "-",
        "manifest",
        0,
        1,
    ),
    (
        "32022R1925-formex.xml",
        "ACT",
        "en",
        "32022R1925",
        "regulation",
        54,
        1,
    ),
    (
        "32024R2847-formex.xml",
        "ACT",
        "en",
        "32024R2847",
        "regulation",
        71,
        1,
    ),
    (
        "32024R2847-toc-formex.xml",
        "PUBLICATION",
        "en",
        "32024R2847",
        "manifest",
        0,
        1,
    ),
    (
        "aia.fmx.xml",
        "ACT",
        "en",
        "32024R1689",
        "regulation",
        113,
        15,
    ),
    (
        "lexparency__mifid_ii.xml",
        "CONS.ACT",
        "de",
        "32014L0065",
        "directive",
        15,
        1,
    ),
];

fn all_formex() -> Vec<(PathBuf, Vec<Document>)> {
    let files = expand_inputs(&[corpus().join("formex").display().to_string()]).unwrap();
    assert_eq!(files.len(), 68, "development set has 68 files");
    read_files_with_manifests(&files)
        .into_iter()
        .map(|(p, r)| {
            let docs = r.unwrap_or_else(|e| panic!("{} failed: {e}", p.display()));
            (p, docs)
        })
        .collect()
}

#[test]
fn real_formex_every_file_parses_with_expected_metadata() {
    let all = all_formex();
    assert_eq!(EXPECTED.len(), 68);
    let mut failures = Vec::new();
    for &(file, root, lang, celex, ty, arts, ndocs) in EXPECTED {
        let (_, docs) = all
            .iter()
            .find(|(p, _)| p.file_name().unwrap() == file)
            .unwrap_or_else(|| panic!("{file} not in corpus"));
        if docs.len() != ndocs {
            failures.push(format!(
                "{file}: {} documents, expected {ndocs}",
                docs.len()
            ));
            continue;
        }
        let d = docs
            .iter()
            .find(|d| d.doc_type != DocType::Manifest)
            .unwrap_or(&docs[0]);
        let want_celex = if celex == "-" { None } else { Some(celex) };
        let got = (
            d.root.as_str(),
            d.lang.as_deref(),
            d.celex.as_deref(),
            d.doc_type.as_str(),
            d.articles.len(),
        );
        let want = (root, Some(lang), want_celex, ty, arts);
        if got != want {
            failures.push(format!("{file}: got {got:?}, expected {want:?}"));
        }
        if d.doc_type == DocType::Manifest {
            if !d.text.is_empty() {
                failures.push(format!("{file}: manifest has text"));
            }
        } else if d.text.trim().is_empty() {
            failures.push(format!("{file}: empty text"));
        }
        if d.date.is_none() {
            failures.push(format!("{file}: no date"));
        }
        if d.title.is_none() {
            failures.push(format!("{file}: no title"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn doc<'a>(all: &'a [(PathBuf, Vec<Document>)], file: &str) -> &'a Document {
    let (_, v) = all
        .iter()
        .find(|(p, _)| p.file_name().unwrap() == file)
        .unwrap();
    v.iter()
        .find(|d| d.doc_type != DocType::Manifest)
        .unwrap_or(&v[0])
}

#[test]
fn real_formex_text_and_fields() {
    let all = all_formex();
    let gdpr = doc(&all, "L_2016119EN.01000101.xml");
    assert_eq!(gdpr.date.as_deref(), Some("2016-04-27"));
    assert!(gdpr
        .title
        .as_deref()
        .unwrap()
        .starts_with("Regulation (EU) 2016/679 of the European Parliament"));
    let a1 = &gdpr.articles[0];
    assert_eq!((a1.id.as_str(), a1.title.as_str()), ("001", "Article 1"));
    assert_eq!(
        a1.subtitle.as_deref(),
        Some("Subject-matter and objectives")
    );
    assert_eq!(a1.paragraphs.len(), 3);
    assert!(
        a1.paragraphs[0].starts_with("1. This Regulation lays down rules"),
        "{}",
        a1.paragraphs[0]
    );
    let t = &gdpr.text;
    assert!(
        t.contains("Article 1\nSubject-matter and objectives\n1. This Regulation lays down rules"),
        "{}",
        &t[..2000]
    );
    assert!(t.contains("(the \u{2018}Charter\u{2019})"));
    assert!(
        t.contains("Committee [OJ C 229, 31.7.2012, p. 90.],"),
        "footnote inline"
    );
    assert!(
        !t.contains("  ") && !t.contains(" \n") && !t.contains("\n\n"),
        "clean whitespace"
    );
    assert!(
        !t.contains("L_2016119EN.01000101.doc.xml") && !t.starts_with("L\n"),
        "BIB.INSTANCE stripped"
    );
    assert_eq!(gdpr.articles.last().unwrap().id, "099");

    // consolidated: CELEX from NO.CELEX, date of the version, title of the base act, no modifier list in the text
    let cons = doc(&all, "CL2011L0083EN0020010.0001.xml");
    assert_eq!(cons.date.as_deref(), Some("2022-05-28"));
    assert!(cons
        .title
        .as_deref()
        .unwrap()
        .starts_with("Directive 2011/83/EU of the European Parliament"));
    assert!(!cons.text.contains("32015L2302"));
    assert!(cons.text.contains("Correlation table"));
    assert!(
        cons.text.lines().any(|l| l.starts_with("Article 1 |")),
        "table rows render as cell | cell"
    );

    // case law: language from the file name, date from the title
    let j = doc(&all, "62018CJ0311.lv.fmx.xml");
    assert_eq!(j.date.as_deref(), Some("2020-07-16"));
    assert!(j.text.len() > 100_000);

    // corrigendum quotes are not articles; aia wrapper gives PUBLICATION + ACT + 13 ANNEX
    let (_, aia) = all
        .iter()
        .find(|(p, _)| p.file_name().unwrap() == "aia.fmx.xml")
        .unwrap();
    let roots: Vec<&str> = aia.iter().map(|d| d.root.as_str()).collect();
    assert_eq!(roots[..2], ["PUBLICATION", "ACT"]);
    assert_eq!(roots.iter().filter(|r| **r == "ANNEX").count(), 13);

    // annexes get the CELEX of their package from the manifest
    let annex = doc(&all, "L_2017154EN.01008901.xml");
    assert_eq!(annex.doc_type, DocType::Annex);
    assert_eq!(annex.celex.as_deref(), Some("32017R1001"));
}

#[test]
fn real_bench_every_file_parses() {
    let bench = corpus().join("bench");
    let files = expand_inputs(&[bench.display().to_string()]).unwrap();
    assert_eq!(files.len(), 610, "bench corpus has 610 files");
    let (mut docs, mut arts, mut chars) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    for f in &files {
        let lang = f
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        match read_file(f) {
            Err(e) => failures.push(format!("{e}")),
            Ok(v) => {
                if v.len() != 1 {
                    failures.push(format!("{}: {} documents", f.display(), v.len()));
                    continue;
                }
                let d = &v[0];
                let name = f.file_name().unwrap().to_str().unwrap();
                // CL2016R0679FR… → 32016R0679 must agree with NO.CELEX
                let from_name = format!("3{}", &name[2..11]);
                if d.celex.as_deref() != Some(from_name.as_str()) {
                    failures.push(format!("{name}: celex {:?} != {from_name}", d.celex));
                }
                if d.lang.as_deref() != Some(lang.as_str()) {
                    failures.push(format!("{name}: lang {:?}", d.lang));
                }
                if !matches!(
                    d.doc_type,
                    DocType::Regulation | DocType::Directive | DocType::Decision
                ) {
                    failures.push(format!("{name}: type {:?}", d.doc_type));
                }
                if d.text.trim().is_empty() || d.date.is_none() || d.title.is_none() {
                    failures.push(format!("{name}: empty text/date/title"));
                }
                docs += 1;
                arts += d.articles.len();
                chars += d.text.len();
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(docs, 610);
    assert!(arts > 10_000, "articles {arts}");
    assert!(chars > 50_000_000, "text bytes {chars}");
}
