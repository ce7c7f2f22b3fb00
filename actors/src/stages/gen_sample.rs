//! Deterministic generator of realistic FORMEX 4 sample packages (the corpus `lexflow run` uses when no input paths are
//! configured, and the fixture of many tests).
//!
//! Layout: `out/<lg>/` per language, with Official-Journal-style file names:
//!
//! * `L_2023<nnn><LG>.01000101.xml` — the act body (`ACT`), sometimes compressed as `.xml.zst`;
//! * `L_2023<nnn><LG>.0100PPPP01.xml` — 0–3 annexes (`ANNEX`, with a `TBL/CORPUS/ROW/CELL` table);
//! * `L_2023<nnn><LG>.01000101.doc.xml` — the manifest (`DOC`) naming body and annexes, with the CELEX number;
//! * corrigenda (`CORR`) as `L_2023<nnn><LG>.01000201.xml` (+ `.doc.xml`);
//! * consolidated texts (`CONS.ACT`, with `NO.CELEX`) as `CL2023<T><nnnn><LG>0010010.0001.xml`;
//! * the last act of each language packed as one `L_2023<nnn><LG>.zip` (body, annexes and manifest inside).
//!
//! Act `i` has the same type, number, date and structure (articles, paragraphs, lists, notes, annexes) in every
//! language, like a real translated act; only the wording differs, drawn from small per-language vocabularies of legal
//! phrases (`en`, `fr`, `de`, `es`, `pt`; any other ISO 639-1 code gets the English vocabulary under its own `LG.DOC`).
//! Everything derives from `seed` through ChaCha8 streams keyed by (seed, act) and (seed, act, language): the same
//! config produces byte-identical files, and adding a language does not change the others.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// `[input.generate]`: the sample corpus generated when `input.paths` is empty (`lexflow gen-sample` too).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// Number of acts (each with annexes and a manifest) per language.
    #[serde(default = "default_gen_acts")]
    pub acts_per_language: usize,
    #[serde(default = "default_gen_langs")]
    pub languages: Vec<String>,
    #[serde(default = "default_gen_seed")]
    pub seed: u64,
}

/// `input.generate.seed` defaults to the value `run.seed` defaults to.
fn default_gen_seed() -> u64 {
    1234
}

fn default_gen_acts() -> usize {
    40
}

fn default_gen_langs() -> Vec<String> {
    ["en", "fr", "de", "es", "pt"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            acts_per_language: default_gen_acts(),
            languages: default_gen_langs(),
            seed: default_gen_seed(),
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GenStats {
    /// Files written (a `.zip` counts once).
    pub files: usize,
    /// Bytes written to disk (compressed sizes for `.zst` and `.zip`).
    pub bytes: u64,
    /// Acts (publications: act, corrigendum or consolidated text) per language.
    pub acts: BTreeMap<String, usize>,
    /// XML documents per language (bodies, annexes, manifests; including those inside `.zst`/`.zip`).
    pub documents: BTreeMap<String, usize>,
    pub annexes: usize,
    pub corrigenda: usize,
    pub consolidated: usize,
    pub zst_files: usize,
    pub zip_files: usize,
    /// Input files of an earlier generation removed by [`generate_exact`].
    pub stale_removed: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regulation,
    Directive,
    Decision,
    Corrigendum,
    Consolidated,
}

/// Type letter of the act in its CELEX number.
fn celex_letter(t: usize) -> char {
    ['R', 'L', 'D'][t]
}

/// The parts of an act that are the same in every language.
struct Plan {
    kind: Kind,
    /// 0 regulation, 1 directive, 2 decision: the act itself, or the act corrected/consolidated.
    act_type: usize,
    /// Adopted by the Parliament and Council (else by the Commission).
    parliament: bool,
    year: u32,
    oj: u32,
    number: u32,
    month: u32,
    day: u32,
    topic: usize,
    annexes: usize,
    pages: u32,
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    // splitmix64 over the three words: independent, well-spread stream seeds.
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn lang_key(lang: &str) -> u64 {
    lang.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn plan(i: usize, s: &mut ChaCha8Rng) -> Plan {
    let kind = match i % 20 {
        4 | 14 => Kind::Corrigendum,
        9 => Kind::Consolidated,
        1 | 5 | 11 | 17 => Kind::Directive,
        2 | 8 | 12 | 18 => Kind::Decision,
        _ => Kind::Regulation,
    };
    let act_type = match kind {
        Kind::Regulation => 0,
        Kind::Directive => 1,
        Kind::Decision => 2,
        Kind::Corrigendum | Kind::Consolidated => s.gen_range(0..2),
    };
    Plan {
        kind,
        act_type,
        parliament: act_type == 1 || (act_type == 0 && s.gen_bool(0.6)),
        year: 2023 - (i / 900) as u32,
        oj: 100 + (i % 900) as u32,
        number: 1001 + i as u32,
        month: s.gen_range(1..=12),
        day: s.gen_range(1..=28),
        topic: s.gen_range(0..1000),
        annexes: if matches!(kind, Kind::Corrigendum | Kind::Consolidated) {
            0
        } else {
            [0, 0, 0, 0, 0, 1, 1, 1, 2, 3][s.gen_range(0..10)]
        },
        pages: s.gen_range(2..60),
    }
}

/// Per-language legal phrases. Placeholders: `{act}` (the act's name in context), `{n}` (a number).
struct Vocab {
    act_type: [&'static str; 3],
    this_act: [&'static str; 3],
    eu: &'static str,
    by_parliament: &'static str,
    by_commission: [&'static str; 2],
    of: &'static str,
    months: [&'static str; 12],
    date_style: u8,
    topics: &'static [&'static str],
    preamble_init: [&'static str; 2],
    visas: &'static [&'static str],
    whereas: &'static str,
    preamble_final: &'static str,
    subj_sg: &'static [&'static str],
    pred_sg: &'static [&'static str],
    subj_pl: &'static [&'static str],
    pred_pl: &'static [&'static str],
    adjuncts: &'static [&'static str],
    ref_prefix: &'static str,
    oj_ref: &'static str,
    article: &'static str,
    article_one: &'static str,
    chapter: &'static str,
    chapter_titles: &'static [&'static str],
    art_titles: &'static [&'static str],
    defs_intro: &'static str,
    terms: &'static [&'static str],
    means: &'static str,
    def_bodies: &'static [&'static str],
    list_intro: &'static str,
    list_items: &'static [&'static str],
    amend_intro: &'static str,
    entry_into_force: &'static str,
    finals: [&'static str; 3],
    done_at: &'static str,
    for_parliament: &'static str,
    for_council: &'static str,
    for_commission: &'static str,
    president: &'static str,
    annex: &'static str,
    annex_titles: &'static [&'static str],
    table_headers: &'static [&'static str],
    table_cells: &'static [&'static str],
    corrigendum: &'static str,
    corr_where: &'static str,
    for_: &'static str,
    read: &'static str,
    quotes: (&'static str, &'static str),
    eea: &'static str,
}

const EN: Vocab = Vocab {
    act_type: ["Regulation", "Directive", "Decision"],
    this_act: ["This Regulation", "This Directive", "This Decision"],
    eu: "(EU)",
    by_parliament: "of the European Parliament and of the Council",
    by_commission: ["Commission", ""],
    of: "of",
    months: ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"],
    date_style: 0,
    topics: &[
        "on the protection of natural persons with regard to the processing of personal data",
        "laying down harmonised rules on artificial intelligence",
        "on the protection of persons who report breaches of Union law",
        "on consumer rights and the approximation of the laws of the Member States",
        "on the conservation of fishery resources and the protection of marine ecosystems",
        "establishing a framework for the screening of foreign direct investments into the Union",
        "on the energy performance of buildings",
        "on common rules for the internal market for electricity",
        "on the approval and market surveillance of motor vehicles and their trailers",
        "laying down detailed rules for the implementation of the common agricultural policy",
    ],
    preamble_init: ["THE EUROPEAN PARLIAMENT AND THE COUNCIL OF THE EUROPEAN UNION,", "THE EUROPEAN COMMISSION,"],
    visas: &[
        "Having regard to the Treaty on the Functioning of the European Union, and in particular Article {n} thereof,",
        "Having regard to the proposal from the European Commission,",
        "After transmission of the draft legislative act to the national parliaments,",
        "Having regard to the opinion of the European Economic and Social Committee",
        "Acting in accordance with the ordinary legislative procedure",
    ],
    whereas: "Whereas:",
    preamble_final: "HAVE ADOPTED THIS ACT:",
    subj_sg: &["The Commission", "The competent authority", "The Agency", "Each Member State", "The Board", "The provider"],
    pred_sg: &[
        "shall adopt implementing acts laying down the detailed arrangements",
        "shall ensure that the information referred to in paragraph {n} is made publicly available",
        "may request additional information from the operator concerned",
        "shall notify the Commission of the measures taken",
        "shall take all appropriate measures to guarantee compliance with the obligations laid down in this Article",
        "shall publish a report on the application of this Article",
        "shall keep records of the assessments carried out",
        "may decide to extend the period referred to in the first subparagraph",
    ],
    subj_pl: &["Member States", "The competent authorities", "Providers", "Operators", "Notified bodies", "The supervisory authorities"],
    pred_pl: &[
        "shall lay down the rules on penalties applicable to infringements",
        "shall ensure that adequate resources are allocated to the tasks laid down in this Regulation",
        "shall cooperate closely with each other and exchange all relevant information",
        "may adopt or maintain more stringent provisions",
        "shall designate one or more competent authorities responsible for the application of this Article",
        "shall communicate to the Commission the text of the main provisions of national law",
        "shall establish procedures for the handling of complaints",
        "shall take the necessary measures to comply with the requirements set out in Annex I",
    ],
    adjuncts: &[
        "in accordance with Article {n}",
        "without undue delay",
        "by 31 December 2025",
        "within three months of the date of receipt of the request",
        "in accordance with the examination procedure referred to in Article {n}(2)",
        "taking into account the generally acknowledged state of the art",
        "where appropriate",
        "in a clear and comprehensible manner",
        "for the purposes of paragraph {n}",
        "at least once every two years",
    ],
    ref_prefix: "in accordance with Regulation (EU)",
    oj_ref: "OJ L",
    article: "Article",
    article_one: "Article 1",
    chapter: "CHAPTER",
    chapter_titles: &["General provisions", "Obligations of providers", "Supervision and enforcement", "Governance", "Penalties", "Final provisions", "Transparency requirements"],
    art_titles: &["Subject matter", "Scope", "Definitions", "Obligations of Member States", "Reporting", "Exercise of the delegation", "Committee procedure", "Penalties", "Review", "Entry into force and application", "Confidentiality", "Cooperation between authorities"],
    defs_intro: "For the purposes of {act}, the following definitions apply:",
    terms: &["provider", "competent authority", "personal data", "placing on the market", "serious incident", "operator", "consumer", "trader"],
    means: " means ",
    def_bodies: &[
        "a natural or legal person, public authority, agency or other body",
        "any information relating to an identified or identifiable natural person",
        "the first making available of a product on the Union market",
        "any person who is acting for purposes which are outside his trade, business, craft or profession",
        "an authority designated by a Member State in accordance with Article {n}",
        "any incident that directly or indirectly leads to serious damage to health or property",
    ],
    list_intro: "The report shall include at least the following elements:",
    list_items: &[
        "a description of the measures taken",
        "the number of complaints received",
        "an assessment of the impact on small and medium-sized enterprises",
        "the resources allocated to the competent authorities",
        "the results of the checks carried out under Article {n}",
        "any other relevant information",
    ],
    amend_intro: "Article {n} of Regulation (EU) 2019/881 is replaced by the following:",
    entry_into_force: "{act} shall enter into force on the twentieth day following that of its publication in the Official Journal of the European Union.",
    finals: [
        "This Regulation shall be binding in its entirety and directly applicable in all Member States.",
        "This Directive is addressed to the Member States.",
        "This Decision is addressed to the Member States.",
    ],
    done_at: "Done at Brussels, ",
    for_parliament: "For the European Parliament",
    for_council: "For the Council",
    for_commission: "For the Commission",
    president: "The President",
    annex: "ANNEX",
    annex_titles: &["List of Union harmonisation legislation", "Information to be submitted", "Correlation table", "Technical documentation", "Amounts of the fees"],
    table_headers: &["Category", "Description", "Amount (EUR)", "Reference"],
    table_cells: &["Basic fee", "Application by electronic means", "Renewal", "Article {n}(1)", "Not applicable", "Annual supervisory fee", "Point (a)"],
    corrigendum: "Corrigendum to",
    corr_where: "On page {n}, Article {n}, paragraph {n}:",
    for_: "for:",
    read: "read:",
    quotes: ("2018", "2019"),
    eea: "(Text with EEA relevance)",
};

const FR: Vocab = Vocab {
    act_type: ["Règlement", "Directive", "Décision"],
    this_act: ["Le présent règlement", "La présente directive", "La présente décision"],
    eu: "(UE)",
    by_parliament: "du Parlement européen et du Conseil",
    by_commission: ["", "de la Commission"],
    of: "du",
    months: ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre", "novembre", "décembre"],
    date_style: 1,
    topics: &[
        "relatif à la protection des personnes physiques à l'égard du traitement des données à caractère personnel",
        "établissant des règles harmonisées concernant l'intelligence artificielle",
        "sur la protection des personnes qui signalent des violations du droit de l'Union",
        "relative aux droits des consommateurs",
        "relatif à la conservation des ressources halieutiques et à la protection des écosystèmes marins",
        "établissant un cadre pour le filtrage des investissements directs étrangers dans l'Union",
        "sur la performance énergétique des bâtiments",
        "concernant des règles communes pour le marché intérieur de l'électricité",
        "relatif à la réception et à la surveillance du marché des véhicules à moteur",
        "portant modalités d'application de la politique agricole commune",
    ],
    preamble_init: ["LE PARLEMENT EUROPÉEN ET LE CONSEIL DE L'UNION EUROPÉENNE,", "LA COMMISSION EUROPÉENNE,"],
    visas: &[
        "vu le traité sur le fonctionnement de l'Union européenne, et notamment son article {n},",
        "vu la proposition de la Commission européenne,",
        "après transmission du projet d'acte législatif aux parlements nationaux,",
        "vu l'avis du Comité économique et social européen",
        "statuant conformément à la procédure législative ordinaire",
    ],
    whereas: "considérant ce qui suit:",
    preamble_final: "ONT ADOPTÉ LE PRÉSENT ACTE:",
    subj_sg: &["La Commission", "L'autorité compétente", "L'Agence", "Chaque État membre", "Le comité", "Le fournisseur"],
    pred_sg: &[
        "adopte des actes d'exécution précisant les modalités détaillées",
        "veille à ce que les informations visées au paragraphe {n} soient rendues publiques",
        "peut demander des informations complémentaires à l'opérateur concerné",
        "notifie à la Commission les mesures prises",
        "prend toutes les mesures appropriées pour garantir le respect des obligations prévues au présent article",
        "publie un rapport sur l'application du présent article",
        "conserve une trace des évaluations effectuées",
        "peut décider de prolonger le délai visé au premier alinéa",
    ],
    subj_pl: &["Les États membres", "Les autorités compétentes", "Les fournisseurs", "Les opérateurs", "Les organismes notifiés", "Les autorités de contrôle"],
    pred_pl: &[
        "déterminent le régime des sanctions applicables aux violations",
        "veillent à ce que des ressources suffisantes soient affectées aux tâches prévues par le présent règlement",
        "coopèrent étroitement et échangent toutes les informations pertinentes",
        "peuvent adopter ou maintenir des dispositions plus strictes",
        "désignent une ou plusieurs autorités compétentes chargées de l'application du présent article",
        "communiquent à la Commission le texte des dispositions essentielles de droit interne",
        "établissent des procédures de traitement des réclamations",
        "prennent les mesures nécessaires pour se conformer aux exigences énoncées à l'annexe I",
    ],
    adjuncts: &[
        "conformément à l'article {n}",
        "dans les meilleurs délais",
        "au plus tard le 31 décembre 2025",
        "dans un délai de trois mois à compter de la réception de la demande",
        "en conformité avec la procédure d'examen visée à l'article {n}, paragraphe 2",
        "en tenant compte de l'état de la technique généralement reconnu",
        "le cas échéant",
        "de manière claire et compréhensible",
        "aux fins du paragraphe {n}",
        "au moins tous les deux ans",
    ],
    ref_prefix: "conformément au règlement (UE)",
    oj_ref: "JO L",
    article: "Article",
    article_one: "Article premier",
    chapter: "CHAPITRE",
    chapter_titles: &["Dispositions générales", "Obligations des fournisseurs", "Surveillance et contrôle", "Gouvernance", "Sanctions", "Dispositions finales", "Obligations de transparence"],
    art_titles: &["Objet", "Champ d'application", "Définitions", "Obligations des États membres", "Rapports", "Exercice de la délégation", "Comité", "Sanctions", "Réexamen", "Entrée en vigueur et application", "Confidentialité", "Coopération entre autorités"],
    defs_intro: "Aux fins de {act}, on entend par:",
    terms: &["fournisseur", "autorité compétente", "données à caractère personnel", "mise sur le marché", "incident grave", "opérateur", "consommateur", "professionnel"],
    means: ": ",
    def_bodies: &[
        "une personne physique ou morale, une autorité publique, une agence ou tout autre organisme",
        "toute information se rapportant à une personne physique identifiée ou identifiable",
        "la première mise à disposition d'un produit sur le marché de l'Union",
        "toute personne physique qui agit à des fins qui n'entrent pas dans le cadre de son activité professionnelle",
        "une autorité désignée par un État membre conformément à l'article {n}",
        "tout incident entraînant directement ou indirectement un dommage grave pour la santé ou les biens",
    ],
    list_intro: "Le rapport comprend au moins les éléments suivants:",
    list_items: &[
        "une description des mesures prises",
        "le nombre de réclamations reçues",
        "une évaluation de l'incidence sur les petites et moyennes entreprises",
        "les ressources allouées aux autorités compétentes",
        "les résultats des contrôles effectués au titre de l'article {n}",
        "toute autre information pertinente",
    ],
    amend_intro: "L'article {n} du règlement (UE) 2019/881 est remplacé par le texte suivant:",
    entry_into_force: "{act} entre en vigueur le vingtième jour suivant celui de sa publication au Journal officiel de l'Union européenne.",
    finals: [
        "Le présent règlement est obligatoire dans tous ses éléments et directement applicable dans tout État membre.",
        "Les États membres sont destinataires de la présente directive.",
        "Les États membres sont destinataires de la présente décision.",
    ],
    done_at: "Fait à Bruxelles, le ",
    for_parliament: "Par le Parlement européen",
    for_council: "Par le Conseil",
    for_commission: "Par la Commission",
    president: "La présidente",
    annex: "ANNEXE",
    annex_titles: &["Liste de la législation d'harmonisation de l'Union", "Informations à fournir", "Tableau de correspondance", "Documentation technique", "Montant des taxes"],
    table_headers: &["Catégorie", "Description", "Montant (EUR)", "Référence"],
    table_cells: &["Taxe de base", "Demande par voie électronique", "Renouvellement", "Article {n}, paragraphe 1", "Sans objet", "Redevance annuelle de surveillance", "Point a)"],
    corrigendum: "Rectificatif au",
    corr_where: "À la page {n}, article {n}, paragraphe {n}:",
    for_: "au lieu de:",
    read: "lire:",
    quotes: ("00AB", "00BB"),
    eea: "(Texte présentant de l'intérêt pour l'EEE)",
};

const DE: Vocab = Vocab {
    act_type: ["Verordnung", "Richtlinie", "Beschluss"],
    this_act: ["Diese Verordnung", "Diese Richtlinie", "Dieser Beschluss"],
    eu: "(EU)",
    by_parliament: "des Europäischen Parlaments und des Rates",
    by_commission: ["der Kommission", ""],
    of: "vom",
    months: ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober", "November", "Dezember"],
    date_style: 2,
    topics: &[
        "zum Schutz natürlicher Personen bei der Verarbeitung personenbezogener Daten",
        "zur Festlegung harmonisierter Vorschriften für künstliche Intelligenz",
        "zum Schutz von Personen, die Verstöße gegen das Unionsrecht melden",
        "über die Rechte der Verbraucher",
        "über die Erhaltung der Fischereiressourcen und den Schutz von Meeresökosystemen",
        "zur Schaffung eines Rahmens für die Überprüfung ausländischer Direktinvestitionen in der Union",
        "über die Gesamtenergieeffizienz von Gebäuden",
        "mit gemeinsamen Vorschriften für den Elektrizitätsbinnenmarkt",
        "über die Genehmigung und die Marktüberwachung von Kraftfahrzeugen und Kraftfahrzeuganhängern",
        "mit Durchführungsbestimmungen zur Gemeinsamen Agrarpolitik",
    ],
    preamble_init: ["DAS EUROPÄISCHE PARLAMENT UND DER RAT DER EUROPÄISCHEN UNION —", "DIE EUROPÄISCHE KOMMISSION —"],
    visas: &[
        "gestützt auf den Vertrag über die Arbeitsweise der Europäischen Union, insbesondere auf Artikel {n},",
        "auf Vorschlag der Europäischen Kommission,",
        "nach Zuleitung des Entwurfs des Gesetzgebungsakts an die nationalen Parlamente,",
        "nach Stellungnahme des Europäischen Wirtschafts- und Sozialausschusses",
        "gemäß dem ordentlichen Gesetzgebungsverfahren",
    ],
    whereas: "in Erwägung nachstehender Gründe:",
    preamble_final: "HABEN FOLGENDES ERLASSEN:",
    subj_sg: &["Die Kommission", "Die zuständige Behörde", "Die Agentur", "Jeder Mitgliedstaat", "Der Ausschuss", "Der Anbieter"],
    pred_sg: &[
        "erlässt Durchführungsrechtsakte mit den genauen Modalitäten",
        "stellt sicher, dass die in Absatz {n} genannten Informationen öffentlich zugänglich gemacht werden",
        "kann von dem betreffenden Betreiber zusätzliche Informationen anfordern",
        "teilt der Kommission die getroffenen Maßnahmen mit",
        "trifft alle geeigneten Maßnahmen, um die Einhaltung der in diesem Artikel festgelegten Pflichten zu gewährleisten",
        "veröffentlicht einen Bericht über die Anwendung dieses Artikels",
        "führt Aufzeichnungen über die durchgeführten Bewertungen",
        "kann beschließen, die in Unterabsatz 1 genannte Frist zu verlängern",
    ],
    subj_pl: &["Die Mitgliedstaaten", "Die zuständigen Behörden", "Die Anbieter", "Die Betreiber", "Die notifizierten Stellen", "Die Aufsichtsbehörden"],
    pred_pl: &[
        "erlassen Vorschriften über Sanktionen, die bei Verstößen zu verhängen sind",
        "sorgen dafür, dass für die in dieser Verordnung festgelegten Aufgaben angemessene Ressourcen bereitgestellt werden",
        "arbeiten eng zusammen und tauschen alle einschlägigen Informationen aus",
        "können strengere Bestimmungen erlassen oder beibehalten",
        "benennen eine oder mehrere zuständige Behörden, die für die Anwendung dieses Artikels verantwortlich sind",
        "teilen der Kommission den Wortlaut der wichtigsten innerstaatlichen Rechtsvorschriften mit",
        "legen Verfahren für die Bearbeitung von Beschwerden fest",
        "treffen die erforderlichen Maßnahmen, um den Anforderungen des Anhangs I nachzukommen",
    ],
    adjuncts: &[
        "gemäß Artikel {n}",
        "unverzüglich",
        "bis zum 31. Dezember 2025",
        "innerhalb von drei Monaten nach Eingang des Antrags",
        "gemäß dem in Artikel {n} Absatz 2 genannten Prüfverfahren",
        "unter Berücksichtigung des allgemein anerkannten Stands der Technik",
        "gegebenenfalls",
        "in klarer und verständlicher Weise",
        "für die Zwecke des Absatzes {n}",
        "mindestens alle zwei Jahre",
    ],
    ref_prefix: "gemäß der Verordnung (EU)",
    oj_ref: "ABl. L",
    article: "Artikel",
    article_one: "Artikel 1",
    chapter: "KAPITEL",
    chapter_titles: &["Allgemeine Bestimmungen", "Pflichten der Anbieter", "Aufsicht und Durchsetzung", "Governance", "Sanktionen", "Schlussbestimmungen", "Transparenzpflichten"],
    art_titles: &["Gegenstand", "Anwendungsbereich", "Begriffsbestimmungen", "Pflichten der Mitgliedstaaten", "Berichterstattung", "Ausübung der Befugnisübertragung", "Ausschussverfahren", "Sanktionen", "Überprüfung", "Inkrafttreten und Geltungsbeginn", "Vertraulichkeit", "Zusammenarbeit der Behörden"],
    defs_intro: "Für die Zwecke {act} bezeichnet der Ausdruck",
    terms: &["Anbieter", "zuständige Behörde", "personenbezogene Daten", "Inverkehrbringen", "schwerwiegender Vorfall", "Betreiber", "Verbraucher", "Unternehmer"],
    means: " ",
    def_bodies: &[
        "eine natürliche oder juristische Person, Behörde, Einrichtung oder sonstige Stelle",
        "alle Informationen, die sich auf eine identifizierte oder identifizierbare natürliche Person beziehen",
        "die erstmalige Bereitstellung eines Produkts auf dem Unionsmarkt",
        "jede natürliche Person, die zu Zwecken handelt, die außerhalb ihrer gewerblichen Tätigkeit liegen",
        "eine von einem Mitgliedstaat gemäß Artikel {n} benannte Behörde",
        "einen Vorfall, der direkt oder indirekt zu einer schweren Schädigung der Gesundheit oder von Eigentum führt",
    ],
    list_intro: "Der Bericht enthält mindestens folgende Angaben:",
    list_items: &[
        "eine Beschreibung der getroffenen Maßnahmen",
        "die Zahl der eingegangenen Beschwerden",
        "eine Bewertung der Auswirkungen auf kleine und mittlere Unternehmen",
        "die den zuständigen Behörden zugewiesenen Ressourcen",
        "die Ergebnisse der gemäß Artikel {n} durchgeführten Kontrollen",
        "alle sonstigen einschlägigen Informationen",
    ],
    amend_intro: "Artikel {n} der Verordnung (EU) 2019/881 erhält folgende Fassung:",
    entry_into_force: "{act} tritt am zwanzigsten Tag nach seiner Veröffentlichung im Amtsblatt der Europäischen Union in Kraft.",
    finals: [
        "Diese Verordnung ist in allen ihren Teilen verbindlich und gilt unmittelbar in jedem Mitgliedstaat.",
        "Diese Richtlinie ist an die Mitgliedstaaten gerichtet.",
        "Dieser Beschluss ist an die Mitgliedstaaten gerichtet.",
    ],
    done_at: "Geschehen zu Brüssel am ",
    for_parliament: "Im Namen des Europäischen Parlaments",
    for_council: "Im Namen des Rates",
    for_commission: "Für die Kommission",
    president: "Die Präsidentin",
    annex: "ANHANG",
    annex_titles: &["Liste der Harmonisierungsrechtsvorschriften der Union", "Vorzulegende Informationen", "Entsprechungstabelle", "Technische Dokumentation", "Höhe der Gebühren"],
    table_headers: &["Kategorie", "Beschreibung", "Betrag (EUR)", "Fundstelle"],
    table_cells: &["Grundgebühr", "Elektronische Anmeldung", "Verlängerung", "Artikel {n} Absatz 1", "Entfällt", "Jährliche Aufsichtsgebühr", "Buchstabe a"],
    corrigendum: "Berichtigung der",
    corr_where: "Seite {n}, Artikel {n} Absatz {n}:",
    for_: "Anstatt:",
    read: "muss es heißen:",
    quotes: ("201E", "201C"),
    eea: "(Text von Bedeutung für den EWR)",
};

const ES: Vocab = Vocab {
    act_type: ["Reglamento", "Directiva", "Decisión"],
    this_act: ["El presente Reglamento", "La presente Directiva", "La presente Decisión"],
    eu: "(UE)",
    by_parliament: "del Parlamento Europeo y del Consejo",
    by_commission: ["de la Comisión", ""],
    of: "de",
    months: ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre", "noviembre", "diciembre"],
    date_style: 3,
    topics: &[
        "relativo a la protección de las personas físicas en lo que respecta al tratamiento de datos personales",
        "por el que se establecen normas armonizadas en materia de inteligencia artificial",
        "relativa a la protección de las personas que informen sobre infracciones del Derecho de la Unión",
        "sobre los derechos de los consumidores",
        "relativo a la conservación de los recursos pesqueros y la protección de los ecosistemas marinos",
        "para el control de las inversiones extranjeras directas en la Unión",
        "relativa a la eficiencia energética de los edificios",
        "sobre normas comunes para el mercado interior de la electricidad",
        "sobre la homologación y la vigilancia del mercado de los vehículos de motor",
        "por el que se establecen disposiciones de aplicación de la política agrícola común",
    ],
    preamble_init: ["EL PARLAMENTO EUROPEO Y EL CONSEJO DE LA UNIÓN EUROPEA,", "LA COMISIÓN EUROPEA,"],
    visas: &[
        "Visto el Tratado de Funcionamiento de la Unión Europea, y en particular su artículo {n},",
        "Vista la propuesta de la Comisión Europea,",
        "Previa transmisión del proyecto de acto legislativo a los Parlamentos nacionales,",
        "Visto el dictamen del Comité Económico y Social Europeo",
        "De conformidad con el procedimiento legislativo ordinario",
    ],
    whereas: "Considerando lo siguiente:",
    preamble_final: "HAN ADOPTADO EL PRESENTE ACTO:",
    subj_sg: &["La Comisión", "La autoridad competente", "La Agencia", "Cada Estado miembro", "El Comité", "El proveedor"],
    pred_sg: &[
        "adoptará actos de ejecución que establezcan las modalidades detalladas",
        "velará por que la información a que se refiere el apartado {n} se haga pública",
        "podrá solicitar información adicional al operador de que se trate",
        "notificará a la Comisión las medidas adoptadas",
        "adoptará todas las medidas adecuadas para garantizar el cumplimiento de las obligaciones establecidas en el presente artículo",
        "publicará un informe sobre la aplicación del presente artículo",
        "llevará un registro de las evaluaciones realizadas",
        "podrá decidir prorrogar el plazo contemplado en el párrafo primero",
    ],
    subj_pl: &["Los Estados miembros", "Las autoridades competentes", "Los proveedores", "Los operadores", "Los organismos notificados", "Las autoridades de control"],
    pred_pl: &[
        "establecerán el régimen de sanciones aplicable a las infracciones",
        "velarán por que se asignen recursos suficientes a las funciones previstas en el presente Reglamento",
        "cooperarán estrechamente e intercambiarán toda la información pertinente",
        "podrán adoptar o mantener disposiciones más estrictas",
        "designarán una o varias autoridades competentes responsables de la aplicación del presente artículo",
        "comunicarán a la Comisión el texto de las principales disposiciones de Derecho interno",
        "establecerán procedimientos para la tramitación de las reclamaciones",
        "adoptarán las medidas necesarias para cumplir los requisitos establecidos en el anexo I",
    ],
    adjuncts: &[
        "de conformidad con el artículo {n}",
        "sin dilación indebida",
        "a más tardar el 31 de diciembre de 2025",
        "en un plazo de tres meses a partir de la recepción de la solicitud",
        "con arreglo al procedimiento de examen a que se refiere el artículo {n}, apartado 2",
        "teniendo en cuenta el estado de la técnica generalmente reconocido",
        "cuando proceda",
        "de manera clara y comprensible",
        "a efectos del apartado {n}",
        "al menos cada dos años",
    ],
    ref_prefix: "de conformidad con el Reglamento (UE)",
    oj_ref: "DO L",
    article: "Artículo",
    article_one: "Artículo 1",
    chapter: "CAPÍTULO",
    chapter_titles: &["Disposiciones generales", "Obligaciones de los proveedores", "Supervisión y ejecución", "Gobernanza", "Sanciones", "Disposiciones finales", "Obligaciones de transparencia"],
    art_titles: &["Objeto", "Ámbito de aplicación", "Definiciones", "Obligaciones de los Estados miembros", "Informes", "Ejercicio de la delegación", "Procedimiento de comité", "Sanciones", "Revisión", "Entrada en vigor y aplicación", "Confidencialidad", "Cooperación entre autoridades"],
    defs_intro: "A efectos de {act}, se entenderá por:",
    terms: &["proveedor", "autoridad competente", "datos personales", "introducción en el mercado", "incidente grave", "operador", "consumidor", "comerciante"],
    means: ": ",
    def_bodies: &[
        "una persona física o jurídica, autoridad pública, agencia u otro organismo",
        "toda información sobre una persona física identificada o identificable",
        "la primera comercialización de un producto en el mercado de la Unión",
        "toda persona física que actúe con un propósito ajeno a su actividad comercial o profesión",
        "una autoridad designada por un Estado miembro de conformidad con el artículo {n}",
        "todo incidente que provoque directa o indirectamente daños graves para la salud o los bienes",
    ],
    list_intro: "El informe incluirá, como mínimo, los elementos siguientes:",
    list_items: &[
        "una descripción de las medidas adoptadas",
        "el número de reclamaciones recibidas",
        "una evaluación del impacto en las pequeñas y medianas empresas",
        "los recursos asignados a las autoridades competentes",
        "los resultados de los controles efectuados con arreglo al artículo {n}",
        "cualquier otra información pertinente",
    ],
    amend_intro: "El artículo {n} del Reglamento (UE) 2019/881 se sustituye por el texto siguiente:",
    entry_into_force: "{act} entrará en vigor a los veinte días de su publicación en el Diario Oficial de la Unión Europea.",
    finals: [
        "El presente Reglamento será obligatorio en todos sus elementos y directamente aplicable en cada Estado miembro.",
        "Los destinatarios de la presente Directiva son los Estados miembros.",
        "Los destinatarios de la presente Decisión son los Estados miembros.",
    ],
    done_at: "Hecho en Bruselas, el ",
    for_parliament: "Por el Parlamento Europeo",
    for_council: "Por el Consejo",
    for_commission: "Por la Comisión",
    president: "La Presidenta",
    annex: "ANEXO",
    annex_titles: &["Lista de la legislación de armonización de la Unión", "Información que debe presentarse", "Tabla de correspondencias", "Documentación técnica", "Importe de las tasas"],
    table_headers: &["Categoría", "Descripción", "Importe (EUR)", "Referencia"],
    table_cells: &["Tasa básica", "Solicitud por vía electrónica", "Renovación", "Artículo {n}, apartado 1", "No procede", "Tasa anual de supervisión", "Letra a)"],
    corrigendum: "Corrección de errores del",
    corr_where: "En la página {n}, artículo {n}, apartado {n}:",
    for_: "donde dice:",
    read: "debe decir:",
    quotes: ("00AB", "00BB"),
    eea: "(Texto pertinente a efectos del EEE)",
};

const PT: Vocab = Vocab {
    act_type: ["Regulamento", "Diretiva", "Decisão"],
    this_act: ["O presente regulamento", "A presente diretiva", "A presente decisão"],
    eu: "(UE)",
    by_parliament: "do Parlamento Europeu e do Conselho",
    by_commission: ["da Comissão", ""],
    of: "de",
    months: ["janeiro", "fevereiro", "março", "abril", "maio", "junho", "julho", "agosto", "setembro", "outubro", "novembro", "dezembro"],
    date_style: 3,
    topics: &[
        "relativo à proteção das pessoas singulares no que diz respeito ao tratamento de dados pessoais",
        "que cria regras harmonizadas em matéria de inteligência artificial",
        "relativa à proteção das pessoas que denunciam violações do direito da União",
        "relativa aos direitos dos consumidores",
        "relativo à conservação dos recursos haliêuticos e à proteção dos ecossistemas marinhos",
        "que estabelece um regime de análise dos investimentos diretos estrangeiros na União",
        "relativa ao desempenho energético dos edifícios",
        "relativa a regras comuns para o mercado interno da eletricidade",
        "relativo à homologação e à fiscalização do mercado dos veículos a motor",
        "que estabelece regras de execução da política agrícola comum",
    ],
    preamble_init: ["O PARLAMENTO EUROPEU E O CONSELHO DA UNIÃO EUROPEIA,", "A COMISSÃO EUROPEIA,"],
    visas: &[
        "Tendo em conta o Tratado sobre o Funcionamento da União Europeia, nomeadamente o artigo {n},",
        "Tendo em conta a proposta da Comissão Europeia,",
        "Após transmissão do projeto de ato legislativo aos parlamentos nacionais,",
        "Tendo em conta o parecer do Comité Económico e Social Europeu",
        "Deliberando de acordo com o processo legislativo ordinário",
    ],
    whereas: "Considerando o seguinte:",
    preamble_final: "ADOTARAM O PRESENTE ATO:",
    subj_sg: &["A Comissão", "A autoridade competente", "A Agência", "Cada Estado-Membro", "O Comité", "O prestador"],
    pred_sg: &[
        "adota atos de execução que estabelecem as regras pormenorizadas",
        "assegura que as informações referidas no n.o {n} sejam tornadas públicas",
        "pode solicitar informações adicionais ao operador em causa",
        "notifica a Comissão das medidas tomadas",
        "toma todas as medidas adequadas para garantir o cumprimento das obrigações previstas no presente artigo",
        "publica um relatório sobre a aplicação do presente artigo",
        "mantém registos das avaliações efetuadas",
        "pode decidir prorrogar o prazo referido no primeiro parágrafo",
    ],
    subj_pl: &["Os Estados-Membros", "As autoridades competentes", "Os prestadores", "Os operadores", "Os organismos notificados", "As autoridades de controlo"],
    pred_pl: &[
        "estabelecem as regras relativas às sanções aplicáveis em caso de infração",
        "asseguram que são afetados recursos adequados às funções previstas no presente regulamento",
        "cooperam estreitamente e trocam todas as informações pertinentes",
        "podem adotar ou manter disposições mais rigorosas",
        "designam uma ou mais autoridades competentes responsáveis pela aplicação do presente artigo",
        "comunicam à Comissão o texto das principais disposições de direito interno",
        "estabelecem procedimentos para o tratamento das reclamações",
        "tomam as medidas necessárias para dar cumprimento aos requisitos estabelecidos no anexo I",
    ],
    adjuncts: &[
        "nos termos do artigo {n}",
        "sem demora injustificada",
        "até 31 de dezembro de 2025",
        "no prazo de três meses a contar da data de receção do pedido",
        "pelo procedimento de exame a que se refere o artigo {n}, n.o 2",
        "tendo em conta o estado da técnica geralmente reconhecido",
        "se for caso disso",
        "de forma clara e compreensível",
        "para efeitos do n.o {n}",
        "pelo menos de dois em dois anos",
    ],
    ref_prefix: "em conformidade com o Regulamento (UE)",
    oj_ref: "JO L",
    article: "Artigo",
    article_one: "Artigo 1.o",
    chapter: "CAPÍTULO",
    chapter_titles: &["Disposições gerais", "Obrigações dos prestadores", "Supervisão e execução", "Governação", "Sanções", "Disposições finais", "Obrigações de transparência"],
    art_titles: &["Objeto", "Âmbito de aplicação", "Definições", "Obrigações dos Estados-Membros", "Relatórios", "Exercício da delegação", "Procedimento de comité", "Sanções", "Reexame", "Entrada em vigor e aplicação", "Confidencialidade", "Cooperação entre autoridades"],
    defs_intro: "Para efeitos de {act}, entende-se por:",
    terms: &["prestador", "autoridade competente", "dados pessoais", "colocação no mercado", "incidente grave", "operador", "consumidor", "profissional"],
    means: ", ",
    def_bodies: &[
        "uma pessoa singular ou coletiva, autoridade pública, agência ou outro organismo",
        "informação relativa a uma pessoa singular identificada ou identificável",
        "a primeira disponibilização de um produto no mercado da União",
        "qualquer pessoa singular que atue com fins que não se incluam no âmbito da sua atividade profissional",
        "uma autoridade designada por um Estado-Membro nos termos do artigo {n}",
        "um incidente que cause, direta ou indiretamente, danos graves para a saúde ou bens",
    ],
    list_intro: "O relatório inclui, pelo menos, os seguintes elementos:",
    list_items: &[
        "uma descrição das medidas tomadas",
        "o número de reclamações recebidas",
        "uma avaliação do impacto nas pequenas e médias empresas",
        "os recursos afetados às autoridades competentes",
        "os resultados dos controlos efetuados nos termos do artigo {n}",
        "quaisquer outras informações pertinentes",
    ],
    amend_intro: "O artigo {n} do Regulamento (UE) 2019/881 passa a ter a seguinte redação:",
    entry_into_force: "{act} entra em vigor no vigésimo dia seguinte ao da sua publicação no Jornal Oficial da União Europeia.",
    finals: [
        "O presente regulamento é obrigatório em todos os seus elementos e diretamente aplicável em todos os Estados-Membros.",
        "Os destinatários da presente diretiva são os Estados-Membros.",
        "Os destinatários da presente decisão são os Estados-Membros.",
    ],
    done_at: "Feito em Bruxelas, em ",
    for_parliament: "Pelo Parlamento Europeu",
    for_council: "Pelo Conselho",
    for_commission: "Pela Comissão",
    president: "A Presidente",
    annex: "ANEXO",
    annex_titles: &["Lista da legislação de harmonização da União", "Informações a apresentar", "Quadro de correspondência", "Documentação técnica", "Montante das taxas"],
    table_headers: &["Categoria", "Descrição", "Montante (EUR)", "Referência"],
    table_cells: &["Taxa de base", "Pedido por via eletrónica", "Renovação", "Artigo {n}, n.o 1", "Não aplicável", "Taxa anual de supervisão", "Alínea a)"],
    corrigendum: "Retificação do",
    corr_where: "Na página {n}, artigo {n}, n.o {n}:",
    for_: "onde se lê:",
    read: "deve ler-se:",
    quotes: ("00AB", "00BB"),
    eea: "(Texto relevante para efeitos do EEE)",
};

fn vocab(lang: &str) -> &'static Vocab {
    match lang {
        "fr" => &FR,
        "de" => &DE,
        "es" => &ES,
        "pt" => &PT,
        _ => &EN,
    }
}

/// Escapes text for XML content and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            _ => o.push(c),
        }
    }
    o
}

const ROMAN: [&str; 12] = [
    "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII",
];

/// XML text builder. `pretty` puts block elements (element-only content) on their own indented lines.
struct X {
    s: String,
    pretty: bool,
    depth: usize,
}

impl X {
    fn new(pretty: bool) -> X {
        let mut s = String::with_capacity(16 * 1024);
        s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        X {
            s,
            pretty,
            depth: 0,
        }
    }
    fn indent(&mut self) {
        if self.pretty && self.depth > 0 {
            self.s.push('\n');
            for _ in 0..self.depth {
                self.s.push_str("  ");
            }
        }
    }
    fn attrs(&mut self, attrs: &[(&str, &str)]) {
        for (k, v) in attrs {
            let _ = write!(self.s, " {k}=\"{}\"", esc(v));
        }
    }
    /// Opens a block element (only elements inside, no text).
    fn b(&mut self, tag: &str, attrs: &[(&str, &str)]) {
        self.indent();
        self.s.push('<');
        self.s.push_str(tag);
        self.attrs(attrs);
        self.s.push('>');
        self.depth += 1;
    }
    /// Closes a block element.
    fn e(&mut self, tag: &str) {
        self.depth -= 1;
        self.indent();
        let _ = write!(self.s, "</{tag}>");
    }
    /// A leaf element with escaped text, on its own line when pretty.
    fn leaf(&mut self, tag: &str, attrs: &[(&str, &str)], text: &str) {
        self.indent();
        self.inline(tag, attrs, text);
    }
    /// An element with escaped text, inline.
    fn inline(&mut self, tag: &str, attrs: &[(&str, &str)], text: &str) {
        self.s.push('<');
        self.s.push_str(tag);
        self.attrs(attrs);
        let _ = write!(self.s, ">{}</{tag}>", esc(text));
    }
    /// A leaf element whose content is already markup (mixed content: text + inline elements).
    fn mixed(&mut self, tag: &str, attrs: &[(&str, &str)], markup: &str) {
        self.indent();
        self.s.push('<');
        self.s.push_str(tag);
        self.attrs(attrs);
        let _ = write!(self.s, ">{markup}</{tag}>");
    }
    fn empty(&mut self, tag: &str, attrs: &[(&str, &str)]) {
        self.indent();
        self.s.push('<');
        self.s.push_str(tag);
        self.attrs(attrs);
        self.s.push_str("/>");
    }
    fn finish(mut self) -> String {
        self.s.push('\n');
        self.s
    }
}

/// Generates one language's text of one act. `s` draws structure (shared by all languages: same seed per act),
/// `t` draws wording (per language).
struct Writer<'a> {
    v: &'static Vocab,
    lg: String,
    p: &'a Plan,
    s: ChaCha8Rng,
    t: ChaCha8Rng,
    notes: u32,
    quotes: u32,
}

impl<'a> Writer<'a> {
    fn pick(&mut self, xs: &'static [&'static str]) -> &'static str {
        xs[self.t.gen_range(0..xs.len())]
    }

    fn fill(&mut self, template: &str) -> String {
        let mut out = String::with_capacity(template.len() + 8);
        let mut rest = template;
        while let Some(k) = rest.find("{n}") {
            out.push_str(&rest[..k]);
            let n = self.t.gen_range(1..40u32);
            let _ = write!(out, "{n}");
            rest = &rest[k + 3..];
        }
        out.push_str(rest);
        out.replace("{act}", &self.this_act_lower())
    }

    fn this_act_lower(&self) -> String {
        let a = self.v.this_act[self.p.act_type];
        // "This Regulation" → "this Regulation"; German "Diese Verordnung" → "dieser Verordnung" is close enough.
        let mut c = a.chars();
        match c.next() {
            Some(f) => f.to_lowercase().collect::<String>() + c.as_str(),
            None => String::new(),
        }
    }

    fn date_text(&self, y: u32, m: u32, d: u32) -> String {
        let month = self.v.months[(m - 1) as usize];
        match self.v.date_style {
            1 => format!("{d} {month} {y}"),
            2 => format!("{d}. {month} {y}"),
            3 => format!("{d} de {month} de {y}"),
            _ => format!("{d} {month} {y}"),
        }
    }

    fn date_el(&self, y: u32, m: u32, d: u32) -> String {
        format!(
            "<DATE ISO=\"{y:04}{m:02}{d:02}\">{}</DATE>",
            esc(&self.date_text(y, m, d))
        )
    }

    fn iso(&self) -> String {
        format!("{:04}{:02}{:02}", self.p.year, self.p.month, self.p.day)
    }

    fn quoted(&mut self, inner: &str) -> String {
        self.quotes += 1;
        let q = self.quotes;
        let (open, close) = self.v.quotes;
        format!(
            "<QUOT.START CODE=\"{open}\" ID=\"QS{q:04}\" REF.END=\"QE{q:04}\"/>{inner}<QUOT.END CODE=\"{close}\" ID=\"QE{q:04}\" REF.START=\"QS{q:04}\"/>"
        )
    }

    fn note(&mut self) -> String {
        self.notes += 1;
        let n = self.notes;
        let (no, page) = (self.t.gen_range(1..400u32), self.t.gen_range(1..120u32));
        let (y, m, d) = (
            self.t.gen_range(2005..2023u32),
            self.t.gen_range(1..=12u32),
            self.t.gen_range(1..=28u32),
        );
        format!(
            "<NOTE NOTE.ID=\"E{n:04}\" NUMBERING=\"ARAB\" TYPE=\"FOOTNOTE\"><P><REF.DOC.OJ COLL=\"L\" DATE.PUB=\"{y}{m:02}{d:02}\" NO.OJ=\"{no}\" PAGE.FIRST=\"{page}\">{} {no}, {d}.{m}.{y}, p. {page}</REF.DOC.OJ>.</P></NOTE>",
            esc(self.v.oj_ref)
        )
    }

    /// One sentence as markup; `with_note` cites an act with a footnote mid-sentence.
    fn sentence(&mut self, with_note: bool) -> String {
        let plural = self.t.gen_bool(0.5);
        let (subj, pred) = if plural {
            (self.pick(self.v.subj_pl), self.pick(self.v.pred_pl))
        } else {
            (self.pick(self.v.subj_sg), self.pick(self.v.pred_sg))
        };
        let mut out = esc(&self.fill(subj));
        out.push(' ');
        out.push_str(&esc(&self.fill(pred)));
        if with_note {
            let (y, n) = (
                self.t.gen_range(2010..2023u32),
                self.t.gen_range(100..2500u32),
            );
            let note = self.note();
            let _ = write!(out, " {} {y}/{n}{note}", esc(self.v.ref_prefix));
        }
        let adjuncts = [0, 0, 1, 1, 1, 2][self.t.gen_range(0..6)];
        for _ in 0..adjuncts {
            let a = self.pick(self.v.adjuncts);
            out.push(' ');
            out.push_str(&esc(&self.fill(a)));
        }
        out.push('.');
        out
    }

    fn sentences(&mut self, n: usize, note_at: Option<usize>) -> String {
        let mut parts = Vec::with_capacity(n);
        for k in 0..n {
            parts.push(self.sentence(note_at == Some(k)));
        }
        parts.join(" ")
    }

    fn bib_instance(&mut self, x: &mut X, doc_file: &str, seq: &str, page_first: u32, pages: u32) {
        let p = self.p;
        let lg_up = self.lg.to_uppercase();
        x.b("BIB.INSTANCE", &[]);
        x.b("DOCUMENT.REF", &[("FILE", doc_file)]);
        x.leaf("COLL", &[], "L");
        x.leaf("NO.OJ", &[], &p.oj.to_string());
        x.leaf("YEAR", &[], &p.year.to_string());
        x.leaf("LG.OJ", &[], &lg_up);
        x.leaf("PAGE.FIRST", &[], &page_first.to_string());
        x.leaf("PAGE.SEQ", &[], "1");
        x.leaf("VOLUME.REF", &[], "01");
        x.e("DOCUMENT.REF");
        let iso = self.iso();
        x.leaf("DATE", &[("ISO", &iso)], &iso);
        x.leaf("LG.DOC", &[], &lg_up);
        x.leaf("NO.SEQ", &[], seq);
        x.leaf("PAGE.FIRST", &[], &page_first.to_string());
        x.leaf("PAGE.SEQ", &[], "1");
        x.leaf("PAGE.LAST", &[], &(page_first + pages - 1).to_string());
        x.leaf("PAGE.TOTAL", &[], &pages.to_string());
        if seq.len() == 4 {
            x.b("NO.DOC", &[("FORMAT", "YN"), ("TYPE", "OJ")]);
            x.leaf("NO.CURRENT", &[], &p.number.to_string());
            x.leaf("YEAR", &[], &p.year.to_string());
            x.leaf("COM", &[], "EU");
            x.e("NO.DOC");
        }
        x.e("BIB.INSTANCE");
    }

    /// `Regulation (EU) 2023/1001 of the European Parliament and of the Council` as markup.
    fn act_name(&self) -> String {
        let v = self.v;
        let p = self.p;
        let ty = v.act_type[p.act_type];
        let by = if p.parliament { v.by_parliament } else { "" };
        let (pre, post) = if p.parliament {
            ("", "")
        } else {
            (v.by_commission[0], v.by_commission[1])
        };
        let mut s = String::new();
        if !pre.is_empty() && self.lg == "en" {
            let _ = write!(s, "{pre} ");
        }
        let _ = write!(s, "{ty} {} {}/{}", v.eu, p.year, p.number);
        if !by.is_empty() {
            let _ = write!(s, " {by}");
        } else if !pre.is_empty() && self.lg != "en" {
            let _ = write!(s, " {pre}");
        } else if !post.is_empty() {
            let _ = write!(s, " {post}");
        }
        esc(&s)
    }

    fn title(&mut self, x: &mut X, prefix: &str) {
        let topic = self.v.topics[self.p.topic % self.v.topics.len()];
        let date = self.date_el(self.p.year, self.p.month, self.p.day);
        x.b("TITLE", &[]);
        x.b("TI", &[]);
        x.mixed("P", &[], &format!("{}{}", esc(prefix), self.act_name()));
        x.mixed("P", &[], &format!("{} {date}", esc(self.v.of)));
        x.mixed("P", &[], &esc(topic));
        if self.p.act_type != 2 {
            x.mixed("P", &[], &esc(self.v.eea));
        }
        x.e("TI");
        x.e("TITLE");
    }

    fn preamble(&mut self, x: &mut X) {
        let v = self.v;
        x.b("PREAMBLE", &[]);
        x.leaf(
            "PREAMBLE.INIT",
            &[],
            v.preamble_init[if self.p.parliament { 0 } else { 1 }],
        );
        x.b("GR.VISA", &[]);
        let visas = if self.p.parliament { v.visas.len() } else { 2 };
        for k in 0..visas {
            let mut text = esc(&self.fill(v.visas[k]));
            if k >= 3 {
                text.push_str(&self.note());
                text.push(',');
            }
            x.mixed("VISA", &[], &text);
        }
        x.e("GR.VISA");
        x.b("GR.CONSID", &[]);
        x.leaf("GR.CONSID.INIT", &[], v.whereas);
        let recitals = self.s.gen_range(1..=8usize) * if self.s.gen_bool(0.2) { 4 } else { 1 };
        for r in 1..=recitals {
            let n = self.s.gen_range(1..=4usize);
            let note = self.s.gen_bool(0.15).then_some(0);
            let text = self.sentences(n, note);
            x.b("CONSID", &[]);
            x.b("NP", &[]);
            x.leaf("NO.P", &[], &format!("({r})"));
            x.mixed("TXT", &[], &text);
            x.e("NP");
            x.e("CONSID");
        }
        x.e("GR.CONSID");
        x.leaf("PREAMBLE.FINAL", &[], self.v.preamble_final);
        x.e("PREAMBLE");
    }

    fn article_title(&self, n: usize) -> String {
        if n == 1 {
            self.v.article_one.to_string()
        } else if self.lg == "pt" {
            format!("{} {n}.o", self.v.article)
        } else {
            format!("{} {n}", self.v.article)
        }
    }

    fn list(&mut self, x: &mut X, defs: bool) {
        let items = self.s.gen_range(2..=6usize);
        let alpha = self.s.gen_bool(0.5);
        x.b(
            "LIST",
            &[(
                "TYPE",
                if defs {
                    "ARAB"
                } else if alpha {
                    "alpha"
                } else {
                    "DASH"
                },
            )],
        );
        for k in 0..items {
            let no = if defs || !alpha {
                format!("({})", k + 1)
            } else {
                format!("({})", (b'a' + k as u8) as char)
            };
            let last = k + 1 == items;
            let txt = if defs {
                let term = self.pick(self.v.terms);
                let body = self.pick(self.v.def_bodies);
                let body = esc(&self.fill(body));
                format!(
                    "{}{}{body}{}",
                    self.quoted(&esc(term)),
                    esc(self.v.means),
                    if last { "." } else { ";" }
                )
            } else {
                let item = self.pick(self.v.list_items);
                format!("{}{}", esc(&self.fill(item)), if last { "." } else { ";" })
            };
            x.b("ITEM", &[]);
            x.b("NP", &[]);
            x.leaf("NO.P", &[], &no);
            x.mixed("TXT", &[], &txt);
            x.e("NP");
            x.e("ITEM");
        }
        x.e("LIST");
    }

    /// An article with `parags` numbered paragraphs (0: a single unnumbered ALINEA).
    fn article(&mut self, x: &mut X, n: usize, id: &str, last: bool) {
        let parags = if last {
            1
        } else {
            [0, 1, 2, 2, 3, 3, 4, 5][self.s.gen_range(0..8)]
        };
        let subtitle = self.s.gen_bool(0.8);
        let defs = n == 2 || (n > 2 && self.s.gen_bool(0.05));
        let has_list = self.s.gen_bool(0.3);
        let has_note = self.s.gen_bool(0.25);
        let amend = !last && n > 2 && self.s.gen_bool(0.08);
        x.b("ARTICLE", &[("IDENTIFIER", id)]);
        x.leaf("TI.ART", &[], &self.article_title(n));
        if subtitle || last {
            let st = if last {
                self.v.art_titles[9]
            } else if defs {
                self.v.art_titles[2]
            } else {
                let k = self.s.gen_range(0..self.v.art_titles.len());
                self.v.art_titles[k]
            };
            x.leaf("STI.ART", &[], st);
        }
        if last {
            let text = esc(&self.fill(self.v.entry_into_force));
            x.mixed("ALINEA", &[], &text);
        } else if defs {
            x.b("ALINEA", &[]);
            let intro = esc(&self.fill(self.v.defs_intro));
            x.mixed("P", &[], &intro);
            self.list(x, true);
            x.e("ALINEA");
        } else if amend {
            let intro = esc(&self.fill(self.v.amend_intro));
            let qn = self.s.gen_range(2..30usize);
            x.b("ALINEA", &[]);
            x.mixed("P", &[], &intro);
            x.b("QUOT.S", &[("LEVEL", "1")]);
            let qid = format!("{qn:03}");
            x.b("ARTICLE", &[("IDENTIFIER", &qid)]);
            let open = self.quoted("");
            let (start, end) = open.split_at(open.find("<QUOT.END").unwrap_or(open.len()));
            x.mixed(
                "TI.ART",
                &[],
                &format!("{start}{}", esc(&self.article_title(qn))),
            );
            let k = self.s.gen_range(1..=3usize);
            let body = self.sentences(k, None);
            x.mixed("ALINEA", &[], &format!("{body}{end}"));
            x.e("ARTICLE");
            x.e("QUOT.S");
            x.e("ALINEA");
        } else if parags == 0 {
            let k = self.s.gen_range(1..=3usize);
            let note = has_note.then_some(0);
            let text = self.sentences(k, note);
            x.mixed("ALINEA", &[], &text);
        } else {
            let list_at = has_list.then(|| self.s.gen_range(0..parags));
            let note_at = has_note.then(|| self.s.gen_range(0..parags));
            for k in 0..parags {
                let sentences = self.s.gen_range(1..=3usize);
                x.b("PARAG", &[("IDENTIFIER", &format!("{id}.{:03}", k + 1))]);
                x.leaf("NO.PARAG", &[], &format!("{}.", k + 1));
                let note = (note_at == Some(k)).then_some(sentences - 1);
                let text = self.sentences(sentences, note);
                if list_at == Some(k) {
                    x.b("ALINEA", &[]);
                    x.mixed("P", &[], &format!("{text} {}", esc(self.v.list_intro)));
                    self.list(x, false);
                    x.e("ALINEA");
                } else {
                    x.mixed("ALINEA", &[], &text);
                }
                x.e("PARAG");
            }
        }
        x.e("ARTICLE");
    }

    fn enacting_terms(&mut self, x: &mut X) {
        // Length classes: short (1–3 articles), medium, long (spans many 256-token sequences).
        let class = self.s.gen_range(0..100u32);
        let articles = match class {
            0..=24 => self.s.gen_range(1..=3usize),
            25..=84 => self.s.gen_range(4..=12usize),
            _ => self.s.gen_range(20..=48usize),
        };
        let per_div = if articles > 6 {
            self.s.gen_range(4..=9usize)
        } else {
            articles
        };
        x.b("ENACTING.TERMS", &[]);
        let mut n = 1;
        let mut div = 0;
        while n <= articles {
            let in_div = per_div.min(articles + 1 - n);
            let divided = articles > 6;
            if divided {
                x.b("DIVISION", &[]);
                x.b("TITLE", &[]);
                x.b("TI", &[]);
                x.leaf(
                    "P",
                    &[],
                    &format!("{} {}", self.v.chapter, ROMAN[div % ROMAN.len()]),
                );
                x.e("TI");
                x.b("STI", &[]);
                let t = self.v.chapter_titles[(div + self.p.topic) % self.v.chapter_titles.len()];
                x.mixed("P", &[], &format!("<HT TYPE=\"BOLD\">{}</HT>", esc(t)));
                x.e("STI");
                x.e("TITLE");
            }
            for _ in 0..in_div {
                self.article(x, n, &format!("{n:03}"), n == articles && articles > 1);
                n += 1;
            }
            if divided {
                x.e("DIVISION");
            }
            div += 1;
        }
        x.e("ENACTING.TERMS");
    }

    fn final_(&mut self, x: &mut X) {
        let v = self.v;
        x.b("FINAL", &[]);
        x.leaf("P", &[], v.finals[self.p.act_type]);
        x.b("SIGNATURE", &[]);
        x.b("PL.DATE", &[]);
        x.mixed(
            "P",
            &[],
            &format!(
                "{}{}.",
                esc(v.done_at),
                self.date_el(self.p.year, self.p.month, self.p.day)
            ),
        );
        x.e("PL.DATE");
        let signers: &[&str] = if self.p.parliament {
            &[v.for_parliament, v.for_council]
        } else {
            &[v.for_commission]
        };
        for who in signers {
            x.b("SIGNATORY", &[]);
            x.mixed("P", &[], &format!("<HT TYPE=\"ITALIC\">{}</HT>", esc(who)));
            x.mixed(
                "P",
                &[],
                &format!("<HT TYPE=\"ITALIC\">{}</HT>", esc(v.president)),
            );
            let name = [
                "M. <HT TYPE=\"UC\">Schulz</HT>",
                "R. <HT TYPE=\"UC\">Metsola</HT>",
                "U. <HT TYPE=\"UC\">von der Leyen</HT>",
                "P. <HT TYPE=\"UC\">Navarro Ríos</HT>",
            ][self.s.gen_range(0..4)];
            x.mixed("P", &[], name);
            x.e("SIGNATORY");
        }
        x.e("SIGNATURE");
        x.e("FINAL");
    }

    fn act(&mut self, doc_file: &str) -> String {
        let mut x = X::new(false);
        x.b(
            "ACT",
            &[
                ("xmlns:xsi", "http://www.w3.org/2001/XMLSchema-instance"),
                (
                    "xsi:noNamespaceSchemaLocation",
                    "http://formex.publications.europa.eu/schema/formex-06.02.1-20231031.xd",
                ),
            ],
        );
        self.bib_instance(&mut x, doc_file, "0001", 1, self.p.pages);
        self.title(&mut x, "");
        self.preamble(&mut x);
        self.enacting_terms(&mut x);
        self.final_(&mut x);
        x.e("ACT");
        x.finish()
    }

    fn annex(&mut self, doc_file: &str, k: usize, page: u32, pretty: bool) -> String {
        let v = self.v;
        let mut x = X::new(pretty);
        x.b(
            "ANNEX",
            &[
                ("xmlns:xsi", "http://www.w3.org/2001/XMLSchema-instance"),
                (
                    "xsi:noNamespaceSchemaLocation",
                    "http://formex.publications.europa.eu/schema/formex-06.02.1-20231031.xd",
                ),
            ],
        );
        self.bib_instance(&mut x, doc_file, &format!("0001.{:04}", k + 1), page, 2);
        x.b("TITLE", &[]);
        x.b("TI", &[]);
        x.leaf("P", &[], &format!("{} {}", v.annex, ROMAN[k]));
        x.e("TI");
        x.b("STI", &[]);
        let t = v.annex_titles[(self.p.topic + k) % v.annex_titles.len()];
        x.leaf("P", &[], t);
        x.e("STI");
        x.e("TITLE");
        x.b("CONTENTS", &[]);
        let k = self.s.gen_range(1..=2usize);
        let intro = self.sentences(k, None);
        x.mixed("P", &[], &intro);
        let rows = self.s.gen_range(2..=12usize);
        let cols = self.s.gen_range(2..=4usize);
        x.b("TBL", &[("COLS", &cols.to_string()), ("NO.SEQ", "0001")]);
        x.b("CORPUS", &[]);
        x.b("ROW", &[("TYPE", "HEADER")]);
        for c in 0..cols {
            x.leaf(
                "CELL",
                &[("COL", &(c + 1).to_string()), ("TYPE", "HEADER")],
                v.table_headers[c],
            );
        }
        x.e("ROW");
        for _ in 0..rows {
            x.b("ROW", &[]);
            for c in 0..cols {
                let col = (c + 1).to_string();
                if c == 2 {
                    let amount = self.t.gen_range(1..200u32) * 50;
                    x.leaf("CELL", &[("COL", &col)], &amount.to_string());
                } else if self.t.gen_bool(0.1) {
                    x.b("CELL", &[("COL", &col)]);
                    x.empty("IE", &[]);
                    x.e("CELL");
                } else {
                    let cell = self.pick(v.table_cells);
                    let cell = self.fill(cell);
                    x.leaf("CELL", &[("COL", &col)], &cell);
                }
            }
            x.e("ROW");
        }
        x.e("CORPUS");
        x.e("TBL");
        x.e("CONTENTS");
        x.e("ANNEX");
        x.finish()
    }

    fn corrigendum(&mut self, doc_file: &str) -> String {
        let v = self.v;
        let mut x = X::new(false);
        x.b(
            "CORR",
            &[
                ("xmlns:xsi", "http://www.w3.org/2001/XMLSchema-instance"),
                (
                    "xsi:noNamespaceSchemaLocation",
                    "http://formex.publications.europa.eu/schema/formex-05.56-20160701.xd",
                ),
            ],
        );
        self.bib_instance(&mut x, doc_file, "0002", 2, 1);
        self.title(&mut x, &format!("{} ", v.corrigendum));
        x.b("CONTENTS.CORR", &[]);
        let corrections = self.s.gen_range(1..=4usize);
        for _ in 0..corrections {
            x.b("CORRECTION", &[]);
            let where_ = self.fill(v.corr_where);
            x.leaf("DESCRIPTION", &[], &where_);
            let sentences = self.s.gen_range(1..=2usize);
            for (tag, label) in [("OLD.CORR", v.for_), ("NEW.CORR", v.read)] {
                x.b(tag, &[("FOR.READ", "YES")]);
                x.leaf("P", &[], label);
                x.b("QUOT.S", &[("LEVEL", "1")]);
                let text = self.sentences(sentences, None);
                let q = self.quoted(&text);
                x.mixed("P", &[], &format!("{q},"));
                x.e("QUOT.S");
                x.e(tag);
            }
            x.e("CORRECTION");
        }
        x.e("CONTENTS.CORR");
        x.e("CORR");
        x.finish()
    }

    fn consolidated(&mut self, file: &str, celex: &str) -> String {
        let p = self.p;
        let lg_up = self.lg.to_uppercase();
        let mut x = X::new(false);
        x.b(
            "CONS.ACT",
            &[
                ("xmlns:xsi", "http://www.w3.org/2001/XMLSchema-instance"),
                (
                    "xsi:noNamespaceSchemaLocation",
                    "http://formex.publications.europa.eu/schema/formex-06.02.1-20231031.xd",
                ),
            ],
        );
        let consleg = &celex[1..];
        let leg_val = ["REG", "DIR", "DEC"][p.act_type];
        let cons_date = format!("{:04}{:02}{:02}", p.year + 1, p.month, p.day);
        x.empty(
            "INFO.CONSLEG",
            &[
                ("CONSLEG.REF", consleg),
                ("CONSLEG.DATE", &cons_date),
                ("START.DATE", &cons_date),
                ("END.DATE", "99999999"),
                ("LEG.VAL", leg_val),
            ],
        );
        x.empty(
            "INFO.PROD",
            &[
                ("PRODUCER", "ES"),
                ("PROD.SYSTEM", "CONSLEG.NEW"),
                ("PROD.DATE", &cons_date),
            ],
        );
        x.b("CONS.DOC", &[]);
        x.b("BIB.INSTANCE", &[]);
        x.b(
            "DOCUMENT.REF",
            &[("FILE", &file.replace(".xml", ".doc.xml"))],
        );
        x.leaf("LG.OJ", &[], &lg_up);
        x.leaf("PAGE.FIRST", &[], "1");
        x.e("DOCUMENT.REF");
        x.leaf("DATE", &[("ISO", &cons_date)], &cons_date);
        x.leaf("LG.DOC", &[], &lg_up);
        x.e("BIB.INSTANCE");
        x.b("FAM.COMP", &[("LEG.VAL", leg_val)]);
        x.b("BIB.DATA", &[]);
        x.leaf("NO.CELEX", &[], celex);
        let iso = self.iso();
        x.leaf("DATE", &[("ISO", &iso)], &iso);
        x.e("BIB.DATA");
        x.e("FAM.COMP");
        self.title(&mut x, "");
        x.b("PREAMBLE", &[]);
        x.empty("PREAMBLE.INIT", &[]);
        x.empty("PREAMBLE.FINAL", &[]);
        x.e("PREAMBLE");
        self.enacting_terms(&mut x);
        x.e("CONS.DOC");
        x.e("CONS.ACT");
        x.finish()
    }

    fn manifest(&mut self, files: &[(String, &str)], celex: &str, pretty: bool) -> String {
        let p = self.p;
        let lg_up = self.lg.to_uppercase();
        let mut x = X::new(pretty);
        x.b(
            "DOC",
            &[
                ("xmlns:xsi", "http://www.w3.org/2001/XMLSchema-instance"),
                (
                    "xsi:noNamespaceSchemaLocation",
                    "http://formex.publications.europa.eu/schema/formex-06.02.1-20231031.xd",
                ),
            ],
        );
        x.b("BIB.DOC", &[]);
        x.leaf(
            "PROD.ID",
            &[],
            &format!("{}{:02}{:02}{:03}", p.year, p.month, p.day, p.oj % 1000),
        );
        x.b("NO.DOC", &[("FORMAT", "YN"), ("TYPE", "OJ")]);
        x.leaf("NO.CURRENT", &[], &p.number.to_string());
        x.leaf("YEAR", &[], &p.year.to_string());
        x.leaf("COM", &[], "EU");
        x.e("NO.DOC");
        x.leaf("NO.CELEX", &[], celex);
        let eli = format!(
            "http://data.europa.eu/eli/{}/{}/{}/oj",
            ["reg", "dir", "dec"][p.act_type],
            p.year,
            p.number
        );
        x.leaf("NO.ELI", &[("ID", &eli)], &format!("ELI:{eli}"));
        x.e("BIB.DOC");
        x.b(
            "PUBLICATION.REF",
            &[("FILE", &format!("L_{}{:03}{lg_up}.toc.xml", p.year, p.oj))],
        );
        x.leaf("COLL", &[], "L");
        x.leaf("NO.OJ", &[], &p.oj.to_string());
        let iso = self.iso();
        x.leaf("DATE", &[("ISO", &iso)], &iso);
        x.leaf("LG.OJ", &[], &lg_up);
        x.e("PUBLICATION.REF");
        x.b("FMX", &[]);
        for (k, (name, role)) in files.iter().enumerate() {
            if *role == "main" {
                x.b("DOC.MAIN.PUB", &[("NO.SEQ", "0001")]);
                x.leaf("LG.DOC", &[], &lg_up);
                x.leaf(
                    "LEGAL.VALUE",
                    &[],
                    if p.kind == Kind::Corrigendum {
                        "CORR"
                    } else {
                        ["REG", "DIR", "DEC"][p.act_type]
                    },
                );
                x.leaf("DATE", &[("ISO", &iso)], &iso);
                x.empty("REF.PHYS", &[("FILE", name), ("TYPE", "DOC.XML")]);
                x.e("DOC.MAIN.PUB");
            } else {
                x.b(
                    "DOC.SUB.PUB",
                    &[("NO.SEQ", &format!("0001.{k:04}")), ("TYPE", "ANNEX")],
                );
                x.empty("REF.PHYS", &[("FILE", name), ("TYPE", "DOC.XML")]);
                x.e("DOC.SUB.PUB");
            }
        }
        x.e("FMX");
        x.e("DOC");
        x.finish()
    }
}

/// One file to write: name (relative to the language directory) and XML text.
type Member = (String, String);

/// Writes `bytes` unless the file holds them already (a resumed run, `lexflow dedup` or `lexflow heldout` regenerate
/// the corpus a running run may be reading), and then atomically (a temporary file renamed over it): a reader never
/// sees a half-written file.
/// [`generate`] into a directory lexflow owns (a run's `<run.dir>/corpus`), which then holds this generation only:
/// input files an earlier generation wrote (other languages, more acts, another seed) are removed, because the
/// run reads the whole directory. Files this generation writes again with the same bytes are left untouched.
pub fn generate_exact(cfg: &GenerateConfig, out: &Path) -> anyhow::Result<GenStats> {
    let mut keep = std::collections::BTreeSet::new();
    let mut stats = generate_recording(cfg, out, &mut keep)?;
    let mut stack = vec![out.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .with_context(|| format!("gen-sample: cannot list {}", d.display()))?;
        for e in entries {
            let p = e
                .with_context(|| format!("gen-sample: cannot list {}", d.display()))?
                .path();
            if p.is_dir() {
                stack.push(p);
            } else if crate::stages::reader::is_supported(&p) && !keep.contains(&p) {
                std::fs::remove_file(&p).with_context(|| {
                    format!(
                        "gen-sample: cannot remove {}, left by an earlier generation (it would be read as input)",
                        p.display()
                    )
                })?;
                stats.stale_removed += 1;
            }
        }
    }
    if stats.stale_removed > 0 {
        tracing::info!(
            dir = %out.display(),
            removed = stats.stale_removed,
            "removed input files of an earlier sample corpus generation"
        );
    }
    Ok(stats)
}

fn write_file(path: &Path, bytes: &[u8], stats: &mut GenStats) -> anyhow::Result<()> {
    if std::fs::read(path).ok().as_deref() != Some(bytes) {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("gen-sample: cannot write {}", path.display()))?;
    }
    stats.files += 1;
    stats.bytes += bytes.len() as u64;
    Ok(())
}

fn zip_bytes(members: &[Member]) -> anyhow::Result<Vec<u8>> {
    let mut zw = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default())
        .unix_permissions(0o644);
    for (name, text) in members {
        zw.start_file(name.as_str(), opts)?;
        zw.write_all(text.as_bytes())?;
    }
    Ok(zw.finish()?.into_inner())
}

fn check_lang(lang: &str) -> anyhow::Result<String> {
    let l = lang.trim().to_ascii_lowercase();
    // The same languages `input.generate.languages` accepts: a file of another language would be quarantined by
    // the reader of any run that reads the corpus.
    anyhow::ensure!(
        crate::stages::formex::EU_LANGS.contains(&l.as_str()),
        "gen-sample: `{lang}` is not an official EU language (expected one of {})",
        crate::stages::formex::EU_LANGS.join(", ")
    );
    Ok(l)
}

/// Generates the sample corpus under `out` (created if missing). Existing files with the same names are overwritten.
pub fn generate(cfg: &GenerateConfig, out: &Path) -> anyhow::Result<GenStats> {
    generate_recording(cfg, out, &mut std::collections::BTreeSet::new())
}

/// [`generate`], adding the path of every file it writes to `written`.
fn generate_recording(
    cfg: &GenerateConfig,
    out: &Path,
    written: &mut std::collections::BTreeSet<PathBuf>,
) -> anyhow::Result<GenStats> {
    let mut langs = Vec::new();
    for l in &cfg.languages {
        let l = check_lang(l)?;
        anyhow::ensure!(
            !langs.contains(&l),
            "gen-sample: language `{l}` listed twice"
        );
        langs.push(l);
    }
    anyhow::ensure!(!langs.is_empty(), "gen-sample: no languages given");
    let n = cfg.acts_per_language;
    let mut stats = GenStats::default();
    for lang in &langs {
        let dir: PathBuf = out.join(lang);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("gen-sample: cannot create {}", dir.display()))?;
        let lg_up = lang.to_uppercase();
        let mut docs = 0usize;
        for i in 0..n {
            let mut s = ChaCha8Rng::seed_from_u64(mix(cfg.seed, i as u64, 0));
            let p = plan(i, &mut s);
            let t = ChaCha8Rng::seed_from_u64(mix(cfg.seed, i as u64, lang_key(lang)));
            let mut w = Writer {
                v: vocab(lang),
                lg: lang.clone(),
                p: &p,
                s,
                t,
                notes: 0,
                quotes: 0,
            };
            let stem = format!("L_{}{:03}{lg_up}", p.year, p.oj);
            let letter = celex_letter(p.act_type);
            let celex = format!("3{}{letter}{:04}", p.year, p.number);
            let pretty = i % 4 == 1;
            let mut members: Vec<Member> = Vec::new();
            match p.kind {
                Kind::Consolidated => {
                    let name =
                        format!("CL{}{letter}{:04}{lg_up}0010010.0001.xml", p.year, p.number);
                    let xml = w.consolidated(&name, &celex);
                    members.push((name, xml));
                    stats.consolidated += 1;
                }
                Kind::Corrigendum => {
                    let body = format!("{stem}.01000201.xml");
                    let doc = format!("{stem}.01000201.doc.xml");
                    let corr_celex = format!("{}R(01)", celex);
                    let xml = w.corrigendum(&doc);
                    let man = w.manifest(&[(body.clone(), "main")], &corr_celex, pretty);
                    members.push((body, xml));
                    members.push((doc, man));
                    stats.corrigenda += 1;
                }
                _ => {
                    let body = format!("{stem}.01000101.xml");
                    let doc = format!("{stem}.01000101.doc.xml");
                    let xml = w.act(&doc);
                    let mut listed = vec![(body.clone(), "main")];
                    members.push((body, xml));
                    let mut page = p.pages + 1;
                    for k in 0..p.annexes {
                        let name = format!("{stem}.0100{page:04}01.xml");
                        let xml = w.annex(&doc, k, page, pretty);
                        listed.push((name.clone(), "annex"));
                        members.push((name, xml));
                        page += 2;
                        stats.annexes += 1;
                    }
                    let man = w.manifest(&listed, &celex, pretty);
                    members.push((doc, man));
                }
            }
            docs += members.len();
            if n >= 2 && i == n - 1 {
                // The last act of each language travels as a zip package.
                let bytes = zip_bytes(&members)?;
                let path = dir.join(format!("{stem}.zip"));
                write_file(&path, &bytes, &mut stats)?;
                written.insert(path);
                stats.zip_files += 1;
            } else {
                for (k, (name, xml)) in members.iter().enumerate() {
                    // Every sixth act's body (the first member) is zstd-compressed.
                    if k == 0 && i % 6 == 5 {
                        let z =
                            zstd::bulk::compress(xml.as_bytes(), 9).context("gen-sample: zstd")?;
                        let path = dir.join(format!("{name}.zst"));
                        write_file(&path, &z, &mut stats)?;
                        written.insert(path);
                        stats.zst_files += 1;
                    } else {
                        let path = dir.join(name);
                        write_file(&path, xml.as_bytes(), &mut stats)?;
                        written.insert(path);
                    }
                }
            }
        }
        stats.acts.insert(lang.clone(), n);
        stats.documents.insert(lang.clone(), docs);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cfg(acts: usize, langs: &[&str], seed: u64) -> GenerateConfig {
        GenerateConfig {
            acts_per_language: acts,
            languages: langs.iter().map(|s| s.to_string()).collect(),
            seed,
        }
    }

    fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    /// Every XML document of the tree, decompressed, with its name.
    fn documents(files: &BTreeMap<String, Vec<u8>>) -> Vec<(String, String)> {
        let mut docs = Vec::new();
        for (name, bytes) in files {
            if name.ends_with(".zst") {
                docs.push((
                    name.clone(),
                    String::from_utf8(zstd::decode_all(&bytes[..]).unwrap()).unwrap(),
                ));
            } else if name.ends_with(".zip") {
                let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes.clone())).unwrap();
                for k in 0..z.len() {
                    let mut f = z.by_index(k).unwrap();
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut f, &mut s).unwrap();
                    docs.push((format!("{name}!{}", f.name()), s));
                }
            } else {
                docs.push((name.clone(), String::from_utf8(bytes.clone()).unwrap()));
            }
        }
        docs
    }

    /// Parses with quick-xml; returns the root name and the concatenated text.
    fn parse(name: &str, xml: &str) -> (String, String) {
        use quick_xml::events::Event;
        let mut r = quick_xml::Reader::from_str(xml);
        r.config_mut().check_end_names = true;
        let mut root = None;
        let mut depth = 0i64;
        let mut text = String::new();
        loop {
            match r.read_event() {
                Ok(Event::Start(e)) => {
                    depth += 1;
                    root.get_or_insert_with(|| {
                        String::from_utf8(e.name().as_ref().to_vec()).unwrap()
                    });
                }
                Ok(Event::End(_)) => depth -= 1,
                Ok(Event::Text(t)) => {
                    text.push_str(&t.unescape().unwrap_or_else(|e| panic!("{name}: {e}")))
                }
                Ok(Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("{name}: not well-formed at {}: {e}", r.buffer_position()),
            }
            assert!(depth >= 0, "{name}: unbalanced");
        }
        assert_eq!(depth, 0, "{name}: unclosed elements");
        (root.unwrap_or_else(|| panic!("{name}: no root")), text)
    }

    /// A run's generated corpus directory holds exactly the current generation: regenerating with fewer languages,
    /// fewer acts or another seed removes the earlier input files (the run reads the whole directory), keeps files
    /// that are not inputs, and leaves the result equal to a fresh generation.
    #[test]
    fn generate_exact_leaves_only_this_generation() {
        let (dir, fresh) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        generate(&cfg(9, &["en", "fr", "de"], 5), dir.path()).unwrap();
        std::fs::write(dir.path().join("en").join("NOTES.txt"), "mine").unwrap();
        let small = cfg(4, &["en", "pt"], 6);
        let st = generate_exact(&small, dir.path()).unwrap();
        assert!(st.stale_removed > 0);
        generate(&small, fresh.path()).unwrap();
        let mut got = tree(dir.path());
        assert_eq!(
            got.remove("en/NOTES.txt").as_deref(),
            Some(&b"mine"[..]),
            "a file that is not an input was removed"
        );
        assert!(got == tree(fresh.path()), "stale inputs left: {:?}", {
            let want = tree(fresh.path());
            got.keys()
                .filter(|k| !want.contains_key(*k))
                .cloned()
                .collect::<Vec<_>>()
        });
        // What the run reads is this generation's files.
        let inputs =
            crate::stages::reader::expand_inputs(&[dir.path().display().to_string()]).unwrap();
        assert_eq!(inputs.len(), st.files);
        // Regenerating the same corpus removes nothing.
        assert_eq!(generate_exact(&small, dir.path()).unwrap().stale_removed, 0);
    }

    #[test]
    fn deterministic_and_seed_sensitive() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let sa = generate(&cfg(12, &["en", "fr", "de"], 5), a.path()).unwrap();
        let sb = generate(&cfg(12, &["en", "fr", "de"], 5), b.path()).unwrap();
        generate(&cfg(12, &["en", "fr", "de"], 6), c.path()).unwrap();
        assert_eq!(sa, sb);
        let (ta, tb, tc) = (tree(a.path()), tree(b.path()), tree(c.path()));
        assert!(ta == tb, "two runs with the same seed differ");
        assert_ne!(ta, tc, "another seed gives the same corpus");
        assert_eq!(sa.files, ta.len());
        assert_eq!(sa.bytes, ta.values().map(|v| v.len() as u64).sum::<u64>());
        // Adding a language leaves the others unchanged.
        let d = tempfile::tempdir().unwrap();
        generate(&cfg(12, &["en", "fr", "de", "pt"], 5), d.path()).unwrap();
        let td = tree(d.path());
        for (k, v) in &ta {
            assert!(td.get(k) == Some(v), "{k} changed when adding a language");
        }
    }

    #[test]
    fn well_formed_with_expected_roots_and_languages() {
        let dir = tempfile::tempdir().unwrap();
        let langs = ["en", "fr", "de", "es", "pt", "it"];
        let st = generate(&cfg(20, &langs, 7), dir.path()).unwrap();
        let files = tree(dir.path());
        let docs = documents(&files);
        assert_eq!(st.documents.values().sum::<usize>(), docs.len());
        assert!(
            st.zst_files >= langs.len() && st.zip_files == langs.len(),
            "{st:?}"
        );
        let mut roots = BTreeMap::<String, usize>::new();
        for (name, xml) in &docs {
            assert!(!xml.contains("<!DOCTYPE"));
            let (root, text) = parse(name, xml);
            *roots.entry(root.clone()).or_default() += 1;
            let lang = &name[..2];
            assert!(
                xml.contains(&format!("<LG.DOC>{}</LG.DOC>", lang.to_uppercase())) || root == "DOC",
                "{name}"
            );
            if root == "ACT" {
                let needle = match lang {
                    "fr" => " la Commission",
                    "de" => "Kommission",
                    "es" => "Comisión",
                    "pt" => "Comissão",
                    _ => "Commission",
                };
                assert!(
                    text.contains(needle) || text.contains(&needle.to_lowercase()),
                    "{name}: no `{needle}`"
                );
                assert!(
                    xml.contains("<ARTICLE IDENTIFIER=\"001\"><TI.ART>"),
                    "{name}"
                );
                assert!(
                    xml.contains("<GR.VISA>")
                        && xml.contains("<GR.CONSID>")
                        && xml.contains("<FINAL>"),
                    "{name}"
                );
                assert_eq!(
                    xml.lines().count(),
                    2,
                    "{name}: acts are one line after the declaration"
                );
            }
            if root == "DOC" {
                assert!(xml.contains("<NO.CELEX>3"), "{name}");
            }
        }
        for root in ["ACT", "ANNEX", "DOC", "CORR", "CONS.ACT"] {
            assert!(
                roots.get(root).copied().unwrap_or(0) > 0,
                "no {root} in {roots:?}"
            );
        }
        for lang in langs {
            assert!(
                files.keys().any(|k| k.starts_with(&format!("{lang}/"))),
                "no files for {lang}"
            );
            assert_eq!(st.acts[lang], 20);
        }
        let all: String = docs.iter().map(|(_, x)| x.as_str()).collect();
        for feature in [
            "<QUOT.S LEVEL=\"1\"><ARTICLE",
            "<QUOT.START CODE=\"2018\"",
            "<QUOT.START CODE=\"00AB\"",
            "<QUOT.START CODE=\"201E\"",
            "TYPE=\"FOOTNOTE\"",
            "<LIST TYPE=",
            "<NP><NO.P>",
            "<TBL COLS=",
            "<CELL COL=\"1\"",
            "<DIVISION>",
            "<STI.ART>",
            "<NO.PARAG>",
        ] {
            assert!(all.contains(feature), "no `{feature}` anywhere");
        }
    }

    #[test]
    fn lengths_vary_and_some_acts_are_long() {
        let dir = tempfile::tempdir().unwrap();
        generate(&cfg(40, &["en"], 1234), dir.path()).unwrap();
        let docs = documents(&tree(dir.path()));
        let sizes: Vec<usize> = docs
            .iter()
            .filter(|(_, x)| x.contains("<ACT "))
            .map(|(n, x)| parse(n, x).1.len())
            .collect();
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        // ~4 bytes per token: short acts fit in one 256-token sequence's worth of text, long ones span many.
        assert!(*min < 4_000 && *max > 12_000, "text sizes {min}..{max}");
    }

    #[test]
    fn rejects_bad_languages() {
        let dir = tempfile::tempdir().unwrap();
        assert!(generate(&cfg(1, &["english"], 1), dir.path()).is_err());
        // A code shaped like a language but not an official EU one: refused, as `input.generate.languages` does.
        let e = generate(&cfg(1, &["xx"], 1), dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`xx` is not an official EU language"), "{e}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        assert!(generate(&cfg(1, &["en", "EN"], 1), dir.path()).is_err());
        assert!(generate(&cfg(1, &[], 1), dir.path()).is_err());
    }
}
