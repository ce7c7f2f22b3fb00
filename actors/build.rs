//! Records where libtorch was found (torch-sys's `libtorch_lib` output) as the binaries' run path, so `lexflow`
//! starts without `LD_LIBRARY_PATH` on the machine that built it. `--enable-new-dtags` writes a RUNPATH, which
//! `LD_LIBRARY_PATH` overrides: a binary carried to another machine (the GPU bench) still finds that machine's
//! libtorch through `LD_LIBRARY_PATH`. The torch wheel's NCCL directory joins the run path (for `--features cuda`).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        if cfg!(target_os = "linux") && !dir.is_empty() {
            println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{dir}");
            // The torch wheel's NCCL (`site-packages/nvidia/nccl/lib`, where scripts/setup.sh links `libnccl.so`,
            // the name cudarc loads): a run path of the executable also serves its `dlopen` calls.
            let nccl = std::path::Path::new(&dir).join("../../nvidia/nccl/lib");
            if nccl.is_dir() {
                println!(
                    "cargo:rustc-link-arg=-Wl,-rpath,{}",
                    nccl.canonicalize().unwrap_or(nccl.clone()).display()
                );
            }
        }
    }
}
