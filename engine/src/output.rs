//! Files the tools write where the user says: a report, an evidence bundle, exported weights,
//! a plot.
//!
//! A mistyped output path must not cost anything already stored. [`check_output`] runs before
//! any work (an audit can take hours, and its result must not then fail on a path), follows
//! links, and refuses:
//! - a path inside a record directory: the write would damage the record, and an audit of it
//!   would then blame its trainer for the auditor's own flag;
//! - a directory, a socket or a block device, or a link to nothing;
//! - a file there already that is not of the kind being written (a signing key, a config, a
//!   dataset): replacing an earlier report with a new one is what the flag is for; replacing
//!   anything else is not;
//! - a directory that does not exist.
//!
//! A FIFO or character device (`/dev/stdout`, a pipe) is a stream, written into as it is. A
//! file is written by [`write_output`] through a temporary file beside it and a rename, so a
//! full disk or a crash leaves the old file (or none), never a partial one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::record::{LEAVES_FILE, SPEC_FILE, STEPS_DIR};

/// What a tool writes, for the check on what is already at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A JSON document (a signed report).
    Json,
    /// An SVG image.
    Svg,
    /// A safetensors file.
    Safetensors,
    /// A binary file that starts with these bytes (an evidence bundle's magic).
    Magic(&'static [u8]),
}

impl OutputKind {
    fn name(self) -> &'static str {
        match self {
            OutputKind::Json => "a JSON document",
            OutputKind::Svg => "an SVG image",
            OutputKind::Safetensors => "a safetensors file",
            OutputKind::Magic(_) => "a file of this kind",
        }
    }

    /// Whether a file starting with `head` (up to 16 bytes; the whole file if shorter) is
    /// one of this kind. An empty file is anyone's.
    fn is_kind(self, head: &[u8]) -> bool {
        let text = String::from_utf8_lossy(head);
        let text = text.trim_start_matches('\u{feff}').trim_start();
        head.is_empty()
            || match self {
                OutputKind::Json => text.starts_with('{'),
                OutputKind::Svg => text.starts_with('<'),
                OutputKind::Safetensors => head.len() > 8 && head[8] == b'{',
                OutputKind::Magic(m) => head.starts_with(m),
            }
    }
}

/// The record directory `dir` is or lies in, if any: a directory holding a run spec and its
/// leaves or steps.
pub fn record_holding(dir: &Path) -> Option<PathBuf> {
    let dir = dir.canonicalize().ok()?;
    dir.ancestors()
        .find(|a| a.join(SPEC_FILE).is_file() && (a.join(LEAVES_FILE).is_file() || a.join(STEPS_DIR).is_dir()))
        .map(Path::to_path_buf)
}

/// Where an output goes once links are followed.
enum Target {
    /// A regular file (or none yet) at this path, links resolved: written beside and renamed.
    File(PathBuf),
    /// A FIFO or character device (`/dev/stdout`, a pipe, `/dev/null`): written straight into.
    Stream,
}

/// Follows `path` to what a write would reach.
fn target(path: &Path) -> Result<Target, String> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err("a directory".into()),
        Ok(m) if m.file_type().is_fifo() || m.file_type().is_char_device() => Ok(Target::Stream),
        Ok(m) if !m.is_file() => Err("not a regular file (a socket or a block device)".into()),
        // A link to a regular file is written through: the file it names is replaced, not the link.
        Ok(_) => path.canonicalize().map(Target::File).map_err(|e| format!("cannot be resolved: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(path).is_ok() {
                Err("a symbolic link to nothing".into())
            } else {
                Ok(Target::File(path.to_path_buf()))
            }
        }
        Err(e) => Err(format!("cannot be examined: {e}")),
    }
}

/// Whether `path` may receive a file of `kind`; the error says why not, without the path
/// (callers name the flag and the path). A stream (a pipe, `/dev/stdout`) takes any kind but
/// safetensors, which is a file others load by path.
pub fn check_output(path: &Path, kind: OutputKind) -> Result<(), String> {
    if path.file_name().is_none() {
        return Err("not a file name".into());
    }
    let file = match target(path)? {
        Target::Stream if kind == OutputKind::Safetensors => {
            return Err("not a regular file (a device or FIFO); export writes a file".into());
        }
        Target::Stream => return Ok(()),
        Target::File(file) => file,
    };
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(format!("the directory {} does not exist", parent.display()));
    }
    if let Some(record) = record_holding(parent) {
        return Err(format!(
            "inside the record {}, which writing there would damage; write it elsewhere",
            record.display()
        ));
    }
    if std::fs::symlink_metadata(&file).is_err() {
        return Ok(());
    }
    let head = common::files::read_regular_prefix(&file, 16)
        .map_err(|e| format!("there is a file there that cannot be read: {e}"))?;
    if kind.is_kind(&head) {
        Ok(())
    } else {
        Err(format!(
            "there is a file there that is not {} (a key, a config, data?); it is left as it is: name another \
             path or remove it",
            kind.name()
        ))
    }
}

/// Refuses a secret key file inside a record directory: a record is shipped and published, and
/// its key would go with it.
pub fn check_key_path(path: &Path) -> Result<(), String> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match record_holding(parent) {
        Some(record) => Err(format!(
            "inside the record {}, which is shipped and published; keep the signing key outside it",
            record.display()
        )),
        None => Ok(()),
    }
}

/// Writes `bytes` to `path`: into a stream as it is, and otherwise through a temporary file
/// beside the file it names (links followed), synced, and a rename; the temporary file goes
/// whatever fails.
pub fn write_output(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let file = match target(path).map_err(std::io::Error::other)? {
        Target::Stream => return std::fs::OpenOptions::new().write(true).open(path)?.write_all(bytes),
        Target::File(file) => file,
    };
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", std::process::id()));
    let tmp = file.with_file_name(name);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, &file));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tiebreak-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_mistyped_output_path_replaces_nothing_of_another_kind() {
        let d = scratch("kinds");
        std::fs::write(d.join("old.json"), "{\"old\": 1}\n").unwrap();
        std::fs::write(d.join("trainer.key"), "9f3c...\n").unwrap();
        std::fs::write(d.join("empty"), "").unwrap();
        assert_eq!(check_output(&d.join("new.json"), OutputKind::Json), Ok(()));
        assert_eq!(check_output(&d.join("old.json"), OutputKind::Json), Ok(()), "a report replaces a report");
        assert_eq!(check_output(&d.join("empty"), OutputKind::Svg), Ok(()));
        for (name, kind) in [("trainer.key", OutputKind::Json), ("old.json", OutputKind::Safetensors)] {
            let e = check_output(&d.join(name), kind).unwrap_err();
            assert!(e.contains("left as it is"), "{name}: {e}");
        }
        assert!(check_output(&d.join("old.json"), OutputKind::Magic(b"TBEV")).is_err());
        assert!(check_output(&d, OutputKind::Json).unwrap_err().contains("directory"));
        assert!(check_output(&d.join("nowhere/r.json"), OutputKind::Json).unwrap_err().contains("does not exist"));
        // Links are followed: to a report, written through; to a key, refused; to nothing, refused.
        std::os::unix::fs::symlink(d.join("old.json"), d.join("link.json")).unwrap();
        std::os::unix::fs::symlink(d.join("trainer.key"), d.join("key-link.json")).unwrap();
        std::os::unix::fs::symlink(d.join("gone"), d.join("dangling.json")).unwrap();
        assert_eq!(check_output(&d.join("link.json"), OutputKind::Json), Ok(()));
        assert!(check_output(&d.join("key-link.json"), OutputKind::Json).unwrap_err().contains("left as it is"));
        assert!(check_output(&d.join("dangling.json"), OutputKind::Json).unwrap_err().contains("to nothing"));
        write_output(&d.join("link.json"), b"{\"new\": 1}").unwrap();
        assert!(std::fs::symlink_metadata(d.join("link.json")).unwrap().file_type().is_symlink(), "the link stays");
        assert_eq!(std::fs::read(d.join("old.json")).unwrap(), b"{\"new\": 1}");
        // A stream takes a report as it is, not an export.
        assert_eq!(check_output(Path::new("/dev/null"), OutputKind::Json), Ok(()));
        write_output(Path::new("/dev/null"), b"{}").unwrap();
        assert!(check_output(Path::new("/dev/null"), OutputKind::Safetensors).is_err());
    }

    #[test]
    fn nothing_is_written_inside_a_record() {
        let d0 = scratch("record-key");
        std::fs::create_dir_all(d0.join("run/steps")).unwrap();
        std::fs::write(d0.join("run").join(SPEC_FILE), "{}").unwrap();
        assert!(check_key_path(&d0.join("run/auditor.key")).unwrap_err().contains("keep the signing key outside"));
        assert_eq!(check_key_path(&d0.join("auditor.key")), Ok(()));
        let d = scratch("record");
        let rec = d.join("run");
        std::fs::create_dir_all(rec.join("steps")).unwrap();
        std::fs::write(rec.join(SPEC_FILE), "{}").unwrap();
        for inside in [rec.join("spec.json"), rec.join("report.json"), rec.join("steps/x.json")] {
            let e = check_output(&inside, OutputKind::Json).unwrap_err();
            assert!(e.contains("inside the record"), "{}: {e}", inside.display());
        }
        assert_eq!(check_output(&d.join("report.json"), OutputKind::Json), Ok(()), "beside the record is fine");
        assert_eq!(check_output(&rec.join("../report.json"), OutputKind::Json), Ok(()));
    }

    #[test]
    fn a_write_replaces_the_file_whole() {
        let d = scratch("write");
        let p = d.join("r.json");
        write_output(&p, b"{\"a\": 1}").unwrap();
        write_output(&p, b"{\"b\": 2}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"b\": 2}");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "no temporary file is left");
        assert!(write_output(&d.join("no/such/dir"), b"x").is_err());
    }
}
