//! Reading one record file defensively: every read of a record file (spec, manifest, leaves,
//! logs, batches, checkpoints, the key) goes through [`read_regular`].
//!
//! A record may come from a hostile trainer, so a path may name a directory, a FIFO (opening it
//! would block forever), a device (`/dev/zero` reads without end), a symlink loop or a huge
//! file. Only regular files (symlinks to regular files included) are read: the type and size
//! are checked with `stat` *before* opening, the file is opened non-blocking and checked again
//! through its handle (so a swap between the two cannot slip through), and the read stops one
//! byte past the limit. What is wrong with the trainer's files is `Corrupt`; trouble of this
//! machine's own (permissions, I/O errors) stays `Io`, and so does a missing file (`NotFound`).

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::Read as _;
use std::path::Path;

use super::{RecordError, io};

fn corrupt(path: &Path, what: String) -> RecordError {
    RecordError::Corrupt { path: path.to_path_buf(), offset: None, what }
}

/// What kind of file `meta` describes, in words, when it is not a regular file.
fn irregular_kind(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        return None;
    }
    if t.is_dir() {
        return Some("a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if t.is_fifo() {
            return Some("a FIFO");
        }
        if t.is_socket() {
            return Some("a socket");
        }
        if t.is_char_device() {
            return Some("a character device");
        }
        if t.is_block_device() {
            return Some("a block device");
        }
    }
    Some("not a file")
}

/// Whether `e` says a path could not be resolved because of the file system's shape (a
/// symlink loop, a component that is not a directory): the record's fault, not this machine's.
fn is_unresolvable(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
        return true;
    }
    e.kind() == std::io::ErrorKind::NotADirectory
}

/// `stat` of `path` (following symlinks), refusing anything but a regular file of at most
/// `max` bytes.
fn stat_regular(path: &Path, max: u64) -> Result<Metadata, RecordError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if is_unresolvable(&e) => {
            return Err(corrupt(path, format!("not a regular file (the path cannot be resolved: {e})")));
        }
        Err(e) => return Err(io("stat", path)(e)),
    };
    check_regular(path, &meta, max)?;
    Ok(meta)
}

fn check_regular(path: &Path, meta: &Metadata, max: u64) -> Result<(), RecordError> {
    if let Some(kind) = irregular_kind(meta) {
        return Err(corrupt(path, format!("not a regular file ({kind})")));
    }
    if meta.len() > max {
        return Err(corrupt(path, format!("{} bytes, more than the {max} allowed", meta.len())));
    }
    Ok(())
}

/// Reads the regular file at `path`, of at most `max` bytes (see the module docs).
pub(crate) fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, RecordError> {
    let meta = stat_regular(path, max)?;
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        // Should the file have become a FIFO since the stat, the open must not block.
        use std::os::unix::fs::OpenOptionsExt as _;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file: File = options.open(path).map_err(|e| {
        if is_unresolvable(&e) {
            corrupt(path, format!("not a regular file (the path cannot be resolved: {e})"))
        } else {
            io("open", path)(e)
        }
    })?;
    let opened = file.metadata().map_err(io("stat", path))?;
    check_regular(path, &opened, max)?;
    let mut bytes = Vec::with_capacity(meta.len().min(opened.len()) as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(io("read", path))?;
    if bytes.len() as u64 > max {
        return Err(corrupt(path, format!("grew past the {max} bytes allowed while being read")));
    }
    Ok(bytes)
}

/// Size of the regular file at `path` (at most `max` bytes), without reading it.
pub(crate) fn regular_len(path: &Path, max: u64) -> Result<u64, RecordError> {
    Ok(stat_regular(path, max)?.len())
}

/// Whether anything (a file, a directory, a link, even a dangling or looping one) is at `path`:
/// what decides that a record has a manifest, so that an unreadable one is an error rather than
/// a record that looks unfinished.
pub(crate) fn is_present(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Whether a regular file is at `path` (following symlinks).
pub(crate) fn is_regular(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a helper thread and fails the test if it does not return within 10 s (a FIFO
    /// that blocks an open must not hang the test suite).
    pub(crate) fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("read did not return within 10 s (blocked?)")
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tiebreak-files-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn what(r: Result<Vec<u8>, RecordError>) -> String {
        match r {
            Err(RecordError::Corrupt { what, offset: None, .. }) => what,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = scratch("kinds");
        let file = dir.join("file");
        fs::write(&file, b"hello").unwrap();
        assert_eq!(read_regular(&file, 5).unwrap(), b"hello");
        assert!(what(read_regular(&file, 4)).contains("more than the 4"));
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_regular(&link, 5).unwrap(), b"hello", "a symlink to a regular file is fine");

        let sub = dir.join("sub");
        fs::create_dir(&sub).unwrap();
        assert!(what(read_regular(&sub, 100)).contains("a directory"));
        let zero = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(what(within_10s(move || read_regular(&zero, 1 << 40))).contains("character device"));
        let (a, b) = (dir.join("loop-a"), dir.join("loop-b"));
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        assert!(what(within_10s(move || read_regular(&a, 100))).contains("cannot be resolved"));
        let beneath = file.join("x");
        assert!(what(read_regular(&beneath, 100)).contains("cannot be resolved"), "a file used as a directory");

        let missing = read_regular(&dir.join("missing"), 100).unwrap_err();
        assert!(matches!(&missing, RecordError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound));
        let dangling = dir.join("dangling");
        std::os::unix::fs::symlink(dir.join("nothing"), &dangling).unwrap();
        assert!(
            matches!(read_regular(&dangling, 100), Err(RecordError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(is_present(&dangling) && !is_regular(&dangling));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(made.success());
        let f = fifo.clone();
        assert!(what(within_10s(move || read_regular(&f, 100))).contains("a FIFO"));
        assert!(matches!(within_10s(move || regular_len(&fifo, 100)), Err(RecordError::Corrupt { .. })));
        let _ = fs::remove_dir_all(&dir);
    }
}
