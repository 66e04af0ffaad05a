//! Builds the XDP program (`filter-ebpf`) with the nightly toolchain and embeds it in `apifilter`.
//!
//! This is `aya_build::build_ebpf` with one difference: it passes `-C target-cpu=v3`. aya-build
//! fixes the eBPF crate's rustflags, and the linker's `--cpu` comes from rustc's target CPU, so
//! there is no other way to reach the BPF v3 atomics the rate limiter's compare-and-swap needs.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().context("workspace root")?;
    for dir in [
        "filter-ebpf/src",
        "filter-ebpf/Cargo.toml",
        "filter-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=APIFILTER_SKIP_EBPF");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let dst = out.join("filter");
    if env::var_os("APIFILTER_SKIP_EBPF").is_some() {
        // For tooling that only type-checks (rust-analyzer, docs): embed an empty object.
        std::fs::write(&dst, [])?;
        return Ok(());
    }

    let mut path = env::split_paths(&env::var_os("PATH").unwrap_or_default()).collect::<Vec<_>>();
    // `cargo xtask setup` installs bpf-linker here; a plain `cargo build` finds it too.
    if let Some(home) = env::var_os("HOME") {
        path.insert(0, Path::new(&home).join(".cache/apifilter/bpf-linker/bin"));
    }
    let target_dir = out.join("ebpf-target");
    let flags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
        "-Ctarget-cpu=v3",
    ]
    .join("\x1f");
    let status = Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--package", "filter-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(root)
        .env("PATH", env::join_paths(path)?)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .status()
        .context("running `rustup run nightly cargo build` for filter-ebpf (run `cargo xtask setup` first)")?;
    if !status.success() {
        bail!("building the XDP program failed ({status}); run `cargo xtask setup` first");
    }
    let built = target_dir.join("bpfel-unknown-none/release/filter");
    std::fs::copy(&built, &dst).with_context(|| format!("copying {}", built.display()))?;
    Ok(())
}
