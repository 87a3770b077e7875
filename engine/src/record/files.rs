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
        ReadError::Io { op, source } => RecordError::Io { op, path: path.to_path_buf(), source },
    }
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
        let missing = read_regular(&dir.join("missing"), 100).unwrap_err();
        assert!(matches!(&missing, RecordError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
