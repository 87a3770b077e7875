//! FP64 → FP32 rounding with tie-break logging (trainer side) and replay (auditor side).

/// An upper bound on how far any honest IEEE-754 FP64 implementation's result can be from the
/// value computed here, from the same inputs. Produced by every kernel next to its values.
#[derive(Debug, Clone, PartialEq)]
pub enum ErrorBound {
    /// The result is exact (or correctly rounded from exact inputs): every machine agrees.
    Exact,
    /// One bound valid for every element.
    Uniform(f64),
    /// One bound per row of `row_len` consecutive elements.
    PerRow { row_len: usize, bounds: Vec<f64> },
    /// One bound per element.
    PerElement(Vec<f64>),
}

impl ErrorBound {
    /// The bound that applies to element `i`.
    #[inline]
    pub fn at(&self, i: usize) -> f64 {
        match self {
            ErrorBound::Exact => 0.0,
            ErrorBound::Uniform(d) => *d,
            ErrorBound::PerRow { row_len, bounds } => bounds[i / row_len],
            ErrorBound::PerElement(bounds) => bounds[i],
        }
    }
}
