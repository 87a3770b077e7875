//! Building the engine's run for a committed spec on the auditor's own profile: shared by the
//! replay and by adjudication, so neither depends on the other.

use std::path::Path;

use engine::EngineError;
use engine::data::Dataset;
use engine::spec::RunSpec;
use engine::train::Run;
use kernels::{Device, Profile};

use crate::AuditError;

/// Loads the dataset a spec names and builds a run on `device`; the data must match the
/// spec's commitment. Every failure here is the auditor's own (its copy of the data, its
/// device): the spec itself is checked before this is called.
///
/// `steps_at_once` is how many steps the caller holds at a time (its replay threads; 1 to
/// re-execute one step), for the memory check.
pub fn build_run(
    spec: &RunSpec,
    data: Option<&Path>,
    device: Profile,
    steps_at_once: usize,
) -> Result<Run, AuditError> {
    if let (Some(path), engine::spec::DataConfig::Synthetic(_)) = (data, &spec.config.data) {
        // The flag is the user's mistake (a usage error), not the auditor's trouble.
        return Err(AuditError::Usage(format!(
            "--data {}: this run's data is synthetic (generated from its seed), so no data file is read; drop --data",
            path.display()
        )));
    }
    // Before the dataset: a run this machine cannot hold would abort the process (and, in the
    // daemon, every audit it is running).
    let sizes = spec.config.sizes().map_err(|e| AuditError::Engine(EngineError::InvalidSpec(e.under("config."))))?;
    engine::memory::check(engine::memory::run_bytes(&sizes, steps_at_once as u64), engine::memory::available())
        .map_err(|e| match steps_at_once {
            1 => AuditError::Memory(e),
            n => AuditError::Memory(format!("{e}; with {n} replay threads (fewer need less: --threads)")),
        })?;
    let dataset = Dataset::for_config(&spec.config, data)?;
    let dev = Device::new(device).map_err(|e| AuditError::Usage(e.to_string()))?;
    Run::new(spec.clone(), dataset, dev).map_err(|e| match e {
        // Name the file: with several datasets at hand, which one did not match is the point.
        e @ EngineError::DatasetMismatch { .. } => AuditError::Data(match data {
            Some(path) => format!("{}: {e}", path.display()),
            None => e.to_string(),
        }),
        e => AuditError::Engine(e),
    })
}
