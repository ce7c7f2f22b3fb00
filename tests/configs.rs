//! Every config shipped in `configs/` parses and validates, and the embedded default is `configs/sample.toml`.

use lexflow_actors::config::{Config, SAMPLE_TOML};

#[test]
fn every_shipped_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let c = Config::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(!c.run.name.is_empty());
            n += 1;
        }
    }
    assert!(
        n >= 2,
        "expected the sample and the full-scale config, found {n}"
    );
}

#[test]
fn embedded_default_is_the_sample_file() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/sample.toml");
    assert_eq!(std::fs::read_to_string(p).unwrap(), SAMPLE_TOML);
}

#[test]
fn fast_config_has_the_seed_fast_run_settings() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs/eurlex-cpt-llama3-fast.toml");
    let c = Config::from_file(&p).unwrap();
    let f = c.filter.as_ref().expect("the fast run filters");
    assert_eq!((f.keep_fraction, f.threshold), (Some(0.4), None));
    assert_eq!(c.packer.seq_len.get(), 3072);
    assert_eq!(c.shards.count.get(), 16);
    let t = c.train.as_ref().unwrap();
    assert_eq!((t.lr, t.steps), (3e-5, 12_000));
    // The same stream as the full run otherwise: mix, tokenizer, dedup, held-out split.
    let full = Config::from_file(&p.with_file_name("eurlex-cpt-llama3.toml")).unwrap();
    assert_eq!(c.sampler.mix, full.sampler.mix);
    assert_eq!(c.tokenizer.path, full.tokenizer.path);
    assert_eq!(c.dedup, full.dedup);
    assert_eq!(c.eval.holdout, full.eval.holdout);
    assert!(full.filter.is_none());
}

#[test]
fn full_scale_config_has_the_seed_settings() {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/eurlex-cpt-llama3.toml");
    let c = Config::from_file(&p).unwrap();
    assert_eq!(c.packer.seq_len.get(), 4096);
    assert_eq!(c.shards.count.get(), 32);
    assert_eq!(c.world_size(), 4);
    let mix: Vec<(String, f64)> = c.sampler.mix.into_iter().collect();
    let want = [
        ("de", 0.20),
        ("en", 0.35),
        ("es", 0.12),
        ("fr", 0.25),
        ("pt", 0.08),
    ];
    assert_eq!(mix.len(), want.len());
    for ((l, s), (wl, ws)) in mix.iter().zip(want) {
        assert_eq!(l, wl);
        assert!((s - ws).abs() < 1e-12);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// README's config reference against the parser: every key the parser accepts is documented, every documented key
// exists, and each documented default, type and lower bound is what the code does.

const MINIMAL: &[(&str, &str)] = &[
    ("run", "name = \"x\""),
    ("run", "dir = \"r\""),
    ("train", "devices = [\"cpu\"]"),
    ("train", "steps = 1"),
];

/// TOML with the minimal config's lines, minus `skip`, plus `extra` (`section`, `line`).
fn config_text(skip: Option<usize>, extra: Option<(&str, String)>) -> String {
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |s: &str, l: String| match sections.iter_mut().find(|(n, _)| n == s) {
        Some((_, v)) => v.push(l),
        None => sections.push((s.to_string(), vec![l])),
    };
    let replaced = |s: &str, l: &str| {
        extra
            .as_ref()
            .is_some_and(|(es, el)| *es == s && el.split(' ').next() == l.split(' ').next())
    };
    for (i, (s, l)) in MINIMAL.iter().enumerate() {
        if Some(i) != skip && !replaced(s, l) {
            add(s, l.to_string());
        }
    }
    if let Some((s, l)) = extra {
        add(s, l);
    }
    sections
        .iter()
        .map(|(s, ls)| format!("[{s}]\n{}\n", ls.join("\n")))
        .collect()
}

/// The field names a struct section accepts, from the parser's own `unknown field` message; None: not a struct.
fn struct_fields(section: &str) -> Option<Vec<String>> {
    let text = if section.is_empty() {
        "__probe__ = 1\n".to_string()
    } else {
        format!("[{section}]\n__probe__ = 1\n")
    };
    let e = Config::from_toml(&text, "probe.toml").err()?.to_string();
    let (_, expected) = e.split_once("unknown field `__probe__`, expected ")?;
    Some(
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

/// Every leaf key the parser accepts (`sampler.mix`, `edges.overrides`: the tables themselves).
fn parser_keys() -> std::collections::BTreeSet<String> {
    let mut keys = std::collections::BTreeSet::new();
    let mut todo = vec![String::new()];
    while let Some(section) = todo.pop() {
        let fields = struct_fields(&section).unwrap_or_else(|| panic!("`{section}` is no struct"));
        assert!(!fields.is_empty(), "no fields found for `{section}`");
        for f in fields {
            let key = if section.is_empty() {
                f
            } else {
                format!("{section}.{f}")
            };
            if struct_fields(&key).is_some() {
                todo.push(key);
            } else {
                keys.insert(key);
            }
        }
    }
    keys
}

/// README's config table: (keys of a row, its type cell, its default cell), `a.{b, c}` expanded, `<stage>` dropped.
fn readme_rows() -> Vec<(Vec<String>, String, String)> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(p).unwrap();
    let (_, section) = readme
        .split_once("## Config reference")
        .expect("README has a config reference");
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in section.lines() {
        if line.starts_with("| key | type | default |") {
            in_table = true;
            continue;
        }
        if !in_table || line.starts_with("|---") {
            continue;
        }
        if !line.starts_with("| `") {
            break;
        }
        let cells: Vec<&str> = line.split(" | ").collect();
        let key_cell = cells[0].trim_start_matches("| ");
        let mut keys = Vec::new();
        for k in key_cell.split('`').skip(1).step_by(2) {
            let k = k.split(".<").next().unwrap();
            match k.split_once(".{") {
                Some((head, rest)) => {
                    for f in rest.trim_end_matches('}').split(',') {
                        keys.push(format!("{head}.{}", f.trim()));
                    }
                }
                None => keys.push(k.to_string()),
            }
        }
        rows.push((keys, cells[1].to_string(), cells[2].to_string()));
    }
    assert!(rows.len() > 20, "README config table not found: {rows:?}");
    rows
}

/// One cell per key: the cell split at `, ` when it has one part per key, else the same cell for every key.
fn per_key(cell: &str, n: usize) -> Vec<String> {
    let parts: Vec<String> = cell.split(", ").map(|s| s.trim().to_string()).collect();
    if parts.len() == n {
        parts
    } else {
        vec![cell.trim().to_string(); n]
    }
}

/// The default value of `a.b.c` in the parsed minimal config, as JSON (`null`: none).
fn default_of(defaults: &serde_json::Value, key: &str) -> serde_json::Value {
    let pointer = format!("/{}", key.replace('.', "/"));
    defaults
        .pointer(&pointer)
        .unwrap_or_else(|| panic!("`{key}` missing from the serialized config"))
        .clone()
}

#[test]
fn readme_documents_exactly_the_keys_the_parser_accepts() {
    let parsed = parser_keys();
    // The probe itself must see the keys: a few that certainly exist.
    for k in [
        "run.name",
        "packer.seq_len",
        "sampler.mix",
        "dedup.threshold",
        "input.generate.seed",
    ] {
        assert!(parsed.contains(k), "probe missed {k}: {parsed:?}");
    }
    let documented: std::collections::BTreeSet<String> =
        readme_rows().into_iter().flat_map(|(k, _, _)| k).collect();
    let undocumented: Vec<_> = parsed.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&parsed).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "README config table vs parser: accepted but not documented {undocumented:?}; documented but rejected {unknown:?}"
    );
}

#[test]
fn readme_defaults_and_types_are_the_parsers() {
    let minimal = config_text(None, None);
    let cfg = Config::from_toml(&minimal, "minimal.toml").unwrap();
    let mut defaults = serde_json::to_value(&cfg).unwrap();
    // `[filter]` is optional (absent: off) and has no default rule (`keep_fraction` or `threshold`): its keys'
    // defaults are those the section has when written.
    assert!(defaults.get("filter").is_none());
    let mut filter = serde_json::to_value(lexflow_actors::config::FilterConfig::default()).unwrap();
    filter["keep_fraction"] = serde_json::Value::Null;
    filter["threshold"] = serde_json::Value::Null;
    defaults["filter"] = filter;
    let mut problems = Vec::new();
    for (keys, types, defaults_cell) in readme_rows() {
        let n = keys.len();
        for ((key, ty), dflt) in keys
            .iter()
            .zip(per_key(&types, n))
            .zip(per_key(&defaults_cell, n))
        {
            let value = default_of(&defaults, key);
            if let Some(p) = check_default(key, &dflt, &value, &minimal) {
                problems.push(p);
            }
            if let Some(p) = check_type(key, &ty, &value) {
                problems.push(p);
            }
        }
    }
    assert!(
        problems.is_empty(),
        "README config table:\n{}",
        problems.join("\n")
    );
}

fn check_default(key: &str, doc: &str, value: &serde_json::Value, minimal: &str) -> Option<String> {
    use serde_json::Value;
    let bad = |why: &str| {
        Some(format!(
            "`{key}`: README default `{doc}` but the code {why} ({value})"
        ))
    };
    let plain = doc.trim_matches('`').trim_matches('"').replace("\\|", "|");
    match doc {
        "required" => {
            // Leaving it out of the minimal config must fail, naming the field.
            let i = MINIMAL
                .iter()
                .position(|(s, l)| key == format!("{s}.{}", l.split(' ').next().unwrap()));
            let Some(i) = i else {
                return bad("gives it a default (it is not among the required keys)");
            };
            let leaf = key.rsplit('.').next().unwrap();
            match Config::from_toml(&config_text(Some(i), None), "t.toml") {
                Err(e) if e.to_string().contains(&format!("missing field `{leaf}`")) => None,
                other => bad(&format!("does not require it: {other:?}")),
            }
        }
        "none" | "—" => match value {
            Value::Null => None,
            Value::Object(m) if m.is_empty() => None,
            _ => bad("has a default"),
        },
        "`[]`" => (value == &Value::Array(vec![]))
            .then_some(())
            .map_or_else(|| bad("differs"), |_| None),
        // Documented in words: what the words say, checked here.
        "five mix languages" => {
            let mix: Vec<String> = lexflow_actors::config::default_mix().into_keys().collect();
            let mut langs: Vec<String> = serde_json::from_value(value.clone()).unwrap_or_default();
            langs.sort();
            (langs == mix)
                .then_some(())
                .map_or_else(|| bad("differs from the default mix's languages"), |_| None)
        }
        "last 10% of `steps`" | "`train.micro_batch`" => value
            .is_null()
            .then_some(())
            .map_or_else(|| bad("has a fixed default"), |_| None),
        _ if ["sampler.mix", "filter.recency", "filter.types"].contains(&key) => {
            let words: Vec<&str> = doc.split_whitespace().collect();
            let doc_mix: Vec<(String, f64)> = words
                .chunks(2)
                .map(|c| {
                    (
                        c[0].to_string(),
                        c.get(1).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN),
                    )
                })
                .collect();
            let code: Vec<(String, f64)> = value
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
                .collect();
            let mut doc_sorted = doc_mix.clone();
            doc_sorted.sort_by(|a, b| a.0.cmp(&b.0));
            let same = doc_sorted.len() == code.len()
                && doc_sorted
                    .iter()
                    .zip(&code)
                    .all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-12);
            (!same).then(|| format!("`{key}`: README default `{doc}` but the code has {value}"))
        }
        _ => {
            let same = match value {
                Value::Number(n) => plain.parse::<f64>().is_ok_and(|d| Some(d) == n.as_f64()),
                Value::Bool(b) => plain.parse::<bool>() == Ok(*b),
                Value::String(s) => &plain == s,
                _ => false,
            };
            let _ = minimal;
            (!same).then(|| format!("`{key}`: README default `{doc}` but the code has {value}"))
        }
    }
}

/// The type cell's kind matches the default's JSON type; an integer's documented lower bound (`≥ N`) is enforced
/// (N − 1 rejected, naming the key), and an integer with no bound accepts 0.
fn check_type(key: &str, ty: &str, value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let kind_ok = |kind: &str| match (kind, value) {
        (_, Value::Null) => true,
        ("string" | "path", Value::String(_)) => true,
        ("integer", Value::Number(n)) => n.is_u64(),
        ("float", Value::Number(_)) => true,
        ("bool", Value::Bool(_)) => true,
        ("list", Value::Array(_)) => true,
        ("table:", Value::Object(_)) => true,
        _ => false,
    };
    let kinds: Vec<&str> = ty
        .split(" or ")
        .map(|k| k.split(' ').next().unwrap())
        .collect();
    if !kinds.iter().any(|k| kind_ok(k)) {
        return Some(format!(
            "`{key}`: README type `{ty}` but the default is {value}"
        ));
    }
    if kinds != ["integer"] {
        return None;
    }
    let min: u64 = ty
        .split_once("≥ ")
        .map_or(0, |(_, n)| n.trim().parse().expect("a number after ≥"));
    let (section, leaf) = key.rsplit_once('.').unwrap();
    let probe = |v: u64| {
        Config::from_toml(
            &config_text(None, Some((section, format!("{leaf} = {v}")))),
            "t.toml",
        )
    };
    if min == 0 {
        return probe(0).err().map(|e| {
            format!("`{key}`: README type `{ty}` (no lower bound) but 0 is rejected: {e}")
        });
    }
    match probe(min - 1) {
        Ok(_) => Some(format!(
            "`{key}`: README says `{ty}` but {} is accepted",
            min - 1
        )),
        Err(e) if !e.to_string().contains(key) => Some(format!(
            "`{key}`: {} is rejected without naming the key: {e}",
            min - 1
        )),
        Err(_) => None,
    }
}
