//! Compiles the eBPF programs in `bpf/` with clang (`-target bpf`). The
//! object lands in `OUT_DIR` and is embedded into the crate with
//! `include_bytes!`; see `src/bpf.rs`.
//!
//! Needs Debian's `clang` and `libbpf-dev` (for `<bpf/bpf_helpers.h>`); set
//! `CLANG` to use another clang binary.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=bpf/slot.bpf.c");

    let obj = out.join("slot.bpf.o");
    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-I/usr/include/x86_64-linux-gnu",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-c",
            "bpf/slot.bpf.c",
            "-o",
        ])
        .arg(&obj)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed ({s}) compiling netd/bpf/slot.bpf.c"),
        Err(e) => panic!(
            "cannot run {clang} ({e}): somna-netd compiles its eBPF programs with clang; \
             install Debian's `clang` and `libbpf-dev` (scripts/setup.sh does)"
        ),
    }
}
