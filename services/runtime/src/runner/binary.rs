//! The `main` of every service binary: one flag (`--config FILE`, plus
//! `--help` and `--version`), logs to stderr (`SLUICE_LOG`, default `info`),
//! run, and the exit code of [`crate::runner::exit::report_service`] (by
//! the error's class). Each binary keeps only
//! its name, its one-line description and its global allocator.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Parse the command line, start logging, run `run` with the `--config`
/// file (if any), and turn its result into the exit code.
pub fn service_main<E>(
    name: &'static str,
    about: &'static str,
    run: impl FnOnce(Option<&Path>) -> Result<(), E>,
) -> ExitCode
where
    E: Display + AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    let matches = clap::Command::new(name)
        .version(env!("CARGO_PKG_VERSION"))
        .about(about)
        .arg(
            clap::Arg::new("config")
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML configuration, under SLUICE_* variables (docs/configuration.md)"),
        )
        .get_matches();
    crate::observe::telemetry::init("info");
    crate::runner::exit::report_service(name, run(matches.get_one::<PathBuf>("config").map(PathBuf::as_path)))
}
