//! `cargo xtask`: the project's own build, test, fuzz, lint, demo and bench driver.
//!
//! Run it from anywhere in the workspace (`cargo xtask <command>`, an alias in `.cargo/config.toml`).
//! Every command that needs the eBPF toolchain runs `setup` first, which is idempotent and takes
//! seconds once the toolchain is in place.

mod bench;
mod cmd;
mod fuzz;
mod setup;
mod tasks;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Build, test, lint and demonstrate apifilter.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need: nightly rust-src, bpf-linker (against nightly's
    /// LLVM), the bpffs mount and the Debian tools the tests use. Idempotent.
    Setup,
    /// Run `setup`, then build the `apifilter` binary (with the XDP program embedded).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run `setup`, the host unit tests and the integration tests (root).
    Test {
        /// Arguments for the integration test binary, after `--` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The long reliability run (root): the differential test of the XDP program against the
    /// host model with many more frames, and the parsers' property tests with many more cases.
    Fuzz(fuzz::FuzzArgs),
    /// rustfmt check, clippy on the host crates and clippy on the eBPF crate (nightly).
    Lint,
    /// Run `setup` and a release build, then the narrated demo in network namespaces (root).
    Demo,
    /// Run `setup` (plus the peers and tools: nftables, ipset, iptables, nginx, wrk, h2load,
    /// clang), a release build, then measure apifilter against its peers and write
    /// BENCHMARKS.md and BENCHMARKS.json (root).
    Bench {
        /// Fewer rounds and shorter floods: a full pass in well under 10 minutes on 2 cores.
        #[arg(long)]
        quick: bool,
        /// Run only these sections (repeatable): kernel, flood, bulk, latency, proxy, memory.
        #[arg(long, value_enum, value_name = "SECTION")]
        only: Vec<bench::Section>,
        /// Where to write BENCHMARKS.md and BENCHMARKS.json (default: the repository root).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(setup::Scope::All).map(|()| ExitCode::SUCCESS),
        Command::Build { release } => tasks::build(release).map(|()| ExitCode::SUCCESS),
        Command::Test { args } => tasks::test(&args).map(|()| ExitCode::SUCCESS),
        Command::Fuzz(args) => fuzz::run(args).map(|()| ExitCode::SUCCESS),
        Command::Lint => tasks::lint().map(|()| ExitCode::SUCCESS),
        Command::Demo => tasks::demo().map(|()| ExitCode::SUCCESS),
        Command::Bench { quick, only, out } => {
            bench::run(&bench::Options { quick, only, out }).map(|()| ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|err| {
        eprintln!("xtask: error: {err:#}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_arguments_after_double_dash() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "prog_test_run", "--nocapture"])
            .expect("parses");
        match cli.command {
            Command::Test { args } => assert_eq!(args, ["prog_test_run", "--nocapture"]),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn bench_flags() {
        let cli = Cli::try_parse_from([
            "xtask", "bench", "--quick", "--only", "kernel", "--only", "flood", "--out", "/tmp/b",
        ])
        .expect("parses");
        match cli.command {
            Command::Bench { quick, only, out } => {
                assert!(quick);
                assert_eq!(only, [bench::Section::Kernel, bench::Section::Flood]);
                assert_eq!(out.as_deref(), Some(std::path::Path::new("/tmp/b")));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["xtask", "bench", "--only", "nope"]).is_err());
    }

    #[test]
    fn fuzz_takes_a_seed_and_a_packet_count() {
        let cli = Cli::try_parse_from(["xtask", "fuzz", "--seed", "0x2a", "--packets", "1_000"])
            .expect("parses");
        match cli.command {
            Command::Fuzz(args) => assert_eq!((args.seed, args.packets), (Some(42), 1_000)),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn build_release_flag() {
        let cli = Cli::try_parse_from(["xtask", "build", "--release"]).expect("parses");
        assert!(matches!(cli.command, Command::Build { release: true }));
    }
}
