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
