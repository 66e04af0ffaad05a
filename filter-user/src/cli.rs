//! The command line, exactly as DESIGN.md spells it. Every argument documents itself with an
//! example; `commands` carries them out.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    cidr::Prefix,
    loader::{AttachMode, Capacities},
};

/// Kernel-level API traffic filter: XDP drops blocklisted sources at the NIC and rate-limits the
/// rest per source IP.
#[derive(Debug, Parser)]
#[command(
    name = "apifilter",
    version,
    after_help = "Examples:
  apifilter attach eth0                       # load the filter and attach it (native XDP, else skb)
  apifilter block 203.0.113.7 --ttl 1h --comment \"credential stuffing\"
  apifilter block 198.51.100.0/24 2001:db8:bad::/48
  apifilter allow 192.0.2.0/24 --comment office
  apifilter import drop.txt --format spamhaus --source spamhaus-drop --replace
  apifilter ratelimit set --pps 200 --burst 400 --ports 80,443
  apifilter stats --watch 5
  apifilter list --blocked --json | jq .
  apifilter detach --all"
)]
pub struct Cli {
    /// Where the loaded program, its maps and links are pinned (bpffs).
    #[arg(
        long,
        global = true,
        env = "APIFILTER_PIN_DIR",
        default_value = "/sys/fs/bpf/apifilter",
        value_name = "DIR"
    )]
    pub pin_dir: PathBuf,
    /// Where durable state lives (state.db: entries, TTLs, comments, audit log).
    #[arg(
        long,
        global = true,
        env = "APIFILTER_STATE_DIR",
        default_value = "/var/lib/apifilter",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, env = "APIFILTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the filter if needed, attach it to interfaces and pin it, so it keeps running after
    /// this command exits. After a reboot this also restores every live entry from the state dir.
    #[command(
        after_help = "Examples:\n  apifilter attach eth0\n  apifilter attach eth0 eth1 --mode skb"
    )]
    Attach {
        /// Interfaces to attach to. Example: eth0
        #[arg(required = true, value_name = "IFACE")]
        ifaces: Vec<String>,
        /// XDP mode: native (in the driver), skb (generic), or auto (native, else skb with a warning).
        #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
        mode: AttachMode,
        /// Map sizes, used when the program is first loaded.
        #[command(flatten)]
        capacities: Capacities,
    },
    /// Detach the filter from interfaces. `--all` also unloads it; durable state is kept.
    #[command(after_help = "Examples:\n  apifilter detach eth1\n  apifilter detach --all")]
    Detach {
        /// Interfaces to detach from. Example: eth1
        #[arg(
            value_name = "IFACE",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ifaces: Vec<String>,
        /// Detach from every interface and unload the program.
        #[arg(long)]
        all: bool,
    },
    /// Show interfaces, modes, program id, map fill levels and the rate limit.
    #[command(after_help = "Examples:\n  apifilter status\n  apifilter status --json")]
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Drop all traffic from addresses or prefixes.
    #[command(
        after_help = "Examples:\n  apifilter block 203.0.113.7\n  apifilter block 198.51.100.0/24 --ttl 6h --comment \"scanner\"\n  apifilter block 2001:db8:bad::/48"
    )]
    Block(BlockArgs),
    /// Remove addresses or prefixes from the blocklist (other owners, such as feeds, keep theirs).
    #[command(after_help = "Example:\n  apifilter unblock 203.0.113.7 198.51.100.0/24")]
    Unblock {
        /// Entries to remove. Example: 203.0.113.7
        #[arg(required = true, value_name = "IP|CIDR")]
        entries: Vec<Prefix>,
    },
    /// Never filter traffic from addresses or prefixes: the allowlist wins over the blocklist and
    /// the rate limit.
    #[command(
        after_help = "Examples:\n  apifilter allow 192.0.2.0/24 --comment office\n  apifilter allow 2001:db8:1::/48"
    )]
    Allow {
        /// Entries to allow. Example: 192.0.2.0/24
        #[arg(required = true, value_name = "IP|CIDR")]
        entries: Vec<Prefix>,
        /// Note stored with the entry. Example: "monitoring"
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
        /// Accept a /0 prefix (it exempts every source from filtering).
        #[arg(long)]
        force: bool,
    },
    /// Remove entries from the allowlist.
    #[command(after_help = "Example:\n  apifilter unallow 192.0.2.0/24")]
    Unallow {
        /// Entries to remove. Example: 192.0.2.0/24
        #[arg(required = true, value_name = "IP|CIDR")]
        entries: Vec<Prefix>,
    },
    /// List entries with their owners, expiry and hit counts.
    #[command(after_help = "Examples:\n  apifilter list\n  apifilter list --blocked --json")]
    List {
        /// Only the blocklist.
        #[arg(long, conflicts_with = "allowed")]
        blocked: bool,
        /// Only the allowlist.
        #[arg(long)]
        allowed: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Block every address or prefix in a list file (or `-` for stdin) as one named source.
    #[command(
        after_help = "Examples:\n  apifilter import bad-ips.txt\n  curl -s https://www.spamhaus.org/drop/drop_v4.json | apifilter import - --format spamhaus --source spamhaus --replace\n  apifilter import firehol_level1.netset --source firehol --ttl 1d"
    )]
    Import(ImportArgs),
    /// Per-source rate limit in the kernel.
    #[command(
        subcommand,
        after_help = "Examples:\n  apifilter ratelimit set --pps 100 --burst 200\n  apifilter ratelimit show --json\n  apifilter ratelimit off"
    )]
    Ratelimit(RatelimitCommand),
    /// Enforce (drop) or only monitor (count what would be dropped).
    #[command(after_help = "Examples:\n  apifilter mode monitor\n  apifilter mode enforce")]
    Mode {
        /// enforce or monitor.
        #[arg(value_enum)]
        mode: Mode,
    },
    /// Kernel counters per interface and reason: packets, bytes and rates.
    #[command(
        after_help = "Examples:\n  apifilter stats\n  apifilter stats --watch        # every 10 s\n  apifilter stats --watch 1 --json"
    )]
    Stats {
        /// Machine-readable output (JSON lines with --watch).
        #[arg(long)]
        json: bool,
        /// Keep printing every SECS seconds (default 10), with deltas and rates.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "10")]
        watch: Option<f64>,
    },
    /// Run the daemon: attach and restore, then keep feeds, CrowdSec, the TLS proxy, counters and
    /// metrics going. SIGHUP reloads the config (a bad one is refused and the running one kept);
    /// SIGTERM stops the daemon and leaves the filter attached.
    #[command(
        after_help = "Examples:\n  apifilter run --config /etc/apifilter/apifilter.toml\n  APIFILTER_LOG=debug apifilter --log-format json run --config apifilter.toml\n  kill -HUP $(pidof apifilter)     # reload the config"
    )]
    Run {
        /// The TOML config (see packaging/apifilter.toml for every option). Example: /etc/apifilter/apifilter.toml
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a daemon config and exit: syntax, unknown fields, values, and that its interfaces
    /// exist. Changes nothing.
    #[command(
        after_help = "Examples:\n  apifilter check-config --config /etc/apifilter/apifilter.toml\n  apifilter check-config --config new.toml && systemctl reload apifilter"
    )]
    CheckConfig {
        /// The TOML config. Example: /etc/apifilter/apifilter.toml
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

/// `apifilter block`.
#[derive(Debug, Args)]
pub struct BlockArgs {
    /// Addresses or CIDR prefixes, IPv4 or IPv6. Example: 203.0.113.7 198.51.100.0/24
    #[arg(required = true, value_name = "IP|CIDR")]
    pub entries: Vec<Prefix>,
    /// Lift the block after this long (the kernel enforces it even with no apifilter running).
    /// Example: 30m, 1h, 7d
    #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
    pub ttl: Option<std::time::Duration>,
    /// Note stored with the entry. Example: "credential stuffing"
    #[arg(long, value_name = "TEXT")]
    pub comment: Option<String>,
    /// Accept a /0 prefix (it blocks every source), or a prefix covering an address an operator
    /// is connected from over SSH.
    #[arg(long)]
    pub force: bool,
}

/// `apifilter import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// List file, or `-` for stdin. Example: drop.txt
    #[arg(value_name = "FILE|-")]
    pub file: PathBuf,
    /// List format; auto recognises every supported one.
    #[arg(long, value_enum, default_value_t = crate::formats::Format::Auto)]
    pub format: crate::formats::Format,
    /// Owner name of the imported entries; `--replace` swaps only this source's entries.
    /// Example: spamhaus-drop
    #[arg(long, default_value = "import", value_name = "NAME")]
    pub source: String,
    /// Lift the imported blocks after this long. Example: 1d
    #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
    pub ttl: Option<std::time::Duration>,
    /// Make the source hold exactly this list: entries it no longer lists are released (after the
    /// new ones are in, so nothing blinks out); entries it already holds with the same expiry are
    /// left as they are, so refreshing a big list costs what changed.
    #[arg(long)]
    pub replace: bool,
    /// Accept /0 prefixes in the list, and prefixes covering an address an operator is
    /// connected from over SSH.
    #[arg(long)]
    pub force: bool,
}

/// `apifilter ratelimit`.
#[derive(Debug, Subcommand)]
pub enum RatelimitCommand {
    /// Turn on (or change) the per-source token bucket.
    #[command(
        after_help = "Examples:\n  apifilter ratelimit set --pps 100 --burst 200\n  apifilter ratelimit set --pps 20 --burst 40 --ports 443 --syn-only\n  apifilter ratelimit set --pps 500 --burst 500 --v6-prefix 56"
    )]
    Set {
        /// Packets per second each source may send. Example: 100
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        pps: u64,
        /// Packets a source may send at once before the rate applies. Example: 200
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        burst: u64,
        /// Only limit these TCP/UDP destination ports. Example: 80,443
        #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
        ports: Vec<u16>,
        /// IPv6 sources share one bucket per prefix of this length. Example: 64
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=128))]
        v6_prefix: u8,
        /// Only limit TCP connection attempts (SYN without ACK).
        #[arg(long)]
        syn_only: bool,
    },
    /// Turn the rate limit off.
    #[command(after_help = "Example:\n  apifilter ratelimit off")]
    Off,
    /// Show the rate limit.
    #[command(
        after_help = "Examples:\n  apifilter ratelimit show\n  apifilter ratelimit show --json"
    )]
    Show {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Enforcement mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Drop what the rules say to drop.
    Enforce,
    /// Pass everything; count what would have been dropped.
    Monitor,
}

/// Parse a positive duration such as `30m`, `1h`, `7d`.
pub fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (examples: 90s, 30m, 1h, 7d)"))?;
    if d.is_zero() {
        return Err(format!("invalid duration {s:?}: must be more than zero"));
    }
    if d > std::time::Duration::from_secs(100 * 365 * 86_400) {
        return Err(format!(
            "invalid duration {s:?}: longer than 100 years; omit --ttl for a permanent entry"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_cidr_is_rejected_naming_it() {
        let err =
            Cli::try_parse_from(["apifilter", "block", "10.0.0.1", "300.1.2.3/8"]).unwrap_err();
        assert!(err.to_string().contains("300.1.2.3/8"), "{err}");
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h").unwrap().as_secs(), 3600);
        assert_eq!(parse_ttl("90s").unwrap().as_secs(), 90);
        assert!(parse_ttl("0s").unwrap_err().contains("\"0s\""));
        assert!(parse_ttl("soon").unwrap_err().contains("\"soon\""));
    }

    #[test]
    fn every_subcommand_has_examples() {
        fn check(cmd: &clap::Command, path: &str) {
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let name = format!("{path} {}", sub.get_name());
                let help = sub
                    .get_after_help()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                assert!(help.contains("apifilter "), "`{name}` has no example");
                check(sub, &name);
            }
        }
        check(&Cli::command(), "apifilter");
    }

    #[test]
    fn stats_watch_defaults_to_ten_seconds() {
        let cli = Cli::try_parse_from(["apifilter", "stats", "--watch"]).unwrap();
        assert!(matches!(cli.command, Command::Stats { watch: Some(w), .. } if w == 10.0));
    }
}

/// Property tests of the `--ttl` parser.
///
/// Bound held: any string of up to 64 characters parses without panicking to a duration of more
/// than zero and at most 100 years, or to an error quoting the input; every duration in that
/// range, written the way `humantime` writes it, parses back to itself, and every integer
/// number of seconds, minutes, hours or days written with its unit parses to that many seconds.
/// 256 cases per property by default; `PROPTEST_CASES` raises it.
#[cfg(test)]
mod proptests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    const HUNDRED_YEARS: Duration = Duration::from_secs(100 * 365 * 86_400);

    fn check(s: &str) -> Result<(), TestCaseError> {
        match parse_ttl(s) {
            Ok(d) => prop_assert!(!d.is_zero() && d <= HUNDRED_YEARS, "{s:?} gave {d:?}"),
            Err(e) => prop_assert!(e.contains(&format!("{s:?}")), "{e}"),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn any_text_parses_or_names_itself(s in "\\PC{0,64}") {
            check(&s)?;
        }

        #[test]
        fn duration_like_text_parses_or_names_itself(
            s in "[0-9]{0,24}[ .]?(ns|us|ms|s|m|h|d|w|M|y|sec|min|hour|days|years)?([ ]?[0-9]{1,20}[a-z]{0,5}){0,3}",
        ) {
            check(&s)?;
        }

        #[test]
        fn written_durations_parse_back(secs in 1u64..=HUNDRED_YEARS.as_secs(), nanos in 0u32..1_000_000_000) {
            let d = Duration::new(secs, nanos).min(HUNDRED_YEARS);
            let text = humantime::format_duration(d).to_string();
            prop_assert_eq!(parse_ttl(&text), Ok(d), "{}", text);
        }

        #[test]
        fn whole_units(n in 1u64..=36_500, unit in prop::sample::select(vec![("s", 1u64), ("m", 60), ("h", 3_600), ("d", 86_400)])) {
            let (suffix, secs) = unit;
            let d = Duration::from_secs(n * secs);
            let got = parse_ttl(&format!("{n}{suffix}"));
            if d <= HUNDRED_YEARS {
                prop_assert_eq!(got, Ok(d));
            } else {
                prop_assert!(got.is_err());
            }
        }
    }
}
