//! Reading a whole file defensively: record files, and every file a user names (configs,
//! datasets, starting weights, keys, tokens, reports, evidence).
//!
//! A path may name a directory, a FIFO (opening it would block forever), a device (`/dev/zero`
//! reads without end), a symlink loop or a huge file, by mistake or because a hostile trainer
//! put it there. Only regular files (symlinks to regular files included) are read: the type and
//! size are checked with `stat` *before* opening, the file is opened non-blocking and checked
//! again through its handle (so a swap between the two cannot slip through), and the read stops
//! one byte past the limit.
//!
//! [`ReadError::Unfit`] is what is wrong with the file itself (its kind, its size, a path that
//! cannot be resolved); [`ReadError::Io`] is trouble of this machine's own (permissions, I/O
//! errors) and a missing file (`NotFound`). Which of them is whose fault is the caller's call.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::Read as _;
use std::path::Path;

/// Why a file could not be read. Its `Display` does not name the path: callers do.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Not a regular file, over the limit, or a path that cannot be resolved.
    #[error("{0}")]
    Unfit(String),
    /// The operation failed: missing, no permission, an I/O error.
    #[error("{op}: {source}")]
    Io { op: &'static str, source: std::io::Error },
}

impl ReadError {
    /// Whether nothing is at the path (or a symlink there dangles).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> ReadError {
    move |source| ReadError::Io { op, source }
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
/// symlink loop, a component that is not a directory).
fn is_unresolvable(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
        return true;
    }
    e.kind() == std::io::ErrorKind::NotADirectory
}

fn unresolvable(e: std::io::Error) -> ReadError {
    ReadError::Unfit(format!("not a regular file (the path cannot be resolved: {e})"))
}

/// `stat` of `path` (following symlinks), refusing anything but a regular file of at most
/// `max` bytes.
pub fn stat_regular(path: &Path, max: u64) -> Result<Metadata, ReadError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if is_unresolvable(&e) => return Err(unresolvable(e)),
        Err(e) => return Err(io("stat")(e)),
    };
    check_regular(&meta, max)?;
    Ok(meta)
}

fn check_regular(meta: &Metadata, max: u64) -> Result<(), ReadError> {
    if let Some(kind) = irregular_kind(meta) {
        return Err(ReadError::Unfit(format!("not a regular file ({kind})")));
    }
    if meta.len() > max {
        return Err(ReadError::Unfit(format!("{} bytes, more than the {max} allowed", meta.len())));
    }
    Ok(())
}

/// The regular file at `path`, opened for reading without blocking, with its metadata; any size.
fn open_regular(path: &Path) -> Result<(File, Metadata), ReadError> {
    stat_regular(path, u64::MAX)?;
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        // Should the file have become a FIFO since the stat, the open must not block.
        use std::os::unix::fs::OpenOptionsExt as _;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file: File =
        options.open(path).map_err(|e| if is_unresolvable(&e) { unresolvable(e) } else { io("open")(e) })?;
    let opened = file.metadata().map_err(io("stat"))?;
    check_regular(&opened, u64::MAX)?;
    Ok((file, opened))
}

/// Reads the regular file at `path`, of at most `max` bytes (see the module docs).
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let (file, meta) = open_regular(path)?;
    check_regular(&meta, max)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(io("read"))?;
    if bytes.len() as u64 > max {
        return Err(ReadError::Unfit(format!("grew past the {max} bytes allowed while being read")));
    }
    Ok(bytes)
}

/// The first `n` bytes of the regular file at `path` (all of it if it is shorter), whatever its
/// size: for a caller that judges an oversized file by its contents.
pub fn read_regular_prefix(path: &Path, n: u64) -> Result<Vec<u8>, ReadError> {
    let (file, meta) = open_regular(path)?;
    let mut bytes = Vec::with_capacity(meta.len().min(n) as usize);
    file.take(n).read_to_end(&mut bytes).map_err(io("read"))?;
    Ok(bytes)
}

/// [`read_regular`] as UTF-8 text.
pub fn read_regular_text(path: &Path, max: u64) -> Result<String, ReadError> {
    String::from_utf8(read_regular(path, max)?).map_err(|e| {
        ReadError::Unfit(format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()))
    })
}

/// Size of the regular file at `path` (at most `max` bytes), without reading it.
pub fn regular_len(path: &Path, max: u64) -> Result<u64, ReadError> {
    Ok(stat_regular(path, max)?.len())
}

/// Whether anything (a file, a directory, a link, even a dangling or looping one) is at `path`.
pub fn is_present(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Whether a regular file is at `path` (following symlinks).
pub fn is_regular(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Runs `f` on a helper thread and panics if it does not return within 10 s (a FIFO that
/// blocks an open must not hang a test suite). For tests.
pub fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10)).expect("read did not return within 10 s (blocked?)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tiebreak-common-files-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn what<T: std::fmt::Debug>(r: Result<T, ReadError>) -> String {
        match r {
            Err(ReadError::Unfit(what)) => what,
            other => panic!("expected Unfit, got {other:?}"),
        }
    }

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = scratch("kinds");
        let file = dir.join("file");
        fs::write(&file, b"hello").unwrap();
        assert_eq!(read_regular(&file, 5).unwrap(), b"hello");
        assert_eq!(read_regular_text(&file, 5).unwrap(), "hello");
        assert!(what(read_regular(&file, 4)).contains("more than the 4"));
        assert_eq!(read_regular_prefix(&file, 4).unwrap(), b"hell");
        assert_eq!(read_regular_prefix(&file, 9).unwrap(), b"hello");
        fs::write(dir.join("binary"), b"ab\xffc").unwrap();
        assert!(what(read_regular_text(&dir.join("binary"), 5)).contains("offset 2"));
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

        assert!(read_regular(&dir.join("missing"), 100).unwrap_err().is_not_found());
        let dangling = dir.join("dangling");
        std::os::unix::fs::symlink(dir.join("nothing"), &dangling).unwrap();
        assert!(read_regular(&dangling, 100).unwrap_err().is_not_found());
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
        let f = fifo.clone();
        assert!(what(within_10s(move || read_regular_text(&f, 100))).contains("a FIFO"));
        let f = fifo.clone();
        assert!(what(within_10s(move || read_regular_prefix(&f, 100))).contains("a FIFO"));
        assert!(what(within_10s(move || regular_len(&fifo, 100))).contains("a FIFO"));
        let _ = fs::remove_dir_all(&dir);
    }
}
