//! The `apifilter` binary: parse the command line, set up logging, run the command.
use clap::Parser as _;
use filter_user::cli::{Cli, Command, LogFormat};

/// mimalloc: the proxy allocates and frees small buffers on every request, from several worker
/// threads; glibc's allocator spent about 6% of a request's CPU time on it.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's defaults commit arenas eagerly, which left an idle daemon at three times glibc's
/// resident size: arenas are committed as used. Freed memory goes back after 100 ms unused
/// (returning it at once cost 7% of the proxy's throughput in page faults and `madvise` calls).
/// Set from a constructor: the first allocation (before `main`) reserves the first arena.
#[used]
#[unsafe(link_section = ".init_array")]
static ALLOCATOR_OPTIONS: extern "C" fn() = allocator_returns_memory;

extern "C" fn allocator_returns_memory() {
    // mimalloc v2's option ids (`mimalloc.h`); not exported by the -sys crate.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting documented options; mimalloc reads them on its next decision.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 100);
    }
}

/// mimalloc returns freed memory on the next allocator call of the thread that freed it, once
/// the purge delay has passed: a thread that goes quiet right after freeing a lot (a large feed
/// applied) would keep it resident. Once a second, a collection returns whatever has waited
/// past the delay.
fn collect_freed_memory() {
    let spawned = std::thread::Builder::new().name("memory".into()).spawn(|| {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            // SAFETY: a documented mimalloc call with no preconditions.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    });
    if let Err(err) = spawned {
        tracing::warn!(%err, "no thread to return freed memory: resident memory may stay high");
    }
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(), // --help, --version
        Err(err) => {
            eprintln!("{} (see --help)", one_line(&err.to_string()));
            std::process::exit(2);
        }
    };
    if matches!(cli.command, Command::Run { .. }) {
        collect_freed_memory();
    }
    if !matches!(cli.command, Command::Run { .. }) {
        // A one-shot command piped into `head` should end quietly when the pipe closes. The
        // daemon keeps Rust's default (SIGPIPE ignored): its sockets report EPIPE instead.
        // SAFETY: restoring the default disposition of a signal.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("APIFILTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match cli.log_format {
        LogFormat::Plain => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
    match filter_user::commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", format!("{err:#}").replace('\n', "\n  "));
            std::process::ExitCode::FAILURE
        }
    }
}

/// A clap error on one line: the message and what it names, without the usage block and tips.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect::<Vec<_>>()
        .join(" ")
}
