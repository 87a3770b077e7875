//! The process's `tracing` subscriber, and the one-line rule of text logs.
//!
//! Log messages quote what a peer sent: a trainer's field names in a finding, a client's
//! `trainer_url`, a path. In a text log a newline in such a value would start a line the peer
//! wrote, one a reader or a log shipper takes for the daemon's own, and an escape sequence
//! would run in the terminal that tails it. So text logs write every control character inside
//! an event as an escape (`\n` → `\u{a}`), and an event is one line whatever it quotes. JSON
//! logs need nothing: serde escapes them.

use std::io::{self, Write};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("log format {s:?}: one of text, json")),
        }
    }
}

/// Installs the process's `tracing` subscriber: stderr, `info` and up unless `RUST_LOG` says
/// otherwise. Text logs are one line per event (see the module) and so have no colours: their
/// escape sequences would be escaped too. A second call (tests start several services in one
/// process) changes nothing.
pub fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).with_writer(|| OneLine(io::stderr())).try_init(),
        LogFormat::Json => builder.with_writer(io::stderr).json().flatten_event(true).try_init(),
    };
}

/// A writer that passes each formatted event on with every control character but a final
/// newline (and tabs) escaped, and the Unicode line and paragraph separators too. `tracing`'s
/// formatter hands it one whole event per write.
struct OneLine<W>(W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(one_line(buf).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// `event` as one line: its text (lossily, should it not be UTF-8) with every control
/// character escaped but tabs and one final newline.
fn one_line(event: &[u8]) -> String {
    let text = String::from_utf8_lossy(event);
    let (body, end) = match text.strip_suffix('\n') {
        Some(body) => (body, "\n"),
        None => (&*text, ""),
    };
    let mut out = String::with_capacity(text.len() + 1);
    for c in body.chars() {
        if (c.is_control() && c != '\t') || c == '\u{2028}' || c == '\u{2029}' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out.push_str(end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_newline_does_not_start_a_line() {
        let forged = "finding: tensor \"w\n2026-12-02T00:00:00Z  INFO audit 7 consistent\" differs\n";
        let line = one_line(forged.as_bytes());
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.ends_with("differs\n"));
        assert!(line.contains("\"w\\u{a}2026"), "{line}");
        assert_eq!(one_line("x\u{1b}[2J\r\u{85}\u{2028}\ty".as_bytes()), "x\\u{1b}[2J\\u{d}\\u{85}\\u{2028}\ty");
        assert_eq!(one_line(b"plain\n"), "plain\n");
    }

    #[test]
    fn the_writer_passes_each_event_on_escaped() {
        let mut sink = OneLine(Vec::new());
        sink.write_all(b"a\nb\n").unwrap();
        sink.write_all(b"c\n").unwrap();
        assert_eq!(String::from_utf8(sink.0).unwrap(), "a\\u{a}b\nc\n");
    }
}
