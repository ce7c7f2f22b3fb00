//! Fuzz `formex::parse_bytes` (the exact source of `lexflow_actors::formex`): it must never panic, and every error
//! must carry a position inside the input.
#![no_main]

#[allow(dead_code)]
#[path = "../../actors/src/types.rs"]
mod types;

#[allow(dead_code)]
#[path = "../../actors/src/stages/formex.rs"]
mod formex;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match formex::parse_bytes("fuzz.xml", data) {
        Ok(docs) => {
            for d in &docs {
                assert!(!d.root.is_empty());
                for a in &d.articles {
                    let _ = a.paragraphs.len();
                }
            }
        }
        Err(e) => {
            assert!(e.line >= 1 && e.column >= 1);
            assert!(e.byte_offset <= data.len() as u64, "{e:?}");
        }
    }
});
