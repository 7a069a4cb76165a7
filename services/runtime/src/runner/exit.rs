//! How every sluice binary ends: success, or the whole error chain on stderr
//! (`{:#}`: "opening state at S: ... : No such file") and a failure code.

use std::fmt::Display;
use std::process::ExitCode;

use crate::runner::error::{ErrorClass, ServiceError};

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

/// As [`report`], for a service: the exit code says the error's class
/// ([`ErrorClass::exit_code`]: 78 when a restart will not help), and a fatal
/// error says so on a second line.
pub fn report_service<E>(name: &str, result: Result<(), E>) -> ExitCode
where
    E: Display + AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            let class = class_of(e.as_ref());
            if class == ErrorClass::Fatal {
                eprintln!("{name}: a restart will not help until the setting or state named above changes");
            }
            ExitCode::from(class.exit_code())
        }
    }
}

/// The class of the first [`ServiceError`] in `e`'s chain; an error that
/// is none (an I/O error at start, say) is worth a retry.
pub fn class_of(e: &(dyn std::error::Error + 'static)) -> ErrorClass {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(service) = err.downcast_ref::<ServiceError>() {
            return service.class();
        }
        next = err.source();
    }
    ErrorClass::Retry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("starting")]
    struct Outer(#[source] ServiceError);

    #[test]
    fn the_class_is_found_under_context() {
        let fatal = Outer(ServiceError::Settings("service.weight must be at least 1".into()));
        assert_eq!(class_of(&fatal), ErrorClass::Fatal);
        assert_eq!(class_of(&ServiceError::TaskStopped("acker")), ErrorClass::Retry);
        assert_eq!(class_of(&std::io::Error::other("x")), ErrorClass::Retry);
    }
}
