//! Whether this machine has the memory a run needs, checked before anything is allocated.
//!
//! The spec sizes a run exactly, but a spec within every limit can still need more memory than
//! the machine has: the state cap alone admits half a billion parameters. Allocating past the
//! machine aborts the process (the allocator cannot fail softly), which for the auditor daemon
//! would end every audit it is running, and a trainer's spec is the trainer's to choose. So the
//! trainer refuses such a run before it starts, and the auditor says it could not decide (its
//! own limit), before the dataset is loaded.
//!
//! The need is a floor, not a forecast: 20 bytes per state value (the FP32 state, its FP64
//! working copy and gradients; an MLP trained with SGD measured 27) and 16 per activation
//! value of a batch (its FP64 value and gradient), for each step held at once (the auditor's
//! replay threads each hold one), plus a dataset the spec makes (synthetic data: 4 bytes per
//! input value, 8 per class-centre value, 100 per example for labels and the commitment). A
//! run refused by it could not have run; one it lets through may still need more.

/// Bytes per value of the state that a step needs at the least.
const PER_STATE_VALUE: u64 = 20;
/// Bytes per activation value of a batch that a step needs at the least.
const PER_ACTIVATION_VALUE: u64 = 16;

/// The least memory a synthetic dataset of `examples` × `features` over `classes` takes.
pub fn synthetic_bytes(examples: u64, features: u64, classes: u64) -> u64 {
    examples
        .saturating_mul(features)
        .saturating_mul(4)
        .saturating_add(classes.saturating_mul(features).saturating_mul(8))
        .saturating_add(examples.saturating_mul(100))
}

/// The least memory a run needs with `steps` steps held at once (1 for the trainer, the
/// replay threads for the auditor).
pub fn run_bytes(sizes: &crate::spec::Sizes, steps: u64) -> u64 {
    sizes.data_memory_bytes.saturating_add(sizes.step_memory_bytes.saturating_mul(steps.max(1)))
}

/// Overrides the memory this machine has available, in bytes (for tests of the refusal).
pub const AVAILABLE_ENV: &str = "TIEBREAK_MEMORY_AVAILABLE";

/// The least memory a step needs, from the state's values and a batch's activation values.
pub fn step_bytes(state_values: u64, batch_activation_values: u64) -> u64 {
    state_values
        .saturating_mul(PER_STATE_VALUE)
        .saturating_add(batch_activation_values.saturating_mul(PER_ACTIVATION_VALUE))
}

/// The memory available to a new allocation now: [`AVAILABLE_ENV`] if set, else Linux's
/// `MemAvailable`; `None` where neither says (the run is then not refused).
pub fn available() -> Option<u64> {
    if let Some(v) = std::env::var_os(AVAILABLE_ENV) {
        return v.to_str().and_then(|s| s.trim().parse().ok());
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Refuses a run that needs more than `available` bytes (`needed`, from [`run_bytes`]).
pub fn check(needed: u64, available: Option<u64>) -> Result<(), String> {
    match available {
        Some(have) if needed > have => Err(format!(
            "this run needs at least {:.1} GiB of memory, and this machine has {:.1} GiB available \
             (the dataset the spec makes, and the model's state and a batch's activations for each step held \
             at once, from the spec)",
            gib(needed),
            gib(have)
        )),
        _ => Ok(()),
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_refused_only_past_what_is_available() {
        let need = step_bytes(1_000_000, 500_000);
        assert_eq!(need, 28_000_000);
        assert!(check(need, None).is_ok(), "nothing known: not refused");
        assert!(check(need, Some(need)).is_ok());
        let e = check(need, Some(need - 1)).unwrap_err();
        assert!(e.contains("needs at least 0.0 GiB") && e.contains("available"), "{e}");
        assert_eq!(step_bytes(u64::MAX, 1), u64::MAX, "saturates");
        // 262,144 examples of 1024 features: 1 GiB of inputs, whatever the model.
        assert!(synthetic_bytes(262_144, 1024, 2) >= 1 << 30);
        assert_eq!(synthetic_bytes(1, 1, 65_536), 4 + 8 * 65_536 + 100);
    }
}
