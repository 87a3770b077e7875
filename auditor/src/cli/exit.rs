//! How the `auditor` process ends: its exit codes (a contract, written in `--help` and the
//! README) and the two ways a command can end without an answer.
//!
//! An answer is an [`Exit`]; a command that gives none returns a [`Failure`], which says whether
//! the user asked for something that cannot be done (usage, 64) or the auditor could not decide
//! (its own trouble, 2). The two are kept apart so that a script can tell "fix your command
//! line" from "try again later", and neither is ever mistaken for a verdict.

use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;

use auditor::AuditError;

/// The exit code table shown by `auditor --help`.
pub const EXIT_CODES: &str = "\
Exit codes:
  0   consistent (audit); the report verifies (verify-report); the re-execution sides with the
      trainer (adjudicate); the daemon stopped cleanly (serve)
  1   an adverse verdict (audit); the report does not verify or is signed by another key
      (verify-report); the re-execution sides with the auditor (adjudicate)
  2   could not decide: the auditor's own trouble (its disk, its network before the trainer
      answered, an input it could not read, a bug), with the reason on stderr
  3   adjudicate only: the re-execution reproduces neither side's leaf
  64  usage or configuration error: bad flags, an unknown or unavailable --device, a path named
      on the command line that does not exist, a bad key, a segment outside the record, a bad
      config file; nothing was audited

Writing to a closed pipe (`auditor ... | head -1`) is not an error: the output stops quietly and
the exit code is still the answer's.";

/// An answer, as the process's exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: consistent; a report that verifies; an adjudication siding with the trainer; a daemon
    /// that stopped cleanly.
    Ok,
    /// 1: an adverse verdict; a report that does not verify or has another signer; an
    /// adjudication siding with the auditor.
    Adverse,
    /// 2: could not decide.
    Undecided,
    /// 3: an adjudication that reproduces neither leaf.
    Neither,
    /// 64, sysexits' `EX_USAGE`: bad flags or configuration.
    Usage,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Adverse => 1,
            Exit::Undecided => 2,
            Exit::Neither => 3,
            Exit::Usage => 64,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// A command that ended without an answer.
#[derive(Debug)]
pub enum Failure {
    /// The command line or configuration asks for something that cannot be done.
    Usage(anyhow::Error),
    /// The auditor could not decide.
    Undecided(anyhow::Error),
}

/// A usage error with `message` (which names the flag or file).
pub fn usage(message: impl Display) -> Failure {
    Failure::Usage(anyhow::anyhow!("{message}"))
}

/// "Could not decide", with `message`.
pub fn undecided(message: impl Display) -> Failure {
    Failure::Undecided(anyhow::anyhow!("{message}"))
}

impl Failure {
    pub fn exit(&self) -> Exit {
        match self {
            Failure::Usage(_) => Exit::Usage,
            Failure::Undecided(_) => Exit::Undecided,
        }
    }

    /// Says why on stderr.
    pub fn report(&self) {
        match self {
            Failure::Usage(e) => {
                warn(format_args!("auditor: usage error: {} (see `auditor --help`)", service::error_text(e.as_ref())))
            }
            Failure::Undecided(e) => {
                warn(format_args!("auditor: could not decide: {}", service::error_text(e.as_ref())))
            }
        }
    }
}

/// The library's own classification decides: [`AuditError::Usage`] anywhere in the chain is
/// the caller's mistake, anything else is "could not decide".
impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        let is_usage = e.chain().any(|c| matches!(c.downcast_ref::<AuditError>(), Some(AuditError::Usage(_))));
        if is_usage { Failure::Usage(e) } else { Failure::Undecided(e) }
    }
}

impl From<AuditError> for Failure {
    fn from(e: AuditError) -> Failure {
        anyhow::Error::from(e).into()
    }
}

/// A line on stderr. Never panics (`eprintln!` does when stderr is a closed pipe, as in
/// `auditor … 2>&1 | head -1`): a message nobody can read is dropped.
pub fn warn(message: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{}", super::output::printable(&message.to_string()));
}
