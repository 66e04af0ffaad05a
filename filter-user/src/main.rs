//! The `apifilter` binary: parse the command line, set up logging, run the command.
use clap::Parser as _;
use filter_user::cli::{Cli, LogFormat};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
