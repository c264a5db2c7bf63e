//! Compiles the BPF programs in ../ebpf with clang (`-target bpf -O2 -g`) into OUT_DIR, for
//! the agent to embed. A missing clang is a build error that says what to install.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    for name in ["netobs", "null"] {
        compile(name);
    }
}

fn compile(name: &str) {
    let src = PathBuf::from(format!("../ebpf/{name}.bpf.c"));
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join(format!("{name}.bpf.o"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "arm64",
        _ => "x86",
    };
    let multiarch = match arch {
        "arm64" => "/usr/include/aarch64-linux-gnu",
        _ => "/usr/include/x86_64-linux-gnu",
    };
    let result = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .arg(format!("-I{multiarch}"))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output();
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "\n\nbuilding the agent's BPF programs needs clang, which was not found ({clang}).\n\
             Install it (Debian/Ubuntu: `sudo apt-get install -y clang`; the README's commands do this),\n\
             or point CLANG at a clang binary.\n\n"
        ),
        Err(e) => panic!("running {clang}: {e}"),
        Ok(o) if !o.status.success() => {
            panic!("clang failed to compile {}:\n{}", src.display(), String::from_utf8_lossy(&o.stderr))
        }
        Ok(_) => {}
    }
}
