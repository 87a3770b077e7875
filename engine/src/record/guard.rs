//! What keeps a record whole while it is written: one writer at a time, a resume that keeps
//! only a committed prefix that checks out, and a start killed before its first leaf that can
//! be started again.

use std::fs::{self, File};
use std::path::Path;

use common::leaf::Leaf;

use super::read::{read_batch_bytes, read_checkpoint_frame, read_init_weights, read_log_frame};
use super::{CHECKPOINTS_DIR, LEAVES_FILE, RecordError, STEPS_DIR, io};
use crate::spec::RunSpec;

/// Takes the record directory's lock for as long as the returned handle lives (the OS drops it
/// if the process dies): two trainers writing or resuming one record would interleave their
/// leaves and files and damage it for good.
pub(super) fn lock_dir(dir: &Path) -> Result<File, RecordError> {
    let handle = File::open(dir).map_err(super::io("open", dir))?;
    match handle.try_lock() {
        Ok(()) => Ok(handle),
        Err(fs::TryLockError::WouldBlock) => Err(RecordError::Refused(format!(
            "{} is being written by another trainer (its lock is held); wait for it, or write elsewhere",
            dir.display()
        ))),
        Err(fs::TryLockError::Error(e)) => Err(io("lock", dir)(e)),
    }
}

/// Whether a record directory of this spec holds no committed leaf yet: a start killed between
/// writing its spec and committing its initial state (an empty or missing `leaves.bin`, no step
/// files; perhaps a checkpoint of step 0 or its temporary file).
pub(super) fn no_leaf_committed(dir: &Path) -> bool {
    let leaves_empty = match fs::symlink_metadata(dir.join(LEAVES_FILE)) {
        Ok(m) => m.is_file() && m.len() == 0,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    let steps_empty = fs::read_dir(dir.join(STEPS_DIR)).is_ok_and(|mut d| d.next().is_none());
    let only_step_0 = fs::read_dir(dir.join(CHECKPOINTS_DIR)).is_ok_and(|d| {
        d.into_iter().all(|e| {
            e.is_ok_and(|e| {
                e.file_type().is_ok_and(|t| t.is_file())
                    && e.file_name().to_str().is_some_and(|n| n.starts_with("0000000000."))
            })
        })
    });
    leaves_empty && steps_empty && only_step_0
}

/// Clears what a start killed before its first leaf left ([`no_leaf_committed`]), so that the
/// run starts again from its spec.
pub(super) fn clear_no_leaf(dir: &Path) -> Result<(), RecordError> {
    let leaves = dir.join(LEAVES_FILE);
    if leaves.exists() {
        fs::remove_file(&leaves).map_err(io("remove", &leaves))?;
    }
    let checkpoints = dir.join(CHECKPOINTS_DIR);
    for e in fs::read_dir(&checkpoints).map_err(io("list", &checkpoints))? {
        let path = e.map_err(io("list", &checkpoints))?.path();
        fs::remove_file(&path).map_err(io("remove", &path))?;
    }
    Ok(())
}

/// Checks the committed prefix a resume keeps (steps `0..keep`) against its leaves: every log,
/// batch and checkpoint file there must be the committed one, and a fine-tune's starting
/// weights too. A resume signs a root over that prefix, so a file damaged since it was written
/// is refused here, naming it, rather than signed into a record no auditor would accept.
pub(super) fn check_kept_prefix(dir: &Path, spec: &RunSpec, leaves: &[Leaf], keep: u64) -> Result<(), RecordError> {
    let damaged = |e: RecordError| {
        RecordError::Refused(format!(
            "cannot resume: {e}. The committed prefix was damaged after it was written; train again into a new \
             directory (this one is left as it is)"
        ))
    };
    if let Some(c) = &spec.init_weights {
        read_init_weights(dir, c).map_err(damaged)?;
    }
    let state_bytes_max = super::read::state_bytes_max(spec, &dir.join(super::SPEC_FILE))?;
    let k = spec.config.train.checkpoint_interval.max(1);
    for (step, leaf) in leaves.iter().enumerate().take(keep as usize) {
        let step = step as u64;
        // The last kept step's checkpoint is the one the resume just verified and starts from.
        if step.is_multiple_of(k) && step + 1 < keep {
            read_checkpoint_frame(dir, step, (spec.state_hash(), leaf), state_bytes_max).map_err(damaged)?;
        }
        if step > 0 {
            read_log_frame(dir, step, leaf).map_err(damaged)?;
            read_batch_bytes(dir, step, leaf).map_err(damaged)?;
        }
    }
    Ok(())
}
