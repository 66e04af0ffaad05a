//! The commands built on `setup`: build, test, lint and demo.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    cmd::{cargo, path_with, release_binary, require_root, step, workspace_root},
    setup::{self, Scope, linker_bin_dir},
};

/// Rustflags for checking the eBPF crate, as `CARGO_ENCODED_RUSTFLAGS` (separated by 0x1f); the
/// same cfg and CPU as `filter-user/build.rs` uses to build it.
const EBPF_RUSTFLAGS: &str = "--cfg=bpf_target_arch=\"x86_64\"\x1f-Ctarget-cpu=v3";

/// `cargo xtask build [--release]`.
pub fn build(release: bool) -> Result<()> {
    setup::run(Scope::All)?;
    let mut build = cargo();
    build.args(["build", "--package", "filter-user"]);
    if release {
        build.arg("--release");
    }
    build.env("PATH", path_with(&linker_bin_dir()?)?);
    step("build", &mut build)?;
    Ok(())
}

/// `cargo xtask test [-- ARGS]`: host unit tests, then the integration tests (root).
pub fn test(args: &[String]) -> Result<()> {
    // Checked first, so nobody waits through the unit tests to learn this.
    require_root(
        "cargo xtask test needs root: the integration tests load XDP programs and build network \
         namespaces (`cargo test` alone runs the unit tests)",
    )?;
    setup::run(Scope::All)?;
    let path = path_with(&linker_bin_dir()?)?;
    step(
        "unit tests",
        cargo()
            .args(["test", "--workspace"])
            .args(["--exclude", "filter-ebpf", "--exclude", "integration-tests"])
            .env("PATH", &path),
    )?;
    step(
        "release build",
        cargo()
            .args(["build", "--package", "filter-user", "--release"])
            .env("PATH", &path),
    )?;
    step(
        "integration tests",
        cargo()
            .args(["test", "--package", "integration-tests", "--release"])
            .args(["--", "--test-threads=1"])
            .args(args)
            .env("APIFILTER_BIN", release_binary())
            .env("PATH", &path),
    )?;
    println!("test: all steps passed");
    Ok(())
}

/// `cargo xtask lint`: every check runs, then the failed ones are named.
pub fn lint() -> Result<()> {
    // filter-user's build script builds the XDP program, so clippy needs the toolchain too.
    setup::run(Scope::Toolchain)?;
    let path = path_with(&linker_bin_dir()?)?;

    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);

    let mut clippy = cargo();
    clippy
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "filter-ebpf",
            "--all-targets",
        ])
        .args(["--", "-D", "warnings"])
        .env("PATH", &path);

    let mut clippy_ebpf = Command::new("rustup");
    clippy_ebpf
        .current_dir(workspace_root())
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "filter-ebpf",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .env("CARGO_ENCODED_RUSTFLAGS", EBPF_RUSTFLAGS)
        .env("PATH", &path)
        // What `cargo xtask` runs under belongs to the stable toolchain.
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");

    let mut failed = Vec::new();
    for (name, cmd) in [
        ("rustfmt", &mut fmt),
        ("clippy", &mut clippy),
        ("clippy (eBPF, nightly)", &mut clippy_ebpf),
    ] {
        if let Err(err) = step(name, cmd) {
            eprintln!("lint: {err:#}");
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    println!("lint: all clean");
    Ok(())
}

/// `cargo xtask demo`: a release build, then `xtask/demo.sh` (root).
pub fn demo() -> Result<()> {
    require_root(
        "cargo xtask demo needs root: it builds network namespaces and attaches XDP programs",
    )?;
    setup::run(Scope::All)?;
    step(
        "release build",
        cargo()
            .args(["build", "--package", "filter-user", "--release"])
            .env("PATH", path_with(&linker_bin_dir()?)?),
    )?;
    let root = workspace_root();
    step(
        "demo",
        Command::new("bash")
            .arg(root.join("xtask/demo.sh"))
            .current_dir(&root)
            .env("APIFILTER", release_binary()),
    )?;
    Ok(())
}
