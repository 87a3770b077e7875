//! Reading one record file defensively: every read of a record file (spec, manifest, leaves,
//! logs, batches, checkpoints, the key) goes through [`read_regular`], which is
//! [`common::files::read_regular`] with its errors as record errors.
//!
//! A record may come from a hostile trainer, so a path may name a directory, a FIFO, a device,
//! a symlink loop or a huge file (see [`common::files`]). What is wrong with the trainer's files
//! is `Corrupt`; trouble of this machine's own (permissions, I/O errors) stays `Io`, and so does
//! a missing file (`NotFound`).

use std::path::Path;

use common::files::{self as f, ReadError};
pub(crate) use common::files::{is_present, is_regular};

use super::RecordError;

fn record_error(path: &Path) -> impl FnOnce(ReadError) -> RecordError + '_ {
    move |e| match e {
        ReadError::Unfit(what) => RecordError::Corrupt { path: path.to_path_buf(), offset: None, what },
        // A link the record itself holds (the file, or its `steps/` or `checkpoints/` folder;
        // not the record directory, which the auditor's user may have linked) chose where the
        // read went: a link to a file this machine cannot read (`/proc/self/mem`, a file the
        // auditor may not open) is the trainer's doing, not this machine's trouble. A link
        // to nothing stays a missing file; a link that reads is followed like any file.
        ReadError::Io { op, source } if source.kind() != std::io::ErrorKind::NotFound && through_a_link(path) => {
            let target = std::fs::read_link(path)
                .or_else(|_| std::fs::canonicalize(path))
                .map_or_else(|_| "?".into(), |t| t.display().to_string());
            RecordError::Corrupt {
                path: path.to_path_buf(),
                offset: None,
                what: format!("a symbolic link to {target}, which cannot be read ({op}: {source})"),
            }
        }
        ReadError::Io { op, source } => RecordError::Io { op, path: path.to_path_buf(), source },
    }
}

/// Whether `path`, or the record folder it is in (`steps/`, `checkpoints/`), is a symbolic link.
fn through_a_link(path: &Path) -> bool {
    let link = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
    let record_folder = |p: &&Path| p.file_name().is_some_and(|n| n == super::STEPS_DIR || n == super::CHECKPOINTS_DIR);
    link(path) || path.parent().filter(record_folder).is_some_and(link)
}

/// Reads the regular file at `path`, of at most `max` bytes (see the module docs).
pub(crate) fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, RecordError> {
    f::read_regular(path, max).map_err(record_error(path))
}

/// Size of the regular file at `path` (at most `max` bytes), without reading it.
pub(crate) fn regular_len(path: &Path, max: u64) -> Result<u64, RecordError> {
    f::regular_len(path, max).map_err(record_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::files::within_10s;

    #[test]
    fn the_trainers_files_are_corrupt_and_this_machines_trouble_is_io() {
        let dir = std::env::temp_dir().join(format!("tiebreak-files-{}-kinds", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"hello").unwrap();
        assert_eq!(read_regular(&file, 5).unwrap(), b"hello");
        assert!(
            matches!(read_regular(&file, 4), Err(RecordError::Corrupt { what, .. }) if what.contains("more than the 4"))
        );
        let zero = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let z = zero.clone();
        assert!(
            matches!(within_10s(move || read_regular(&z, 1 << 40)), Err(RecordError::Corrupt { path, .. }) if path == zero)
        );
        assert!(matches!(regular_len(&dir, 100), Err(RecordError::Corrupt { .. })), "a directory");
        // A link to a file whose reads fail is the record's fault; a dangling one is missing.
        let mem = dir.join("mem");
        std::os::unix::fs::symlink("/proc/self/mem", &mem).unwrap();
        assert!(
            matches!(read_regular(&mem, 100), Err(RecordError::Corrupt { what, .. }) if what.contains("symbolic link to /proc/self/mem"))
        );
        // A linked record directory is the auditor's user's doing: its trouble stays its own.
        let linked = dir.join("linked");
        std::os::unix::fs::symlink("/proc/self", &linked).unwrap();
        assert!(
            matches!(read_regular(&linked.join("mem"), 100), Err(RecordError::Io { .. })),
            "a file in a linked record directory (not steps/ or checkpoints/) is not the record's fault"
        );
        let steps = dir.join(super::super::STEPS_DIR);
        std::os::unix::fs::symlink("/proc/self", &steps).unwrap();
        assert!(matches!(read_regular(&steps.join("mem"), 100), Err(RecordError::Corrupt { .. })), "a linked steps/");
        let dangling = dir.join("dangling");
        std::os::unix::fs::symlink(dir.join("nothing"), &dangling).unwrap();
        assert!(
            matches!(read_regular(&dangling, 100), Err(RecordError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound)
        );
        let missing = read_regular(&dir.join("missing"), 100).unwrap_err();
        assert!(matches!(&missing, RecordError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
