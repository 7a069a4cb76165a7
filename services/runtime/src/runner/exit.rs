//! How every sluice binary ends: success, or the whole error chain on stderr
//! (`{:#}`: "opening state at S: ... : No such file") and a failure code.

use std::fmt::Display;
use std::process::ExitCode;

/// Turn a binary's result into its exit code, printing an error as
/// `name: outer context: ...: root cause`.
pub fn report<E: Display>(name: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
