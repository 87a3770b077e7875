//! Live progress of the audits running now, kept in memory beside the durable progress in the
//! store: how many steps this attempt plans and has replayed, and since when. The status route
//! adds it to a running audit's answer as `progress` (steps, total, rate, ETA); it is gone when
//! the attempt ends, and after a restart until the next attempt begins.

use std::collections::BTreeMap;
use std::sync::Mutex;
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
}

/// Live progress by audit id.
#[derive(Debug, Default)]
pub struct Live {
    attempts: Mutex<BTreeMap<String, Attempt>>,
}

impl Live {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Attempt>) -> R) -> R {
        f(&mut self.attempts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// An attempt of `id` begins: `total` steps to replay, `resumed` already checked.
    pub fn begin(&self, id: &str, total: u64, resumed: u64) {
        self.with(|m| m.insert(id.to_string(), Attempt { total, done: 0, resumed, began: Instant::now() }));
    }

    /// One more step of `id` replayed.
    pub fn step(&self, id: &str) {
        self.with(|m| {
            if let Some(a) = m.get_mut(id) {
                a.done += 1;
            }
        });
    }

    /// The attempt of `id` ended, whatever its outcome.
    pub fn end(&self, id: &str) {
        self.with(|m| m.remove(id));
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
        for _ in 0..4 {
            live.step("audit-1");
        }
        live.step("audit-2"); // not running: ignored
        let s = live.snapshot("audit-1").unwrap();
        assert_eq!(s["steps_done"].as_u64(), Some(9));
        assert_eq!(s["percent"].as_f64(), Some(60.0));
        assert!(s["steps_per_second"].as_f64().unwrap() > 0.0 && s["eta_seconds"].is_u64(), "{s}");
        assert!(live.snapshot("audit-2").is_none());
        live.end("audit-1");
        assert!(live.snapshot("audit-1").is_none());
    }
}
