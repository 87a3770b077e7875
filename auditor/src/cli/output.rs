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
    let text = printable(text);
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

/// Whether `path`, given with `flag`, may receive a file of `kind` (`engine::output`): checked
/// before any work, a refusal is a usage error naming both.
pub fn writable(flag: &str, path: Option<&Path>, kind: engine::output::OutputKind) -> Result<(), Failure> {
    match path {
        Some(path) => engine::output::check_output(path, kind)
            .map_err(|why| usage(format_args!("{flag} {}: {why}", path.display()))),
        None => Ok(()),
    }
}

/// `text` with every control character but newline and tab written as an escape (`\u{1b}`):
/// messages quote what a trainer or a daemon sent (a field name in a manifest, a daemon's
/// error), and a terminal must not run escape sequences from them. JSON output has none to
/// replace (serde escapes them).
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(
                |c| {
                    if c.is_control() && c != '\n' && c != '\t' {
                        c.escape_unicode().to_string()
                    } else {
                        c.to_string()
                    }
                },
            )
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_shown_not_sent_to_the_terminal() {
        assert_eq!(super::printable("a\tb\nc"), "a\tb\nc");
        assert_eq!(super::printable("x\u{1b}[2Jy\u{7}"), "x\\u{1b}[2Jy\\u{7}");
    }
}
