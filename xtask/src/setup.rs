//! `cargo xtask setup`: everything building and testing apifilter needs, installed idempotently.
//!
//! - `rust-src` for the nightly toolchain (the XDP program builds `core` itself).
//! - `bpf-linker` linked against the nightly rustc's own `libLLVM` (see `TOOLCHAIN.md`): the
//!   library links live in `~/.cache/apifilter/llvm/lib` (the binary keeps an rpath to them) and
//!   the binary in `~/.cache/apifilter/bpf-linker/bin`. A stamp file records the nightly it was
//!   built for, so a new nightly triggers a rebuild and an unchanged one costs nothing.
//! - bpffs mounted at `/sys/fs/bpf` (root only).
//! - The Debian tools the tests and the demo use (root only; otherwise a hint), including PyJWT
//!   for the JWT interop test.
//! - Debian's `crowdsec` (a real CrowdSec Local API for the bouncer tests). Its post-install step
//!   registers with the online Central API, which fails offline and leaves dpkg half-configured;
//!   a non-empty `/etc/crowdsec/online_api_credentials.yaml` written first makes it skip that
//!   step (and repairs an earlier failed install with `dpkg --configure -a`). Nothing is started:
//!   the tests run their own LAPI on loopback.

use std::{
    collections::HashSet,
    fs::{self, File},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, is_root, stdout_of, step};

/// The bpf-linker release the project builds with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where bpffs must be mounted.
const BPFFS: &str = "/sys/fs/bpf";
/// Debian packages the tests and the demo run. PyJWT and `cryptography` mint the tokens that
/// `filter-user/tests/auth_interop.rs` verifies (Debian's, so no pip step is needed);
/// `testssl.sh` scans the proxy's TLS in `tests/tests/proxy_abuse.rs`.
const PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "bpftool",
    "xdp-tools",
    "curl",
    "openssl",
    "python3",
    "python3-jwt",
    "python3-cryptography",
    "testssl.sh",
];

/// How much of the setup a command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only the toolchain for building the XDP program (nightly rust-src, bpf-linker).
    Toolchain,
    /// The toolchain plus bpffs and the Debian packages.
    All,
}

/// The toolchain cache under `$HOME/.cache/apifilter`.
struct Paths {
    cache: PathBuf,
    llvm_prefix: PathBuf,
    linker_root: PathBuf,
}

impl Paths {
    fn new() -> Result<Self> {
        let cache = cmd::home()?.join(".cache/apifilter");
        Ok(Self {
            llvm_prefix: cache.join("llvm"),
            linker_root: cache.join("bpf-linker"),
            cache,
        })
    }

    fn linker(&self) -> PathBuf {
        self.linker_root.join("bin/bpf-linker")
    }

    fn stamp(&self) -> PathBuf {
        self.linker_root.join("apifilter-stamp")
    }
}

/// The directory holding `bpf-linker`, for `$PATH`.
pub fn linker_bin_dir() -> Result<PathBuf> {
    Ok(Paths::new()?.linker_root.join("bin"))
}

/// Runs the setup steps of `scope`.
pub fn run(scope: Scope) -> Result<()> {
    let started = Instant::now();
    let paths = Paths::new()?;
    fs::create_dir_all(&paths.cache)
        .with_context(|| format!("creating {}", paths.cache.display()))?;
    {
        // Two setups at once (say `cargo xtask build` in two terminals) take turns here, so they
        // never build bpf-linker over each other.
        let lock_path = paths.cache.join("setup.lock");
        let lock = File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
        let nightly = Nightly::detect()?;
        rust_src(&nightly)?;
        bpf_linker(&nightly, &paths)?;
    }
    if scope == Scope::All {
        bpffs()?;
        // First: it repairs a dpkg left half-configured by a failed crowdsec install, which
        // would make every other apt-get install fail.
        crowdsec()?;
        packages()?;
    }
    println!("setup: done ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// The nightly toolchain the XDP program builds with.
struct Nightly {
    sysroot: PathBuf,
    /// `rustc -V`, e.g. `rustc 1.97.0-nightly (e50aa6fba 2026-05-19)`.
    version: String,
    llvm_major: u32,
}

impl Nightly {
    fn detect() -> Result<Self> {
        let rustc_vv = || stdout_of(Command::new("rustc").args(["+nightly", "-vV"]));
        let verbose = if let Ok(out) = rustc_vv() {
            out
        } else {
            println!("setup: no nightly toolchain; installing it");
            let mut install = Command::new("rustup");
            install
                .args(["toolchain", "install", "nightly", "--profile", "minimal"])
                .args(["--component", "rust-src", "--component", "clippy"])
                .args(["--component", "rustfmt"]);
            step("install nightly", &mut install)?;
            rustc_vv()?
        };
        let (version, llvm_major) = parse_rustc_verbose(&verbose)?;
        let sysroot = stdout_of(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
        Ok(Self {
            sysroot: PathBuf::from(sysroot.trim()),
            version,
            llvm_major,
        })
    }

    /// What the stamp file holds for a bpf-linker built against this toolchain.
    fn stamp(&self) -> String {
        format!(
            "bpf-linker {BPF_LINKER_VERSION}\nllvm-major {}\n{}\n",
            self.llvm_major, self.version
        )
    }
}

/// The version line and the LLVM major version from `rustc -vV`.
fn parse_rustc_verbose(out: &str) -> Result<(String, u32)> {
    let version = out
        .lines()
        .next()
        .filter(|line| line.starts_with("rustc "))
        .context("`rustc +nightly -vV` printed no version line")?
        .trim()
        .to_owned();
    let llvm = out
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    let major = llvm
        .trim()
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("unexpected LLVM version {:?}", llvm.trim()))?;
    Ok((version, major))
}

fn rust_src(nightly: &Nightly) -> Result<()> {
    let library = nightly.sysroot.join("lib/rustlib/src/rust/library");
    if library.is_dir() {
        println!("setup: rust-src ok (nightly)");
        return Ok(());
    }
    step(
        "rust-src",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )?;
    if !library.is_dir() {
        bail!("rust-src was added but {} is missing", library.display());
    }
    println!("setup: rust-src ok (installed)");
    Ok(())
}

/// `bpf-linker --version`, if the installed binary runs.
fn linker_version(paths: &Paths) -> Option<String> {
    let out = Command::new(paths.linker())
        .arg("--version")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn bpf_linker(nightly: &Nightly, paths: &Paths) -> Result<()> {
    let want = nightly.stamp();
    let have = fs::read_to_string(paths.stamp()).unwrap_or_default();
    let works = linker_version(paths).is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if works && have == want {
        println!("setup: bpf-linker ok (cached, LLVM {})", nightly.llvm_major);
        return Ok(());
    }
    let why = if !works {
        "not installed or not working"
    } else if have.is_empty() {
        "no record of the LLVM it was built for"
    } else {
        "the nightly toolchain changed"
    };
    println!(
        "setup: bpf-linker {BPF_LINKER_VERSION}: building against nightly's LLVM {} ({why}); \
         this takes a minute or two",
        nightly.llvm_major
    );
    let started = Instant::now();
    link_llvm(&nightly.sysroot, &paths.llvm_prefix)?;
    // An interrupted build must not look finished next time.
    if let Err(err) = fs::remove_file(paths.stamp())
        && err.kind() != std::io::ErrorKind::NotFound
    {
        return Err(err).context("removing the bpf-linker stamp");
    }
    let features = format!("llvm-{}", nightly.llvm_major);
    let mut install = cmd::cargo();
    install
        .current_dir(&paths.cache)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--no-default-features", "--features", &features])
        .arg("--force")
        .arg("--root")
        .arg(&paths.linker_root)
        .env("LLVM_PREFIX", &paths.llvm_prefix);
    step("install bpf-linker", &mut install)?;
    let version = linker_version(paths).with_context(|| {
        format!(
            "bpf-linker was installed but `{} --version` fails",
            paths.linker().display()
        )
    })?;
    fs::write(paths.stamp(), want)
        .with_context(|| format!("writing {}", paths.stamp().display()))?;
    println!(
        "setup: bpf-linker ok ({version} against LLVM {}, built in {:.0} s)",
        nightly.llvm_major,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Links nightly's `libLLVM*.so*` into `<prefix>/lib`, plus `libLLVM.so` for the linker to find.
fn link_llvm(sysroot: &Path, prefix: &Path) -> Result<()> {
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    // Drop links into an older nightly: they dangle once rustup removes it.
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("libLLVM") {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    let source = sysroot.join("lib");
    let mut versioned = Vec::new();
    for entry in fs::read_dir(&source).with_context(|| format!("reading {}", source.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libLLVM") && name.contains(".so") {
            let link = lib.join(&*name);
            symlink(entry.path(), &link).with_context(|| format!("linking {}", link.display()))?;
            if name.starts_with("libLLVM.so.") {
                versioned.push(entry.path());
            }
        }
    }
    versioned.sort();
    let first = versioned
        .first()
        .with_context(|| format!("no libLLVM.so.* in {}", source.display()))?;
    let link = lib.join("libLLVM.so");
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    symlink(first, &link).with_context(|| format!("linking {}", link.display()))?;
    Ok(())
}

fn bpffs() -> Result<()> {
    let out = Command::new("findmnt")
        .args(["--noheadings", "--output", "FSTYPE", BPFFS])
        .output()
        .context("running findmnt (util-linux)")?;
    let mounted = out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "bpf");
    if mounted {
        println!("setup: bpffs ok (mounted at {BPFFS})");
        return Ok(());
    }
    if !is_root() {
        println!(
            "setup: bpffs is NOT mounted at {BPFFS}: run `cargo xtask setup` as root, or \
             `mount -t bpf bpf {BPFFS}`"
        );
        return Ok(());
    }
    step(
        "mount bpffs",
        Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
    )?;
    println!("setup: bpffs ok (mounted at {BPFFS} now)");
    Ok(())
}

fn packages() -> Result<()> {
    install(PACKAGES, "the integration tests and the demo")
}

/// Installs whichever of `packages` dpkg does not report as installed (`apt-get`, as root; as
/// another user it prints the command instead). `who` names what needs them.
pub fn install(packages: &[&'static str], who: &str) -> Result<()> {
    let missing = match missing_packages(packages) {
        Ok(missing) => missing,
        Err(err) => {
            println!(
                "setup: cannot check Debian packages ({err:#}); make sure these are installed: {}",
                packages.join(" ")
            );
            return Ok(());
        }
    };
    if missing.is_empty() {
        println!("setup: packages ok ({})", packages.join(", "));
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        println!(
            "setup: missing Debian packages ({who} need them): {list}\n\
             setup: install them as root: apt-get update && apt-get install -y \
             --no-install-recommends {list}"
        );
        return Ok(());
    }
    println!("setup: installing missing Debian packages: {list}");
    step(
        "apt-get update",
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    step(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing_packages(packages)?;
    if !still.is_empty() {
        bail!(
            "apt-get install succeeded but these are still missing: {}",
            still.join(" ")
        );
    }
    println!("setup: packages ok (installed {list})");
    Ok(())
}

/// The CrowdSec package, installed apart from [`PACKAGES`] (see the module docs).
const CROWDSEC: &str = "crowdsec";
/// Its Central API credentials; non-empty means "already registered", so the post-install step
/// leaves the (unreachable) Central API alone.
const CROWDSEC_ONLINE_CREDS: &str = "/etc/crowdsec/online_api_credentials.yaml";

/// dpkg's status of one package (`install ok installed`, `install ok half-configured`, ...).
fn dpkg_status(package: &str) -> Result<Option<String>> {
    let out = Command::new("dpkg-query")
        .args(["--show", "--showformat", "${Status}"])
        .arg(package)
        .output()
        .context("running dpkg-query")?;
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(
        (out.status.success() && !status.is_empty() && !status.contains("not-installed"))
            .then_some(status),
    )
}

fn crowdsec() -> Result<()> {
    let status = match dpkg_status(CROWDSEC) {
        Ok(status) => status,
        Err(err) => {
            println!(
                "setup: cannot check the crowdsec package ({err:#}); the CrowdSec tests need it"
            );
            return Ok(());
        }
    };
    if status.as_deref() == Some("install ok installed") {
        println!("setup: crowdsec ok (a Local API for the tests)");
        return Ok(());
    }
    if !is_root() {
        println!(
            "setup: crowdsec is missing (the CrowdSec tests run a Local API): as root, write a \
             comment line to {CROWDSEC_ONLINE_CREDS}, then apt-get install -y crowdsec"
        );
        return Ok(());
    }
    let creds = Path::new(CROWDSEC_ONLINE_CREDS);
    if fs::metadata(creds).map(|m| m.len()).unwrap_or(0) == 0 {
        fs::create_dir_all(creds.parent().expect("absolute path"))
            .context("creating /etc/crowdsec")?;
        fs::write(
            creds,
            "# No Central API on this machine: the Local API runs offline.\n",
        )
        .with_context(|| format!("writing {CROWDSEC_ONLINE_CREDS}"))?;
    }
    if status.is_some() {
        // Unpacked or half-configured by an earlier attempt: finish configuring it.
        println!(
            "setup: crowdsec is {}; configuring it",
            status.unwrap_or_default()
        );
        step(
            "dpkg --configure -a",
            Command::new("dpkg")
                .args(["--configure", "-a"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    } else {
        println!("setup: installing crowdsec");
        step(
            "apt-get update",
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        step(
            "apt-get install crowdsec",
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", CROWDSEC])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    match dpkg_status(CROWDSEC)? {
        Some(s) if s == "install ok installed" => {
            println!("setup: crowdsec ok (installed)");
            Ok(())
        }
        other => bail!(
            "crowdsec is not installed properly after setup (dpkg status: {})",
            other.unwrap_or_else(|| "not installed".into())
        ),
    }
}

/// The entries of `packages` that dpkg does not report as installed.
fn missing_packages(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    // One query for all of them. dpkg-query exits 1 when it knows nothing about some package,
    // but still lists the others, so only its output counts.
    let out = Command::new("dpkg-query")
        .args(["--show", "--showformat", "${Package} ${Status}\\n"])
        .args(packages)
        .output()
        .context("running dpkg-query")?;
    Ok(missing_from(
        packages,
        &String::from_utf8_lossy(&out.stdout),
    ))
}

/// The entries of `packages` not listed as `install ok installed` in dpkg-query's output.
fn missing_from(packages: &[&'static str], listing: &str) -> Vec<&'static str> {
    let installed: HashSet<&str> = listing
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(package, _)| package)
        .collect();
    packages
        .iter()
        .copied()
        .filter(|package| !installed.contains(package))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rustc_verbose_version() {
        let out = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                   commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\n\
                   host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        let (version, major) = parse_rustc_verbose(out).expect("parses");
        assert_eq!(version, "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)");
        assert_eq!(major, 22);
        assert!(parse_rustc_verbose("rustc 1.0.0\n").is_err());
        assert!(parse_rustc_verbose("LLVM version: x\n").is_err());
    }

    #[test]
    fn stamp_changes_with_the_nightly() {
        let nightly = |version: &str, llvm_major| Nightly {
            sysroot: PathBuf::new(),
            version: version.into(),
            llvm_major,
        };
        let today = nightly("rustc 1.97.0-nightly (e50aa6fba 2026-05-19)", 22);
        let tomorrow = nightly("rustc 1.97.0-nightly (0123456789 2026-05-20)", 22);
        let new_llvm = nightly("rustc 1.97.0-nightly (e50aa6fba 2026-05-19)", 23);
        assert_ne!(today.stamp(), tomorrow.stamp());
        assert_ne!(today.stamp(), new_llvm.stamp());
        assert!(today.stamp().contains("llvm-major 22"));
    }

    #[test]
    fn finds_missing_packages() {
        let listing = "iproute2 install ok installed\nethtool deinstall ok config-files\n\
                       bpftool install ok installed\nxdp-tools install ok installed\n\
                       curl install ok installed\nopenssl install ok installed\n";
        assert_eq!(
            missing_from(PACKAGES, listing),
            [
                "ethtool",
                "python3",
                "python3-jwt",
                "python3-cryptography",
                "testssl.sh"
            ]
        );
        assert_eq!(missing_from(PACKAGES, ""), PACKAGES);
    }

    #[test]
    fn links_llvm_like_the_recipe() {
        let dir = std::env::temp_dir().join(format!("xtask-link-llvm-{}", std::process::id()));
        let sysroot = dir.join("sysroot");
        let prefix = dir.join("prefix");
        fs::create_dir_all(sysroot.join("lib")).expect("mkdir");
        for name in [
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "librustc_driver-0.so",
        ] {
            fs::write(sysroot.join("lib").join(name), name).expect("write");
        }
        fs::create_dir_all(prefix.join("lib")).expect("mkdir");
        symlink(
            "/nonexistent/libLLVM-21.so",
            prefix.join("lib/libLLVM-21.so"),
        )
        .expect("link");

        link_llvm(&sysroot, &prefix).expect("links");
        link_llvm(&sysroot, &prefix).expect("links again");

        let mut names: Vec<_> = fs::read_dir(prefix.join("lib"))
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "libLLVM-22-rust-1.97.0-nightly.so",
                "libLLVM.so",
                "libLLVM.so.22.1-rust-1.97.0-nightly"
            ]
        );
        assert_eq!(
            fs::read_link(prefix.join("lib/libLLVM.so")).expect("link"),
            sysroot.join("lib/libLLVM.so.22.1-rust-1.97.0-nightly")
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
