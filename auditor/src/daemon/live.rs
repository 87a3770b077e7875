//! Live progress of the audits running now, kept in memory beside the durable progress in the
//! store: how many steps this attempt plans and has replayed, and since when. The status route
//! adds it to a running audit's answer as `progress` (steps, total, rate, ETA); it is gone when
//! the attempt ends, and after a restart until the next attempt begins.
//!
//! Each replayed step's wall-clock time is kept too and, when the attempt ends, merged into
//! `<state_dir>/timings/<id>.json` (a resumed audit's attempts add up), which the report page
//! plots. Informational: not signed, not part of the report, written through a rename, and a
//! failure to write it only loses the plot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde_json::{Value, json};

/// One attempt's live counters.
#[derive(Debug, Clone)]
struct Attempt {
    /// Steps this attempt plans to replay (resumed ones not counted).
    total: u64,
    /// Steps replayed so far in this attempt.
    done: u64,
    /// Steps checked before this attempt began (durable progress it resumed from).
    resumed: u64,
    began: Instant,
    /// (step, seconds) of every step replayed in this attempt.
    times: Vec<(u64, f64)>,
}

/// The folder of the state directory holding step times.
pub const TIMINGS_DIR: &str = "timings";

/// At most this many step times are kept per audit (a longer audit keeps its first ones).
const TIMES_MAX: usize = 200_000;

/// Live progress by audit id.
#[derive(Debug, Default)]
pub struct Live {
    attempts: Mutex<BTreeMap<String, Attempt>>,
    /// Where finished attempts' step times go (`<state_dir>/timings`); unset in tests that
    /// need no files.
    dir: OnceLock<PathBuf>,
}

/// The step times stored for `id` under `dir`, by step.
fn stored(dir: &Path, id: &str) -> BTreeMap<u64, f64> {
    let text = std::fs::read_to_string(dir.join(format!("{id}.json"))).unwrap_or_default();
    let pairs: Vec<(u64, f64)> = serde_json::from_str(&text).unwrap_or_default();
    pairs.into_iter().filter(|(_, s)| s.is_finite() && *s >= 0.0).collect()
}

impl Live {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Attempt>) -> R) -> R {
        f(&mut self.attempts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Keeps finished attempts' step times under `dir` (once; later calls are ignored).
    pub fn keep_times_in(&self, dir: PathBuf) {
        let _ = self.dir.set(dir);
    }

    /// An attempt of `id` begins: `total` steps to replay, `resumed` already checked.
    pub fn begin(&self, id: &str, total: u64, resumed: u64) {
        let a = Attempt { total, done: 0, resumed, began: Instant::now(), times: Vec::new() };
        self.with(|m| m.insert(id.to_string(), a));
    }

    /// Step `step` of `id` was replayed in `seconds`.
    pub fn step(&self, id: &str, step: u64, seconds: f64) {
        self.with(|m| {
            if let Some(a) = m.get_mut(id) {
                a.done += 1;
                if a.times.len() < TIMES_MAX {
                    a.times.push((step, seconds));
                }
            }
        });
    }

    /// The attempt of `id` ended, whatever its outcome: its step times are merged into the
    /// stored ones.
    pub fn end(&self, id: &str) {
        let Some(a) = self.with(|m| m.remove(id)) else { return };
        let Some(dir) = self.dir.get() else { return };
        if a.times.is_empty() {
            return;
        }
        let mut all = stored(dir, id);
        for (step, s) in a.times {
            if all.len() < TIMES_MAX || all.contains_key(&step) {
                all.insert(step, s);
            }
        }
        let pairs: Vec<(u64, f64)> = all.into_iter().collect();
        let path = dir.join(format!("{id}.json"));
        let tmp = dir.join(format!("{id}.json.part"));
        // Only the folder itself, owner-only like the state directory: a state directory
        // deleted under the daemon is not made again here.
        let mut folder = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut folder, 0o700);
        let written = (if dir.is_dir() { Ok(()) } else { folder.create(dir) })
            .and_then(|()| std::fs::write(&tmp, serde_json::to_vec(&pairs).unwrap_or_default()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(audit = id, error = %e, "step times not kept (the report page will not plot them)");
        }
    }

    /// Every step time known for `id`: stored ones, then the running attempt's.
    pub fn step_times(&self, id: &str) -> Vec<(u64, f64)> {
        let mut all = self.dir.get().map(|d| stored(d, id)).unwrap_or_default();
        if let Some(a) = self.with(|m| m.get(id).cloned()) {
            all.extend(a.times);
        }
        all.into_iter().collect()
    }

    /// `{"steps_done", "steps_total", "percent", "steps_per_second", "eta_seconds"}` for a
    /// running attempt of `id` (steps counted over the whole audit, resumed ones included; the
    /// rate over this attempt; no ETA before the first step).
    pub fn snapshot(&self, id: &str) -> Option<Value> {
        let a = self.with(|m| m.get(id).cloned())?;
        let elapsed = a.began.elapsed().as_secs_f64();
        let rate = if a.done > 0 && elapsed > 0.0 { Some(a.done as f64 / elapsed) } else { None };
        let left = a.total.saturating_sub(a.done);
        let (done, total) = (a.resumed + a.done.min(a.total), a.resumed + a.total);
        let percent = if total == 0 { 100.0 } else { 100.0 * done as f64 / total as f64 };
        Some(json!({
            "steps_done": done,
            "steps_total": total,
            "percent": (percent * 10.0).round() / 10.0,
            "steps_per_second": rate.map(|r| (r * 100.0).round() / 100.0),
            "eta_seconds": rate.map(|r| (left as f64 / r).ceil() as u64),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_resumed_steps_and_ends_with_the_attempt() {
        let live = Live::default();
        assert!(live.snapshot("audit-1").is_none());
        live.begin("audit-1", 10, 5);
        let s = live.snapshot("audit-1").unwrap();
        assert_eq!((s["steps_done"].as_u64(), s["steps_total"].as_u64()), (Some(5), Some(15)));
        assert!(s["eta_seconds"].is_null(), "no rate before the first step: {s}");
        for s in 6..10 {
            live.step("audit-1", s, 0.01);
        }
        live.step("audit-2", 1, 0.01); // not running: ignored
        let s = live.snapshot("audit-1").unwrap();
        assert_eq!(s["steps_done"].as_u64(), Some(9));
        assert_eq!(s["percent"].as_f64(), Some(60.0));
        assert!(s["steps_per_second"].as_f64().unwrap() > 0.0 && s["eta_seconds"].is_u64(), "{s}");
        assert!(live.snapshot("audit-2").is_none());
        live.end("audit-1");
        assert!(live.snapshot("audit-1").is_none());
    }

    #[test]
    fn step_times_of_every_attempt_are_kept_on_disk() {
        let dir = std::env::temp_dir().join(format!("tb-live-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let live = Live::default();
        live.keep_times_in(dir.clone());
        live.begin("audit-3", 4, 0);
        live.step("audit-3", 1, 0.5);
        live.step("audit-3", 2, 0.25);
        assert_eq!(live.step_times("audit-3"), vec![(1, 0.5), (2, 0.25)], "the running attempt's, from memory");
        live.end("audit-3");
        // A second attempt (after a crash) replays step 2 again and goes on.
        let again = Live::default();
        again.keep_times_in(dir.clone());
        again.begin("audit-3", 3, 1);
        again.step("audit-3", 2, 0.125);
        again.step("audit-3", 3, 1.0);
        again.end("audit-3");
        assert_eq!(again.step_times("audit-3"), vec![(1, 0.5), (2, 0.125), (3, 1.0)]);
        assert!(again.step_times("audit-4").is_empty());
        std::fs::write(dir.join("audit-5.json"), "not json").unwrap();
        assert!(again.step_times("audit-5").is_empty(), "a damaged file loses only the plot");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
