//! Compiles `csrc/lexflow_ops.cpp` (the ATen operators tch does not bind: varlen flash attention, fused AdamW)
//! against the libtorch that torch-sys found (`DEP_TCH_LIBTORCH_LIB`, set by torch-sys's `links = "tch"`), with the
//! same flags torch-sys uses for its own C++ wrapper.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/lexflow_ops.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report its libtorch directory (DEP_TCH_LIBTORCH_LIB)"),
    );
    // This crate's own tests and examples find libtorch and the torch wheel's NCCL (where scripts/setup.sh links
    // `libnccl.so`, the name cudarc loads) without LD_LIBRARY_PATH, as the `lexflow` binary does (actors/build.rs).
    if cfg!(target_os = "linux") {
        println!(
            "cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}",
            lib.display()
        );
        let nccl = lib.join("../../nvidia/nccl/lib");
        if nccl.is_dir() {
            let nccl = nccl.canonicalize().unwrap_or(nccl);
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
        }
    }
    let root = lib.parent().expect("libtorch lib dir has a parent");
    let include = root.join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/lexflow_ops.cpp")
        .compile("lexflow_ops");
}
