//! Learning-rate schedules, inside the verified path: the factor that multiplies the
//! optimizer's `lr` at step `t` is a function of the committed config and `t` only, computed
//! with `+ − × ÷` in a fixed order (correctly rounded on every IEEE-754 machine, and Rust never
//! contracts them into FMAs), so every profile gets the same bits without a rounding site. The
//! cosine is this module's own polynomial for the same reason: a platform's `cos` is not
//! guaranteed to be correctly rounded, so two machines' libraries may differ in the last bit.

use serde::{Deserialize, Serialize};

/// How the learning rate moves over the run (`[schedule]` in a config; absent = constant).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    /// `lr` at every step. (A struct variant without fields, not a unit one: serde checks
    /// `deny_unknown_fields` only on those, and a `warmup_steps` left under `kind = "constant"`
    /// must be an error, not ignored. The JSON is the same: `{"kind": "constant"}`.)
    Constant {},
    /// Linear warm-up from `lr / warmup_steps` at step 1 to `lr` at step `warmup_steps`, then
    /// constant.
    Warmup { warmup_steps: u64 },
    /// Linear warm-up as above, then cosine decay from `lr` to `min_ratio × lr` at the last step.
    Cosine {
        #[serde(default)]
        warmup_steps: u64,
        #[serde(default)]
        min_ratio: f64,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Constant {}
    }
}

impl Schedule {
    pub fn is_constant(&self) -> bool {
        *self == Schedule::Constant {}
    }

    /// Range checks; the message names the field under `schedule.`.
    pub fn validate(&self, n_steps: Option<u64>) -> Result<(), (&'static str, String)> {
        let warmup = match *self {
            Schedule::Constant {} => return Ok(()),
            Schedule::Warmup { warmup_steps } => {
                if warmup_steps == 0 {
                    return Err(("schedule.warmup_steps", "must be at least 1 for a warm-up schedule".into()));
                }
                warmup_steps
            }
            Schedule::Cosine { warmup_steps, min_ratio } => {
                if !(0.0..=1.0).contains(&min_ratio) {
                    return Err(("schedule.min_ratio", format!("must be in [0, 1], got {min_ratio}")));
                }
                warmup_steps
            }
        };
        match n_steps {
            Some(n) if warmup > n => {
                Err(("schedule.warmup_steps", format!("{warmup} is more than the run's {n} steps")))
            }
            _ => Ok(()),
        }
    }

    /// The factor on `lr` at step `step` (1-based) of a run of `n_steps` steps.
    pub fn factor(&self, step: u64, n_steps: u64) -> f64 {
        let (warmup, min_ratio) = match *self {
            Schedule::Constant {} => return 1.0,
            Schedule::Warmup { warmup_steps } => (warmup_steps, 1.0),
            Schedule::Cosine { warmup_steps, min_ratio } => (warmup_steps, min_ratio),
        };
        if step <= warmup {
            return step as f64 / warmup as f64;
        }
        if min_ratio == 1.0 {
            return 1.0;
        }
        let span = n_steps.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + cos_pi(progress))
    }
}

/// `cos(π·x)` for `x` in `[0, 1]`, from basic operations only: `cos(π·x) = −cos(π·(1 − x))`
/// folds `x` into `[0, ½]`, where a Taylor series of `cos(y)`, `y = π·x ≤ π/2`, to `y²⁰` has a
/// truncation error below `(π/2)²²/22! < 1e-16`.
fn cos_pi(x: f64) -> f64 {
    let (x, sign) = if x > 0.5 { (1.0 - x, -1.0) } else { (x, 1.0) };
    let y = std::f64::consts::PI * x;
    let y2 = y * y;
    // Horner over 1 − y²/2! + y⁴/4! − … + y²⁰/20!, innermost term first.
    let mut sum = 0.0f64;
    for k in (0..=10u32).rev() {
        let n = 2 * k;
        let fact: f64 = (1..=n).map(f64::from).product();
        let coeff = if k % 2 == 0 { 1.0 / fact } else { -1.0 / fact };
        sum = sum * y2 + coeff;
    }
    sign * sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_schedule_takes_no_fields_and_serialises_as_before() {
        let c: Schedule = serde_json::from_str(r#"{"kind":"constant"}"#).unwrap();
        assert!(c.is_constant());
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"kind":"constant"}"#);
        let e = serde_json::from_str::<Schedule>(r#"{"kind":"constant","warmup_steps":100}"#).unwrap_err();
        assert!(e.to_string().contains("warmup_steps"), "{e}");
    }

    #[test]
    fn the_cosine_is_accurate_and_the_schedules_have_their_shape() {
        for i in 0..=1000 {
            let x = i as f64 / 1000.0;
            let err = (cos_pi(x) - (std::f64::consts::PI * x).cos()).abs();
            assert!(err < 4e-16, "cos(π·{x}): off by {err:e}");
        }
        assert_eq!(Schedule::Constant {}.factor(7, 10), 1.0);
        let w = Schedule::Warmup { warmup_steps: 4 };
        assert_eq!([1, 2, 4, 5, 9].map(|t| w.factor(t, 9)), [0.25, 0.5, 1.0, 1.0, 1.0]);
        let c = Schedule::Cosine { warmup_steps: 2, min_ratio: 0.1 };
        assert_eq!(c.factor(1, 12), 0.5);
        assert_eq!(c.factor(2, 12), 1.0);
        assert!((c.factor(7, 12) - 0.55).abs() < 1e-15, "half-way is the mean of lr and min");
        assert!((c.factor(12, 12) - 0.1).abs() < 1e-15, "the last step reaches min_ratio");
        let f: Vec<f64> = (2..=12).map(|t| c.factor(t, 12)).collect();
        assert!(f.windows(2).all(|p| p[1] < p[0]), "decays monotonically: {f:?}");
        assert!(c.validate(Some(12)).is_ok());
        assert!(Schedule::Cosine { warmup_steps: 13, min_ratio: 0.0 }.validate(Some(12)).is_err());
        assert!(Schedule::Cosine { warmup_steps: 0, min_ratio: 1.5 }.validate(None).is_err());
        assert!(Schedule::Warmup { warmup_steps: 0 }.validate(None).is_err());
    }
}
