//! Everything the CLI prints on stdout goes through [`emit`], so that a reader that stops
//! early (`auditor … | head -1`) ends the output quietly instead of panicking in `println!`.
//!
//! Rust ignores `SIGPIPE`, so a write to a closed pipe fails with `BrokenPipe`. The answer has
//! been decided before anything is printed, so the process keeps the exit code of that answer
//! (not 141, the shell's "killed by SIGPIPE"): `auditor audit … | head -1` still tells the
//! shell (`PIPESTATUS`) whether the record is consistent.

use std::io::{ErrorKind, Write};
use std::path::Path;

use super::exit::{Failure, usage};

/// Writes `text` to stdout and flushes. A closed pipe is not an error (see the module
/// documentation); any other write error is: the answer could not be delivered.
pub fn emit(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Undecided(anyhow::Error::new(e).context("writing to stdout"))),
    }
}

/// Checks that `path`, given with `flag`, exists: a path that does not is a usage error naming
/// both. Other failures to look at it (permissions) are left to whoever reads it, which reports
/// them as "could not decide".
pub fn require_exists(flag: &str, path: &Path) -> Result<(), Failure> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Err(usage(format_args!("{flag} {}: no such file or directory", path.display())))
        }
        _ => Ok(()),
    }
}
