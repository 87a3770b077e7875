//! End-to-end tests live in tests/; benchmarks in benches/ (criterion micro-benchmarks) and in
//! the `bench` binary, whose measurements are in [`bench`].
#![forbid(unsafe_code)]

pub mod bench;
